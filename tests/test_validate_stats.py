"""``dicom-node validate``'s statistics: the two-model comparison gives scipy's own p-values on the per-patient
values, and the ROC bootstrap band is seeded, holds the point curve and narrows with more patients."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from test_validate_planted import SHAPE, meta, planted_case, tiny_model

from pipeline.model import combination_key
from pipeline.roles import ROLES
from training.calibrate import model_combinations
from training.metrics import roc_auc
from training.validate.compare import COMPARED_METRICS, compare_models
from training.validate.evaluate import FPR_GRID, pooled_roc, roc_counts
from training.validate.predictions import PredictionCache
from training.validate.run import ModelRun, describe_dataset, validate

BASELINE = combination_key(ROLES[1:])


def _patient(rng: np.random.Generator, separation: float) -> tuple[np.ndarray, np.ndarray]:
    """(float16-valued probability map, truth) of SHAPE: a random cube lesion, noisy scores."""
    truth = np.zeros(SHAPE, np.uint8)
    z, y, x = rng.integers(1, 6), rng.integers(0, 8), rng.integers(0, 8)
    truth[z:z + rng.integers(2, 4), y:y + rng.integers(2, 5), x:x + rng.integers(2, 5)] = 1
    logits = rng.normal(0.0, 1.0, SHAPE) + separation * truth - 2.0
    return (1.0 / (1.0 + np.exp(-logits))).astype(np.float16).astype(np.float32), truth


def test_comparison_p_values_are_scipys(tmp_path):
    rng = np.random.default_rng(5)
    cases, maps_a, maps_b = [], {}, {}
    for i in range(9):
        prob, truth = _patient(rng, 3.0)
        case = planted_case(f"p{i}", truth)
        cases.append(case)
        maps_a[case.case_id] = prob
        # the baseline: a noisier map of the same patient
        noisy = np.clip(prob + rng.normal(0, 0.15, SHAPE), 0, 1)
        maps_b[case.case_id] = noisy.astype(np.float16).astype(np.float32)
    runs = []
    for label, ild, maps in (("model", True, maps_a), ("baseline", False, maps_b)):
        cache = PredictionCache(tmp_path / "pred", label)
        for case in cases:
            for given in model_combinations(tiny_model(ild)):  # 15 for the ILD model (one map for all here)
                cache.store(case, given, maps[case.case_id])
        runs.append(ModelRun(label, tmp_path / f"{label}.safetensors", tiny_model(ild), meta(label), 0.5,
                             "checkpoint", cache))
    result = validate(runs, cases, mode="all", dataset=describe_dataset(cases, "x", "nifti"), bootstrap=50,
                      progress=False)
    doc = result.doc
    assert runs[0].cache.n_inferred == 0 and runs[1].cache.n_inferred == 0
    assert list(doc["models"]["baseline"]["combinations"]) == [BASELINE]
    assert len(doc["models"]["model"]["combinations"]) == 15
    assert list(doc["comparison"]) == [BASELINE]  # the ILD model on the baseline's roles
    per = doc["comparison"][BASELINE]
    pa = {p["case_id"]: p for p in doc["models"]["model"]["combinations"][BASELINE]["patients"]}
    pb = {p["case_id"]: p for p in doc["models"]["baseline"]["combinations"][BASELINE]["patients"]}
    for name in COMPARED_METRICS:
        ids = [c.case_id for c in cases if np.isfinite(pa[c.case_id][name]) and np.isfinite(pb[c.case_id][name])]
        a = [pa[i][name] for i in ids]
        b = [pb[i][name] for i in ids]
        assert per[name]["n"] == len(ids) and per[name]["case_ids"] == ids
        assert per[name]["p_ranksum"] == stats.ranksums(a, b).pvalue, name
        if np.any(np.array(a) != np.array(b)):
            assert per[name]["p_signed_rank"] == stats.wilcoxon(a, b).pvalue, name
            assert per[name]["significant"] == (per[name]["p_signed_rank"] <= 0.05)
    assert per["dice"]["n"] == 9 and 0 < per["dice"]["p_signed_rank"] < 1


def test_comparison_of_identical_values_has_no_signed_rank_p():
    from training.metrics import evaluate_patient

    t = np.zeros(SHAPE, bool)
    t[2:4, 2:4, 2:4] = True
    ms = [evaluate_patient(np.where(t, 0.9, 0.1).astype(np.float32), t, None, (1, 1, 1), 0.5, case_id=str(i))
          for i in range(4)]
    out = compare_models(ms, ms)
    assert np.isnan(out["dice"]["p_signed_rank"]) and out["dice"]["significant"] is False
    assert out["dice"]["p_ranksum"] == stats.ranksums([1.0] * 4, [1.0] * 4).pvalue


def _rocs(n: int, seed: int):
    rng = np.random.default_rng(seed)
    out = []
    brain = np.ones(SHAPE, bool)
    for _ in range(n):
        prob, truth = _patient(rng, rng.uniform(0.5, 3.0))
        out.append((roc_counts(prob, truth > 0, brain), prob, truth))
    return out


def test_pooled_roc_is_exact_and_the_band_is_seeded_holds_the_curve_and_narrows():
    few, many = _rocs(6, 1), _rocs(40, 2)
    r = pooled_roc([x[0] for x in few], bootstrap=300, seed=3)
    scores = np.concatenate([p.ravel() for _, p, _ in few])
    labels = np.concatenate([t.ravel() > 0 for _, _, t in few])
    assert r["auc"] == pytest.approx(roc_auc(scores, labels), rel=1e-12)
    assert r["bootstrap"] == 300 and r["fpr"] == FPR_GRID.tolist()
    # seeded: same seed, same band; another seed, another band
    assert pooled_roc([x[0] for x in few], bootstrap=300, seed=3) == r
    assert pooled_roc([x[0] for x in few], bootstrap=300, seed=4)["tpr_low"] != r["tpr_low"]
    tpr, low, high = (np.asarray(r[k]) for k in ("tpr", "tpr_low", "tpr_high"))
    assert np.all(low <= tpr + 1e-12) and np.all(tpr <= high + 1e-12)
    assert r["auc_ci95"][0] <= r["auc"] <= r["auc_ci95"][1]
    wide = np.mean(high - low)
    m = pooled_roc([x[0] for x in many], bootstrap=300, seed=3)
    narrow = np.mean(np.asarray(m["tpr_high"]) - np.asarray(m["tpr_low"]))
    assert narrow < 0.7 * wide, (narrow, wide)
    assert m["auc_ci95"][1] - m["auc_ci95"][0] < r["auc_ci95"][1] - r["auc_ci95"][0]


def test_roc_counts_refuses_maps_that_are_not_float16_valued():
    t = np.zeros(SHAPE, bool)
    with pytest.raises(ValueError, match="float16"):
        roc_counts(np.full(SHAPE, 0.1, np.float32), t, np.ones(SHAPE, bool))
