"""The database under stress, with the real node: SQLite locked by another process, PostgreSQL restarted.

The node waits for a lock up to ``database.busy_timeout_seconds``, retries queue transitions after
transient errors (``dicom_node.db.retry_transient``), answers a C-STORE it could not index ``0xA700``
(never success), and loses nothing it answered with success.
"""

from __future__ import annotations

import logging
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
from node_harness import (
    DCMTK_ENV,
    NodeProcess,
    node_config,
    storescp,
    storescu,
    wait_for,
)
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError
from support.known_model import known_checkpoint
from support.studies import lesion_study, write_study

from dicom_node.db import Case, Instance, open_database, retry_transient
from dicom_node.queue import claim

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return known_checkpoint(tmp_path_factory.mktemp("model") / "known.safetensors", "t1_cube_post")


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> list[Path]:
    tmp = tmp_path_factory.mktemp("studies")
    for seed in (20, 21):
        write_study(lesion_study(seed), tmp / str(seed))
    return [tmp / "20", tmp / "21"]


def _uid(folder: Path) -> str:
    return str(pydicom.dcmread(next(folder.rglob("*.dcm")), stop_before_pixels=True).StudyInstanceUID)


@contextmanager
def write_lock(db_file: Path, seconds: float) -> Iterator[threading.Event]:
    """Another process's view of SQLite: hold the database's write lock (BEGIN EXCLUSIVE) for ``seconds``
    from a thread; the event is set when it is released."""
    con = sqlite3.connect(db_file, isolation_level=None, check_same_thread=False)
    con.execute("BEGIN EXCLUSIVE")
    released = threading.Event()

    def hold() -> None:
        time.sleep(seconds)
        con.execute("COMMIT")
        released.set()

    t = threading.Thread(target=hold)
    t.start()
    try:
        yield released
    finally:
        t.join()
        con.close()


def _indexed(url: str) -> int:
    db = open_database(url, migrate_schema=False)
    try:
        with db.read() as s:
            return s.execute(select(func.count(Instance.id))).scalar_one()
    finally:
        db.dispose()


def _latest_case(url: str) -> Case | None:
    db = open_database(url, migrate_schema=False)
    try:
        with db.read() as s:
            return s.execute(select(Case).order_by(Case.version.desc()).limit(1)).scalar_one_or_none()
    finally:
        db.dispose()


def _results(dest: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for p in dest.rglob("*"):
        if p.is_file():
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            out.setdefault(str(ds.StudyInstanceUID), []).append(str(ds.Modality))
    return {uid: sorted(m) for uid, m in out.items()}


# --------------------------------------------------------------------------- retries, in-process


def test_queue_transition_retries_while_another_process_holds_the_lock(tmp_path: Path, caplog) -> None:
    db_file = tmp_path / "node.db"
    db = open_database(f"sqlite:///{db_file}", busy_timeout_s=0.2)
    try:
        with caplog.at_level(logging.WARNING, logger="dicom_node.db"), write_lock(db_file, 1.0) as released:
            assert claim(db, "host:1:x", 60) is None  # empty queue, reached after the lock was released
            assert released.is_set()
        assert any("database busy or unreachable during claim" in r.getMessage() for r in caplog.records)
    finally:
        db.dispose()


def test_retries_are_bounded_and_the_last_error_propagates(tmp_path: Path) -> None:
    db_file = tmp_path / "node.db"
    db = open_database(f"sqlite:///{db_file}", busy_timeout_s=0.1)
    try:
        with write_lock(db_file, 3.0) as released:
            with pytest.raises(OperationalError, match="locked"):
                retry_transient(lambda: _write_transaction(db), "test", attempts=2, first_wait_s=0.1)
            assert not released.is_set()  # gave up in ~0.3 s, long before the lock went away
    finally:
        db.dispose()


def _write_transaction(db) -> None:
    """An empty write transaction: on SQLite it takes the write lock (BEGIN IMMEDIATE)."""
    with db.session() as s:
        s.execute(select(func.count(Case.id)))


# --------------------------------------------------------------------------- the real node


def test_sqlite_locked_for_seconds_node_waits_and_loses_nothing(tmp_path: Path, model: Path, studies) -> None:
    with storescp(tmp_path / "dest") as dest_port:
        cfg = node_config(tmp_path, model=model, destinations=[
            {"name": "pacs", "ae_title": "DEST", "host": "127.0.0.1", "port": dest_port}])
        url = f"sqlite:///{tmp_path / 'node.db'}"
        with NodeProcess(cfg) as node:
            with write_lock(tmp_path / "node.db", 4.0) as released:
                r = storescu(node.port, [studies[0]])
                # the first C-STORE's index waited for the lock: the association cannot end before it went
                assert released.is_set()
            assert r.returncode == 0, r.stderr
            uid = _uid(studies[0])
            node.wait_state(uid, {"sent"}, timeout=300)
            assert _indexed(url) == len(list(studies[0].rglob("*.dcm")))
            assert wait_for(lambda: _results(tmp_path / "dest").get(uid), 30, "results") == ["SEG", "SR"]
            assert node.proc.poll() is None


def test_sqlite_locked_past_the_busy_timeout_answers_a700_and_a_resend_completes(tmp_path: Path, model: Path,
                                                                               studies) -> None:
    files = sorted(studies[1].rglob("*.dcm"))
    with storescp(tmp_path / "dest") as dest_port:
        cfg = node_config(tmp_path, model=model, destinations=[
            {"name": "pacs", "ae_title": "DEST", "host": "127.0.0.1", "port": dest_port}],
            database={"url": f"sqlite:///{tmp_path / 'node.db'}", "busy_timeout_seconds": 0.5},
            completion={"series_quiet_seconds": 1.0, "study_quiet_seconds": 5.0, "max_wait_seconds": 300,
                        "start_when_roles_complete": False})
        url = f"sqlite:///{tmp_path / 'node.db'}"
        with NodeProcess(cfg) as node:
            with write_lock(tmp_path / "node.db", 3.0):
                # -v: one line per response, so the successes can be counted
                r = subprocess.run(["storescu", "-v", "-nh", "-aet", "PACS", "-aec", "ILD_NODE", "127.0.0.1",
                                    str(node.port), *map(str, files)], capture_output=True, text=True, timeout=300,
                                   check=False, env=DCMTK_ENV)
            out = r.stdout + r.stderr
            successes = out.count("Received Store Response (Success)")
            refused = out.count("Received Store Response (Refused: OutOfResources)")
            assert refused >= 1 and successes + refused == len(files), out[-3000:]
            # everything answered with success is indexed; nothing refused is
            assert _indexed(url) == successes
            assert "could not index" in node.log() or "sink failed" in node.log()
            again = storescu(node.port, files)  # what a PACS does with failed instances: send them again
            assert again.returncode == 0, again.stderr
            assert _indexed(url) == len(files)
            uid = _uid(studies[1])

            def latest_sent() -> Case | None:
                case = _latest_case(url)
                return case if case is not None and case.state == "sent" else None

            case = wait_for(latest_sent, 300, "the study's latest case to be sent", interval=0.5)
            assert case.n_instances == len(files)
            assert set(_results(tmp_path / "dest")[uid]) == {"SEG", "SR"}


def test_postgresql_restart_while_the_node_runs(tmp_path: Path, model: Path, studies, postgres) -> None:
    url = postgres.database("restart")
    with storescp(tmp_path / "dest") as dest_port:
        cfg = node_config(tmp_path, model=model, destinations=[
            {"name": "pacs", "ae_title": "DEST", "host": "127.0.0.1", "port": dest_port}],
            database={"url": url, "busy_timeout_seconds": 10})
        with NodeProcess(cfg) as node:
            assert storescu(node.port, [studies[0]]).returncode == 0
            postgres.restart()  # every connection is cut while the study completes, is claimed and processed
            node.wait_state(_uid(studies[0]), {"sent"}, timeout=300)
            postgres.restart()  # and again while the node idles: its pooled connections are all dead
            r = storescu(node.port, [studies[1]])
            assert r.returncode == 0, r.stderr
            node.wait_state(_uid(studies[1]), {"sent"}, timeout=300)
            assert _indexed(url) == sum(len(list(s.rglob("*.dcm"))) for s in studies)
            got = wait_for(lambda: len(_results(tmp_path / "dest")) == 2 and _results(tmp_path / "dest"), 30,
                           "both studies' results at the destination")
            assert got == {_uid(s): ["SEG", "SR"] for s in studies}  # each result once
            assert node.proc.poll() is None
