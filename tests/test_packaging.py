"""The wheel: built quietly, and carrying every file the node reads at run time (package data)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> tuple[zipfile.ZipFile, str]:
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check",
                            "-w", str(out), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (path,) = out.glob("ild_dicom_node-*.whl")
    return zipfile.ZipFile(path), build.stdout + build.stderr


def test_wheel_builds_without_setuptools_warnings(wheel) -> None:
    _, output = wheel
    # pip's notes on this machine's unused local package indexes are not the build's
    said = [line for line in output.splitlines() if "is ignored" not in line]
    assert not [line for line in said if "warning" in line.lower()], said


def test_wheel_carries_the_shipped_files(wheel) -> None:
    archive, _ = wheel
    names = set(archive.namelist())
    shipped = [
        "config/node.yaml", "config/series_rules.yaml", "config/train.yaml", "config/examples/ge.yaml",
        "config/examples/siemens.yaml", "config/examples/philips.yaml",
        "models/ild-demo.safetensors", "models/baseline-demo.safetensors",
        *(f"dicom_node/web/templates/{p.name}" for p in (ROOT / "dicom_node/web/templates").glob("*.html")),
        *(f"dicom_node/web/static/{p.name}" for p in (ROOT / "dicom_node/web/static").glob("*.css")),
    ]
    assert not [n for n in shipped if n not in names]
    for package in ("dicom_node", "pipeline", "training"):
        sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / package).rglob("*.py")}
        assert sources <= names, sorted(sources - names)
    # the bundled model is byte for byte the checkout's
    assert archive.read("models/ild-demo.safetensors") == (ROOT / "models" / "ild-demo.safetensors").read_bytes()
    assert not [n for n in names if n.startswith("tests/") or "__pycache__" in n or n.endswith(".pyc")]
