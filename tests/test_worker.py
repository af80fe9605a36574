"""Worker processes under ``dicom-node serve`` (issue #19): the model runs apart from the receiver, at a lower
priority; a worker that dies is restarted and its case re-queued; workers stop, and die, with their node."""

from __future__ import annotations

import os
import signal
import time
import urllib.request
from pathlib import Path

import pydicom
import pytest
from node_harness import NodeProcess, node_config, storescu, wait_for
from support.known_model import known_checkpoint
from support.studies import lesion_study, write_study

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return known_checkpoint(tmp_path_factory.mktemp("model") / "known.safetensors", "t1_cube_post")


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("study") / "s"
    write_study(lesion_study(3), folder)
    return folder


def _study_uid(folder: Path) -> str:
    first = next(p for p in sorted(folder.rglob("*")) if p.is_file())
    return str(pydicom.dcmread(first, stop_before_pixels=True).StudyInstanceUID)


def _workers(node_pid: int) -> list[int]:
    """Pids of the node's worker processes (multiprocessing spawn children; not its resource tracker)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == node_pid and b"spawn_main" in cmdline:
            out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def test_the_worker_is_its_own_process_at_lower_priority_and_feeds_the_node_metrics(tmp_path, model, study):
    cfg = node_config(tmp_path, model=model)
    with NodeProcess(cfg) as node:
        assert node.proc is not None
        (worker,) = wait_for(lambda: _workers(node.proc.pid), 60, "the worker process")
        # set by the worker itself as it starts: queue.worker_nice (10) above the node, capped at 19 (a node that
        # itself runs under nice, as in a niced test run, leaves less room)
        node_nice = os.getpriority(os.PRIO_PROCESS, node.proc.pid)
        wait_for(lambda: os.getpriority(os.PRIO_PROCESS, worker) == min(19, node_nice + 10), 30, "the worker's niceness")
        uid = _study_uid(study)
        assert storescu(node.port, [study]).returncode == 0
        node.wait_state(uid, {"done", "sent"})
        assert "worker 0 started" in node.log()
        # the stage timings observed in the worker reach the /metrics the receiving node serves
        web = node.settings["web"]
        text = urllib.request.urlopen(f"http://{web['host']}:{web['port']}/metrics", timeout=10).read().decode()
        assert 'dicom_node_stage_seconds_count{stage="total"} 1.0' in text, text[-2000:]
    assert not _alive(worker), "the worker stops with its node"


def test_a_killed_worker_is_restarted_and_its_case_requeued(tmp_path, model, study):
    cfg = node_config(tmp_path, model=model)
    uid = _study_uid(study)
    with NodeProcess(cfg) as node:
        assert node.proc is not None
        (first,) = wait_for(lambda: _workers(node.proc.pid), 60, "the worker process")
        assert storescu(node.port, [study]).returncode == 0
        node.wait_state(uid, {"running"}, timeout=60)
        os.kill(first, signal.SIGKILL)
        (second,) = wait_for(lambda: [p for p in _workers(node.proc.pid) if p != first], 60, "a new worker")
        st = node.wait_state(uid, {"done", "sent"}, timeout=180)
        assert st["case"]["attempts"] == 2, st  # the killed attempt counts
        assert f"(pid {first}) exited with code -9; restarting" in node.log()
        assert echo_ok(node)
    assert not _alive(second)


def test_workers_die_with_a_killed_node(tmp_path, model):
    node = NodeProcess(node_config(tmp_path, model=model)).start()
    assert node.proc is not None
    (worker,) = wait_for(lambda: _workers(node.proc.pid), 60, "the worker process")
    node.proc.kill()
    node.proc.wait(30)
    wait_for(lambda: not _alive(worker), 30, "the orphaned worker to die")


def test_workers_zero_processes_in_the_node_itself(tmp_path, model, study):
    with NodeProcess(node_config(tmp_path, model=model, queue={"workers": 0})) as node:
        assert node.proc is not None
        uid = _study_uid(study)
        assert storescu(node.port, [study]).returncode == 0
        node.wait_state(uid, {"done", "sent"})
        time.sleep(0.5)
        assert _workers(node.proc.pid) == []


def echo_ok(node: NodeProcess) -> bool:
    return node.cli("echo", "127.0.0.1", str(node.port), "ILD_NODE").returncode == 0
