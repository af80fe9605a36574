"""``dicom-node demo`` (issue #6): the whole demo as a user runs it, on small studies and a fast model.

The command runs as a child process (``python -c "from dicom_node.cli import main; main()" demo ...``), so it
generates, starts ``dicom-node serve``, sends with ``dicom-node send``, reports and stops the node for real.
Ports are found free and everything lives under ``tmp_path``: safe under pytest-xdist.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
from node_harness import DICOM_NODE, ROOT, free_port
from support.known_model import IN_PLANE, THRESHOLD, known_model

from pipeline.checkpoint import CheckpointMeta, save_checkpoint

pytestmark = pytest.mark.slow

UID = r"\d+(?:\.\d+)+"


def _demo(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*DICOM_NODE, "demo", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          check=False)


def _fast_model(path: Path) -> Path:
    """test_pipeline_study's known-function model (CUBE post minus CUBE pre, so both studies have lesions; the
    second has no BRAVO) with a higher offset and a 6 mm model grid: few lesions, few slices, a fast pipeline."""
    model = known_model("t1_cube_post")
    with torch.no_grad():
        model.stem[0][1].bias[0] = -0.3
    meta = CheckpointMeta(model_name="ILD-known-function", model_version="0.0.1-test", threshold=THRESHOLD,
                          normalisation="per-slice robust", normalisation_version="1", training_data="none (test)",
                          in_plane_size=IN_PLANE, through_plane_mm=6.0)
    return save_checkpoint(path, model, meta)


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _section(out: str, name: str) -> str:
    """The report block of one study: from its heading to the next blank line."""
    m = re.search(rf"^{name} \(seed .*?(?=^\s*$)", out, re.DOTALL | re.MULTILINE)
    assert m, f"no report for {name}:\n{out}"
    return m.group(0)


def test_demo_end_to_end(tmp_path: Path) -> None:
    model = _fast_model(tmp_path / "known.safetensors")
    port, web_port = free_port(), free_port()
    work = tmp_path / "work"
    start = time.monotonic()
    r = _demo("--work", str(work), "--port", str(port), "--web-port", str(web_port), "--model", str(model),
              "--voxel-mm", "3", "--quiet", "1.5")
    elapsed = time.monotonic() - start
    out = r.stdout
    node_log = work / "node.log"
    slow = [b for b in node_log.read_text().split("\n20") if "has run for" in b] if node_log.is_file() else []
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{out}\nstderr:\n{r.stderr}\nslow stores:\n{slow}"
    assert "demo finished" in out and "2 of 2 studies processed" in out

    # The derived config, said and written.
    assert f"demo config: {work / 'node.yaml'}" in out and (work / "node.yaml").is_file()
    assert "study_quiet_seconds 1.5" in out

    one, two = _section(out, "study 1"), _section(out, "study 2")
    uids = [re.search(rf"StudyInstanceUID\s+({UID})", s).group(1) for s in (one, two)]
    assert len(set(uids)) == 2
    assert re.search(r"missing roles\s+none", one)
    assert re.search(r"missing roles\s+t1_bravo_post", two)
    for role in ("t1_bravo_post", "t1_cube_pre", "t1_cube_post", "flair"):
        assert re.search(rf"^\s+{role}\s+<- '", one, re.MULTILINE), role
    assert not re.search(r"^\s+t1_bravo_post\s+<- '", two, re.MULTILINE)
    for section, uid in zip((one, two), uids, strict=True):
        assert re.search(r"state\s+(done|sent) \(version 1\)", section)
        m = re.search(r"lesions\s+(\d+) found \((\d+) >= 10 mm3\), total \d+ mm3; (\d+) planted", section)
        assert m and int(m.group(1)) >= 1 and int(m.group(1)) >= int(m.group(2))
        # planted vs found: one line per planted lesion, found (as which numbers) or missed
        t = re.search(r"planted\s+(\d+) lesion\(s\): (\d+) found, (\d+) missed; (\d+) of the (\d+) found", section)
        assert t and t.group(1) == m.group(3) and int(t.group(2)) + int(t.group(3)) == int(t.group(1))
        assert int(t.group(5)) == int(m.group(1)) and int(t.group(4)) <= int(t.group(5))
        assert len(re.findall(r"^\s+planted \d+\s+\d+\.\d mm3  (found as #\d|MISSED)", section, re.MULTILINE)) \
            == int(t.group(1))
        rows = re.findall(r"^\s+(\d+)\s+(\d+\.\d)\s+(\d+\.\d)$", section, re.MULTILINE)  # number, volume, diameter
        assert [int(n) for n, _, _ in rows] == list(range(1, int(m.group(1)) + 1))
        for name in ("seg.dcm", "sr.dcm", "summary.json", "overview.png"):
            path = Path(re.search(rf"^\s+{re.escape(name)}\s+(/\S+)$", section, re.MULTILINE).group(1))
            assert path.is_file() and path.parent.name == uid, path
        for stage in ("load", "register", "preprocess", "inference", "lesions", "dicom", "outputs"):
            assert re.search(rf"\b{stage} \d+\.\d", section), stage
        assert re.search(r"generate \d+\.\d .*; send \d+\.\d \(dicom-node send: sent (\d+) of \1 instance", section)
        assert re.search(r"last C-STORE -> study complete \d+\.\d", section)
        assert re.search(r"last C-STORE -> results written: \d+\.\d", section)

    # Everything it started is stopped: the node's process is gone and its ports are free again.
    assert re.search(r"stopped in \d+\.\d s \(exit code 0\)", out)
    pid = int(re.search(r"\(pid (\d+)\)", out).group(1))
    assert not Path(f"/proc/{pid}").exists()
    assert _bindable(port) and _bindable(web_port)
    print(f"demo took {elapsed:.1f} s")


def test_demo_port_in_use_fails_at_once_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("0.0.0.0", 0))
        holder.listen()
        port = holder.getsockname()[1]
        r = _demo("--work", str(tmp_path / "work"), "--port", str(port), "--web-port", str(free_port()), timeout=60)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "already in use" in lines[0] and "--port" in lines[0], r.stderr
    assert not (tmp_path / "work").exists()  # nothing generated, nothing started


def test_demo_help_explains_itself() -> None:
    r = subprocess.run([*DICOM_NODE, "demo", "--help"], capture_output=True, text=True, timeout=60, cwd=ROOT,
                       check=False, env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 0
    for option in ("--config", "--work", "--model", "--port", "--web-port", "--quiet", "--voxel-mm", "--timeout",
                   "--keep"):
        assert option in r.stdout, option
    assert "without BRAVO" in r.stdout and "SIGTERM" in r.stdout


def test_match_planted_by_touching_spheres() -> None:
    from dicom_node.cli.demo import match_planted

    # 33.5 mm3 ~ a sphere of radius 2 mm, 268 mm3 ~ radius 4 mm; matched up to r1 + r2 + 1 mm apart
    planted = [(268.1, (0.0, 0.0, 0.0)), (33.5, (30.0, 0.0, 0.0)), (33.5, (0.0, 40.0, 0.0))]
    found = [(33.5, (6.9, 0.0, 0.0)),    # 6.9 <= 4 + 2 + 1: planted 1
             (33.5, (0.0, 0.0, -7.2)),   # 7.2 > 7: matches nothing (false)
             (268.1, (30.0, 6.0, 0.0)),  # 6 <= 2 + 4 + 1: planted 2
             (4.2, (30.0, -3.0, 0.0))]   # radius 1: 3 <= 2 + 1 + 1: planted 2 too (a fragment, not false)
    per_planted, is_true = match_planted(planted, found)
    assert per_planted == [[1], [3, 4], []]
    assert is_true == [True, False, True, True]
