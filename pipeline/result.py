"""What one study's run produced (:class:`StudyResult`) and its ``summary.json`` content.

Apart from :mod:`pipeline.study` (which makes it) and :mod:`pipeline.outputs` (which writes it), so that the
writers (:mod:`pipeline.overview` among them) import the type without importing the orchestrator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import SimpleITK as sitk
from pydicom.dataset import Dataset

from pipeline.checkpoint import CheckpointMeta
from pipeline.inference import InferenceResult
from pipeline.lesions import LesionResult
from pipeline.model import combination_key
from pipeline.registration import ROLES, RegistrationResult

__all__ = ["SUMMARY_VERSION", "RoleInput", "StudyResult"]

#: Version of the ``summary.json`` layout (``docs/segment.md``).
SUMMARY_VERSION = 1


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
    # The optional Secondary Capture series (summary, then one key image per lesion); empty when switched off
    secondary_capture: list[Dataset] = field(default_factory=list)

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
                "sc_series_instance_uid": (str(self.secondary_capture[0].SeriesInstanceUID)
                                           if self.secondary_capture else None),
                "sc_instances": len(self.secondary_capture),
            },
            "warnings": list(self.warnings),
            "timings_s": {k: round(v, 3) for k, v in self.timings_s.items()},
        }


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
