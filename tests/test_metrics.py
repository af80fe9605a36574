"""training.metrics: ROC/AUC/Youden against scikit-learn, voxel ratios, 26-connected lesion detection with
anisotropic volumes, a fully hand-computed patient, and the mean +/- SD summary."""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage
from sklearn import metrics as skm

import pipeline.lesions
import training.metrics.lesion
from training.metrics import (
    COUNT_GROUPS,
    SUMMARY_FIELDS,
    PatientMetrics,
    VoxelCounts,
    confusion,
    count_group,
    evaluate_patient,
    label_lesions,
    lesion_detection,
    lesion_sensitivity,
    max_dice_threshold,
    roc_auc,
    roc_curve,
    sensitivity_by_size,
    summarise,
    youden_threshold,
)


def _sk_roc(scores, labels):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns (UndefinedMetricWarning) on one class
        return skm.roc_curve(labels, scores, drop_intermediate=False)


# ---------------------------------------------------------------- ROC / AUC / Youden


@pytest.mark.parametrize(
    ("seed", "n", "levels", "pos_frac", "dtype"),
    [
        (0, 1000, 7, 0.3, np.float32),  # very many ties
        (1, 5000, 100, 0.05, np.float32),
        (2, 3000, 0, 0.5, np.float64),  # continuous scores, no ties
        (3, 20000, 1000, 0.01, np.float32),
        (4, 50, 3, 0.5, np.float64),
    ],
)
def test_roc_curve_and_auc_equal_sklearn(seed, n, levels, pos_frac, dtype):
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < pos_frac
    raw = rng.random(n) + 0.3 * labels  # informative but overlapping
    scores = (np.floor(raw * levels) / levels if levels else raw).astype(dtype)

    fpr, tpr, thr = roc_curve(scores, labels)
    sk_fpr, sk_tpr, sk_thr = _sk_roc(scores, labels)
    np.testing.assert_array_equal(fpr, sk_fpr)
    np.testing.assert_array_equal(tpr, sk_tpr)
    np.testing.assert_array_equal(thr, sk_thr.astype(np.float64))
    assert thr[0] == math.inf and fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    assert roc_auc(scores, labels) == pytest.approx(skm.roc_auc_score(labels, scores), rel=1e-12, abs=1e-15)
    # 3D input (a volume) is flattened; 0/1 integer labels work like bool.
    assert roc_auc(scores.reshape(-1, 1, 1), labels.astype(np.uint8).reshape(-1, 1, 1)) == roc_auc(scores, labels)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.booleans()), min_size=1, max_size=40))
def test_roc_equals_sklearn_on_small_tied_inputs(pairs):
    scores = np.array([p[0] / 4 for p in pairs], dtype=np.float32)
    labels = np.array([p[1] for p in pairs])
    fpr, tpr, thr = roc_curve(scores, labels)
    sk_fpr, sk_tpr, sk_thr = _sk_roc(scores, labels)
    np.testing.assert_array_equal(fpr, sk_fpr)  # NaN where sklearn has NaN (one class)
    np.testing.assert_array_equal(tpr, sk_tpr)
    np.testing.assert_array_equal(thr, sk_thr)
    if labels.all() or not labels.any():
        assert math.isnan(roc_auc(scores, labels))
    else:
        assert roc_auc(scores, labels) == pytest.approx(skm.roc_auc_score(labels, scores), rel=1e-12)


def test_auc_hand_computed_and_one_class_nan():
    # Positives 0.9, 0.5; negatives 0.5, 0.1. Pairs (pos > neg): (0.9,0.5) (0.9,0.1) (0.5,0.1) = 3, tie (0.5,0.5) = 1/2.
    assert roc_auc([0.9, 0.5, 0.5, 0.1], [1, 1, 0, 0]) == pytest.approx(3.5 / 4)
    assert math.isnan(roc_auc([0.2, 0.4], [1, 1]))
    assert math.isnan(roc_auc([0.2, 0.4], [False, False]))
    fpr, tpr, thr = roc_curve([0.2, 0.4], [1, 1])
    assert np.isnan(fpr).all()
    np.testing.assert_array_equal(tpr, [0.0, 0.5, 1.0])
    np.testing.assert_array_equal(thr, [math.inf, 0.4, 0.2])


def test_roc_rejects_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        roc_curve([0.1, 0.2], [1])
    with pytest.raises(ValueError, match="empty"):
        roc_auc([], [])
    with pytest.raises(ValueError, match="finite"):
        roc_auc([0.1, np.nan], [1, 0])
    with pytest.raises(ValueError, match="0 and 1"):
        roc_auc([0.1, 0.2], [0.3, 1])


def test_youden_threshold_hand_computed():
    # P = 4, N = 6. Counts of score >= t:
    #   t=0.9: TP1 FP0 -> J = 1/4 - 0   = 0.25
    #   t=0.8: TP2 FP1 -> J = 2/4 - 1/6 = 0.333
    #   t=0.7: TP3 FP1 -> J = 3/4 - 1/6 = 0.583
    #   t=0.6: TP3 FP2 -> J = 3/4 - 2/6 = 0.417
    #   t=0.5: TP4 FP2 -> J = 1   - 2/6 = 0.667  <- maximum: sensitivity 1, specificity 4/6
    #   t<=0.4: TP4, FP >= 3 -> J <= 0.5
    scores = np.array([0.9, 0.8, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1], dtype=np.float32)
    labels = np.array([1, 1, 0, 1, 0, 1, 0, 0, 0, 0], dtype=bool)
    thr, sens, spec = youden_threshold(scores, labels)
    assert thr == float(np.float32(0.5))
    assert sens == 1.0
    assert spec == pytest.approx(4 / 6)
    # The returned threshold reproduces the rates with score >= threshold.
    counts = confusion(scores >= thr, labels)
    assert (counts.sensitivity, counts.specificity) == (sens, spec)


def test_youden_ties_take_larger_threshold_and_never_inf():
    # t=0.9: J = 1/2 - 0 = 0.5; t=0.8: 1/2 - 1/2 = 0; t=0.7: 1 - 1/2 = 0.5 (tie -> 0.9); t=0.6: 0.
    assert youden_threshold([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == (pytest.approx(0.9), 0.5, 1.0)
    # Inverted classifier: every finite J <= 0, the +inf start point (J = 0) must not be chosen.
    # t=0.9: tpr 0, fpr 1/2 -> J = -0.5; t=0.1: tpr 1, fpr 1 -> J = 0 -> threshold 0.1.
    thr, sens, spec = youden_threshold([0.9, 0.1], [0, 1])
    assert thr == 0.1 and math.isfinite(thr) and (sens, spec) == (1.0, 0.0)
    with pytest.raises(ValueError, match="both"):
        youden_threshold([0.1, 0.2], [1, 1])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_youden_equals_bruteforce_over_sklearn_curve(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(4000) < 0.1
    scores = (np.round((rng.random(4000) + 0.5 * labels) * 50) / 75).astype(np.float32)
    sk_fpr, sk_tpr, sk_thr = _sk_roc(scores, labels)
    j = (sk_tpr - sk_fpr)[1:]
    k = int(np.argmax(j)) + 1  # first maximum = largest threshold; skip the +inf point
    thr, sens, spec = youden_threshold(scores, labels)
    assert thr == sk_thr[k]
    assert sens == sk_tpr[k]
    assert spec == pytest.approx(1 - sk_fpr[k], abs=1e-15)


def test_max_dice_threshold_hand_computed_and_bruteforce():
    # scores 0.9 (pos), 0.8 (pos), 0.7 (neg), 0.6 (pos), 0.1 (neg) x 95: P = 3.
    # >= 0.9: Dice 2/(1+0+3)=0.5; >= 0.8: 4/5=0.8; >= 0.7: 4/6; >= 0.6: 6/7=0.857 (max); >= 0.1: 6/101.
    # Youden picks 0.6 as well here; with 1000 negatives just below a 4th positive it would not (next check).
    scores = np.array([0.9, 0.8, 0.7, 0.6] + [0.1] * 95)
    labels = np.array([1, 1, 0, 1] + [0] * 95, dtype=bool)
    thr, sens, spec = max_dice_threshold(scores, labels)
    assert (thr, sens, spec) == (0.6, 1.0, 95 / 96)
    # positives 0.9, 0.8, 0.6, 0.15; negatives 0.7, 0.3 x 30, 0.1 x 1000 (P = 4, N = 1031):
    # >= 0.6: TP 3, FP 1 -> J = 0.75 - 1/1031 = 0.749, Dice 6/8 = 0.75 (max Dice);
    # >= 0.15: TP 4, FP 31 -> J = 1 - 31/1031 = 0.970 (max J), Dice 8/39 = 0.205: Youden buys the 4th lesion
    # voxel with 30 false ones, Dice does not.
    scores = np.array([0.9, 0.8, 0.6, 0.15, 0.7] + [0.3] * 30 + [0.1] * 1000)
    labels = np.array([1, 1, 1, 1] + [0] * 1031, dtype=bool)
    assert max_dice_threshold(scores, labels) == (0.6, 0.75, 1030 / 1031)
    assert youden_threshold(scores, labels)[0] == 0.15
    rng = np.random.default_rng(3)
    labels = rng.random(5000) < 0.02
    scores = (np.round((rng.random(5000) + 0.6 * labels) * 40) / 64).astype(np.float32)
    fpr, tpr, thr_all = _sk_roc(scores, labels)
    p, n = labels.sum(), (~labels).sum()
    tp, fp = tpr * p, fpr * n
    k = int(np.argmax((2 * tp / (tp + fp + p))[1:])) + 1
    assert max_dice_threshold(scores, labels)[0] == thr_all[k]


# ---------------------------------------------------------------- voxel ratios


def test_confusion_ratios_hand_computed():
    pred = np.array([1, 1, 1, 0, 0, 0, 1, 0], dtype=bool)
    truth = np.array([1, 1, 0, 1, 0, 0, 0, 0], dtype=bool)
    # TP: 0, 1; FP: 2, 6; FN: 3; TN: 4, 5, 7.
    c = confusion(pred, truth)
    assert c == VoxelCounts(tp=2, fp=2, fn=1, tn=3)
    assert c.n_voxels == 8
    assert c.dice == pytest.approx(4 / 7)
    assert c.iou == pytest.approx(2 / 5)
    assert c.precision == pytest.approx(2 / 4)
    assert c.recall == c.sensitivity == pytest.approx(2 / 3)
    assert c.specificity == pytest.approx(3 / 5)
    assert c.fpr == pytest.approx(2 / 5)
    # Mask keeps voxels 0..4: pred [1,1,1,0,0], truth [1,1,0,1,0] -> TP2 FP1 FN1 TN1.
    mask = np.array([1, 1, 1, 1, 1, 0, 0, 0])
    assert confusion(pred, truth, mask) == VoxelCounts(tp=2, fp=1, fn=1, tn=1)


def test_confusion_empty_conventions():
    none = np.zeros(5, dtype=bool)
    both_empty = confusion(none, none)
    assert (both_empty.dice, both_empty.iou, both_empty.specificity, both_empty.fpr) == (1.0, 1.0, 1.0, 0.0)
    assert math.isnan(both_empty.precision) and math.isnan(both_empty.recall)
    missed = confusion(none, np.eye(1, 5, 2, dtype=bool)[0])
    assert (missed.dice, missed.iou, missed.recall) == (0.0, 0.0, 0.0)
    assert math.isnan(missed.precision)
    all_pos = confusion(np.ones(3, bool), np.ones(3, bool))
    assert math.isnan(all_pos.specificity) and math.isnan(all_pos.fpr) and all_pos.dice == 1.0
    with pytest.raises(ValueError, match="0 and 1"):
        confusion(np.array([0.5, 1.0]), np.array([1, 0]))
    with pytest.raises(ValueError, match="same shape"):
        confusion(np.ones(3, bool), np.ones(4, bool))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_confusion_ratios_equal_sklearn(seed):
    rng = np.random.default_rng(seed)
    truth = rng.random((6, 7, 8)) < 0.2
    pred = np.where(rng.random(truth.shape) < 0.7, truth, rng.random(truth.shape) < 0.3)
    c = confusion(pred, truth)
    t, p = truth.ravel(), pred.ravel()
    assert c.dice == pytest.approx(skm.f1_score(t, p))
    assert c.iou == pytest.approx(skm.jaccard_score(t, p))
    assert c.precision == pytest.approx(skm.precision_score(t, p))
    assert c.recall == pytest.approx(skm.recall_score(t, p))
    tn, fp, fn, tp = skm.confusion_matrix(t, p, labels=[False, True]).ravel()
    assert c == VoxelCounts(tp=int(tp), fp=int(fp), fn=int(fn), tn=int(tn))
    assert c.fpr == pytest.approx(fp / (fp + tn))


# ---------------------------------------------------------------- lesions

SPACING = (2.0, 1.0, 0.75)  # (slice, row, column) mm -> 1.5 mm^3 per voxel


def _lesion_case() -> tuple[np.ndarray, np.ndarray]:
    """Known GT lesions and predicted components on a (10, 20, 20) grid with 1.5 mm^3 voxels."""
    truth = np.zeros((10, 20, 20), dtype=bool)
    truth[0:2, 0:5, 0:5] = True  # G1: 50 vox = 75 mm^3, hit
    truth[4:7, 0:3, 10:13] = True  # G2: 27 vox = 40.5 mm^3, missed
    truth[4:8, 8:19, 18] = True  # G5: 44 vox = 66 mm^3 (>= 65), missed
    truth[8, 0, 0] = truth[9, 1, 1] = True  # G4: corner-touching pair = one lesion, 3 mm^3, missed
    truth[8, 15, 15] = True  # G3: 1 vox = 1.5 mm^3, hit
    pred = np.zeros_like(truth)
    pred[1:3, 2:4, 2:4] = True  # P1: 8 vox, half inside G1 -> true positive
    pred[8, 15, 15] = True  # P2: exactly G3 -> true positive
    pred[0, 10:17, 0] = True  # P3: FP 7 vox = 10.5 mm^3 (>= 10)
    pred[0, 10:16, 10] = True  # P4: FP 6 vox = 9.0 mm^3 (< 10)
    pred[9, 19, 19] = True  # P5: FP 1 vox = 1.5 mm^3
    pred[6, 15, 0] = pred[7, 16, 1] = True  # P6: FP corner-touching pair = 3 mm^3
    return pred, truth


def test_reuses_pipeline_structure_26():
    assert training.metrics.lesion.STRUCTURE_26 is pipeline.lesions.STRUCTURE_26


def test_corner_touching_voxels_are_one_lesion():
    mask = np.zeros((3, 3, 3), dtype=bool)
    mask[0, 0, 0] = mask[1, 1, 1] = True
    labels, n = label_lesions(mask)
    assert n == 1 and labels[0, 0, 0] == labels[1, 1, 1] == 1
    assert ndimage.label(mask)[1] == 2  # scipy's default 6-connectivity would split them
    rng = np.random.default_rng(5)
    sparse = rng.random((12, 13, 14)) < 0.08
    assert label_lesions(sparse)[1] == ndimage.label(sparse, structure=np.ones((3, 3, 3)))[1]


def test_lesion_detection_counts_and_anisotropic_volumes():
    pred, truth = _lesion_case()
    det = lesion_detection(pred, truth, SPACING)
    assert det.voxel_volume_mm3 == 1.5
    # GT in scipy raster order of first voxel: G1 (0,0,0), G2 (4,0,10), G5 (4,8,18), G4 (8,0,0), G3 (8,15,15).
    np.testing.assert_array_equal(det.true_volumes_mm3, [75.0, 40.5, 66.0, 3.0, 1.5])
    np.testing.assert_array_equal(det.true_hit, [True, False, False, False, True])
    assert (det.n_true, det.n_hit, det.n_pred) == (5, 2, 6)
    assert (det.n_fp, det.n_fp_10) == (4, 1)  # only P3 (10.5 mm^3) reaches 10 mm^3
    np.testing.assert_array_equal(np.sort(det.fp_volumes_mm3), [1.5, 3.0, 9.0, 10.5])
    assert det.sensitivity() == pytest.approx(2 / 5)
    assert det.sensitivity(65.0) == pytest.approx(1 / 2)  # G1 (75, hit) and G5 (66, missed)
    assert math.isnan(det.sensitivity(100.0))  # no GT lesion that big
    assert det.counts(65.0) == (1, 2)
    assert lesion_sensitivity(pred, truth, SPACING, min_volume_mm3=65.0) == pytest.approx(0.5)
    # The FP size limit is inclusive: at 9 mm^3, P4 (exactly 9.0) counts too.
    assert lesion_detection(pred, truth, SPACING, fp_min_volume_mm3=9.0).n_fp_10 == 2
    # Isotropic 1 mm: same components, volumes = voxel counts, now P3 (7) and P4 (6) are both < 10.
    iso = lesion_detection(pred, truth, (1.0, 1.0, 1.0))
    np.testing.assert_array_equal(iso.true_volumes_mm3, [50, 27, 44, 2, 1])
    assert (iso.n_fp, iso.n_fp_10) == (4, 0)
    with pytest.raises(ValueError):
        det.true_hit[0] = False  # read-only


def test_sensitivity_by_size_bins():
    pred, truth = _lesion_case()
    bins = sensitivity_by_size(lesion_detection(pred, truth, SPACING))
    # [0,10): G4 3.0 missed, G3 1.5 hit; [10,65): G2 40.5 missed; [65,500): G1 hit, G5 missed; [500,inf): none.
    assert [(b.low_mm3, b.high_mm3, b.n_true, b.n_hit) for b in bins] == [
        (0.0, 10.0, 2, 1), (10.0, 65.0, 1, 0), (65.0, 500.0, 2, 1), (500.0, math.inf, 0, 0),
    ]
    assert [b.sensitivity for b in bins[:3]] == [0.5, 0.0, 0.5]
    assert math.isnan(bins[3].sensitivity)
    for bad in [(10.0, 5.0), (0.0, math.nan, 10.0), (1.0,)]:
        with pytest.raises(ValueError, match="increasing"):
            sensitivity_by_size(lesion_detection(pred, truth, SPACING), bad)


def test_lesion_input_validation():
    pred, truth = _lesion_case()
    for bad in [(1.0, 1.0), (1.0, 0.0, 1.0), (1.0, math.nan, 1.0), (1.0, -1.0, 1.0), "abc"]:
        with pytest.raises(ValueError, match="spacing_mm"):
            lesion_detection(pred, truth, bad)
    with pytest.raises(ValueError, match="same shape"):
        lesion_detection(pred[:5], truth, SPACING)
    with pytest.raises(ValueError, match="3D"):
        lesion_detection(pred[0], truth[0], SPACING)


def test_count_group():
    assert [count_group(n) for n in (0, 1, 3, 4, 10, 11, 250)] == ["0", "1-3", "1-3", "4-10", "4-10", ">10", ">10"]
    for bad in (-1, 2.5):
        with pytest.raises(ValueError):
            count_group(bad)


# ---------------------------------------------------------------- per patient


def _patient_case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(prob float32, truth, brain) on a (4, 6, 6) grid; brain = slices 0..2 (108 voxels)."""
    prob = np.full((4, 6, 6), 0.1, dtype=np.float32)
    truth = np.zeros(prob.shape, dtype=bool)
    truth[0, 0:3, 0:3] = True  # T1: 9 vox = 67.5 mm^3
    prob[0, 0:2, 0:3] = 0.9  # 6 of T1 above threshold
    prob[0, 2, 0:3] = 0.4  # 3 of T1 below
    truth[2, 5, 5] = True  # T2: 1 vox = 7.5 mm^3, missed
    prob[2, 5, 5] = 0.4
    prob[1, 4:6, 0] = 0.8  # FP A: 2 vox = 15 mm^3, in the brain
    prob[3, 0, 5] = 0.7  # FP B: 1 vox = 7.5 mm^3, outside the brain
    prob[2, 0:2, 5] = 0.4  # two negatives tied with positives, below threshold
    brain = np.zeros(prob.shape, dtype=bool)
    brain[0:3] = True
    return prob, truth, brain


PATIENT_SPACING = (4.0, 1.5, 1.25)  # 7.5 mm^3 per voxel


def test_evaluate_patient_hand_computed():
    prob, truth, brain = _patient_case()
    m = evaluate_patient(prob, truth, brain, PATIENT_SPACING, 0.5, case_id="p1")
    # Brain: P = 10 (scores 0.9 x6, 0.4 x4), N = 98 (0.8 x2, 0.4 x2, 0.1 x94).
    # AUC = [6 x 98 + 4 x (94 + 2/2)] / (10 x 98) = (588 + 380) / 980.
    assert m.auc == pytest.approx(968 / 980)
    # Brain at 0.5: TP 6, FP 2 (A), FN 4, TN 96.
    assert m.sensitivity == pytest.approx(0.6)
    assert m.specificity == pytest.approx(96 / 98)
    # Whole volume (144 vox): predicted 6 + 2 (A) + 1 (B) -> TP 6, FP 3, FN 4, TN 131.
    assert m.dice == pytest.approx(12 / 19)
    assert m.iou == pytest.approx(6 / 13)
    assert m.precision == pytest.approx(6 / 9)
    assert m.recall == pytest.approx(0.6)
    assert m.fpr == pytest.approx(3 / 134)
    # Lesions: T1 (67.5 mm^3) hit, T2 missed; components: T1 part, A (15 mm^3, FP), B (7.5 mm^3, FP).
    expected = {
        "case_id": "p1", "threshold": 0.5, "lesion_sensitivity": 0.5, "lesion_sensitivity_ge_65mm3": 1.0,
        "n_lesions": 2, "n_hit": 1, "n_lesions_ge_65mm3": 1, "n_hit_ge_65mm3": 1, "n_pred": 3, "fp": 2, "fp_10": 1,
        "count_group": "1-3",
    }
    assert {k: m.to_dict()[k] for k in expected} == expected
    assert set(m.to_dict()) == {f.name for f in dataclasses.fields(PatientMetrics)}

    # Without a brain mask the AUC and sensitivity/specificity use all 144 voxels: N = 134 adds B (0.7) and
    # 35 voxels at 0.1. AUC = [6 x 134 + 4 x (94 + 35 + 2/2)] / (10 x 134) = (804 + 520) / 1340.
    whole = evaluate_patient(prob, truth, None, PATIENT_SPACING, 0.5)
    assert whole.auc == pytest.approx(1324 / 1340)
    assert whole.specificity == pytest.approx(131 / 134)
    assert whole.dice == m.dice and whole.fp == m.fp
    assert whole.auc == pytest.approx(skm.roc_auc_score(truth.ravel(), prob.ravel()))
    assert m.auc == pytest.approx(skm.roc_auc_score(truth[brain], prob[brain]))


def test_evaluate_patient_threshold_in_map_precision_and_empty_truth():
    prob = np.full((1, 2, 2), np.float32(0.76))  # float32(0.76) < 0.76 as float64
    truth = np.zeros(prob.shape, dtype=bool)
    m = evaluate_patient(prob, truth, None, (1.0, 1.0, 1.0), 0.76)
    assert m.fp == 1 and m.n_pred == 1 and m.fp_10 == 0  # 4 mm^3 < 10
    assert math.isnan(m.auc) and math.isnan(m.sensitivity) and math.isnan(m.lesion_sensitivity)
    assert m.specificity == 0.0 and m.dice == 0.0 and m.count_group == "0"


def test_evaluate_patient_validation():
    prob, truth, brain = _patient_case()
    cases = [
        ({"truth": truth[:2]}, "truth"),
        ({"brain_mask": brain[:, :3]}, "brain_mask"),
        ({"brain_mask": np.zeros_like(brain)}, "empty"),
        ({"prob": prob[0]}, "3D"),
        ({"prob": np.where(brain, prob, np.nan)}, "finite"),
        ({"spacing_mm": (1.0, 1.0)}, "spacing_mm"),
        ({"spacing_mm": (1.0, math.inf, 1.0)}, "spacing_mm"),
        ({"threshold": math.nan}, "threshold"),
        ({"truth": prob}, "0 and 1"),
    ]
    base = {"prob": prob, "truth": truth, "brain_mask": brain, "spacing_mm": PATIENT_SPACING, "threshold": 0.5}
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            evaluate_patient(**{**base, **change})


# ---------------------------------------------------------------- summary


def _metrics(case_id: str, dice: float, n_lesions: int, n_hit: int, fp: int, fp_10: int, **kw) -> PatientMetrics:
    values = {
        "case_id": case_id, "auc": 0.99, "threshold": 0.5, "sensitivity": 0.8, "specificity": 0.999,
        "dice": dice, "iou": dice / 2, "precision": 0.7, "recall": 0.6, "fpr": 1e-4,
        "lesion_sensitivity": n_hit / n_lesions if n_lesions else math.nan, "lesion_sensitivity_ge_65mm3": math.nan,
        "n_lesions": n_lesions, "n_hit": n_hit, "n_lesions_ge_65mm3": 0, "n_hit_ge_65mm3": 0,
        "n_pred": n_hit + fp, "fp": fp, "fp_10": fp_10, "count_group": count_group(n_lesions),
    }
    values.update(kw)
    return PatientMetrics(**values)


def test_summarise_mean_sd_pooled_and_groups():
    patients = [
        _metrics("a", 0.8, 2, 2, 3, 1, lesion_sensitivity_ge_65mm3=1.0, n_lesions_ge_65mm3=1, n_hit_ge_65mm3=1),
        _metrics("b", 0.6, 3, 1, 10, 4, precision=math.nan),
        _metrics("c", 0.7, 5, 4, 0, 0, lesion_sensitivity_ge_65mm3=0.5, n_lesions_ge_65mm3=2, n_hit_ge_65mm3=1),
        _metrics("d", 0.5, 12, 6, 7, 2),
        _metrics("e", 0.0, 0, 0, 5, 5, auc=math.nan),  # no GT lesion: overall only
    ]
    s = summarise(patients)
    assert set(SUMMARY_FIELDS) <= set(s)
    dice = np.array([0.8, 0.6, 0.7, 0.5, 0.0])
    assert s["dice"]["mean"] == pytest.approx(dice.mean())
    assert s["dice"]["sd"] == pytest.approx(dice.std(ddof=1))
    assert s["dice"]["n"] == 5
    assert s["precision"] == {"mean": pytest.approx(0.7), "sd": pytest.approx(0.0), "n": 4}  # NaN skipped
    assert s["auc"]["n"] == 4
    ls = np.array([1.0, 1 / 3, 0.8, 0.5])  # patient e has NaN lesion sensitivity
    assert s["lesion_sensitivity"]["mean"] == pytest.approx(ls.mean())
    assert s["lesion_sensitivity"]["sd"] == pytest.approx(ls.std(ddof=1))
    assert s["lesion_sensitivity_ge_65mm3"]["n"] == 2
    assert s["n_patients"] == 5
    assert s["pooled_lesion_sensitivity"] == pytest.approx((2 + 1 + 4 + 6) / (2 + 3 + 5 + 12))
    assert s["pooled_lesion_sensitivity_ge_65mm3"] == pytest.approx(2 / 3)
    assert s["fp_per_patient"] == pytest.approx(25 / 5) == s["fp"]["mean"]
    assert s["fp_10_per_patient"] == pytest.approx(12 / 5)

    assert tuple(s["groups"]) == COUNT_GROUPS == ("1-3", "4-10", ">10")
    g13 = s["groups"]["1-3"]
    assert g13["n_patients"] == 2
    assert g13["dice"]["mean"] == pytest.approx(0.7)
    assert g13["dice"]["sd"] == pytest.approx(np.std([0.8, 0.6], ddof=1))
    assert g13["pooled_lesion_sensitivity"] == pytest.approx(3 / 5)
    assert g13["fp_per_patient"] == pytest.approx(6.5)
    g4 = s["groups"]["4-10"]
    assert (g4["n_patients"], g4["dice"]["mean"], g4["dice"]["n"]) == (1, pytest.approx(0.7), 1)
    assert math.isnan(g4["dice"]["sd"])  # one patient: no sample SD
    assert s["groups"][">10"]["pooled_lesion_sensitivity"] == pytest.approx(0.5)
    assert "groups" not in g13


def test_summarise_empty():
    s = summarise([])
    assert s["n_patients"] == 0 and s["dice"]["n"] == 0 and math.isnan(s["dice"]["mean"])
    assert math.isnan(s["pooled_lesion_sensitivity"])
    assert all(g["n_patients"] == 0 for g in s["groups"].values())
