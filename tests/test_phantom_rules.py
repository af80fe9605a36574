"""End to end: synthetic studies of every vendor style, written as DICOM, classified by `dicom-node rules test`.

This is the issue's acceptance check: the four roles land on the right series for GE, Siemens and
Philips naming, classic and enhanced, with and without BRAVO, and every distractor gets no role.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dicom_node.cli import app
from training.phantom import SeriesKind, Vendor, generate_study
from training.phantom.dicom_writer import plan_study, write_dicom_study

runner = CliRunner()

CASES = [
    # (seed, vendor, enhanced, missing)
    (11, Vendor.GE, False, ()),
    (12, Vendor.SIEMENS, False, ()),
    (13, Vendor.PHILIPS, False, ()),
    (14, Vendor.GE, True, ()),
    (15, Vendor.SIEMENS, True, ()),
    (16, Vendor.PHILIPS, True, ()),
    (17, Vendor.GE, False, (SeriesKind.T1_BRAVO_POST,)),
    (18, Vendor.SIEMENS, False, (SeriesKind.T1_BRAVO_POST, SeriesKind.FLAIR)),
    (19, Vendor.PHILIPS, True, (SeriesKind.T1_BRAVO_POST,)),
]


@pytest.mark.parametrize(("seed", "vendor", "enhanced", "missing"), CASES, ids=lambda v: getattr(v, "value", str(v)))
def test_rules_find_every_role_and_reject_every_distractor(
    tmp_path: Path, seed: int, vendor: Vendor, enhanced: bool, missing: tuple[SeriesKind, ...]
) -> None:
    study = generate_study(seed, vendor=vendor, missing=missing, voxel_mm=3.0)
    write_dicom_study(study, tmp_path, enhanced=enhanced)
    uid_of = {study.series[p.index].kind: p.series_uid for p in plan_study(study, enhanced).series}

    result = runner.invoke(app, ["rules", "test", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    (assignment,) = json.loads(result.stdout)["studies"]

    chosen = {role: c["series_instance_uid"] for role, c in assignment["chosen"].items()}
    expected = {kind.value: uid for kind, uid in uid_of.items() if kind.is_role}
    assert chosen == expected
    assert set(assignment["missing_roles"]) == {kind.value for kind in missing}

    decisions = {d["series_instance_uid"]: d for d in assignment["decisions"]}
    distractors = [kind for kind in uid_of if not kind.is_role]
    assert distractors, "every generated study carries at least one distractor"
    for kind in distractors:
        decision = decisions[uid_of[kind]]
        assert decision["role"] is None, (kind, decision)
        assert decision["candidate_role"] is None, (kind, decision)
