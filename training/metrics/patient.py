"""Per-patient evaluation of a probability map, and mean +/- SD summaries over patients.

Which voxels each metric uses (see ``../shared/spec/ild-method.md``, "Metrics"):

* ``auc``, ``sensitivity`` and ``specificity`` use the voxels inside ``brain_mask`` (all voxels when it is None),
  as the papers compute AUC in the brain mask. ``sensitivity``/``specificity`` are at the given operating
  threshold (the model's Youden threshold, chosen on the validation set), not at a per-patient optimum.
* ``dice``, ``iou``, ``precision``, ``recall``, ``fpr`` and the lesion metrics use the whole volume thresholded
  at ``prob >= threshold`` (compared in ``prob``'s own precision, as :func:`pipeline.lesions.find_lesions`).
* Undefined values are NaN (e.g. AUC of a patient without lesion voxels in the brain, precision with nothing
  predicted) and are left out of the means; each summary reports ``n``, the number of patients it averages.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from training.metrics.lesion import (
    COUNT_GROUPS,
    FP_MIN_VOLUME_MM3,
    LESION_5MM_VOLUME_MM3,
    count_group,
    lesion_detection,
    validate_spacing,
)
from training.metrics.voxel import as_bool, confusion, roc_auc

__all__ = ["SUMMARY_FIELDS", "PatientMetrics", "evaluate_patient", "summarise"]


@dataclass(frozen=True)
class PatientMetrics:
    """Metrics of one patient. Rates are fractions in [0, 1] (NaN when undefined); counts are integers."""

    case_id: str
    auc: float  # voxel-wise ROC AUC inside the brain mask
    threshold: float  # operating threshold used for everything below (prob >= threshold)
    sensitivity: float  # voxel-wise, inside the brain mask
    specificity: float  # voxel-wise, inside the brain mask
    dice: float  # whole volume; 1.0 when prediction and truth are both empty
    iou: float
    precision: float
    recall: float
    fpr: float  # FP voxels / negative voxels, whole volume
    lesion_sensitivity: float  # GT lesions hit / GT lesions (26-connected)
    lesion_sensitivity_ge_65mm3: float  # same, GT lesions >= 65 mm^3 ("lesions >= 5 mm")
    n_lesions: int  # GT lesions
    n_hit: int
    n_lesions_ge_65mm3: int
    n_hit_ge_65mm3: int
    n_pred: int  # predicted components
    fp: int  # predicted components overlapping no GT voxel, any size
    fp_10: int  # those with volume >= 10 mm^3
    count_group: str  # "0", "1-3", "4-10" or ">10" GT lesions

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


SUMMARY_FIELDS: tuple[str, ...] = (
    "auc", "sensitivity", "specificity", "dice", "iou", "precision", "recall", "fpr",
    "lesion_sensitivity", "lesion_sensitivity_ge_65mm3", "n_lesions", "fp", "fp_10",
)
"""The :class:`PatientMetrics` fields that :func:`summarise` reports as mean +/- SD."""


def evaluate_patient(
    prob: npt.ArrayLike,
    truth: npt.ArrayLike,
    brain_mask: npt.ArrayLike | None,
    spacing_mm: Sequence[float],
    threshold: float,
    case_id: str = "",
) -> PatientMetrics:
    """All per-patient metrics of probability map ``prob`` against ``truth`` at ``threshold``.

    ``prob`` (real, finite), ``truth`` and ``brain_mask`` (bool or 0/1) are 3D numpy (slice, row, column) arrays
    of one shape; ``spacing_mm`` is the voxel size (mm) in that order. Raises ``ValueError`` on invalid input.
    """
    p = np.asarray(prob)
    if p.ndim != 3:
        raise ValueError(f"prob must be 3D (slice, row, column), got shape {p.shape}")
    if not (np.issubdtype(p.dtype, np.floating) or np.issubdtype(p.dtype, np.integer)):
        raise ValueError(f"prob must be real numbers, got dtype {p.dtype}")
    if not np.all(np.isfinite(p)):
        raise ValueError("prob must be finite (no NaN or inf)")
    t = as_bool("truth", truth)
    if t.shape != p.shape:
        raise ValueError(f"truth {t.shape} must have the shape of prob {p.shape}")
    brain = None
    if brain_mask is not None:
        brain = as_bool("brain_mask", brain_mask)
        if brain.shape != p.shape:
            raise ValueError(f"brain_mask {brain.shape} must have the shape of prob {p.shape}")
        if not brain.any():
            raise ValueError("brain_mask is empty")
    spacing = validate_spacing(spacing_mm)
    threshold = float(threshold)
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}")

    # Compare in the map's own precision: a float32 map holding 0.76 is at the threshold 0.76.
    limit = np.asarray(threshold, dtype=p.dtype) if np.issubdtype(p.dtype, np.floating) else threshold
    pred = p >= limit
    if brain is None:
        auc = roc_auc(p, t)
    else:
        auc = roc_auc(p[brain], t[brain])
    in_brain = confusion(pred, t, brain)
    whole = confusion(pred, t)
    det = lesion_detection(pred, t, spacing, fp_min_volume_mm3=FP_MIN_VOLUME_MM3)
    hit_65, n_65 = det.counts(LESION_5MM_VOLUME_MM3)
    return PatientMetrics(
        case_id=str(case_id),
        auc=auc,
        threshold=threshold,
        sensitivity=in_brain.sensitivity,
        specificity=in_brain.specificity,
        dice=whole.dice,
        iou=whole.iou,
        precision=whole.precision,
        recall=whole.recall,
        fpr=whole.fpr,
        lesion_sensitivity=det.sensitivity(),
        lesion_sensitivity_ge_65mm3=det.sensitivity(LESION_5MM_VOLUME_MM3),
        n_lesions=det.n_true,
        n_hit=det.n_hit,
        n_lesions_ge_65mm3=n_65,
        n_hit_ge_65mm3=hit_65,
        n_pred=det.n_pred,
        fp=det.n_fp,
        fp_10=det.n_fp_10,
        count_group=count_group(det.n_true),
    )


def _stats(values: Sequence[float]) -> dict[str, Any]:
    """{"mean", "sd", "n"}: NaN-skipping mean and sample SD (ddof=1; NaN below 2 values), n = values used."""
    a = np.asarray(values, dtype=np.float64)
    a = a[~np.isnan(a)]
    n = int(a.size)
    mean = float(a.mean()) if n else float("nan")
    sd = float(a.std(ddof=1)) if n >= 2 else float("nan")
    return {"mean": mean, "sd": sd, "n": n}


def _summary(patients: Sequence[PatientMetrics]) -> dict[str, Any]:
    out: dict[str, Any] = {name: _stats([getattr(p, name) for p in patients]) for name in SUMMARY_FIELDS}
    n_lesions = sum(p.n_lesions for p in patients)
    n_65 = sum(p.n_lesions_ge_65mm3 for p in patients)
    out["n_patients"] = len(patients)
    out["pooled_lesion_sensitivity"] = sum(p.n_hit for p in patients) / n_lesions if n_lesions else float("nan")
    out["pooled_lesion_sensitivity_ge_65mm3"] = (
        sum(p.n_hit_ge_65mm3 for p in patients) / n_65 if n_65 else float("nan")
    )
    out["fp_per_patient"] = out["fp"]["mean"]
    out["fp_10_per_patient"] = out["fp_10"]["mean"]
    return out


def summarise(patients: Sequence[PatientMetrics]) -> dict[str, Any]:
    """Mean +/- SD over patients, overall and per lesion-count group.

    Keys: each of :data:`SUMMARY_FIELDS` -> ``{"mean", "sd", "n"}`` (NaN skipped, sample SD with ddof=1, NaN
    for fewer than 2 values; ``n`` = patients with a defined value); ``n_patients``; ``pooled_lesion_sensitivity``
    (all hits / all GT lesions) and ``pooled_lesion_sensitivity_ge_65mm3`` (NaN with no such lesion);
    ``fp_per_patient`` / ``fp_10_per_patient`` (mean FP components per patient, any size / >= 10 mm^3); and
    ``groups``: ``{"1-3", "4-10", ">10"}`` -> the same keys (without ``groups``) over that group's patients.
    Patients with no GT lesion (group "0") count in the overall summary only.
    """
    patients = list(patients)
    out = _summary(patients)
    out["groups"] = {g: _summary([p for p in patients if p.count_group == g]) for g in COUNT_GROUPS}
    return out
