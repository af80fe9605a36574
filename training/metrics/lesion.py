"""Lesion-wise detection metrics: GT lesions hit, false-positive components, sensitivity by size and count group.

Conventions (see ``../shared/spec/ild-method.md``, "Metrics"):

* Lesions (ground truth and predicted) are connected components with 26-connectivity
  (:data:`pipeline.lesions.STRUCTURE_26`: faces, edges or corners touch).
* A GT lesion is hit when at least one of its voxels is predicted positive.
* A predicted component is a false positive when it overlaps no GT voxel. FP counts are reported with no size
  limit (``n_fp``) and counting only components of volume >= ``fp_min_volume_mm3`` (10 mm^3 by default, ``n_fp_10``).
* Volume = voxel count x voxel volume (mm^3), the voxel volume being the product of ``spacing_mm``.
* Lesion sensitivity = GT lesions hit / GT lesions (optionally only those >= ``min_volume_mm3``), NaN when there
  is no such GT lesion.

Arrays are numpy (slice, row, column); ``spacing_mm`` is the voxel size in the same order.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from pipeline.lesions import STRUCTURE_26
from training.metrics.voxel import as_bool

__all__ = [
    "COUNT_GROUPS",
    "DEFAULT_SIZE_BINS_MM3",
    "FP_MIN_VOLUME_MM3",
    "LESION_5MM_VOLUME_MM3",
    "LesionDetection",
    "SizeBin",
    "count_group",
    "label_lesions",
    "lesion_detection",
    "lesion_sensitivity",
    "sensitivity_by_size",
    "validate_spacing",
    "voxel_volume_mm3",
]

FP_MIN_VOLUME_MM3 = 10.0
"""The spec's size limit for the "FP >= 10 mm^3" figures."""

LESION_5MM_VOLUME_MM3 = 65.0
"""Volume standing for "lesions >= 5 mm": a sphere of 5 mm diameter is pi/6 x 125 = 65.4 mm^3."""

DEFAULT_SIZE_BINS_MM3: tuple[float, ...] = (0.0, 10.0, LESION_5MM_VOLUME_MM3, 500.0, math.inf)
"""Default GT-volume bin edges (mm^3) of :func:`sensitivity_by_size`; bins are half-open [low, high)."""

COUNT_GROUPS: tuple[str, ...] = ("1-3", "4-10", ">10")
"""Subgroups by number of metastases (study 1 stratification); a patient with none is group "0"."""


def validate_spacing(spacing_mm: Sequence[float], ndim: int = 3) -> tuple[float, ...]:
    """``spacing_mm`` as ``ndim`` finite positive floats, else ``ValueError``."""
    try:
        spacing = tuple(float(s) for s in spacing_mm)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"spacing_mm must be {ndim} numbers, got {spacing_mm!r}") from exc
    if len(spacing) != ndim or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing_mm must be {ndim} finite positive numbers (mm), got {spacing_mm!r}")
    return spacing


def voxel_volume_mm3(spacing_mm: Sequence[float]) -> float:
    """Voxel volume (mm^3) of a (slice, row, column) spacing."""
    # Multiply in SimpleITK's (x, y, z) order, as pipeline.lesions does, so both give bit-identical volumes and
    # agree on which lesions reach a volume limit.
    return float(np.prod(tuple(spacing_mm)[::-1]))


def label_lesions(mask: npt.ArrayLike) -> tuple[np.ndarray, int]:
    """26-connected components of a 3D bool/0-1 mask: (int32 labels 0..n, n), in scipy's raster order."""
    m = as_bool("mask", mask)
    if m.ndim != 3:
        raise ValueError(f"mask must be 3D (slice, row, column), got shape {m.shape}")
    labels, n = ndimage.label(m, structure=STRUCTURE_26)
    return labels, int(n)


@dataclass(frozen=True)
class SizeBin:
    """GT lesions with volume in [low_mm3, high_mm3) and how many of them were hit."""

    low_mm3: float
    high_mm3: float
    n_true: int
    n_hit: int

    @property
    def sensitivity(self) -> float:
        """n_hit / n_true, NaN for an empty bin."""
        return float("nan") if self.n_true == 0 else self.n_hit / self.n_true


@dataclass(frozen=True, eq=False)
class LesionDetection:
    """Lesion-wise comparison of one predicted mask with the truth (arrays are read-only).

    ``true_volumes_mm3`` / ``true_hit`` have one entry per GT lesion, ``pred_volumes_mm3`` / ``pred_is_fp`` one per
    predicted component, both in scipy's label (raster) order.
    """

    voxel_volume_mm3: float
    true_volumes_mm3: np.ndarray
    true_hit: np.ndarray
    pred_volumes_mm3: np.ndarray
    pred_is_fp: np.ndarray
    fp_min_volume_mm3: float = FP_MIN_VOLUME_MM3

    @property
    def n_true(self) -> int:
        return int(self.true_volumes_mm3.size)

    @property
    def n_hit(self) -> int:
        return int(np.count_nonzero(self.true_hit))

    @property
    def n_pred(self) -> int:
        return int(self.pred_volumes_mm3.size)

    @property
    def fp_volumes_mm3(self) -> np.ndarray:
        return self.pred_volumes_mm3[self.pred_is_fp]

    @property
    def n_fp(self) -> int:
        """False-positive components, any size."""
        return int(np.count_nonzero(self.pred_is_fp))

    @property
    def n_fp_10(self) -> int:
        """False-positive components with volume >= ``fp_min_volume_mm3`` (10 mm^3 by default)."""
        return int(np.count_nonzero(self.fp_volumes_mm3 >= self.fp_min_volume_mm3))

    def counts(self, min_volume_mm3: float = 0.0) -> tuple[int, int]:
        """(GT lesions hit, GT lesions) among GT lesions with volume >= ``min_volume_mm3``."""
        keep = self.true_volumes_mm3 >= min_volume_mm3
        return int(np.count_nonzero(self.true_hit & keep)), int(np.count_nonzero(keep))

    def sensitivity(self, min_volume_mm3: float = 0.0) -> float:
        """GT lesions hit / GT lesions, counting GT lesions >= ``min_volume_mm3``; NaN when there are none."""
        hit, total = self.counts(min_volume_mm3)
        return float("nan") if total == 0 else hit / total


def _readonly(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


def lesion_detection(
    pred: npt.ArrayLike,
    truth: npt.ArrayLike,
    spacing_mm: Sequence[float],
    *,
    fp_min_volume_mm3: float = FP_MIN_VOLUME_MM3,
) -> LesionDetection:
    """Compare the 26-connected components of ``pred`` and ``truth`` (3D, same shape, bool or 0/1)."""
    p = as_bool("pred", pred)
    t = as_bool("truth", truth)
    if p.shape != t.shape:
        raise ValueError(f"pred {p.shape} and truth {t.shape} must have the same shape")
    voxel_mm3 = voxel_volume_mm3(validate_spacing(spacing_mm))
    true_labels, n_true = label_lesions(t)
    pred_labels, n_pred = label_lesions(p)
    true_voxels = np.bincount(true_labels.ravel(), minlength=n_true + 1)[1:]
    pred_voxels = np.bincount(pred_labels.ravel(), minlength=n_pred + 1)[1:]
    true_hit = np.bincount(true_labels[p], minlength=n_true + 1)[1:] > 0
    pred_overlaps = np.bincount(pred_labels[t], minlength=n_pred + 1)[1:] > 0
    return LesionDetection(
        voxel_volume_mm3=voxel_mm3,
        true_volumes_mm3=_readonly(true_voxels.astype(np.float64) * voxel_mm3),
        true_hit=_readonly(true_hit),
        pred_volumes_mm3=_readonly(pred_voxels.astype(np.float64) * voxel_mm3),
        pred_is_fp=_readonly(~pred_overlaps),
        fp_min_volume_mm3=float(fp_min_volume_mm3),
    )


def lesion_sensitivity(
    pred: npt.ArrayLike, truth: npt.ArrayLike, spacing_mm: Sequence[float], min_volume_mm3: float = 0.0
) -> float:
    """GT lesions hit / GT lesions with volume >= ``min_volume_mm3`` (e.g. 65 for ">= 5 mm"); NaN if none."""
    return lesion_detection(pred, truth, spacing_mm).sensitivity(min_volume_mm3)


def sensitivity_by_size(
    detection: LesionDetection, bins_mm3: Sequence[float] = DEFAULT_SIZE_BINS_MM3
) -> tuple[SizeBin, ...]:
    """Hits per GT-volume bin; ``bins_mm3`` are increasing edges, bin i = [edge i, edge i+1).

    GT lesions outside [first edge, last edge) are in no bin (end with ``inf`` to keep the largest).
    """
    edges = [float(e) for e in bins_mm3]
    increasing = all(a < b for a, b in itertools.pairwise(edges))  # False for NaN edges too
    if len(edges) < 2 or not increasing:
        raise ValueError(f"bins_mm3 must be at least 2 strictly increasing edges, got {bins_mm3!r}")
    volumes = detection.true_volumes_mm3
    out = []
    for low, high in itertools.pairwise(edges):
        inside = (volumes >= low) & (volumes < high)
        n_hit = int(np.count_nonzero(inside & detection.true_hit))
        out.append(SizeBin(low, high, int(np.count_nonzero(inside)), n_hit))
    return tuple(out)


def count_group(n_lesions: int) -> str:
    """Subgroup by number of GT metastases: "0", "1-3", "4-10" or ">10"."""
    n = int(n_lesions)
    if n < 0 or n != n_lesions:
        raise ValueError(f"n_lesions must be a non-negative integer, got {n_lesions!r}")
    if n == 0:
        return "0"
    if n <= 3:
        return "1-3"
    if n <= 10:
        return "4-10"
    return ">10"
