"""Operating points over whole patients: a threshold sweep of lesion-wise and per-patient figures, and the
lesion-wise FROC rule that picks the node's threshold from it.

The method's Youden rule works on pooled voxels, where ~1000 background voxels stand against each lesion voxel:
J = sensitivity + specificity - 1 gains more from the last few lesion voxels than it loses on thousands of
false ones, so a soft model's Youden point sits near zero and floods studies with false lesions. The rule here
works on what a reader sees instead: lesions (26-connected components, :func:`training.metrics.lesion_detection`)
and false-positive components per patient.

:func:`lesion_froc_point`: among the swept thresholds whose false positives (components >= 10 mm^3 touching no
true lesion) stay within :data:`FROC_MAX_FP_PER_PATIENT` per patient, the one of highest pooled lesion sensitivity;
ties go to the best mean per-patient Dice, then to the largest threshold.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from training.metrics.lesion import lesion_detection
from training.metrics.voxel import confusion

__all__ = ["FROC_MAX_FP_PER_PATIENT", "SWEEP_THRESHOLDS", "OperatingPoint", "lesion_froc_point", "sweep"]

FROC_MAX_FP_PER_PATIENT = 0.5
"""The false-positive budget of the FROC rule: components >= 10 mm^3 per patient (issue #17's target)."""

SWEEP_THRESHOLDS: tuple[float, ...] = tuple(
    float(1.0 / (1.0 + math.exp(-x))) for x in np.linspace(math.log(1e-4 / (1 - 1e-4)), math.log(0.95 / 0.05), 49))
"""Thresholds of :func:`sweep`: 49 points evenly spaced in logit from 1e-4 to 0.95 (~30 % apart at the low end,
where a soft model's useful thresholds lie)."""


@dataclass(frozen=True)
class OperatingPoint:
    """Figures of ``prob >= threshold`` over a set of patients.

    ``dice``: mean per-patient Dice (whole volume); ``lesion_sensitivity``: GT lesions hit / GT lesions, pooled
    (NaN with no GT lesion); ``fp_10_per_patient``: mean FP components >= 10 mm^3 per patient."""

    threshold: float
    dice: float
    lesion_sensitivity: float
    fp_10_per_patient: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sweep(patients: Sequence[tuple[npt.ArrayLike, npt.ArrayLike, Sequence[float]]],
          thresholds: Sequence[float] = SWEEP_THRESHOLDS) -> list[OperatingPoint]:
    """One :class:`OperatingPoint` per threshold over ``patients``: (probability map, truth mask, spacing mm) each,
    3D (slice, row, column), compared in the map's own precision as :func:`training.metrics.evaluate_patient`."""
    if not patients:
        raise ValueError("sweep needs at least one patient")
    maps = [_crop(np.asarray(p), np.asarray(t) > 0, min(thresholds)) + (s,) for p, t, s in patients]
    out = []
    for threshold in thresholds:
        dice, hits, n_true, fp_10 = [], 0, 0, 0
        for prob, truth, spacing in maps:
            pred = prob >= np.asarray(threshold, dtype=prob.dtype)
            dice.append(confusion(pred, truth).dice)
            det = lesion_detection(pred, truth, spacing)
            hits += det.n_hit
            n_true += det.n_true
            fp_10 += det.n_fp_10
        out.append(OperatingPoint(threshold=float(threshold), dice=float(np.mean(dice)),
                                  lesion_sensitivity=hits / n_true if n_true else float("nan"),
                                  fp_10_per_patient=fp_10 / len(maps)))
    return out


def _crop(prob: np.ndarray, truth: np.ndarray, lowest: float) -> tuple[np.ndarray, np.ndarray]:
    """``prob`` and ``truth`` cut to the box of every voxel that is true or reaches ``lowest``: outside it every
    voxel is negative at every threshold of the sweep, so Dice and components are unchanged (and ~3x cheaper)."""
    keep = truth | (prob >= np.asarray(lowest, dtype=prob.dtype))
    if not keep.any():
        return prob, truth
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(keep))
    return prob[box], truth[box]


def lesion_froc_point(points: Sequence[OperatingPoint],
                      max_fp_per_patient: float = FROC_MAX_FP_PER_PATIENT) -> OperatingPoint:
    """The FROC rule (module doc): highest lesion sensitivity with ``fp_10_per_patient <= max_fp_per_patient``,
    ties to the best Dice, then the largest threshold. When no point meets the budget, those with the fewest false
    positives compete instead."""
    if not points:
        raise ValueError("lesion_froc_point needs at least one operating point")
    allowed = [p for p in points if p.fp_10_per_patient <= max_fp_per_patient]
    if not allowed:
        fewest = min(p.fp_10_per_patient for p in points)
        allowed = [p for p in points if p.fp_10_per_patient == fewest]

    def key(p: OperatingPoint) -> tuple[float, float, float]:
        sens = -1.0 if math.isnan(p.lesion_sensitivity) else p.lesion_sensitivity
        return sens, p.dice, p.threshold

    return max(allowed, key=key)
