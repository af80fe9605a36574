"""Per-patient metrics of cached probability maps, and their summaries per model and role combination.

Conventions are :mod:`training.metrics`' (the method spec's "Metrics"): voxel AUC and sensitivity/specificity
inside the brain mask, overlap and lesion metrics on the whole volume at ``prob >= threshold``, lesions
26-connected. Added here, from the same primitives:

* lesion sensitivity per GT-volume bin (:data:`training.metrics.DEFAULT_SIZE_BINS_MM3`), pooled over patients;
* FROC: pooled lesion sensitivity vs mean FP components per patient (any size) over :data:`FROC_THRESHOLDS`
  and the operating threshold;
* the voxel ROC pooled over patients (brain-mask voxels of all patients together) and its Youden point (the
  threshold the method would pick on these cases), with a 95 % band from a
  bootstrap over patients (patients resampled with replacement, seeded; percentile band of the TPR at fixed
  FPRs). The pooled ROC is exact: the maps are float16, so each patient is reduced to positive and negative
  voxel counts per distinct float16 value, and a resample is a weighted sum of those counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from training.data.cache import CachedCase
from training.metrics import (
    DEFAULT_SIZE_BINS_MM3,
    PatientMetrics,
    SizeBin,
    evaluate_patient,
    lesion_detection,
    sensitivity_by_size,
    summarise,
)

__all__ = ["FPR_GRID", "FROC_THRESHOLDS", "CaseEvaluation", "RocCounts", "evaluate_case", "froc_counts", "froc_points",
           "pooled_roc", "pooled_size_bins", "roc_counts", "summarise_group"]

#: Thresholds of the FROC sweep: log-spaced low values (calibrated ILD thresholds can be far below 0.5) up to 0.99.
FROC_THRESHOLDS: tuple[float, ...] = tuple(float(t) for t in np.unique(np.round(np.concatenate(
    [np.geomspace(1e-5, 0.5, 12), 1.0 - np.geomspace(0.25, 0.01, 4)]), 8)))

#: False-positive rates at which the ROC band is given: log-spaced (the AUC sits in the first percent) and linear.
FPR_GRID: np.ndarray = np.unique(np.concatenate([[0.0], np.geomspace(1e-5, 1.0, 51), np.linspace(0.0, 1.0, 21)]))


@dataclass(frozen=True, eq=False)
class RocCounts:
    """One patient's brain-mask voxels: positive and negative counts per distinct float16 probability.

    ``bits``: the float16 bit patterns, increasing (for probabilities >= 0 the same order as the values)."""

    bits: np.ndarray
    pos: np.ndarray
    neg: np.ndarray


def roc_counts(prob: np.ndarray, truth: np.ndarray, brain: np.ndarray) -> RocCounts:
    """:class:`RocCounts` of ``prob`` (values in [0, 1], exactly representable as float16) in ``brain``."""
    p = np.asarray(prob)[brain]
    bits = p.astype(np.float16).view(np.uint16)
    if bits.size and not np.array_equal(bits.view(np.float16).astype(p.dtype), p):
        raise ValueError("roc_counts needs float16-valued probabilities (the prediction cache's)")
    if bits.size and (p.min() < 0 or p.max() > 1):
        raise ValueError("probabilities must lie in [0, 1]")
    t = np.asarray(truth)[brain]
    values, inverse = np.unique(bits, return_inverse=True)
    pos = np.bincount(inverse, weights=t, minlength=values.size).astype(np.int64)
    total = np.bincount(inverse, minlength=values.size).astype(np.int64)
    return RocCounts(bits=values, pos=pos, neg=total - pos)


@dataclass(frozen=True, eq=False)
class CaseEvaluation:
    """One case with one model and one role combination: metrics at the operating threshold, GT lesions hit
    per size bin, (hits, GT lesions, FP components) at each FROC threshold, and its ROC counts."""

    model: str
    combination: str
    roles: tuple[str, ...]
    metrics: PatientMetrics
    size_bins: tuple[SizeBin, ...]
    froc: tuple[tuple[int, int, int], ...]
    roc: RocCounts


def froc_counts(prob: np.ndarray, truth: np.ndarray, spacing_mm: Sequence[float],
                thresholds: Sequence[float] = FROC_THRESHOLDS) -> tuple[tuple[int, int, int], ...]:
    """(GT lesions hit, GT lesions, FP components) of ``prob >= t`` for each threshold ``t``."""
    out = []
    for t in thresholds:
        d = lesion_detection(prob >= np.float32(t), truth, spacing_mm)
        out.append((d.n_hit, d.n_true, d.n_fp))
    return tuple(out)


def evaluate_case(prob: np.ndarray, case: CachedCase, threshold: float, *, model: str, combination: str,
                  roles: Sequence[str], froc_thresholds: Sequence[float] = FROC_THRESHOLDS,
                  froc: Sequence[tuple[int, int, int]] | None = None) -> CaseEvaluation:
    """Everything :func:`summarise_group` needs from one probability map (model grid, float16 values);
    ``froc``: the map's :func:`froc_counts` at ``froc_thresholds`` when already known (cached)."""
    truth = np.asarray(case.label) > 0
    brain = np.asarray(case.brain) > 0
    metrics = evaluate_patient(prob, truth, brain, case.spacing_mm, threshold, case_id=case.case_id)
    detection = lesion_detection(prob >= np.float32(threshold), truth, case.spacing_mm)
    if froc is None:
        froc = froc_counts(prob, truth, case.spacing_mm, froc_thresholds)
    return CaseEvaluation(model=model, combination=combination, roles=tuple(roles), metrics=metrics,
                          size_bins=sensitivity_by_size(detection, DEFAULT_SIZE_BINS_MM3), froc=tuple(froc),
                          roc=roc_counts(prob, truth, brain))


def pooled_size_bins(evals: Sequence[CaseEvaluation]) -> list[dict[str, float]]:
    """GT lesions hit / GT lesions per volume bin, pooled over the patients (NaN for an empty bin)."""
    out = []
    for i, b in enumerate(evals[0].size_bins):
        n_true = sum(e.size_bins[i].n_true for e in evals)
        n_hit = sum(e.size_bins[i].n_hit for e in evals)
        out.append({"low_mm3": b.low_mm3, "high_mm3": b.high_mm3, "n_true": n_true, "n_hit": n_hit,
                    "sensitivity": n_hit / n_true if n_true else float("nan")})
    return out


def froc_points(evals: Sequence[CaseEvaluation], thresholds: Sequence[float] = FROC_THRESHOLDS
                ) -> list[dict[str, float]]:
    """Per threshold: pooled lesion sensitivity and mean FP components per patient (any size)."""
    out = []
    for i, t in enumerate(thresholds):
        hits = sum(e.froc[i][0] for e in evals)
        n_true = sum(e.froc[i][1] for e in evals)
        out.append({"threshold": float(t), "lesion_sensitivity": hits / n_true if n_true else float("nan"),
                    "fp_per_patient": sum(e.froc[i][2] for e in evals) / len(evals)})
    return out


def _curve(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) from (0, 0) over decreasing thresholds, from counts per increasing value; rows are resamples."""
    tps = np.cumsum(pos[..., ::-1], axis=-1)
    fps = np.cumsum(neg[..., ::-1], axis=-1)
    zero = np.zeros(tps.shape[:-1] + (1,))
    tps = np.concatenate([zero, tps], axis=-1)
    fps = np.concatenate([zero, fps], axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return fps / fps[..., -1:], tps / tps[..., -1:]


def _auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def _on_grid(fpr: np.ndarray, tpr: np.ndarray, grid: np.ndarray) -> np.ndarray:
    # several points at one FPR (a vertical segment): keep the highest, so the curve is a function of FPR
    last = np.r_[fpr[1:] != fpr[:-1], True]
    return np.interp(grid, fpr[last], tpr[last])


def pooled_roc(rocs: Sequence[RocCounts], *, bootstrap: int = 1000, seed: int = 0,
               fpr_grid: np.ndarray = FPR_GRID, chunk: int = 100) -> dict[str, Any]:
    """Pooled voxel ROC of the patients and its 95 % bootstrap band over patients (see the module doc).

    Keys: ``auc`` (pooled, exact), ``auc_ci95`` (bootstrap percentiles), ``fpr`` (the grid), ``tpr`` (the point
    curve on it), ``tpr_low`` / ``tpr_high`` (2.5 / 97.5 percentiles; NaN without bootstrap), ``youden``
    (threshold, sensitivity, specificity at the pooled curve's maximum Youden index), ``n_patients``,
    ``bootstrap`` (resamples with both classes), ``seed``. AUC is NaN without positive or negative voxels."""
    values = np.unique(np.concatenate([r.bits for r in rocs]))
    pos = np.zeros((len(rocs), values.size))
    neg = np.zeros((len(rocs), values.size))
    for i, r in enumerate(rocs):
        idx = np.searchsorted(values, r.bits)
        pos[i, idx] = r.pos
        neg[i, idx] = r.neg
    out: dict[str, Any] = {"n_patients": len(rocs), "seed": seed, "fpr": fpr_grid.tolist()}
    if pos.sum() == 0 or neg.sum() == 0:
        nan = [float("nan")] * fpr_grid.size
        return {**out, "auc": float("nan"), "auc_ci95": [float("nan")] * 2, "tpr": nan, "tpr_low": nan,
                "tpr_high": nan, "bootstrap": 0, "youden": None}
    fpr, tpr = _curve(pos.sum(axis=0), neg.sum(axis=0))
    # Youden point of the pooled curve; point k >= 1 is "prob >= k-th largest value"; ties go to the largest
    k = int(np.argmax(tpr[1:] - fpr[1:])) + 1
    youden = {"threshold": float(values[::-1][k - 1].view(np.float16)), "sensitivity": float(tpr[k]),
              "specificity": float(1.0 - fpr[k])}
    out.update(auc=_auc(fpr, tpr), tpr=_on_grid(fpr, tpr, fpr_grid).tolist(), youden=youden)
    rng = np.random.default_rng(seed)
    n = len(rocs)
    bands, aucs = [], []
    for start in range(0, bootstrap, chunk):
        weights = rng.multinomial(n, np.full(n, 1.0 / n), size=min(chunk, bootstrap - start)).astype(np.float64)
        bfpr, btpr = _curve(weights @ pos, weights @ neg)
        for f, t in zip(bfpr, btpr):
            if np.isfinite(f[-1]) and np.isfinite(t[-1]):  # a resample without lesion voxels has no ROC
                bands.append(_on_grid(f, t, fpr_grid))
                aucs.append(_auc(f, t))
    if bands:
        low, high = np.percentile(np.asarray(bands), [2.5, 97.5], axis=0)
        out.update(tpr_low=low.tolist(), tpr_high=high.tolist(),
                   auc_ci95=np.percentile(aucs, [2.5, 97.5]).tolist(), bootstrap=len(bands))
    else:
        nan = [float("nan")] * fpr_grid.size
        out.update(tpr_low=nan, tpr_high=nan, auc_ci95=[float("nan")] * 2, bootstrap=0)
    return out


def summarise_group(evals: Sequence[CaseEvaluation], *, bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The figures of one model and combination: ``summary`` (:func:`training.metrics.summarise`: mean +/- SD,
    count groups), ``size_bins``, ``froc``, ``operating_point`` (the FROC point at the threshold), ``roc`` and
    per-patient ``patients``."""
    metrics = [e.metrics for e in evals]
    summary = summarise(metrics)
    return {"summary": summary, "size_bins": pooled_size_bins(evals), "froc": froc_points(evals),
            "operating_point": {"threshold": metrics[0].threshold,
                                "lesion_sensitivity": summary["pooled_lesion_sensitivity"],
                                "fp_per_patient": summary["fp_per_patient"]},
            "roc": pooled_roc([e.roc for e in evals], bootstrap=bootstrap, seed=seed),
            "patients": [m.to_dict() for m in metrics]}
