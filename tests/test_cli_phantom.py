"""``dicom-node phantom``: arguments, exit codes, output layout and determinism (real generator, 3 mm voxels)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
import typer
from typer.testing import CliRunner

from dicom_node.cli.phantom import app
from training.phantom.types import ROLES

runner = CliRunner()
FAST = ["--voxel-mm", "3"]


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def test_help_explains_every_option_and_the_layout() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    command = typer.main.get_command(app)
    for param in command.params:
        assert param.help, f"{param.name} has no help"
        for flag in param.opts:
            if flag.startswith("--"):
                assert flag in result.output
    helps = {param.name: param.help or "" for param in command.params}
    for part in ("case-", "dicom/", "nifti/<role>.nii.gz", "truth/label.nii.gz", "truth/brain_mask.nii.gz",
                 "truth/lesions.json", "preview.png"):
        assert part in helps["out"]
    assert all(role in helps["missing"] for role in ROLES)


def test_importing_the_command_stays_light() -> None:
    # `dicom-node --help` imports this module: the generator and SimpleITK must only load when the command runs.
    code = ("import sys, dicom_node.cli.phantom; "
            "print(any(m in sys.modules for m in ('SimpleITK', 'training.phantom.generate')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--vendor", "canon"],
         "error: unknown vendor 'canon' for --vendor (choose from ge, siemens, philips, random)"),
        (["--missing", "flair,t2"], "error: unknown role 't2' for --missing (choose from t1_bravo_post, t1_cube_pre, "
                                    "t1_cube_post, flair)"),
        (["--format", "nrrd"], "error: unknown format 'nrrd' for --format (choose from dicom, nifti)"),
        (["--voxel-mm", "0"], "error: --voxel-mm must be > 0 mm, got 0.0"),
        (["--format", "nifti", "--enhanced"], "error: --enhanced only applies to --format dicom"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    result = runner.invoke(app, [str(tmp_path / "out"), *args])
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [message]
    assert not (tmp_path / "out").exists()


def test_typer_level_errors_also_exit_2(tmp_path: Path) -> None:
    assert runner.invoke(app, [str(tmp_path), "--count", "0"]).exit_code == 2
    assert runner.invoke(app, [str(tmp_path), "--seed", "x"]).exit_code == 2


def test_dicom_studies_with_truth_in_the_documented_layout(tmp_path: Path) -> None:
    result = runner.invoke(app, [str(tmp_path), "--seed", "7", "--count", "2", "--vendor", "siemens", *FAST])
    assert result.exit_code == 0, result.output
    assert "phantom studies" in result.stderr  # the progress bar
    cases = sorted(p.name for p in tmp_path.iterdir())
    assert cases == ["case-0007-siemens", "case-0008-siemens"]
    for name in cases:
        case = tmp_path / name
        assert sorted(p.name for p in case.iterdir()) == ["dicom", "truth"]
        assert sorted(p.name for p in (case / "truth").iterdir()) == ["brain_mask.nii.gz", "label.nii.gz",
                                                                        "lesions.json"]
        truth = json.loads((case / "truth" / "lesions.json").read_text())
        series_uids = {}
        for folder in (case / "dicom").iterdir():
            number, _, _ = folder.name.partition("_")
            ds = pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True)
            assert ds.Manufacturer.upper().startswith("SIEMENS") and int(ds.SeriesNumber) == int(number)
            series_uids[ds.SeriesInstanceUID] = ds
        assert truth["seed"] == int(name[5:9]) and truth["vendor"] == "siemens"
        assert truth["reference_series_instance_uid"] in series_uids
        assert f"{name}: dicom" in result.stdout


def test_nifti_with_a_missing_role_and_a_preview(tmp_path: Path) -> None:
    result = runner.invoke(app, [str(tmp_path), "--format", "nifti", "--missing", "flair", "--preview", *FAST])
    assert result.exit_code == 0, result.output
    (case,) = tmp_path.iterdir()
    assert case.name.startswith("case-0000-")
    assert sorted(p.name for p in case.iterdir()) == ["nifti", "preview.png", "truth"]
    assert sorted(p.name for p in (case / "nifti").iterdir()) == sorted(
        f"{role}.nii.gz" for role in ROLES if role != "flair")
    assert (case / "preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((case / "truth" / "lesions.json").read_text())["reference_series_instance_uid"] is None


def test_enhanced_without_distractors_is_one_multiframe_file_per_role(tmp_path: Path) -> None:
    result = runner.invoke(app, [str(tmp_path), "--enhanced", "--no-distractors", "--vendor", "ge", *FAST])
    assert result.exit_code == 0, result.output
    folders = sorted((tmp_path / "case-0000-ge" / "dicom").iterdir())
    assert len(folders) == len(ROLES)
    for folder in folders:
        (path,) = folder.iterdir()
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.SOPClassUID == pydicom.uid.EnhancedMRImageStorage
        assert int(ds.NumberOfFrames) > 1


def test_same_seed_gives_byte_identical_output(tmp_path: Path) -> None:
    for run in ("a", "b"):
        result = runner.invoke(app, [str(tmp_path / run), "--seed", "3", "--vendor", "philips", *FAST])
        assert result.exit_code == 0, result.output
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert [p.relative_to(tmp_path / "a") for p in a] == [p.relative_to(tmp_path / "b") for p in b]
    assert all(pa.read_bytes() == pb.read_bytes() for pa, pb in zip(a, b))
