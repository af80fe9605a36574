"""``dicom-node validate`` end to end on three tiny NIfTI phantoms (3 mm, as ``dicom-node phantom --format nifti
--voxel-mm 3 --no-distractors`` writes them; one without BRAVO) with the known-function model on a 64 px grid:
outputs, the resumable prediction cache (a rerun with another threshold does no inference), forced roles, a
baseline comparison, --calibrate-on, a DICOM study with NIfTI truth, and the exit codes."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest
from support.known_model import known_model
from typer.testing import CliRunner

from dicom_node.cli import app
from pipeline.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from pipeline.model import combination_key
from training.calibrate import pooled_threshold
from training.data.cache import GridSettings, cache_case
from training.data.nifti import nifti_sources
from training.phantom import generate_study
from training.phantom.dicom_writer import write_dicom_study
from training.phantom.nifti_writer import write_nifti_study, write_truth

runner = CliRunner()
ALL = ("t1_bravo_post", "t1_cube_pre", "t1_cube_post", "flair")
NO_BRAVO = combination_key(ALL[1:])


def invoke(*args):
    return runner.invoke(app, ["validate", *(str(a) for a in args)])


def _checkpoint(path: Path, name: str, youden: float | None = None) -> Path:
    meta = CheckpointMeta(model_name=name, model_version="0.0.1-test", threshold=0.5, normalisation="per-slice robust",
                          normalisation_version="1", training_data="none (test)", training_run_uid="1.2.826.0.1.99",
                          in_plane_size=64, through_plane_mm=3.0, youden_threshold=youden,
                          threshold_rule="youden" if youden is None else "lesion-froc")
    return save_checkpoint(path, known_model("t1_cube_post"), meta)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A model, a file that is not one, and an empty folder (no phantoms: for the argument checks)."""
    root = tmp_path_factory.mktemp("validate-args")
    (root / "empty").mkdir()
    (root / "broken.safetensors").write_bytes(b"not a checkpoint")
    return {"data": root / "empty", "model": _checkpoint(root / "known.safetensors", "known"),
            "empty": root / "empty", "broken": root / "broken.safetensors"}


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("validate-cli")
    for seed in range(3):
        study = generate_study(seed, voxel_mm=3.0, distractors=False, missing=("t1_bravo_post",) if seed == 2 else ())
        case = root / "data" / f"case-{seed}"
        write_nifti_study(study, case / "nifti", truth_dir=case / "truth")
    return root


def test_help_explains_the_options():
    r = runner.invoke(app, ["validate", "--help"])
    assert r.exit_code == 0
    for option in ("--model", "--baseline", "--kind", "--roles", "--all-combinations", "--calibrate-on",
                   "--threshold", "--out", "--cache", "--bootstrap", "--seed", "--no-progress"):
        assert option in r.output


@pytest.mark.parametrize("args, message", [
    (["--kind", "png"], "--kind"),
    (["--roles", "t1_cube_post,dwi"], "--roles"),
    (["--roles", "flair", "--all-combinations"], "at most one"),
    (["--threshold", "1.5"], "--threshold"),
    (["--threshold", "otsu"], "--threshold"),
    (["--bootstrap", "-1"], "--bootstrap"),
])
def test_bad_arguments_exit_2(files, tmp_path, args, message):
    r = invoke(files["data"], "--model", files["model"], "--out", tmp_path, *args)
    assert r.exit_code == 2, r.output
    assert message in r.output


def test_unreadable_model_and_no_cases_exit_2(files, tmp_path):
    r = invoke(files["data"], "--model", files["broken"], "--out", tmp_path)
    assert r.exit_code == 2 and "model" in r.output
    r = invoke(files["empty"], "--model", files["model"], "--out", tmp_path, "--no-progress")
    assert r.exit_code == 2 and "no nifti case found" in r.output


def _mtimes(folder: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*.npy")}


@pytest.mark.slow
def test_end_to_end_rerun_forced_roles_and_comparison(phantoms):
    """One test, in order, so that each run reuses the previous runs' cache (cases and predictions)."""
    model = _checkpoint(phantoms / "known.safetensors", "known")
    data, out = phantoms / "data", phantoms / "out"
    r = invoke(data, "--model", model, "--out", out, "--no-progress", "--bootstrap", "100")
    assert r.exit_code == 0, r.output
    assert "3 prediction(s) computed" in r.output
    for name in ("report.html", "report.pdf", "metrics.json", "cases.csv"):
        assert (out / name).stat().st_size > 0
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["dataset"]["n_cases"] == 3 and doc["dataset"]["roles_present"]["t1_bravo_post"] == 2
    rows = list(csv.DictReader((out / "cases.csv").open()))
    # as acquired: the case without BRAVO is run on the three roles it has, the others on all four
    assert sorted(r["roles_given"] for r in rows) == [combination_key(ALL)] * 2 + [NO_BRAVO]
    assert {float(r["threshold"]) for r in rows} == {0.5}
    predictions = out / "cache" / "predictions"
    before = _mtimes(predictions)
    assert len(before) == 3

    # another threshold: every map read back from the cache
    t0 = time.perf_counter()
    r = invoke(data, "--model", model, "--out", out, "--no-progress", "--bootstrap", "100", "--threshold", "0.3")
    seconds = time.perf_counter() - t0
    assert r.exit_code == 0, r.output
    assert "0 prediction(s) computed" in r.output
    assert _mtimes(predictions) == before  # read back, not rewritten
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["models"]["model"]["inferred"] == 0 and doc["models"]["model"]["threshold"] == 0.3
    assert doc["models"]["model"]["threshold_source"] == "--threshold"
    assert {float(r["threshold"]) for r in csv.DictReader((out / "cases.csv").open())} == {0.3}
    assert seconds < 60, seconds  # no inference: loading, metrics and the reports only

    # forced roles, the model against itself as "baseline": the no-BRAVO case's map is cached already
    forced = phantoms / "forced"
    r = invoke(data, "--model", model, "--baseline", model, "--roles", ",".join(NO_BRAVO.split("+")), "--out",
               forced, "--no-progress", "--bootstrap", "0", "--cache", out / "cache")
    assert r.exit_code == 0, r.output
    assert "known: 2 prediction(s) computed" in r.output and "known: 0 prediction(s) computed" in r.output
    doc = json.loads((forced / "metrics.json").read_text())
    assert list(doc["models"]["model"]["combinations"]) == [NO_BRAVO]
    assert doc["models"]["model"]["combinations"][NO_BRAVO]["summary"]["n_patients"] == 3
    assert doc["models"]["model"]["combinations"][NO_BRAVO]["roc"]["bootstrap"] == 0
    # identical per-patient values: the rank-sum p is 1, the signed-rank test has nothing to rank
    cmp = doc["comparison"][NO_BRAVO]["dice"]
    assert cmp["n"] == 3 and cmp["p_ranksum"] == 1.0 and cmp["p_signed_rank"] is None

    # --calibrate-on (here the same folder): each model's threshold is training.calibrate.pooled_threshold's
    r = invoke(data, "--model", model, "--calibrate-on", data, "--out", phantoms / "calibrated", "--no-progress",
               "--bootstrap", "0", "--cache", out / "cache")
    assert r.exit_code == 0, r.output
    doc = json.loads((phantoms / "calibrated" / "metrics.json").read_text())
    net, meta = load_checkpoint(model)
    cases = [cache_case(s, out / "cache" / "cases", GridSettings(meta.in_plane_size, meta.through_plane_mm,
                                                                 net.config.slices_per_role))
             for s in nifti_sources(data)]
    assert doc["models"]["model"]["threshold"] == pooled_threshold(net, cases, progress=False)[0]
    assert doc["models"]["model"]["threshold_source"] == "calibrated on data (3 cases, youden)"


@pytest.mark.slow
def test_a_dicom_study_with_nifti_truth(tmp_path):
    """``--kind dicom``: the series get their roles from the node's own rules, as in production (no FLAIR here)."""
    study = generate_study(0, vendor="ge", voxel_mm=3.0, distractors=False, missing=("flair",))
    write_dicom_study(study, tmp_path / "data" / "site-case" / "scanner")
    write_truth(study, tmp_path / "data" / "site-case" / "truth")
    model = _checkpoint(tmp_path / "known.safetensors", "known")
    r = invoke(tmp_path / "data", "--model", model, "--kind", "dicom", "--out", tmp_path / "out", "--no-progress",
               "--bootstrap", "0")
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert doc["dataset"]["kind"] == "dicom" and doc["dataset"]["roles_present"] == {
        "t1_bravo_post": 1, "t1_cube_pre": 1, "t1_cube_post": 1, "flair": 0}
    [row] = list(csv.DictReader((tmp_path / "out" / "cases.csv").open()))
    assert (row["case_id"], row["roles_given"]) == ("site-case", combination_key(ALL[:3]))
    assert int(row["n_lesions"]) == doc["dataset"]["n_lesions"] > 0


@pytest.mark.slow
def test_threshold_youden_selects_the_stored_youden_point(phantoms, tmp_path):
    model = _checkpoint(tmp_path / "froc.safetensors", "froc", youden=0.25)
    out = tmp_path / "out"
    r = invoke(phantoms / "data", "--model", model, "--out", out, "--no-progress", "--bootstrap", "0",
               "--threshold", "youden")
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())["models"]["model"]
    assert m["threshold"] == 0.25 and "youden" in m["threshold_source"].lower()
    assert (m["checkpoint_threshold"], m["checkpoint_threshold_rule"], m["checkpoint_youden_threshold"]) == \
        (0.5, "lesion-froc", 0.25)
    assert "0.5 (lesion-froc); Youden point 0.25" in (out / "report.html").read_text()
    # a checkpoint from before the Youden point was stored: a usage error, nothing evaluated
    old = _checkpoint(tmp_path / "old.safetensors", "old")
    r = invoke(phantoms / "data", "--model", old, "--out", tmp_path / "old", "--cache", out / "cache", "--no-progress",
               "--bootstrap", "0", "--threshold", "youden")
    assert r.exit_code == 2 and "does not record its Youden point" in r.output
