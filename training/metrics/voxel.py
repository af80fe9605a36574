"""Voxel-wise metrics: exact ROC curve and AUC, the Youden threshold, and confusion-count ratios.

Conventions (see ``../shared/spec/ild-method.md``, "Threshold" and "Metrics"):

* A voxel is predicted positive when ``score >= threshold`` (as :func:`pipeline.lesions.find_lesions`).
* :func:`roc_curve` returns one point per distinct score plus the start point (0, 0) at threshold ``+inf``, exactly
  as ``sklearn.metrics.roc_curve(..., drop_intermediate=False)`` (tied scores move together, giving a diagonal
  segment); :func:`roc_auc` is the trapezoid area under that curve, equal to ``roc_auc_score`` with ties.
* With only one class present the curve's undefined rate is NaN, and :func:`roc_auc` returns NaN (scikit-learn
  raises instead); :func:`youden_threshold` raises ``ValueError`` because no threshold can be chosen.
* Empty denominators give NaN so that per-patient means (``np.nanmean``) skip them, except Dice and IoU, which are
  1.0 when prediction and truth are both empty (a perfect empty segmentation).

Scores may be any real dtype; float32 probability maps are used as they are (no float64 copy), and thresholds
come back as Python/NumPy float64 holding the score's exact value, so ``score >= threshold`` reproduces the curve.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["VoxelCounts", "as_bool", "confusion", "roc_auc", "roc_curve", "youden_threshold"]


def as_bool(name: str, array: npt.ArrayLike) -> np.ndarray:
    """``array`` as a bool array; bool, or numbers that are all 0 or 1 (else ``ValueError`` naming ``name``)."""
    a = np.asarray(array)
    if a.dtype == bool:
        return a
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise ValueError(f"{name} must be a bool or 0/1 numeric array, got dtype {a.dtype}")
    # A probability map passed where a mask is expected must fail, not be silently binarised at > 0.
    if not np.all((a == 0) | (a == 1)):
        raise ValueError(f"{name} must hold only 0 and 1 (or be bool)")
    return a != 0


def _prepare(scores: npt.ArrayLike, labels: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores)
    y = as_bool("labels", labels)
    if s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and labels {y.shape} must have the same shape")
    if s.size == 0:
        raise ValueError("scores and labels are empty")
    if s.dtype == bool or np.issubdtype(s.dtype, np.integer):
        s = s.astype(np.float64)
    elif not np.issubdtype(s.dtype, np.floating):
        raise ValueError(f"scores must be real numbers, got dtype {s.dtype}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite (no NaN or inf)")
    return s.ravel(), y.ravel()


def _roc_counts(scores: npt.ArrayLike, labels: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """(fps, tps, thresholds, n_neg, n_pos): counts of voxels with ``score >= threshold``, thresholds descending,
    starting with (0, 0, +inf)."""
    s, y = _prepare(scores, labels)
    n = s.size
    # One plain sort of all scores (SIMD-fast for float32) instead of a stable argsort (~5x slower): counts of
    # scores >= each distinct value come from run starts, and positives (few) are counted by binary search.
    ordered = np.sort(s)
    new_run = np.empty(n, dtype=bool)
    new_run[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=new_run[1:])
    starts = np.flatnonzero(new_run)
    del new_run
    values = ordered[starts]
    del ordered
    n_ge = n - starts
    positives = np.sort(s[y])
    n_pos = int(positives.size)
    tp_ge = n_pos - np.searchsorted(positives, values, side="left")
    fp_ge = n_ge - tp_ge
    thresholds = np.concatenate(([np.inf], values[::-1].astype(np.float64)))
    tps = np.concatenate(([0], tp_ge[::-1]))
    fps = np.concatenate(([0], fp_ge[::-1]))
    return fps, tps, thresholds, n - n_pos, n_pos


def _rates(counts: np.ndarray, total: int) -> np.ndarray:
    if total == 0:
        return np.full(counts.shape, np.nan)
    return counts / total


def roc_curve(scores: npt.ArrayLike, labels: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact voxel-wise ROC: (fpr, tpr, thresholds), float64, thresholds strictly decreasing from ``+inf``.

    Point k holds the rates of ``score >= thresholds[k]``. Same points as scikit-learn's
    ``roc_curve(labels, scores, drop_intermediate=False)``. ``fpr`` is all NaN when no label is negative,
    ``tpr`` all NaN when none is positive. Raises ``ValueError`` on empty, mismatched or non-finite input.
    """
    fps, tps, thresholds, n_neg, n_pos = _roc_counts(scores, labels)
    return _rates(fps, n_neg), _rates(tps, n_pos), thresholds


def roc_auc(scores: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """Area under the exact ROC curve (trapezoids; ties count one half), or NaN when only one class is present."""
    fps, tps, _, n_neg, n_pos = _roc_counts(scores, labels)
    if n_neg == 0 or n_pos == 0:
        return float("nan")
    # Trapezoids on the integer counts, normalised once: no per-point rounding of the rates.
    dfp = np.diff(fps).astype(np.float64)
    heights = (tps[1:] + tps[:-1]).astype(np.float64)
    return float(np.dot(dfp, heights) / (2.0 * n_neg * n_pos))


def youden_threshold(scores: npt.ArrayLike, labels: npt.ArrayLike) -> tuple[float, float, float]:
    """(threshold, sensitivity, specificity) at the maximum Youden index J = sensitivity + specificity - 1.

    The threshold is one of the (finite) scores, so ``score >= threshold`` gives exactly the returned rates.
    Ties in J go to the largest threshold (fewest predicted positives). Raises ``ValueError`` when the labels hold
    only one class (J is undefined) or the input is invalid.
    """
    fps, tps, thresholds, n_neg, n_pos = _roc_counts(scores, labels)
    if n_neg == 0 or n_pos == 0:
        raise ValueError("youden_threshold needs both positive and negative labels")
    # Skip the +inf start point; thresholds are decreasing, so argmax's first maximum is the largest threshold.
    k = int(np.argmax(tps[1:] / n_pos - fps[1:] / n_neg)) + 1
    # Specificity from the TN count (not 1 - fpr) so it equals VoxelCounts.specificity bit for bit.
    return float(thresholds[k]), float(tps[k] / n_pos), float((n_neg - fps[k]) / n_neg)


def max_dice_threshold(scores: npt.ArrayLike, labels: npt.ArrayLike) -> tuple[float, float, float]:
    """(threshold, sensitivity, specificity) at the maximum pooled Dice 2TP / (2TP + FP + FN) over the ROC points.

    Unlike the Youden index, Dice ignores the true negatives, so with ~1000 background voxels per lesion voxel it
    does not trade thousands of false-positive voxels for the last few true ones. Same conventions as
    :func:`youden_threshold` (a finite score; ties go to the largest threshold)."""
    fps, tps, thresholds, n_neg, n_pos = _roc_counts(scores, labels)
    if n_neg == 0 or n_pos == 0:
        raise ValueError("max_dice_threshold needs both positive and negative labels")
    k = int(np.argmax(2 * tps[1:] / (tps[1:] + fps[1:] + n_pos))) + 1
    return float(thresholds[k]), float(tps[k] / n_pos), float((n_neg - fps[k]) / n_neg)


@dataclass(frozen=True)
class VoxelCounts:
    """Voxel confusion counts of a binary prediction against the truth.

    Ratios (float; NaN when the denominator is 0, except Dice/IoU, 1.0 when prediction and truth are both empty):
    ``dice`` 2TP/(2TP+FP+FN), ``iou`` TP/(TP+FP+FN), ``precision`` TP/(TP+FP), ``recall`` = ``sensitivity``
    TP/(TP+FN), ``specificity`` TN/(TN+FP), ``fpr`` FP/(FP+TN) (FP voxels / negative voxels).
    """

    tp: int
    fp: int
    fn: int
    tn: int

    @property
    def n_voxels(self) -> int:
        return self.tp + self.fp + self.fn + self.tn

    @property
    def dice(self) -> float:
        denominator = 2 * self.tp + self.fp + self.fn
        return 1.0 if denominator == 0 else 2 * self.tp / denominator

    @property
    def iou(self) -> float:
        denominator = self.tp + self.fp + self.fn
        return 1.0 if denominator == 0 else self.tp / denominator

    @property
    def precision(self) -> float:
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float:
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def sensitivity(self) -> float:
        return self.recall

    @property
    def specificity(self) -> float:
        return _ratio(self.tn, self.tn + self.fp)

    @property
    def fpr(self) -> float:
        return _ratio(self.fp, self.fp + self.tn)


def _ratio(numerator: int, denominator: int) -> float:
    return float("nan") if denominator == 0 else numerator / denominator


def confusion(pred: npt.ArrayLike, truth: npt.ArrayLike, mask: npt.ArrayLike | None = None) -> VoxelCounts:
    """Confusion counts of ``pred`` against ``truth`` (same shape; bool or 0/1), over the voxels where ``mask`` is
    true (all voxels when ``mask`` is None)."""
    p = as_bool("pred", pred)
    t = as_bool("truth", truth)
    if p.shape != t.shape:
        raise ValueError(f"pred {p.shape} and truth {t.shape} must have the same shape")
    if mask is None:
        n = p.size
    else:
        m = as_bool("mask", mask)
        if m.shape != p.shape:
            raise ValueError(f"mask {m.shape} must have the shape of pred {p.shape}")
        p = p & m
        t = t & m
        n = int(np.count_nonzero(m))
    tp = int(np.count_nonzero(p & t))
    n_pred = int(np.count_nonzero(p))
    n_true = int(np.count_nonzero(t))
    fp = n_pred - tp
    fn = n_true - tp
    return VoxelCounts(tp=tp, fp=fp, fn=fn, tn=n - tp - fp - fn)
