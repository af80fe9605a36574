"""Two models compared patient by patient on the same cases.

Both tests are two-sided, on the patients where both models have a defined value:

* Wilcoxon rank-sum (:func:`scipy.stats.ranksums`): the papers' test. It treats the two models' values as
  independent samples, which they are not (same patients), so it is reported to compare with the papers;
* Wilcoxon signed-rank (:func:`scipy.stats.wilcoxon`) on the per-patient differences: the right test for
  paired cases. NaN when every difference is zero (nothing to rank) or there is no pair.

p <= 0.05 is called significant (the method spec), with no correction for the number of metrics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats

from training.metrics import PatientMetrics

__all__ = ["COMPARED_METRICS", "SIGNIFICANCE", "compare_models"]

COMPARED_METRICS: tuple[str, ...] = ("auc", "sensitivity", "specificity", "dice", "iou", "precision", "recall",
                                     "fpr", "lesion_sensitivity", "fp", "fp_10")
SIGNIFICANCE = 0.05


def _p(test, a: np.ndarray, b: np.ndarray) -> float:
    try:
        p = float(test(a, b).pvalue)
    except ValueError:  # scipy refuses e.g. all-zero differences
        return float("nan")
    return p


def compare_models(a: Sequence[PatientMetrics], b: Sequence[PatientMetrics],
                   metrics: Sequence[str] = COMPARED_METRICS) -> dict[str, dict[str, Any]]:
    """Per metric: ``n`` pairs, ``mean_a`` / ``mean_b``, ``p_ranksum``, ``p_signed_rank``, ``significant``
    (signed-rank p <= 0.05), ``case_ids`` of the pairs. Patients are paired by case id."""
    by_id = {m.case_id: m for m in b}
    pairs = [(m, by_id[m.case_id]) for m in a if m.case_id in by_id]
    out = {}
    for name in metrics:
        kept = [(x, y) for x, y in pairs
                if math.isfinite(getattr(x, name)) and math.isfinite(getattr(y, name))]
        va = np.array([float(getattr(x, name)) for x, _ in kept])
        vb = np.array([float(getattr(y, name)) for _, y in kept])
        p_rank = _p(stats.ranksums, va, vb) if kept else float("nan")
        p_signed = _p(stats.wilcoxon, va, vb) if kept and np.any(va != vb) else float("nan")
        out[name] = {"n": len(kept), "mean_a": float(va.mean()) if kept else float("nan"),
                     "mean_b": float(vb.mean()) if kept else float("nan"), "p_ranksum": p_rank,
                     "p_signed_rank": p_signed,
                     "significant": bool(math.isfinite(p_signed) and p_signed <= SIGNIFICANCE),
                     "case_ids": [x.case_id for x, _ in kept]}
    return out
