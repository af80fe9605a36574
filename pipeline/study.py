"""The whole pipeline for one study, stage by stage, with a wall time per stage.

Stages (keys of ``StudyResult.timings_s``):

1. ``load``        - every chosen series read into a float32 LPS volume (:func:`pipeline.io.load_series`); the
                     series must share one StudyInstanceUID and one PatientID (:class:`StudyError` otherwise;
                     the message names UIDs only, never patient data).
2. ``register``    - rigid MI registration of every series to the reference (post-Gd T1: BRAVO, else CUBE post,
                     :func:`pipeline.registration.choose_reference`); a fallback to scanner coordinates becomes
                     a warning.
3. ``preprocess``  - model grid (the checkpoint's ``in_plane_size`` / ``through_plane_mm``), resampling,
                     per-slice normalisation (:func:`pipeline.preprocess.prepare_study`).
4. ``inference``   - batched 2.5D inference, probability back on the reference grid (:mod:`pipeline.inference`).
5. ``lesions``     - threshold (the checkpoint's) + 26-connected components (:func:`pipeline.lesions.find_lesions`).
6. ``dicom``       - DICOM SEG (only when there is at least one lesion) and TID 1500 SR (always).

:meth:`StudyResult.write` then writes ``seg.dcm`` (when lesions), ``sr.dcm``, ``summary.json`` and
``overview.png`` (stage ``outputs``). ``pipeline`` never imports ``dicom_node``: the caller picks the series
(``role -> files``).
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from pipeline.checkpoint import CheckpointMeta
from pipeline.dicom_out import AlgorithmInfo, ordered_sources, write_seg, write_sr
from pipeline.inference import InferenceResult, ProgressCallback, run_inference
from pipeline.io import LoadedSeries, load_series
from pipeline.lesions import LesionResult, find_lesions
from pipeline.model import ILDDeepLabV3, combination_key
from pipeline.preprocess import prepare_study
from pipeline.registration import (
    ROLES,
    RegistrationResult,
    RegistrationSettings,
    choose_reference,
    register_study,
)

__all__ = ["SUMMARY_VERSION", "RoleInput", "StudyError", "StudyResult", "StudySettings", "check_one_study",
           "run_study"]

log = logging.getLogger(__name__)

#: Version of the ``summary.json`` layout (``docs/segment.md``).
SUMMARY_VERSION = 1

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class StudyError(ValueError):
    """The series given cannot be processed as one study (no series, several studies or patients)."""


@dataclass(frozen=True)
class StudySettings:
    batch_size: int = 8
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int | None = None  # torch CPU threads (None: os.cpu_count())
    registration: RegistrationSettings = field(default_factory=RegistrationSettings)
    manufacturer: str = "ILD DICOM node (open source, research use only)"
    software_version: str = "unknown"  # the node's version, written to summary.json and the SEG/SR SoftwareVersions
    institution_name: str | None = None


@dataclass(frozen=True)
class RoleInput:
    """One role of the study as used: its series and its registration to the reference."""

    role: str
    series_instance_uid: str
    n_slices: int
    registration: RegistrationResult


@dataclass
class StudyResult:
    study_instance_uid: str
    reference_role: str
    roles: dict[str, RoleInput]  # present roles, in ROLES order
    meta: CheckpointMeta
    model_architecture: dict[str, Any]
    inference: InferenceResult
    lesions: LesionResult
    seg: Dataset | None  # None when there is no lesion
    sr: Dataset
    reference_image: sitk.Image
    timings_s: dict[str, float]
    warnings: list[str] = field(default_factory=list)
    software_version: str = "unknown"

    @property
    def roles_present(self) -> tuple[str, ...]:
        return tuple(self.roles)

    def expected_performance(self) -> dict[str, Any] | None:
        """The model's validation figures (AUC, Dice, lesion sensitivity; from its checkpoint) for the role
        combination this study gave it, or None when the checkpoint has none for it."""
        key = combination_key(self.inference.roles_used)
        figures = self.meta.validation.get(key)
        if figures is None:
            return None
        return {"roles": key, **{k: round(float(v), 4) for k, v in figures.items()},
                "source": "the model's validation set (checkpoint metadata), not this study"}

    def summary(self) -> dict[str, Any]:
        """The ``summary.json`` content (see ``docs/segment.md``): UIDs and numbers only, no patient data."""
        return {
            "summary_version": SUMMARY_VERSION,
            "software_version": self.software_version,
            "study_instance_uid": self.study_instance_uid,
            "reference_role": self.reference_role,
            "reference_series_instance_uid": self.roles[self.reference_role].series_instance_uid,
            "roles": {
                role: {
                    "series_instance_uid": ri.series_instance_uid,
                    "n_slices": ri.n_slices,
                    "used_by_model": role in self.inference.roles_used,
                    "registration": _registration_dict(ri.registration, role == self.reference_role),
                }
                for role, ri in self.roles.items()
            },
            "roles_missing": [r for r in ROLES if r not in self.roles],
            "model": {
                "name": self.meta.model_name,
                "version": self.meta.model_version,
                "training_run_uid": self.meta.training_run_uid,
                "architecture": self.model_architecture,
                "in_plane_size": self.meta.in_plane_size,
                "through_plane_mm": self.meta.through_plane_mm,
            },
            "threshold": self.lesions.threshold,
            "threshold_rule": self.meta.threshold_rule,
            "expected_performance": self.expected_performance(),
            "inference": {
                "device": self.inference.device, "threads": self.inference.threads,
                "batch_size": self.inference.batch_size, "n_batches": self.inference.n_batches,
                "model_grid_size": list(self.inference.grid.GetSize()),
                "model_grid_spacing_mm": [round(v, 4) for v in self.inference.grid.GetSpacing()],
            },
            "lesion_count": self.lesions.count_all,
            "lesion_count_ge_10mm3": self.lesions.count_ge_10mm3,
            "total_volume_mm3": round(self.lesions.total_volume_mm3, 3),
            "lesions": [
                {
                    "number": les.number,
                    "volume_mm3": round(les.volume_mm3, 3),
                    "voxel_count": les.voxel_count,
                    "centroid_lps_mm": [round(v, 2) for v in les.centroid_lps_mm],
                    "max_diameter_mm": round(les.max_diameter_mm, 2),
                    "mean_probability": round(les.mean_probability, 4),
                    "max_probability": round(les.max_probability, 4),
                }
                for les in self.lesions.lesions
            ],
            "outputs": {
                "seg_series_instance_uid": str(self.seg.SeriesInstanceUID) if self.seg is not None else None,
                "sr_series_instance_uid": str(self.sr.SeriesInstanceUID),
            },
            "warnings": list(self.warnings),
            "timings_s": {k: round(v, 3) for k, v in self.timings_s.items()},
        }

    def write(self, out_dir: str | PathLike[str], *, overview: bool = True) -> dict[str, Path]:
        """Write ``seg.dcm`` (only with lesions), ``sr.dcm``, ``overview.png`` and ``summary.json`` (last, so
        that its ``timings_s`` includes ``outputs``). Returns name -> path of what was written."""
        t0 = time.perf_counter()
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        written: dict[str, Path] = {}
        stale = out / "seg.dcm"
        if self.seg is not None:
            self.seg.save_as(stale, enforce_file_format=True)
            written["seg"] = stale
        elif stale.exists():
            stale.unlink()  # a previous run's SEG must not survive next to a count-0 SR
        self.sr.save_as(out / "sr.dcm", enforce_file_format=True)
        written["sr"] = out / "sr.dcm"
        if overview:
            from pipeline.overview import write_overview

            written["overview"] = write_overview(self, out / "overview.png")
        self.timings_s["outputs"] = time.perf_counter() - t0
        self.timings_s["total"] = sum(v for k, v in self.timings_s.items() if k != "total")
        path = out / "summary.json"
        path.write_text(json.dumps(self.summary(), indent=2) + "\n", encoding="utf-8")
        written["summary"] = path
        return written


def _registration_dict(r: RegistrationResult, is_reference: bool) -> dict[str, Any]:
    def num(v: float) -> float | None:
        return None if v is None or not math.isfinite(v) else round(float(v), 5)

    return {
        "is_reference": is_reference,
        "metric": "mattes_mutual_information (negative; lower is better)",
        "metric_initial": num(r.metric_initial),
        "metric_final": num(r.metric_final),
        "rotation_deg": round(r.rotation_magnitude_deg, 3),
        "translation_mm": round(r.translation_magnitude_mm, 3),
        "fell_back": r.fell_back,
        "warning": r.warning,
        "seconds": round(r.seconds, 3),
    }


def _device_uid(meta: CheckpointMeta) -> str:
    run = meta.training_run_uid
    if _UID.match(run) and len(run) <= 64:
        return run
    return str(generate_uid(entropy_srcs=[run]))  # deterministic per training run


def algorithm_info(meta: CheckpointMeta, settings: StudySettings) -> AlgorithmInfo:
    """Who made the SEG/SR: the checkpoint's name and version; the device UID is its training-run UID."""
    return AlgorithmInfo(
        name=meta.model_name, version=meta.model_version, manufacturer=settings.manufacturer,
        device_uid=_device_uid(meta), institution_name=settings.institution_name,
        software=f"dicom-node {settings.software_version}",
        parameters={"threshold": f"{meta.threshold:g}", "training_run_uid": meta.training_run_uid},
    )


def check_one_study(loaded: Mapping[str, LoadedSeries]) -> str:
    """The StudyInstanceUID shared by all ``loaded`` series; :class:`StudyError` for several studies or
    PatientIDs (the message names UIDs, never the IDs)."""
    studies = sorted({s.study_instance_uid for s in loaded.values()})
    if len(studies) != 1:
        raise StudyError(f"the chosen series belong to {len(studies)} studies ({', '.join(studies)}); "
                         "give the series of one study")
    patients = {str(s.header.get("PatientID", "") or "") for s in loaded.values()}
    if len(patients) > 1:
        uids = ", ".join(f"{r}={s.series_instance_uid}" for r, s in loaded.items())
        raise StudyError(f"study {studies[0]}: the chosen series have different PatientIDs (series {uids}); "
                         "refusing to combine them")
    return studies[0]


def run_study(
    series_files: Mapping[str, Sequence[str | PathLike[str]]], model: ILDDeepLabV3, meta: CheckpointMeta, *,
    settings: StudySettings = StudySettings(), progress: ProgressCallback | None = None,
) -> StudyResult:
    """Run every stage on the series ``role -> files`` (roles from :data:`pipeline.registration.ROLES`)."""
    unknown = sorted(set(series_files) - set(ROLES))
    if unknown:
        raise StudyError(f"unknown role(s) {unknown}; expected some of {list(ROLES)}")
    files = {r: list(series_files[r]) for r in ROLES if series_files.get(r)}
    if not files:
        raise StudyError("no usable series: none of the roles has a series")
    usable = [r for r in files if r in model.config.roles]
    if not usable:
        raise StudyError(f"none of the series present ({list(files)}) is an input of the model "
                         f"({list(model.config.roles)})")
    timings: dict[str, float] = {}
    warnings: list[str] = []

    t = time.perf_counter()
    loaded = {r: load_series(p) for r, p in files.items()}
    study_uid = check_one_study(loaded)
    timings["load"] = time.perf_counter() - t

    t = time.perf_counter()
    images = {r: s.image for r, s in loaded.items()}
    reference_role = choose_reference(images)
    regs = register_study(images, reference_role=reference_role, settings=settings.registration)
    for r in regs.values():
        if r.warning:
            warnings.append(r.warning)
            log.warning("study %s: %s", study_uid, r.warning)
    timings["register"] = time.perf_counter() - t

    t = time.perf_counter()
    cfg = model.config
    prepared = prepare_study(
        images, {r: x.transform for r, x in regs.items()}, reference_role, roles=cfg.roles,
        size=meta.in_plane_size, through_plane_mm=meta.through_plane_mm, slices_per_role=cfg.slices_per_role)
    timings["preprocess"] = time.perf_counter() - t

    t = time.perf_counter()
    try:
        inference = run_inference(model, prepared, images[reference_role], batch_size=settings.batch_size,
                                  device=settings.device, threads=settings.threads, progress=progress)
    except ValueError as exc:  # a baseline model missing one of its roles
        raise StudyError(str(exc)) from None
    timings["inference"] = time.perf_counter() - t
    del prepared

    t = time.perf_counter()
    lesions = find_lesions(inference.probability, meta.threshold)
    timings["lesions"] = time.perf_counter() - t

    t = time.perf_counter()
    algorithm = algorithm_info(meta, settings)
    # SEG and SR need the source headers only; the pixels were decoded once, by the load stage.
    sources = ordered_sources([pydicom.dcmread(p, stop_before_pixels=True) for p in files[reference_role]])
    seg = write_seg(sources, lesions.labels, lesions.lesions, algorithm) if lesions.lesions else None
    sr = write_sr(sources, lesions, algorithm, seg=seg, roles_present=list(inference.roles_used))
    timings["dicom"] = time.perf_counter() - t

    roles = {r: RoleInput(role=r, series_instance_uid=s.series_instance_uid, n_slices=int(s.image.GetSize()[2]),
                          registration=regs[r]) for r, s in loaded.items()}
    ignored = [r for r in roles if r not in cfg.roles]
    if ignored:
        warnings.append(f"series for role(s) {ignored} not used: the model does not take them")
    return StudyResult(
        study_instance_uid=study_uid, reference_role=reference_role, roles=roles, meta=meta,
        model_architecture=cfg.to_dict(), inference=inference, lesions=lesions, seg=seg, sr=sr,
        reference_image=images[reference_role], timings_s=timings, warnings=warnings,
        software_version=settings.software_version,
    )
