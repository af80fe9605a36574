"""Run the real node (``dicom-node serve`` in a subprocess) and real DCMTK peers on loopback for tests and benches.

Everything listens on 127.0.0.1 with ports found free at start; every process is stopped at exit.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
# The code under test, whatever an installed `dicom-node` script would import: `-c` puts the working
# directory (ROOT, see cwd= below) first on sys.path.
DICOM_NODE = [sys.executable, "-c", "from dicom_node.cli import main; main()"]


# DCMTK keeps Nagle's algorithm on unless told: ~45 ms per DIMSE response on loopback without this.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll ``condition`` until it returns something truthy; AssertionError naming ``what`` on timeout."""
    end = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextmanager
def storescp(out: Path, *, ae_title: str = "DEST", port: int | None = None, extra: Sequence[str] = ()) -> Iterator[int]:
    """DCMTK ``storescp`` writing every received object to ``out`` under a unique name (so duplicates show);
    ``extra``: more storescp options (``--fork``, ``--sleep-after 1``, TLS, ...)."""
    port = port or free_port()
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(["storescp", "--aetitle", ae_title, "--output-directory", str(out), "+xa",
                             "--unique-filenames", *extra, str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=DCMTK_ENV)
    try:
        wait_for(lambda: port_open(port) or proc.poll() is not None, 10, "storescp to listen")
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "storescp exited"
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def storescu(port: int, paths: Sequence[Path], *, called: str = "ILD_NODE", calling: str = "PACS",
             timeout: float = 120, dimse_timeout: int | None = None) -> subprocess.CompletedProcess[str]:
    """DCMTK ``storescu`` of files or folders (recursively) to the node on 127.0.0.1; ``dimse_timeout``
    (s): each C-STORE answer must come within it, else storescu aborts and exits non-zero."""
    dimse = ["--dimse-timeout", str(dimse_timeout)] if dimse_timeout is not None else []
    return subprocess.run(["storescu", "-aet", calling, "-aec", called, "+sd", "+r", "-nh", *dimse, "127.0.0.1",
                           str(port), *map(str, paths)], capture_output=True, text=True, timeout=timeout,
                          check=False, env=DCMTK_ENV)


def node_config(tmp: Path, *, model: Path, destinations: Sequence[dict[str, Any]] = (), **sections: Any) -> Path:
    """A config for a test node under ``tmp`` with short quiet times; ``sections`` override whole keys."""
    cfg: dict[str, Any] = {
        "node": {"ae_title": "ILD_NODE", "port": free_port(), "bind_address": "127.0.0.1"},
        "storage": {"root": str(tmp / "storage"), "min_free_gb": 0.0},
        "database": {"url": f"sqlite:///{tmp / 'node.db'}"},
        "completion": {"series_quiet_seconds": 1.0, "study_quiet_seconds": 1.5, "max_wait_seconds": 120,
                       "start_when_roles_complete": True},
        "queue": {"poll_seconds": 0.2, "lease_seconds": 60, "shutdown_grace_seconds": 20},
        "send": {"retry_initial_seconds": 0.5, "retry_max_seconds": 2, "timeout_seconds": 10},
        "destinations": list(destinations),
        "model": {"path": str(model), "device": "cpu"},
        "web": {"host": "127.0.0.1", "port": free_port()},
        "logging": {"level": "INFO"},
        "rules": str(ROOT / "config" / "series_rules.yaml"),
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    path = tmp / "node.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


class NodeProcess:
    """``dicom-node serve --config FILE`` as a child process, with its log in ``log_path``."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.settings = yaml.safe_load(config.read_text())
        self.port = int(self.settings["node"]["port"])
        self.log_path = config.parent / "node.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> NodeProcess:
        log = open(self.log_path, "ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([*DICOM_NODE, "serve", "--config", str(self.config)], stdout=log,
                                     stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        log.close()
        wait_for(lambda: port_open(self.port) or self.proc.poll() is not None, timeout, "the node to listen")
        if self.proc.poll() is not None:
            raise AssertionError(f"the node exited with {self.proc.returncode}:\n{self.log()}")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"the node did not stop within {timeout:g} s of signal {sig}") from None

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run another ``dicom-node`` subcommand against this node's config."""
        return subprocess.run([*DICOM_NODE, *args, "--config", str(self.config)], capture_output=True, text=True,
                              timeout=timeout, cwd=ROOT, check=False)

    def status(self) -> dict[str, Any]:
        """``dicom-node status --json``'s content, read in-process (polling through the CLI costs a second each)."""
        from dicom_node.db import open_database
        from dicom_node.status import node_status

        db = open_database(self.settings["database"]["url"], migrate_schema=False)
        try:
            return node_status(db)
        finally:
            db.dispose()

    def study(self, study_uid: str) -> dict[str, Any] | None:
        return next((s for s in self.status()["studies"] if s["study_instance_uid"] == study_uid), None)

    def wait_state(self, study_uid: str, states: set[str], timeout: float = 120) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            s = self.study(study_uid)
            return s if s is not None and s["state"] in states else None

        try:
            return wait_for(reached, timeout, f"study {study_uid} to reach {sorted(states)}", interval=0.5)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; status: {self.study(study_uid)}\nlog:\n{self.log()[-4000:]}") from None

    def __enter__(self) -> NodeProcess:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
