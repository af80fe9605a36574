"""Training (``dicom-node train`` / ``calibrate`` / ``model-card``): config, splits, batches, loss, and tiny end-to-end
runs on four 3 mm phantom cases with a 64 px / 3 mm model grid (seconds per run on one CPU thread)."""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from dicom_node.cli import app
from dicom_node.cli.train import _load_train_config
from dicom_node.paths import CONFIG_DIR
from pipeline.checkpoint import load_checkpoint
from pipeline.model import combination_key
from training.batches import SliceSampler, augment, build_batch
from training.calibrate import combinations, predict_case
from training.config import DataSection, SourceEntry, TrainConfig
from training.data.cache import cache_case
from training.data.nifti import nifti_sources
from training.loss import segmentation_loss
from training.metrics import count_group, max_dice_threshold, youden_threshold
from training.metrics.operating import lesion_froc_point, sweep
from training.phantom import generate_study
from training.phantom.dicom_writer import write_dicom_study
from training.phantom.nifti_writer import write_nifti_study
from training.splits import make_splits
from training.trainer import grid_settings, load_cases, train

runner = CliRunner()

ALL_ROLES = ("t1_bravo_post", "t1_cube_pre", "t1_cube_post", "flair")
BASELINE_KEY = "t1_cube_pre+t1_cube_post+flair"

#: the tiny recipe: 64 px / 3 mm grid, batches of 4 whole slices, one CPU thread
TINY: dict[str, Any] = {
    "model": {"architecture": "ild-small", "name": "tiny-ild", "version": "0.1.2", "in_plane_size": 64,
              "through_plane_mm": 3.0},
    "recipe": {"batch_size": 4, "crop": None, "monitor_slices": 4, "steps_per_epoch": 3, "epochs": 2,
               "threads": 1, "seed": 0},
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Everything in-process on one torch thread (the machine is small and shared)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def write_config(path: Path, data: Path, cache: Path, out: Path, **over: dict[str, Any]) -> Path:
    doc = _merge(TINY, {"data": {"sources": [{"kind": "nifti", "path": str(data)}], "cache": str(cache),
                                 "split": {"seed": 0, "validation": 1, "test": 1}},
                        "output": {"dir": str(out), "checkpoint": str(out / "model.safetensors")}})
    doc = _merge(doc, over)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc))
    return path


def read_metrics(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


# --- shared tiny data -------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory) -> Path:
    """Four NIfTI phantom cases (all four roles), as ``dicom-node phantom --format nifti --voxel-mm 3
    --no-distractors --count 4`` writes them."""
    root = tmp_path_factory.mktemp("phantom-nifti")
    for seed in range(4):
        study = generate_study(seed, voxel_mm=3.0, distractors=False)
        case = root / f"case-{seed:04d}-{study.vendor.value}"
        write_nifti_study(study, case / "nifti", truth_dir=case / "truth")
    return root


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("training-cache")


@pytest.fixture(scope="module")
def dicom_studies(tmp_path_factory) -> dict[str, Path]:
    """DICOM studies for ``dicom-node segment``: one with all four roles, one without ``t1_cube_pre``."""
    root = tmp_path_factory.mktemp("phantom-dicom")
    full = generate_study(7, voxel_mm=3.0)
    write_dicom_study(full, root / "full" / "dicom")
    no_pre = generate_study(8, voxel_mm=3.0, distractors=False, missing=("t1_cube_pre",))
    write_dicom_study(no_pre, root / "no-pre" / "dicom")
    return {"full": root / "full", "no_pre": root / "no-pre"}


@pytest.fixture(scope="module")
def tiny_config(phantom_root, cache_dir, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("tiny")
    return write_config(tmp / "tiny.yaml", phantom_root, cache_dir, tmp / "run",
                        recipe={"epochs": 3, "steps_per_epoch": 8})


@pytest.fixture(scope="module")
def cases(tiny_config) -> dict:
    return load_cases(_load_train_config(tiny_config), progress=False)


@pytest.fixture(scope="module")
def trained(tiny_config) -> dict[str, Any]:
    r = invoke("train", "--config", tiny_config, "--no-progress")
    assert r.exit_code == 0, r.output
    cfg = _load_train_config(tiny_config)
    return {"result": r, "config": cfg, "path": tiny_config, "dir": cfg.output.dir, "checkpoint": cfg.output.checkpoint}


@pytest.fixture(scope="module")
def baseline(phantom_root, cache_dir, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("baseline")
    path = write_config(tmp / "baseline.yaml", phantom_root, cache_dir, tmp / "run",
                        model={"architecture": "baseline-small", "name": "tiny-baseline"},
                        recipe={"epochs": 1, "steps_per_epoch": 3})
    r = invoke("train", "--config", path, "--no-progress")
    assert r.exit_code == 0, r.output
    return tmp / "run" / "model.safetensors"


# --- 1. config ----------------------------------------------------------------------------------------------------


def test_shipped_train_yaml_equals_schema_defaults() -> None:
    path = CONFIG_DIR / "train.yaml"
    source = yaml.safe_load(path.read_text())["data"]["sources"][0]
    expected = TrainConfig(data=DataSection(sources=[SourceEntry(**source)])).resolve_paths(CONFIG_DIR.resolve())
    assert _load_train_config(path) == expected


def test_every_train_yaml_key_has_a_comment() -> None:
    for line in (CONFIG_DIR / "train.yaml").read_text().splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and not stripped.endswith(":"):
            assert "#" in stripped, f"no comment on: {line!r}"


@pytest.mark.parametrize(("over", "expected"), [
    ({"recipe": {"batchsize": 4}}, "recipe.batchsize: unknown key"),
    ({"recipe": {"epochs": "many"}}, "recipe.epochs: expected a valid integer"),
    ({"model": {"architecture": "resnet"}}, "model.architecture: expected one of"),
    ({"recipe": {"batch_size": 6, "accumulation": 4}},
     "recipe.batch_size 6 is not divisible by recipe.accumulation 4"),
])
def test_bad_train_config_exits_2_with_one_line(tmp_path, over, expected) -> None:
    path = write_config(tmp_path / "bad.yaml", tmp_path / "data", tmp_path / "cache", tmp_path / "run", **over)
    r = invoke("train", "--config", path)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and expected in lines[0], r.stderr
    assert not (tmp_path / "run").exists()


# --- 2. splits ----------------------------------------------------------------------------------------------------

#: 30 patients: 15 with 1-3 lesions, 9 with 4-10, 6 with > 10
COUNTS = {f"p{i:02d}": n for i, n in enumerate([1, 2, 3] * 5 + [4, 7, 10] * 3 + [11, 20] * 3)}


def test_splits_keep_patients_whole_and_are_seeded() -> None:
    s = make_splits(COUNTS, validation=0.2, test=0.3, seed=0)
    sets = [set(s[k]) for k in ("train", "validation", "test")]
    assert sum(len(x) for x in sets) == len(COUNTS) and set().union(*sets) == set(COUNTS)  # disjoint, complete
    assert all(s[k] == sorted(s[k]) for k in s)
    assert make_splits(COUNTS, validation=0.2, test=0.3, seed=0) == s
    assert make_splits(COUNTS, validation=0.2, test=0.3, seed=1) != s


@pytest.mark.parametrize(("validation", "test", "sizes"), [(3, 5, (22, 3, 5)), (0.1, 0.2, (21, 3, 6)),
                                                           (1, 0, (29, 1, 0))])
def test_split_sizes_from_counts_and_fractions(validation, test, sizes) -> None:
    s = make_splits(COUNTS, validation=validation, test=test, seed=3)
    assert (len(s["train"]), len(s["validation"]), len(s["test"])) == sizes


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_test_set_is_stratified_by_lesion_count(seed) -> None:
    s = make_splits(COUNTS, validation=0.1, test=10, seed=seed)
    groups = [count_group(COUNTS[c]) for c in s["test"]]
    # 10 of 30: each group its proportional share (15, 9, 6 -> 5, 3, 2)
    assert {g: groups.count(g) for g in ("1-3", "4-10", ">10")} == {"1-3": 5, "4-10": 3, ">10": 2}


@pytest.mark.parametrize(("counts", "validation", "test"), [({"a": 1, "b": 2}, 1, 1), ({"a": 1}, 1, 0),
                                                            ({"a": 1, "b": 2, "c": 3}, 0.1, 0)])
def test_too_few_cases_for_a_split(counts, validation, test) -> None:
    with pytest.raises(ValueError, match="cannot give"):
        make_splits(counts, validation=validation, test=test, seed=0)


# --- 3. batches ---------------------------------------------------------------------------------------------------


def test_sampler_draws_lesion_slices(cases) -> None:
    cs = list(cases.values())
    assert all(c.n_lesions >= 1 and len(c.lesion_slices) for c in cs)
    for fraction, n in ((0.5, 10), (0.3, 10), (0.25, 6), (0.0, 5), (1.0, 4)):
        picks = SliceSampler(cs, fraction, np.random.default_rng(1)).draw(n)
        assert len(picks) == n
        lesion = [p for p in picks if p[2]]
        assert len(lesion) == round(n * fraction)
        assert all(cs[c].label[k].any() for c, k, _ in lesion)
        assert all(0 <= k < cs[c].n_slices for c, k, _ in picks)


def test_build_batch_shapes_and_missing_role(cases, phantom_root, tmp_path, tiny_config) -> None:
    first = min(phantom_root.iterdir())
    shutil.copytree(first, tmp_path / "data" / first.name)
    (tmp_path / "data" / first.name / "nifti" / "flair.nii.gz").unlink()
    [source] = nifti_sources(tmp_path / "data")
    no_flair = cache_case(source, tmp_path / "cache", grid_settings(_load_train_config(tiny_config)))
    full = cases[first.name]
    assert no_flair.volumes["flair"] is None and full.volumes["flair"] is not None
    k = int(full.lesion_slices[0])
    b = build_batch([full, no_flair], [(0, k, True), (1, k, True), (1, 0, False)], ALL_ROLES, slices_per_role=5,
                    crop=None, flips=False, rot90=False, rng=np.random.default_rng(0))
    assert b.x.shape == (3, 20, 64, 64) and b.x.dtype == np.float32
    assert b.y.shape == (3, 1, 64, 64) and b.y.dtype == np.float32 and set(np.unique(b.y)) <= {0.0, 1.0}
    assert b.present.dtype == bool and b.present.tolist() == [[True] * 4, [True, True, True, False],
                                                             [True, True, True, False]]
    assert b.lesion_draw.tolist() == [True, True, False]
    assert not b.x[1:, 15:].any() and b.x[0, 15:].any()  # flair channels (role-major, 5 each): zeros when missing
    np.testing.assert_array_equal(b.y[0, 0], full.label[k])  # no augmentation: the centre slice's label
    np.testing.assert_array_equal(b.x[0, 7], np.asarray(full.volumes["t1_cube_pre"][k], dtype=np.float32))


def test_crops_of_lesion_draws_hold_lesion(cases) -> None:
    cs = list(cases.values())
    rng = np.random.default_rng(5)
    picks = SliceSampler(cs, 0.5, rng).draw(16)
    b = build_batch(cs, picks, ALL_ROLES, slices_per_role=5, crop=32, flips=True, rot90=True, rng=rng)
    assert b.x.shape == (16, 20, 32, 32) and b.y.shape == (16, 1, 32, 32)
    assert b.lesion_draw.sum() == 8
    assert all(b.y[i].sum() > 0 for i in np.flatnonzero(b.lesion_draw))


def _dihedral(a: np.ndarray) -> list[np.ndarray]:
    """The 8 flips/rotations of the last two axes."""
    out = []
    for flip in (False, True):
        f = np.flip(a, -1) if flip else a
        out += [np.rot90(f, k, axes=(-2, -1)) for k in range(4)]
    return out


def test_augment_moves_input_and_label_together() -> None:
    rng = np.random.default_rng(0)
    x = rng.random((3, 8, 8)).astype(np.float32)  # no symmetry: each of the 8 transforms is distinct
    y = (x[:1] > 0.5).astype(np.float32)
    seen = set()
    for seed in range(32):
        xa, ya = augment(x, y, np.random.default_rng(seed), flips=True, rot90=True)
        assert xa.shape == x.shape and ya.shape == y.shape and xa.flags.c_contiguous
        [t] = [i for i, d in enumerate(_dihedral(x[0])) if np.array_equal(d, xa[0])]
        seen.add(t)
        for c in range(3):
            np.testing.assert_array_equal(xa[c], _dihedral(x[c])[t])  # every channel the same transform
        np.testing.assert_array_equal(ya, (xa[:1] > 0.5).astype(np.float32))  # ... and the label too
    assert len(seen) == 8
    xa, ya = augment(x, y, np.random.default_rng(0), flips=False, rot90=False)
    np.testing.assert_array_equal(xa, x)
    np.testing.assert_array_equal(ya, y)


# --- 4. loss ------------------------------------------------------------------------------------------------------


def test_loss_is_weighted_bce_plus_dice() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, (2, 1, 6, 6))
    y = (rng.random((2, 1, 6, 6)) < 0.2).astype(np.float64)
    p = 1 / (1 + np.exp(-z))
    bce = float(np.mean(-(10 * y * np.log(p) + (1 - y) * np.log(1 - p))))
    dice = (2 * np.sum(p * y) + 1) / (np.sum(p) + np.sum(y) + 1)
    zt, yt = torch.tensor(z, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
    assert float(segmentation_loss(zt, yt, positive_weight=10)) == pytest.approx(bce, rel=1e-5)
    assert float(segmentation_loss(zt, yt, positive_weight=10, dice_weight=0.5)) == pytest.approx(
        bce + 0.5 * (1 - dice), rel=1e-5)
    assert float(segmentation_loss(zt, yt, positive_weight=1)) == pytest.approx(
        float(np.mean(-(y * np.log(p) + (1 - y) * np.log(1 - p)))), rel=1e-5)


# --- 5. training end to end -----------------------------------------------------------------------------------------


def test_train_end_to_end(trained) -> None:
    out = trained["dir"]
    assert {"metrics.csv", "splits.json", "run.json", "last.pt", "calibration.json"} <= {p.name for p in out.iterdir()}
    assert trained["checkpoint"].is_file() and str(trained["checkpoint"]) in trained["result"].output
    rows = read_metrics(out / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3] and [int(r["step"]) for r in rows] == [8, 16, 24]
    train_loss = [float(r["train_loss"]) for r in rows]
    val_loss = [float(r["val_loss"]) for r in rows]
    assert all(math.isfinite(v) for v in train_loss + val_loss)
    assert train_loss[-1] < train_loss[0]  # it learns (fixed seeds: the same numbers every run)
    assert val_loss[-1] < val_loss[0]  # the same validation slices every epoch
    splits = json.loads((out / "splits.json").read_text())
    assert sorted(splits["train"] + splits["validation"] + splits["test"]) == sorted(
        p.name for p in trained["config"].data.sources[0].path.iterdir())
    assert (len(splits["train"]), len(splits["validation"]), len(splits["test"])) == (2, 1, 1)
    run = json.loads((out / "run.json").read_text())
    assert run["world_size"] == 1 and run["train_cases"] == 2 and run["steps_per_epoch"] == 8

    model, meta = load_checkpoint(trained["checkpoint"])
    assert 0 < meta.threshold < 1
    assert (meta.in_plane_size, meta.through_plane_mm) == (64, 3.0)
    assert (meta.model_name, meta.model_version) == ("tiny-ild", "0.1.2")
    assert meta.training_run_uid == run["run_uid"]
    assert set(meta.validation) == {combination_key(c) for c in combinations(ALL_ROLES)}
    assert len(meta.validation) == 15
    assert json.loads((out / "calibration.json").read_text())["threshold"] == pytest.approx(meta.threshold)
    # the checkpoint holds the trained weights (last.pt's)
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    assert state["epoch"] == 3
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state["model"][k], rtol=0, atol=0)


def test_segment_with_trained_model(trained, dicom_studies, tmp_path) -> None:
    r = invoke("segment", dicom_studies["full"], "--out", tmp_path / "out", "--model", trained["checkpoint"],
               "--threads", "1")
    assert r.exit_code == 0, r.output
    assert {"sr.dcm", "summary.json"} <= {p.name for p in (tmp_path / "out").iterdir()}
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (s["model"]["name"], s["model"]["version"]) == ("tiny-ild", "0.1.2")
    assert (s["model"]["in_plane_size"], s["model"]["through_plane_mm"]) == (64, 3.0)


# --- 6. resume ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resumed(phantom_root, cache_dir, tmp_path_factory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("resume")
    one = write_config(tmp / "one.yaml", phantom_root, cache_dir, tmp / "run", recipe={"epochs": 1, "steps_per_epoch": 2})
    r = invoke("train", "--config", one, "--no-progress")
    assert r.exit_code == 0, r.output
    first = {"rows": read_metrics(tmp / "run" / "metrics.csv"), "run": json.loads((tmp / "run" / "run.json").read_text())}
    two = write_config(tmp / "two.yaml", phantom_root, cache_dir, tmp / "run", recipe={"epochs": 2, "steps_per_epoch": 2})
    r = invoke("train", "--config", two, "--resume", "--no-progress")
    assert r.exit_code == 0, r.output
    return {"tmp": tmp, "first": first, "two": two, "dir": tmp / "run"}


def test_resume_adds_one_epoch(resumed) -> None:
    rows = read_metrics(resumed["dir"] / "metrics.csv")
    assert rows[:1] == resumed["first"]["rows"] and len(rows) == 2
    assert (int(rows[1]["epoch"]), int(rows[1]["step"])) == (2, 4)
    run = json.loads((resumed["dir"] / "run.json").read_text())
    assert run["run_uid"] == resumed["first"]["run"]["run_uid"]
    _, meta = load_checkpoint(resumed["dir"] / "model.safetensors")
    assert meta.training_run_uid == run["run_uid"]


def _weights(out_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(out_dir / "last.pt", map_location="cpu", weights_only=False)["model"]


def test_resumed_run_equals_an_uninterrupted_one(resumed, tmp_path) -> None:
    """1 epoch + resume = 2 epochs straight: weights, optimiser and random streams are all restored; and the
    seed alone decides the initial weights (the global torch stream is disturbed first)."""
    torch.rand(100)
    cfg = _load_train_config(resumed["two"])
    straight = cfg.model_copy(update={"output": cfg.output.model_copy(update={"dir": tmp_path / "straight"})})
    train(straight, progress=False, calibrate=False)
    a, b = _weights(resumed["dir"]), _weights(tmp_path / "straight")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert read_metrics(tmp_path / "straight" / "metrics.csv")[1]["train_loss"] == read_metrics(
        resumed["dir"] / "metrics.csv")[1]["train_loss"]


def test_other_seed_other_initial_weights(resumed, tmp_path) -> None:
    cfg = _load_train_config(resumed["two"])
    runs = {}
    for seed in (0, 1):
        c = cfg.model_copy(update={
            "recipe": cfg.recipe.model_copy(update={"epochs": 1, "steps_per_epoch": 1, "seed": seed}),
            "output": cfg.output.model_copy(update={"dir": tmp_path / str(seed)})})
        train(c, progress=False, calibrate=False)
        runs[seed] = _weights(tmp_path / str(seed))
    first_conv = next(k for k in runs[0] if k.endswith("weight"))
    assert not torch.equal(runs[0][first_conv], runs[1][first_conv])


# --- 7. baseline ----------------------------------------------------------------------------------------------------


def test_baseline_trains_with_its_one_combination(baseline) -> None:
    model, meta = load_checkpoint(baseline)
    assert not model.config.ild and tuple(model.config.roles) == ("t1_cube_pre", "t1_cube_post", "flair")
    assert set(meta.validation) == {BASELINE_KEY}
    assert meta.model_name == "tiny-baseline" and 0 < meta.threshold < 1


def test_baseline_refuses_a_study_missing_its_role(baseline, dicom_studies, tmp_path) -> None:
    r = invoke("segment", dicom_studies["no_pre"], "--out", tmp_path / "out", "--model", baseline, "--threads", "1")
    assert r.exit_code == 1, r.output
    assert "needs every one of its roles" in r.output and "t1_cube_pre" in r.output
    assert not (tmp_path / "out" / "sr.dcm").exists()


# --- 8. calibrate ---------------------------------------------------------------------------------------------------


def test_calibrate_on_a_folder(trained, phantom_root, cache_dir, tmp_path) -> None:
    new = tmp_path / "new.safetensors"
    r = invoke("calibrate", trained["checkpoint"], "--data", phantom_root, "--cache", cache_dir, "--out", new,
               "--no-progress")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "new.calibration.json").is_file()
    old_w, new_w = load_file(trained["checkpoint"]), load_file(new)
    assert old_w.keys() == new_w.keys()
    assert all(torch.equal(old_w[k], new_w[k]) for k in old_w)
    model, old = load_checkpoint(trained["checkpoint"])
    _, meta = load_checkpoint(new)
    assert meta.training_run_uid == old.training_run_uid
    assert (meta.model_name, meta.model_version, meta.in_plane_size) == (old.model_name, old.model_version, 64)
    assert set(meta.validation) == set(old.validation)
    # the default rule's threshold: the lesion-wise FROC point of the four cases' whole maps, all roles given
    maps = [(predict_case(model, c, ALL_ROLES), c.label, c.spacing_mm)
            for c in load_cases(trained["config"], progress=False).values()]
    assert meta.threshold_rule == "lesion-froc"
    assert meta.threshold == pytest.approx(lesion_froc_point(sweep(maps)).threshold, rel=1e-6)
    # and beside it, independently: the Youden point of the pooled brain-mask voxels of all four cases
    scores, labels = _pooled_brain_voxels(model, trained)
    expected, _, _ = youden_threshold(scores, labels)
    assert meta.youden_threshold == pytest.approx(expected, rel=1e-6)
    assert f"on {len(load_cases(trained['config'], progress=False))} case(s)" in r.output


def _pooled_brain_voxels(model, trained) -> tuple[np.ndarray, np.ndarray]:
    """Scores and labels of every case's brain-mask voxels, all roles given (computed here, not by calibrate)."""
    scores, labels = [], []
    for case in load_cases(trained["config"], progress=False).values():
        prob = predict_case(model, case, ALL_ROLES)
        brain = np.asarray(case.brain) > 0
        scores.append(prob[brain])
        labels.append(np.asarray(case.label)[brain] > 0)
    return np.concatenate(scores), np.concatenate(labels)


def test_calibrate_max_dice_rule(trained, phantom_root, cache_dir, tmp_path) -> None:
    new = tmp_path / "dice.safetensors"
    r = invoke("calibrate", trained["checkpoint"], "--data", phantom_root, "--cache", cache_dir, "--out", new,
               "--rule", "max-dice", "--no-progress")
    assert r.exit_code == 0, r.output
    model, meta = load_checkpoint(new)
    assert meta.threshold_rule == "max-dice"
    expected, _, _ = max_dice_threshold(*_pooled_brain_voxels(model, trained))
    assert meta.threshold == pytest.approx(expected, rel=1e-6)
    assert invoke("calibrate", trained["checkpoint"], "--data", phantom_root, "--out", tmp_path / "x.safetensors",
                  "--rule", "otsu").exit_code == 2


def test_calibrate_needs_exactly_one_source(trained, phantom_root, tmp_path) -> None:
    r = invoke("calibrate", trained["checkpoint"], "--config", trained["path"], "--data", phantom_root,
               "--out", tmp_path / "x.safetensors")
    assert r.exit_code == 2
    assert "exactly one of --config" in r.stderr
    assert not (tmp_path / "x.safetensors").exists()


# --- 9. model card --------------------------------------------------------------------------------------------------


def test_model_card(trained, baseline, tmp_path) -> None:
    out = tmp_path / "card" / "evaluation"
    r = invoke("model-card", "--config", trained["path"], "--model", trained["checkpoint"], "--baseline", baseline,
               "--out", out, "--no-progress")
    assert r.exit_code == 0, r.output
    doc = json.loads(out.with_suffix(".json").read_text())
    assert doc["test_cases"] == json.loads((trained["dir"] / "splits.json").read_text())["test"]
    assert len(doc["model"]["combinations"]) == 15 and set(doc["baseline"]["combinations"]) == {BASELINE_KEY}
    md = out.with_suffix(".md").read_text()
    assert "| | n | AUC | Dice | IoU | recall | precision |" in md
    assert "*paper: study 2 ILD, test site missing BRAVO (real data)*" in md
    assert "*paper: study 2 DeepLab V3 baseline (real data)*" in md
    assert "tiny-ild (ILD), BRAVO missing | 1 |" in md and "tiny-baseline (baseline DeepLab V3, same roles) | 1 |" in md


# --- 10. distributed (torchrun, CPU / Gloo) -------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes(phantom_root, cache_dir, cases, tmp_path) -> None:
    # ``cases`` first: the shared cache is built, so both ranks only read it
    bindir = Path(sys.executable).parent
    config = write_config(tmp_path / "ddp.yaml", phantom_root, cache_dir, tmp_path / "run",
                          recipe={"epochs": 2, "steps_per_epoch": 2})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    p = subprocess.run([str(bindir / "torchrun"), "--nproc_per_node", "2", "--master_port", str(_free_port()),
                        str(bindir / "dicom-node"), "train", "--config", str(config), "--no-progress"],
                       env=env, capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2] and all(math.isfinite(float(r["train_loss"])) for r in rows)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["world_size"] == 2 and run["device"] == "cpu"
    _, meta = load_checkpoint(tmp_path / "run" / "model.safetensors")
    assert meta.training_run_uid == run["run_uid"] and len(meta.validation) == 15
