"""The lesion-wise operating-point sweep and the FROC threshold rule (training/metrics/operating.py), on planted
predictions whose figures are worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from training.metrics.operating import OperatingPoint, lesion_froc_point, sweep

# one row of voxels of 10 mm^3 each: every single-voxel component counts as a false positive >= 10 mm^3
SPACING = (1.0, 1.0, 10.0)


def _patient(length: int, lesions: dict[int, float], others: dict[int, float]):
    """(prob, truth, spacing): single-voxel GT lesions at the ``lesions`` positions with those probabilities, and
    background voxels at ``others`` with theirs (zero elsewhere); positions two apart, so never 26-connected."""
    prob = np.zeros((1, 1, length), dtype=np.float32)
    truth = np.zeros(prob.shape, dtype=bool)
    for x, p in lesions.items():
        prob[0, 0, x], truth[0, 0, x] = p, True
    for x, p in others.items():
        prob[0, 0, x] = p
    return prob, truth, SPACING


# patient 1: lesions of 0.9 and 0.3, a false blob of 0.2; patient 2: a lesion of 0.6, a false blob of 0.4
PATIENTS = [_patient(12, {1: 0.9, 5: 0.3}, {9: 0.2}), _patient(12, {2: 0.6}, {8: 0.4})]
THRESHOLDS = (0.1, 0.25, 0.35, 0.5, 0.7, 0.95)


def test_sweep_by_hand():
    points = sweep(PATIENTS, THRESHOLDS)
    got = [(p.threshold, p.lesion_sensitivity, p.fp_10_per_patient, p.dice) for p in points]
    expected = [
        # all found, both blobs: Dice 2x2/(2x2+1) = 0.8 and 2/(2+1)
        (0.1, 1.0, 1.0, (0.8 + 2 / 3) / 2),
        # all found, patient 2's blob left: Dice 1 and 2/3
        (0.25, 1.0, 0.5, (1 + 2 / 3) / 2),
        # the 0.3 lesion lost: Dice 2/(2+1) and 2/3
        (0.35, 2 / 3, 0.5, (2 / 3 + 2 / 3) / 2),
        (0.5, 2 / 3, 0.0, (2 / 3 + 1) / 2),
        (0.7, 1 / 3, 0.0, (2 / 3 + 0) / 2),
        (0.95, 0.0, 0.0, 0.0),
    ]
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert g == pytest.approx(e)


def test_froc_rule_picks_the_most_sensitive_point_within_the_budget():
    points = sweep(PATIENTS, THRESHOLDS)
    # 0.5 FP per patient: 0.25 finds every lesion with one false blob in two patients (0.1 has two)
    assert lesion_froc_point(points, 0.5).threshold == 0.25
    # no false blob at all: 0.5 (2 of 3 found, Dice 0.833) beats 0.7 (1 of 3) and 0.95
    assert lesion_froc_point(points, 0.0).threshold == 0.5
    # a budget of 1 allows 0.1 too, same sensitivity as 0.25 but lower Dice: still 0.25
    assert lesion_froc_point(points, 1.0).threshold == 0.25


def test_froc_rule_ties_and_no_feasible_point():
    a = OperatingPoint(0.2, dice=0.7, lesion_sensitivity=0.9, fp_10_per_patient=0.4)
    b = OperatingPoint(0.3, dice=0.8, lesion_sensitivity=0.9, fp_10_per_patient=0.2)
    c = OperatingPoint(0.4, dice=0.8, lesion_sensitivity=0.9, fp_10_per_patient=0.1)
    assert lesion_froc_point([a, b]) is b  # same sensitivity: the better Dice
    assert lesion_froc_point([a, b, c]) is c  # same sensitivity and Dice: the larger threshold
    over = [OperatingPoint(0.1, 0.5, 1.0, 3.0), OperatingPoint(0.2, 0.6, 0.8, 2.0), OperatingPoint(0.3, 0.4, 0.7, 2.0)]
    assert lesion_froc_point(over, 0.5) is over[1]  # nothing within budget: the fewest FPs compete
    with pytest.raises(ValueError):
        lesion_froc_point([])
    with pytest.raises(ValueError):
        sweep([])
