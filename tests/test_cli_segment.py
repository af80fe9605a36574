"""``dicom-node segment``: end to end on synthetic DICOM folders with a known-function checkpoint."""

from __future__ import annotations

import json
import shutil

import pydicom
import pytest
from support.known_model import known_checkpoint
from support.studies import lesion_study, write_study
from typer.testing import CliRunner

from dicom_node.cli import app
from dicom_node.paths import DEFAULT_RULES

runner = CliRunner()


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seg")
    study = lesion_study(0, missing=("flair", "t1_cube_post"))
    write_study(study, tmp / "dicom")
    return study, tmp / "dicom", known_checkpoint(tmp / "m.safetensors", "t1_bravo_post")


def test_segment_writes_outputs(case, tmp_path):
    study, dicom, model = case
    out = tmp_path / "out"
    r = runner.invoke(app, ["segment", str(dicom), "--out", str(out), "--model", str(model)])
    assert r.exit_code == 0, r.output
    assert {p.name for p in out.iterdir()} == {"seg.dcm", "sr.dcm", "summary.json", "overview.png"}
    s = json.loads((out / "summary.json").read_text())
    assert s["lesion_count"] >= 1 and s["reference_role"] == "t1_bravo_post"
    assert set(s["roles"]) == {"t1_bravo_post", "t1_cube_pre"}
    assert pydicom.dcmread(out / "seg.dcm").Modality == "SEG"
    assert f"{s['lesion_count']} lesion(s)" in r.output
    assert study.patient.name not in r.output and study.patient.patient_id not in r.output


def test_segment_secondary_capture_option(case, tmp_path):
    """--secondary-capture adds the SC series (summary + one key image per lesion, the study's); a later run
    without it into the same folder leaves no SC file behind."""
    _, dicom, model = case
    out = tmp_path / "out"
    r = runner.invoke(app, ["segment", str(dicom), "--out", str(out), "--model", str(model), "--secondary-capture"])
    assert r.exit_code == 0, r.output
    s = json.loads((out / "summary.json").read_text())
    n = s["lesion_count"]
    names = sorted(p.name for p in out.glob("sc-*.dcm"))
    assert names == [f"sc-{i:04d}.dcm" for i in range(1, n + 2)] and s["outputs"]["sc_instances"] == n + 1
    assert f"sc-0001..{n + 1:04d}.dcm ({n + 1})" in r.output
    seg = pydicom.dcmread(out / "seg.dcm", stop_before_pixels=True)
    for name in names:
        ds = pydicom.dcmread(out / name, stop_before_pixels=True)
        assert ds.StudyInstanceUID == seg.StudyInstanceUID and ds.BurnedInAnnotation == "YES"
        assert ds.SeriesInstanceUID == s["outputs"]["sc_series_instance_uid"]
    again = runner.invoke(app, ["segment", str(dicom), "--out", str(out), "--model", str(model)])
    assert again.exit_code == 0, again.output
    assert not list(out.glob("sc-*.dcm"))
    assert json.loads((out / "summary.json").read_text())["outputs"]["sc_series_instance_uid"] is None


def test_missing_model_file(case, tmp_path):
    _, dicom, _ = case
    missing = tmp_path / "nope.safetensors"
    r = runner.invoke(app, ["segment", str(dicom), "--out", str(tmp_path / "o"), "--model", str(missing)])
    assert r.exit_code == 1
    assert f"model file {missing} does not exist" in r.output


def test_default_model_is_config_path(case, tmp_path):
    """Without --model the config's model.path is used; a missing one is one clear line, exit 1."""
    _, dicom, _ = case
    cfg = tmp_path / "node.yaml"
    cfg.write_text(f"model:\n  path: nowhere/missing.safetensors\nrules: {DEFAULT_RULES}\n")
    r = runner.invoke(app, ["segment", str(dicom), "--out", str(tmp_path / "o"), "--config", str(cfg)])
    assert r.exit_code == 1
    assert "missing.safetensors does not exist (model.path of the config" in r.output


def test_no_usable_series(tmp_path, case):
    _, _, model = case
    study = lesion_study(3, missing=("flair", "t1_cube_post"))
    files = write_study(study, tmp_path / "all")
    only = tmp_path / "dicom"
    # one series that no rule takes: a derived (reformatted) image is excluded by the rules
    only.mkdir()
    ds = pydicom.dcmread(files["t1_bravo_post"][0])
    ds.ImageType = ["DERIVED", "SECONDARY", "REFORMATTED"]
    ds.SeriesDescription = "MPR reformat"
    ds.save_as(only / "x.dcm")
    r = runner.invoke(app, ["segment", str(only), "--out", str(tmp_path / "o"), "--model", str(model)])
    assert r.exit_code == 1, r.output
    assert "no usable series" in r.output and str(ds.StudyInstanceUID) in r.output


def test_two_studies_refused(tmp_path, case):
    _, dicom, model = case
    other = lesion_study(2, missing=("flair", "t1_cube_post"))
    both = tmp_path / "both"
    shutil.copytree(dicom, both / "a")
    write_study(other, both / "b")
    r = runner.invoke(app, ["segment", str(both), "--out", str(tmp_path / "o"), "--model", str(model)])
    assert r.exit_code == 1
    assert "2 studies" in r.output


def test_conflicting_patients(tmp_path, case):
    _, dicom, model = case
    d = tmp_path / "d"
    shutil.copytree(dicom, d)
    pre = [p for p in d.rglob("*.dcm") if "CUBE" in str(p.parent).upper() or "cube" in str(p.parent)]
    assert pre
    for p in pre:
        ds = pydicom.dcmread(p)
        ds.PatientID = "OTHER-PATIENT-1"
        ds.save_as(p)
    r = runner.invoke(app, ["segment", str(d), "--out", str(tmp_path / "o"), "--model", str(model)])
    assert r.exit_code == 1, r.output
    assert "different PatientIDs" in r.output and "OTHER-PATIENT-1" not in r.output
