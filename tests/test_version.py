"""One version number (``dicom_node.__version__``) and everything that carries it: the package metadata, the
changelog, ``dicom-node --version``, ``status``, the dashboard's footer and /api/health, and the outputs
(SEG/SR SoftwareVersions, summary.json) of a real ``dicom-node segment`` run."""

from __future__ import annotations

import configparser
import json
import re
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from test_conformance import segment_outputs
from test_web import _client, filled, study_dir  # noqa: F401 - fixtures: a node database with one processed study
from typer.testing import CliRunner

from dicom_node import __version__
from dicom_node.cli import app
from dicom_node.status import format_status, node_status
from pipeline.dicom_out import AlgorithmInfo

ROOT = Path(__file__).resolve().parents[1]


def test_version_is_semantic_and_setup_cfg_reads_it() -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+", __version__)
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert cfg["metadata"]["version"] == "attr: dicom_node.__version__"


def test_changelog_names_this_version_first_and_every_issue() -> None:
    text = (ROOT / "CHANGELOG.md").read_text()
    releases = re.findall(r"^## \[([^\]]+)\]", text, re.MULTILINE)
    assert releases[0] == "Unreleased" and releases[1] == __version__, releases
    assert re.search(rf"^## \[{re.escape(__version__)}\] - \d{{4}}-\d{{2}}-\d{{2}}$", text, re.MULTILINE)
    for issue in range(2, 10):
        assert re.search(rf"^### .*#{issue}\b", text, re.MULTILINE), f"no section for issue #{issue}"


def test_cli_version() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"dicom-node {__version__}"
    # The installed console script says the same (it is what operators run).
    script = Path(sys.executable).parent / "dicom-node"
    out = subprocess.run([str(script), "--version"], check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == f"dicom-node {__version__}"


def test_status_names_the_node_version_and_the_version_behind_each_result(filled) -> None:  # noqa: F811
    report = node_status(filled["db"])
    assert report["software_version"] == __version__
    done = next(st for st in report["studies"] if st["study_instance_uid"] == filled["a"])
    assert done["case"]["software_version"] == filled["summary"]["software_version"]
    text = format_status(report)
    assert text.splitlines()[0] == f"dicom-node {__version__}"
    assert f"(dicom-node {filled['summary']['software_version']})" in text


def test_dashboard_footer_and_health_carry_the_version(filled) -> None:  # noqa: F811
    client = _client(filled)
    assert client.get("/api/health").json()["version"] == __version__
    assert f"dicom-node {__version__}" in client.get("/").text


def test_software_versions_without_and_with_the_node() -> None:
    model_only = AlgorithmInfo(name="m", version="1.2", manufacturer="x", device_uid="1.2.3")
    assert model_only.software_versions == "1.2"
    with_node = AlgorithmInfo(name="m", version="1.2", manufacturer="x", device_uid="1.2.3", software="dicom-node 9.9.9")
    assert with_node.software_versions == ["1.2", "dicom-node 9.9.9"]


@pytest.fixture(scope="module")
def segmented(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return segment_outputs(tmp_path_factory.mktemp("segment"))[1]


def test_outputs_carry_the_node_and_model_versions(segmented: Path) -> None:
    summary = json.loads((segmented / "summary.json").read_text())
    assert summary["software_version"] == __version__
    for name in ("seg.dcm", "sr.dcm"):
        ds = pydicom.dcmread(segmented / name, stop_before_pixels=True)
        # Model version first (it pairs with ManufacturerModelName, the model's name), then the node.
        assert list(ds.SoftwareVersions) == [summary["model"]["version"], f"dicom-node {__version__}"]
        assert ds.ManufacturerModelName == summary["model"]["name"]
        # (highdicom adds an item for itself, and the source scanner's equipment is kept.)
        ours = [item for item in ds.ContributingEquipmentSequence if item.Manufacturer == ds.Manufacturer]
        assert [list(item.SoftwareVersions) for item in ours] == [list(ds.SoftwareVersions)]
