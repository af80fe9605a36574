"""The bundled model (``models/ild-demo.safetensors``, the node's default ``model.path``) and its baseline."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from dicom_node.cli import app
from dicom_node.config import load_config
from dicom_node.paths import DEFAULT_CONFIG, PROJECT_ROOT
from pipeline.checkpoint import load_checkpoint
from pipeline.model import ARCHITECTURES
from training.calibrate import combinations
from training.phantom import generate_study
from training.phantom.dicom_writer import write_dicom_study

MODELS = PROJECT_ROOT / "models"
runner = CliRunner()


def test_default_config_points_at_the_bundled_model():
    assert load_config(DEFAULT_CONFIG).model.path == MODELS / "ild-demo.safetensors"


@pytest.mark.parametrize("name, architecture, n_combinations", [
    ("ild-demo", "ild-small-os8", 15), ("baseline-demo", "baseline-small-os8", 1)])
def test_bundled_checkpoints(name, architecture, n_combinations):
    path = MODELS / f"{name}.safetensors"
    assert path.stat().st_size < 20 * 2**20  # fits the repository comfortably
    model, meta = load_checkpoint(path)
    assert model.config == ARCHITECTURES[architecture]
    assert meta.model_name == name and 0 < meta.threshold < 1
    assert "nifti:" in meta.training_data  # the synthetic studies (models/*.train.yaml)
    assert (meta.in_plane_size, meta.through_plane_mm) == (256, 1.0)
    keys = [("+".join(c)) for c in combinations(model.config.roles)][:n_combinations]
    assert sorted(meta.validation) == sorted(keys)
    for figures in meta.validation.values():
        assert set(figures) == {"auc", "dice", "lesion_sensitivity"}


def test_model_card_states_synthetic_only():
    text = (MODELS / "README.md").read_text()
    assert "Trained on synthetic data only. Not for clinical use." in text
    assert "make model" in text


@pytest.mark.slow
def test_segment_with_the_defaults_finds_the_large_lesions(tmp_path):
    """A synthetic study the model never saw (seed outside 1000-1071), realistic resolution, no BRAVO (the
    paper's test condition): `dicom-node segment` with the node's defaults finds every lesion >= 500 mm^3."""
    study = generate_study(4242, vendor="siemens", distractors=False, missing=("t1_bravo_post",))
    write_dicom_study(study, tmp_path / "dicom")
    r = runner.invoke(app, ["segment", str(tmp_path / "dicom"), "--out", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["model"]["name"] == "ild-demo" and s["reference_role"] == "t1_cube_post"
    assert s["expected_performance"]["roles"] == "t1_cube_pre+t1_cube_post+flair"
    found = [les["centroid_lps_mm"] for les in s["lesions"]]
    for truth in study.lesions:
        if truth.volume_mm3 >= 500:
            nearest = min(sum((a - b) ** 2 for a, b in zip(truth.centroid_lps_mm, c)) ** 0.5 for c in found)
            assert nearest < max(5.0, truth.diameter_mm / 2), (truth.label, truth.volume_mm3, nearest)
