"""``dicom-node rules test``: the PACS admin's tool, driven through the typer sub-app."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_rules import GE, ge_study, write_series
from typer.testing import CliRunner

from dicom_node.cli.rules import app
from dicom_node.rules import default_rules_path

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real-dicom"
runner = CliRunner()


@pytest.fixture(scope="module")
def ge_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("ge_cli")
    return root, ge_study(root)


@pytest.fixture(scope="module")
def real_text() -> str:
    if not (REAL / "manifest.json").is_file():
        pytest.skip("shared/data/real-dicom not checked out")
    result = runner.invoke(app, ["test", str(REAL)])
    assert result.exit_code == 0, result.output
    return result.stdout


def test_text_report_on_real_corpus_lists_every_series(real_text: str) -> None:
    manifest = json.loads((REAL / "manifest.json").read_text())
    for entry in manifest["series"]:
        assert entry["series_instance_uid"] in real_text
    assert real_text.count("T1 GRE candidate (BRAVO family) without contrast evidence") == 4
    for matcher in (
        "exclusion:diffusion",
        "exclusion:localizer",
        "exclusion:derived",
        "exclusion:secondary_capture",
        "exclusion:non_image",
        "exclusion:epi",
        "t1_gre/ge_bravo",
        "t1_gre/siemens_mprage",
    ):
        assert f"decided by: {matcher}" in real_text
    assert real_text.count("t1_bravo_post  MISSING") == 5  # five studies, none has a post-contrast T1
    assert real_text.splitlines()[0] == f"rules: {default_rules_path()}"


def test_real_report_leaks_no_patient_identity_or_paths(real_text: str) -> None:
    for identity in ("FRUIT", "Development", "XAtest_sub-July11"):
        assert identity not in real_text
    assert str(REAL) not in real_text.split("\n", 1)[1]


def test_synthetic_study_text_shows_roles_and_why(ge_dir: tuple[Path, dict[str, str]]) -> None:
    root, uids = ge_dir
    result = runner.invoke(app, ["test", str(root)])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"t1_bravo_post  <- 'Ax 3D BRAVO +C' {uids['bravo']} (only candidate: score" in out
    assert f"flair          <- 'Sag CUBE FLAIR' {uids['flair3d']} (best of 2 candidates" in out
    assert "role: t1_cube_pre   decided by: t1_fse/ge_cube_t1" in out
    assert "contrast: post (ContrastBolusAgent 'GADAVIST')" in out
    assert "lost to series #6 'Sag CUBE FLAIR'" in out
    for identity in ("Synthetic", "SYN-RULES-001", "19700101"):
        assert identity not in out


def test_json_output(ge_dir: tuple[Path, dict[str, str]]) -> None:
    root, uids = ge_dir
    result = runner.invoke(app, ["test", str(root), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["rules"] == str(default_rules_path())
    [study] = data["studies"]
    assert {role: c["series_instance_uid"] for role, c in study["chosen"].items()} == {
        "t1_bravo_post": uids["bravo"],
        "t1_cube_pre": uids["cube_pre"],
        "t1_cube_post": uids["cube_post"],
        "flair": uids["flair3d"],
    }
    by_uid = {d["series_instance_uid"]: d for d in study["decisions"]}
    assert set(by_uid) == set(uids.values())
    assert by_uid[uids["dwi"]]["matcher"] == "exclusion:diffusion"
    assert by_uid[uids["dwi"]]["excluded_by"] == ["diffusion", "epi"]
    assert by_uid[uids["bravo"]]["n_slices"] == 12
    assert "Synthetic" not in result.stdout and "SYN-RULES-001" not in result.stdout


def test_custom_rules_file_changes_the_answer(tmp_path: Path, ge_dir: tuple[Path, dict[str, str]]) -> None:
    """An admin who drops the FLAIR role sees both FLAIR series lose it."""
    root, uids = ge_dir
    data = yaml.safe_load(default_rules_path().read_text())
    del data["roles"]["flair"]
    site = tmp_path / "site_rules.yaml"
    site.write_text(yaml.safe_dump(data, sort_keys=False))
    result = runner.invoke(app, ["test", str(root), "--rules", str(site), "--json"])
    assert result.exit_code == 0, result.output
    study = json.loads(result.stdout)["studies"][0]
    assert "flair" not in study["chosen"]
    flair = next(d for d in study["decisions"] if d["series_instance_uid"] == uids["flair3d"])
    assert flair["role"] is None and flair["family"] == "flair"


def test_bad_rules_file_exits_2_with_one_line(tmp_path: Path, ge_dir: tuple[Path, dict[str, str]]) -> None:
    root, _ = ge_dir
    bad = tmp_path / "bad.yaml"
    data = yaml.safe_load(default_rules_path().read_text())
    data["scoring"]["three_d"] = "lots"
    bad.write_text(yaml.safe_dump(data, sort_keys=False))
    result = runner.invoke(app, ["test", str(root), "--rules", str(bad)])
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"error: {bad}: scoring.three_d: expected a valid number")
    missing = runner.invoke(app, ["test", str(root), "--rules", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 2 and "rules file not found" in missing.stderr


def test_folder_without_dicom_exits_1(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("no images here")
    result = runner.invoke(app, ["test", str(tmp_path)])
    assert result.exit_code == 1
    assert result.stderr.strip() == f"error: no DICOM files found under {tmp_path}"


def test_bad_usage_exits_2(tmp_path: Path) -> None:
    assert runner.invoke(app, ["test", str(tmp_path / "does-not-exist")]).exit_code == 2
    assert runner.invoke(app, ["test"]).exit_code == 2
    assert runner.invoke(app, ["test", str(tmp_path), "--colour"]).exit_code == 2


def test_help_lists_the_command() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "test" in result.stdout
    result = runner.invoke(app, ["test", "--help"])
    assert result.exit_code == 0 and "--rules" in result.stdout and "--json" in result.stdout


def test_series_without_description_is_still_reported(tmp_path: Path) -> None:
    uid = write_series(
        tmp_path,
        "1.2.826.0.1.3680043.8.498.1",
        1,
        "",
        time="101010",
        manufacturer=GE,
        n=3,
        ScanningSequence="SE",
        MRAcquisitionType="2D",
        RepetitionTime=500,
        EchoTime=10,
    )
    result = runner.invoke(app, ["test", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert f"#1      ''  {uid}  [3 files, 3 positions]" in result.stdout
    assert "decided by: no rule" in result.stdout
