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
6. ``dicom``       - DICOM SEG (only when there is at least one lesion) and TID 1500 SR (always); with
                     ``StudySettings.secondary_capture`` also the Secondary Capture key images
                     (:func:`pipeline.dicom_out.sc.write_sc`: a summary, then one per lesion).

:func:`pipeline.outputs.write_outputs` then writes ``seg.dcm`` (when lesions), ``sr.dcm``, ``summary.json`` and
``overview.png`` (stage ``outputs``). ``pipeline`` never imports ``dicom_node``: the caller picks the series
(``role -> files``).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from os import PathLike

import pydicom
from pydicom.uid import generate_uid

from pipeline.checkpoint import CheckpointMeta
from pipeline.dicom_out import AlgorithmInfo, ordered_sources, write_sc, write_seg, write_sr
from pipeline.inference import ProgressCallback, run_inference
from pipeline.io import LoadedSeries, load_series
from pipeline.lesions import find_lesions
from pipeline.model import ILDDeepLabV3
from pipeline.overview import overview_rgb
from pipeline.preprocess import prepare_study
from pipeline.registration import ROLES, RegistrationSettings, choose_reference, register_study
from pipeline.result import RoleInput, StudyResult

__all__ = ["StudyError", "StudySettings", "algorithm_info", "check_one_study", "run_study"]

log = logging.getLogger(__name__)

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
    # Also a Secondary Capture series with the outlines burned in (viewers without SEG support; off by default)
    secondary_capture: bool = False


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
    result = StudyResult(
        study_instance_uid=study_uid, reference_role=reference_role, roles=roles, meta=meta,
        model_architecture=cfg.to_dict(), inference=inference, lesions=lesions, seg=seg, sr=sr,
        reference_image=images[reference_role], timings_s=timings, warnings=warnings,
        software_version=settings.software_version,
    )
    if settings.secondary_capture:
        t = time.perf_counter()
        result.secondary_capture = write_sc(sources, images[reference_role], lesions, algorithm,
                                            summary=overview_rgb(result))
        timings["dicom"] += time.perf_counter() - t
    return result
