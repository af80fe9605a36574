"""Index, completion, queue, dispatcher and retention on real SQLite and PostgreSQL databases, with times
given explicitly (every test that takes ``env`` runs on both; PostgreSQL is started by ``pg_harness``).

The network parts are covered with real peers in test_node.py; here the clock is a parameter, so
every completion rule and lease transition is checked exactly, in milliseconds.
"""

from __future__ import annotations

import itertools
import json
import shutil
import threading
import time
from pathlib import Path

import pytest
from node_harness import free_port, storescp
from support.studies import lesion_study, write_study

from dicom_node.cleaner import purge
from dicom_node.config import CompletionSection, NodeConfig
from dicom_node.db import SCHEMA_VERSION, Case, Delivery, Study, migrate, open_database
from dicom_node.dispatcher import backoff_seconds, deliver_one, dispatch_due, resend
from dicom_node.headers import read_instance_features, scan_directory
from dicom_node.index import Index, reindex_missing, study_series
from dicom_node.queue import (
    claim,
    complete,
    fail,
    recover_expired,
    recover_orphans,
    release,
)
from dicom_node.receiver import ROUTABLE_SOP_CLASSES, ReceivedInstance
from dicom_node.router import reprocess, route_complete_studies
from dicom_node.rules import load_rules
from dicom_node.storage import instance_path

RULES = load_rules()
REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-dicom"


@pytest.fixture(scope="module")
def study_files(tmp_path_factory) -> list[Path]:
    out = tmp_path_factory.mktemp("study")
    write_study(lesion_study(3), out)
    return sorted(out.rglob("*.dcm"))


def _store(root: Path, src: Path) -> ReceivedInstance:
    """What the receiver does for one file: copy it to its UID path and describe it."""
    h = read_instance_features(src)
    assert h is not None
    dst = instance_path(root, h.study_instance_uid, h.series_instance_uid, h.sop_instance_uid)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return ReceivedInstance(
        path=dst, relative_path=dst.relative_to(root).as_posix(), sop_class_uid=h.features.sop_class_uid,
        sop_instance_uid=h.sop_instance_uid, study_instance_uid=h.study_instance_uid,
        series_instance_uid=h.series_instance_uid, transfer_syntax_uid="", size_bytes=dst.stat().st_size,
        calling_ae_title="PACS", peer_address="127.0.0.1", routable=h.features.sop_class_uid in ROUTABLE_SOP_CLASSES,
        header=h)


@pytest.fixture(params=["sqlite", "postgresql"])
def env(request, tmp_path):
    """A fresh database: SQLite in tmp_path, or a new database on the test session's PostgreSQL server."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'node.db'}"
    else:
        url = request.getfixturevalue("postgres").database(f"queue_{next(_DATABASES)}")
    db = open_database(url)
    yield db, tmp_path / "storage"
    db.dispose()


_DATABASES = itertools.count()


def _receive(db, root: Path, files: list[Path], now: float) -> None:
    index = Index(db)
    for f in files:
        index.record(_store(root, f), now=now)


def test_schema_created_and_migrations_idempotent(env) -> None:
    db, _ = env
    assert migrate(db.engine) == SCHEMA_VERSION
    assert migrate(db.engine) == SCHEMA_VERSION
    if db.engine.dialect.name == "sqlite":
        with db.engine.connect() as c:
            assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


def test_index_rebuilds_the_features_scan_directory_computes(env, study_files) -> None:
    db, root = env
    _receive(db, root, study_files, 100.0)
    _receive(db, root, study_files[:3], 101.0)  # repeats are idempotent
    with db.session() as s:
        study = s.query(Study).one()
        assert study.n_instances == len(study_files)
        from_db = study_series(s, study.id)
    from_disk = scan_directory(root / "incoming")
    assert [f.to_dict() | {"source": []} for f in from_db] == [f.to_dict() | {"source": []} for f in from_disk]


def test_concurrent_records_of_one_study(env, study_files) -> None:
    db, root = env
    stored = [_store(root, f) for f in study_files]
    index = Index(db)
    threads = [threading.Thread(target=lambda part=stored[i::4]: [index.record(x, now=5.0) for x in part])
               for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with db.session() as s:
        assert s.query(Study).one().n_instances == len(study_files)


def _settings(**kw) -> CompletionSection:
    base = {"series_quiet_seconds": 10, "study_quiet_seconds": 30, "max_wait_seconds": 600,
            "start_when_roles_complete": False}
    return CompletionSection(**(base | kw))


def test_completion_waits_for_quiet_then_queues_with_roles(env, study_files) -> None:
    db, root = env
    _receive(db, root, study_files, 1000.0)
    assert route_complete_studies(db, _settings(), RULES, now=1020.0) == []  # series quiet, study not yet
    made = route_complete_studies(db, _settings(), RULES, now=1031.0)
    assert len(made) == 1
    with db.session() as s:
        case = s.get(Case, made[0])
        assert case.state == "queued" and case.version == 1 and case.trigger.startswith("all series complete")
        inputs = json.loads(case.inputs)
    assert set(inputs) == {"t1_bravo_post", "t1_cube_pre", "t1_cube_post", "flair"}
    assert all((root / p).is_file() for paths in inputs.values() for p in paths)
    assert route_complete_studies(db, _settings(), RULES, now=2000.0) == []  # nothing pending any more


def test_completion_when_every_role_is_complete(env, study_files) -> None:
    db, root = env
    _receive(db, root, study_files, 1000.0)
    made = route_complete_studies(db, _settings(start_when_roles_complete=True), RULES, now=1011.0)
    assert len(made) == 1
    with db.session() as s:
        assert s.get(Case, made[0]).trigger == "every role has a complete series"


def test_max_wait_processes_what_is_there(env, study_files) -> None:
    db, root = env
    _receive(db, root, study_files[:5], 0.0)
    _receive(db, root, study_files[5:10], 595.0)  # still arriving
    made = route_complete_studies(db, _settings(), RULES, now=600.0)
    with db.session() as s:
        assert s.get(Case, made[0]).trigger.startswith("max wait")


def test_distractors_only_is_skipped_with_reason(env) -> None:
    db, root = env
    _receive(db, root, sorted((REAL / "dcm_qa_ge" / "01_Ax_DWI_TENSOR_R2").iterdir()), 0.0)
    made = route_complete_studies(db, _settings(), RULES, now=100.0)
    with db.session() as s:
        case = s.get(Case, made[0])
    assert case.state == "skipped" and case.reason.startswith("no usable series: no series matched a role")


def test_late_instances_new_version_or_ignored(env, study_files) -> None:
    db, root = env
    flair = [f for f in study_files if "FLAIR" in f.parent.name.upper()]
    early = [f for f in study_files if f != flair[-1]]
    _receive(db, root, early, 0.0)
    (v1,) = route_complete_studies(db, _settings(), RULES, now=100.0)
    _receive(db, root, [flair[-1]], 200.0)
    (v2,) = route_complete_studies(db, _settings(), RULES, now=300.0)
    with db.session() as s:
        first, second = s.get(Case, v1), s.get(Case, v2)
        assert (first.version, second.version) == (1, 2)
        assert first.state == "skipped" and first.reason == "superseded by version 2"  # was still queued
        assert len(json.loads(second.inputs)["flair"]) == len(json.loads(first.inputs)["flair"]) + 1
    # ignore policy: counted, no version 3
    with db.session() as s:
        study_uid = s.query(Study).one().study_uid
    # a late instance of the same study: reuse one file with a new SOP Instance UID
    import pydicom
    from pydicom.uid import generate_uid
    ds = pydicom.dcmread(flair[0])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    late = root.parent / "late.dcm"
    ds.save_as(late)
    _receive(db, root, [late], 400.0)
    assert route_complete_studies(db, _settings(late_instances="ignore"), RULES, now=500.0) == []
    with db.session() as s:
        st = s.query(Study).filter_by(study_uid=study_uid).one()
        assert st.ignored_instances == 1 and st.latest_version == 2 and st.pending_since is None


def test_claim_lease_fail_and_recover(env, study_files) -> None:
    db, root = env
    _receive(db, root, study_files, 0.0)
    (cid,) = route_complete_studies(db, _settings(), RULES, now=100.0)
    a = claim(db, "host:1:a", 60, now=200.0)
    assert a is not None and a.id == cid and a.attempt == 1
    assert claim(db, "host:2:b", 60, now=200.0) is None  # only one worker wins
    assert fail(db, cid, "host:1:a", "boom", max_attempts=2, permanent=False) == "queued"
    b = claim(db, "host:2:b", 60, now=300.0)
    assert b is not None and b.attempt == 2
    assert recover_expired(db, max_attempts=2, now=400.0) == 1  # lease ran out: out of attempts -> failed
    with db.session() as s:
        case = s.get(Case, cid)
        assert case.state == "failed" and "lease expired" in case.reason
    assert fail(db, cid, "host:2:b", "late", max_attempts=2, permanent=False) == ""  # lease lost: no change


def test_release_and_orphans_do_not_lose_cases(env, study_files) -> None:
    db, root = env
    _receive(db, root, study_files, 0.0)
    (cid,) = route_complete_studies(db, _settings(), RULES, now=100.0)
    claim(db, "me:1:x", 60)
    assert release(db, cid, "me:1:x", "shutdown")
    with db.session() as s:
        assert (s.get(Case, cid).state, s.get(Case, cid).attempts) == ("queued", 0)
    claim(db, "me:999999999:x", 60)  # a pid that cannot exist: its process died
    assert recover_orphans(db, "me", max_attempts=3) == 1
    with db.session() as s:
        assert s.get(Case, cid).state == "queued"


def _done_case(db, root: Path, study_files: list[Path], results: tuple[str, ...]) -> tuple[int, str]:
    """A case processed by worker "w" with one pending delivery to "pacs"; real DICOM files stand in for
    its results (the dispatcher sends files as stored). Returns (case id, StudyInstanceUID)."""
    _receive(db, root, study_files, 0.0)
    (cid,) = route_complete_studies(db, _settings(), RULES, now=100.0)
    c = claim(db, "w", 60)
    res = root / "results" / c.study_uid
    res.mkdir(parents=True)
    for name, source in zip(results, study_files, strict=False):
        shutil.copyfile(source, res / name)
    assert complete(db, cid, "w", f"results/{c.study_uid}", {"lesion_count": 1, "lesion_count_ge_10mm3": 1}, ["pacs"])
    return cid, c.study_uid


def test_complete_creates_deliveries_and_dispatcher_sends_once(env, study_files, tmp_path) -> None:
    db, root = env
    cid, study_uid = _done_case(db, root, study_files, ("seg.dcm", "sr.dcm"))
    port = free_port()
    cfg = NodeConfig.model_validate({
        "storage": {"root": str(root)}, "destinations": [{"name": "pacs", "ae_title": "DEST", "host": "127.0.0.1",
                                                          "port": port}],
        "send": {"retry_initial_seconds": 1, "retry_max_seconds": 4, "max_attempts": 3, "timeout_seconds": 5}})
    assert dispatch_due(db, cfg) == 1  # destination down: transient
    with db.session() as s:
        d = s.query(Delivery).one()
        assert d.state == "pending" and d.attempts == 1 and d.last_error
    with storescp(tmp_path / "dest", port=port):
        assert dispatch_due(db, cfg, now=d.next_attempt_at + 0.01) == 1
    with db.session() as s:
        assert s.query(Delivery).one().state == "sent"
        assert s.get(Case, cid).state == "sent"
    assert len(list((tmp_path / "dest").iterdir())) == 2
    assert resend(db, cfg, study_uid) == 1
    with db.session() as s:
        assert s.query(Delivery).one().state == "pending" and s.get(Case, cid).state == "done"


def test_permanent_refusal_stops_retries(env, study_files, tmp_path) -> None:
    db, root = env
    _done_case(db, root, study_files, ("sr.dcm",))
    port = free_port()
    cfg = NodeConfig.model_validate({
        "storage": {"root": str(root)}, "node": {"ae_title": "NOT_ALLOWED"},
        "destinations": [{"name": "pacs", "ae_title": "DEST", "host": "127.0.0.1", "port": port}]})
    # A pynetdicom peer that knows only "ILD_NODE": our calling AE is rejected permanently.
    from pynetdicom import AE
    from pynetdicom.sop_class import MRImageStorage
    peer = AE(ae_title="DEST")
    peer.add_supported_context(MRImageStorage)
    peer.require_calling_aet = ["ILD_NODE"]
    server = peer.start_server(("127.0.0.1", port), block=False)
    try:
        with db.session() as s:
            did = s.query(Delivery).one().id
            s.query(Delivery).update({"state": "sending"})
        assert deliver_one(db, cfg, did) == "failed"
    finally:
        server.shutdown()
    with db.session() as s:
        d = s.query(Delivery).one()
        assert d.attempts == 1 and "reject" in d.last_error.lower()


def test_backoff_doubles_and_caps() -> None:
    assert [backoff_seconds(n, 10, 60) for n in (1, 2, 3, 4, 5)] == [10, 20, 40, 60, 60]


def test_reprocess_and_purge(env, study_files) -> None:
    db, root = env
    _receive(db, root, study_files, 0.0)
    assert len(route_complete_studies(db, _settings(), RULES, now=100.0)) == 1
    with db.session() as s:
        uid = s.query(Study).one().study_uid
    case = reprocess(db, uid, RULES)
    assert case.version == 2 and case.trigger == "reprocess requested"
    with pytest.raises(KeyError):
        reprocess(db, "1.2.3", RULES)
    # queued: kept whatever its age
    report = purge(db, root, 0, now=10 ** 10)
    assert report.studies == [] and report.kept_busy == [uid]
    with db.session() as s:
        s.query(Case).update({"state": "sent"})
    report = purge(db, root, 1, now=10 ** 10)
    assert report.studies == [uid] and report.bytes_freed > 0
    assert not (root / "incoming" / uid).exists()
    with db.session() as s:
        assert s.query(Study).count() == 0 and s.query(Case).count() == 0


def test_a_study_purged_while_the_node_runs_is_indexed_again_when_resent(env, study_files) -> None:
    db, root = env
    index = Index(db)  # the running node's index, with its cache of series ids
    for f in study_files[:3]:
        index.record(_store(root, f), now=0.0)
    assert purge(db, root, 1, now=10 ** 10).studies  # another process purges the study
    for f in study_files[:3]:
        assert index.record(_store(root, f), now=10 ** 10)  # new again, under re-created rows
    with db.session() as s:
        assert s.query(Study).one().n_instances == 3


def test_reindex_missing_finds_files_the_database_lost(env, study_files) -> None:
    db, root = env
    for f in study_files[:4]:
        _store(root, f)
    assert reindex_missing(db, root) == 4
    assert reindex_missing(db, root) == 0


def test_readers_do_not_block_the_index(env, study_files) -> None:
    """A status poll holding a read transaction must not hold up the receiver's index (SQLite: no write lock)."""
    db, root = env
    with db.read() as reader:
        assert reader.query(Study).count() == 0
        started = time.monotonic()
        _receive(db, root, study_files[:2], 0.0)
        assert time.monotonic() - started < 5  # the busy timeout is 30 s: a blocked writer would wait for it
    with db.read() as reader:
        assert reader.query(Study).one().n_instances == 2
