"""Faults the node survives (issue #8): ``kill -9`` at random points, a PACS that is down or refuses for good,
hung peers on either side. The real ``dicom-node serve`` (tests/node_harness.py) with real peers on loopback:
a pynetdicom sender that records which instances were answered with success, DCMTK ``storescp`` as the
destination (one file per received object, so duplicates show)."""

from __future__ import annotations

import contextlib
import json
import random
import signal
import socket
import struct
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
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
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage, Verification
from sqlalchemy import select
from support.known_model import known_checkpoint
from support.studies import lesion_study, write_study

from dicom_node.db import SENDING, Delivery, Instance, open_database

pytestmark = pytest.mark.slow

KILLS = 20
SEED = 8
PHASES = ("receive", "case", "send")
REAL_DWI = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-dicom" / "dcm_qa_ge" / "01_Ax_DWI_TENSOR_R2"
# Two roles (CUBE pre and post): a case takes a few seconds with the known-function model.
MISSING = ("t1_bravo_post", "flair")
# Upper bound of one wait (a case takes ~4 s on an idle 2-core machine, 30 s when it is shared with other work).
WAIT = 240


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return known_checkpoint(tmp_path_factory.mktemp("model") / "known.safetensors", "t1_cube_post")


@dataclass
class StudyFiles:
    uid: str
    files: list[Path]
    sop_uids: dict[Path, str]


def _write_studies(tmp: Path, seeds: range) -> list[StudyFiles]:
    out = []
    for seed in seeds:
        folder = tmp / f"study-{seed}"
        write_study(lesion_study(seed, missing=MISSING), folder)
        files = sorted(folder.rglob("*.dcm"))
        headers = {p: pydicom.dcmread(p, stop_before_pixels=True) for p in files}
        out.append(StudyFiles(str(headers[files[0]].StudyInstanceUID), files,
                              {p: str(ds.SOPInstanceUID) for p, ds in headers.items()}))
    return out


@dataclass
class Sender:
    """A PACS sending with pynetdicom: which SOP Instance UIDs the node answered with success (0x0000)."""

    port: int
    acked: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def send(self, files: list[Path], *, calling: str = "PACS") -> int:
        """C-STORE ``files`` on one association until done or the association dies; returns how many were acked."""
        ae = AE(ae_title=calling)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        ae.add_requested_context(MRImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        assoc = ae.associate("127.0.0.1", self.port, ae_title="ILD_NODE")
        n = 0
        if not assoc.is_established:
            return n
        try:
            for path in files:
                ds = pydicom.dcmread(path)
                try:
                    status = assoc.send_c_store(ds)
                except (RuntimeError, OSError):  # the node went away mid-association
                    break
                if status.get("Status") == 0x0000:
                    with self.lock:
                        self.acked.add(str(ds.SOPInstanceUID))
                    n += 1
                if not assoc.is_established:
                    break
        finally:
            if assoc.is_established:
                assoc.release()
        return n


def _db_state(url: str) -> tuple[int, int, int]:
    """(cases running, cases queued, deliveries sending or pending) straight from the database."""
    from sqlalchemy import func

    from dicom_node.db import PENDING, QUEUED, RUNNING, Case

    db = open_database(url, migrate_schema=False)
    try:
        with db.read() as s:
            counts = dict(s.execute(select(Case.state, func.count(Case.id)).group_by(Case.state)).all())
            deliveries = s.execute(select(func.count(Delivery.id)).where(
                Delivery.state.in_((SENDING, PENDING)))).scalar_one()
        return counts.get(RUNNING, 0), counts.get(QUEUED, 0), deliveries
    finally:
        db.dispose()


def _sending(url: str) -> bool:
    db = open_database(url, migrate_schema=False)
    try:
        with db.read() as s:
            return s.execute(select(Delivery.id).where(Delivery.state == SENDING).limit(1)).first() is not None
    finally:
        db.dispose()


def _received_by_sop_uid(dest: Path) -> Counter[str]:
    """How many times storescp stored each SOP Instance UID (it keeps every copy under a unique name)."""
    return Counter(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                   for p in dest.rglob("*") if p.is_file())


def test_kill_9_twenty_times_nothing_acknowledged_is_lost(tmp_path: Path, model: Path) -> None:
    rng = random.Random(SEED)
    studies = _write_studies(tmp_path / "studies", range(40, 46))
    dest = tmp_path / "dest"
    # storescp pauses 1 s after each C-STORE (so a kill can land between the SEG's answer and the SR's, or
    # before the release) and forks per association (one the node abandoned does not hold up the next).
    stack = contextlib.ExitStack()
    dest_port = stack.enter_context(storescp(dest, extra=("--fork", "--sleep-after", "1")))
    cfg = node_config(tmp_path, model=model, destinations=[
        {"name": "pacs", "ae_title": "DEST", "host": "127.0.0.1", "port": dest_port}],
        # Every interrupted attempt counts against a case (a study that crashes the node must end failed);
        # here the kills are the test's, not the study's, so the budget outlasts them.
        queue={"max_attempts": KILLS + 5}, send={"timeout_seconds": 5})
    node = NodeProcess(cfg)
    url = node.settings["database"]["url"]
    sender = Sender(node.port)
    next_study = iter(studies * 3)
    kills: Counter[str] = Counter()
    t_start = time.monotonic()

    def feed() -> None:
        """Make work for the node: the next study, sent whole (a PACS re-sends whole studies)."""
        sender.send(next(next_study).files)

    try:
        for _ in range(KILLS):
            node.start()
            phase = rng.choice(PHASES)
            if phase == "receive":
                thread = threading.Thread(target=feed, daemon=True)
                before = len(sender.acked)
                thread.start()
                wait_for(lambda b=before, t=thread: len(sender.acked) > b or not t.is_alive(), 30, "a first instance acked")
                time.sleep(rng.uniform(0.0, 0.8))
                observed = thread.is_alive()
            elif phase == "case":
                running, queued, _ = _db_state(url)
                if not running and not queued:
                    feed()
                wait_for(lambda: _db_state(url)[0], WAIT, "a case to run")
                time.sleep(rng.uniform(0.0, 2.5))
                observed = _db_state(url)[0] > 0
            else:
                running, queued, deliveries = _db_state(url)
                if not (running or queued or deliveries):
                    feed()
                # A killed sender's delivery comes back after its lease (dispatcher.LEASE_SECONDS).
                wait_for(lambda: _sending(url), WAIT, "a delivery being sent", interval=0.05)
                time.sleep(rng.uniform(0.0, 1.5))
                observed = _sending(url)
            node.stop(signal.SIGKILL)
            kills[phase if observed else f"{phase} (over before the kill)"] += 1
            if phase == "receive":
                thread.join(30)
                assert not thread.is_alive()
        loop_s = time.monotonic() - t_start

        node.start()
        # 1. Everything answered with success is on disk and in the index, before anything is re-sent.
        root = Path(node.settings["storage"]["root"])
        db = open_database(url, migrate_schema=False)
        try:
            with db.read() as s:
                indexed = dict(s.execute(select(Instance.sop_uid, Instance.path)).all())
        finally:
            db.dispose()
        missing = [u for u in sender.acked if u not in indexed or not (root / indexed[u]).is_file()]
        assert missing == [], f"{len(missing)} acknowledged instance(s) lost, e.g. {missing[:3]}"
        acked_before_retry = len(sender.acked)
        # 2. The PACS sends what was never acknowledged; every study then completes and is delivered.
        for study in studies:
            rest = [p for p in study.files if study.sop_uids[p] not in sender.acked]
            if rest:
                sent = storescu(node.port, rest)
                assert sent.returncode == 0, sent.stderr
        for study in studies:
            st = node.wait_state(study.uid, {"sent"}, timeout=WAIT)
            assert st["instances"] == len(study.files) and not st["waiting_for_completion"]
            assert st["case"]["instances"] == len(study.files)
        db = open_database(url, migrate_schema=False)
        try:
            with db.read() as s:
                open_deliveries = s.execute(select(Delivery.id, Delivery.state).where(Delivery.state != "sent")).all()
        finally:
            db.dispose()
        assert open_deliveries == []
        # 3. Each result at the destination; count the copies.
        results = [p for p in (root / "results").rglob("*.dcm") if ".tmp" not in p.parts]
        expected = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in results}
        got = _received_by_sop_uid(dest)
        assert expected <= set(got), f"results never delivered: {sorted(expected - set(got))[:3]}"
        duplicates = {u: n for u, n in got.items() if n > 1}
    finally:
        node.stop(signal.SIGKILL)
        stack.close()
    total = time.monotonic() - t_start
    print(f"\ncrash loop: {sum(kills.values())} kill -9 ({', '.join(f'{k} {v}' for k, v in sorted(kills.items()))}); "
          f"{acked_before_retry} instance(s) acknowledged before the kills ended, all on disk and indexed; "
          f"{len(studies)} studies, {sum(len(s.files) for s in studies)} instances, all sent; "
          f"{len(expected)} result objects delivered, {sum(got.values())} C-STOREs received by storescp, "
          f"{len(duplicates)} received more than once ({sum(duplicates.values()) - len(duplicates)} extra copies); "
          f"loop {loop_s:.0f} s, total {total:.0f} s")
    assert sum(kills.values()) == KILLS


# --------------------------------------------------------------------------- PACS refusing, hung destination


@pytest.fixture(scope="module")
def small_study(tmp_path_factory) -> StudyFiles:
    return _write_studies(tmp_path_factory.mktemp("small"), range(50, 51))[0]


def test_refusing_and_hung_destinations_healthy_one_served_hung_one_retried_until_back(
        tmp_path: Path, model: Path, small_study: StudyFiles) -> None:
    """Three destinations for one study: one rejects the association for good (DCMTK ``storescp --refuse``:
    rejected-permanent), one accepts TCP connections but never answers, one works. The working one gets the
    results at once; the refusal fails on the first attempt, stays failed and shows in ``status``; the hung
    one times out (``send.timeout_seconds``) and is retried, and is delivered once when a real PACS is back."""
    timeout = 2.0
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(16)  # the kernel completes the TCP handshake; nothing ever reads or answers
    hung_port = hung.getsockname()[1]
    with contextlib.ExitStack() as stack:
        ok_port = stack.enter_context(storescp(tmp_path / "ok"))
        refusing_port = stack.enter_context(storescp(tmp_path / "refusing", extra=("--refuse",)))
        cfg = node_config(tmp_path, model=model, send={"timeout_seconds": timeout, "retry_initial_seconds": 0.5,
                                                       "retry_max_seconds": 1}, destinations=[
            {"name": "refusing", "ae_title": "DEST", "host": "127.0.0.1", "port": refusing_port},
            {"name": "hung", "ae_title": "DEST", "host": "127.0.0.1", "port": hung_port},
            {"name": "ok", "ae_title": "DEST", "host": "127.0.0.1", "port": ok_port}])
        node = stack.enter_context(NodeProcess(cfg))
        sent = storescu(node.port, small_study.files)
        assert sent.returncode == 0, sent.stderr

        def deliveries() -> dict[str, dict]:
            st = node.study(small_study.uid)
            return {d["destination"]: d for d in (st["case"] or {}).get("deliveries", [])} if st else {}

        def hung_retried() -> dict[str, dict] | None:
            d = deliveries()
            return d if d and d["hung"]["attempts"] >= 2 and d["ok"]["state"] == "sent" else None

        d = wait_for(hung_retried, 120, "the hung destination retried and the healthy one served")
        assert d["refusing"]["state"] == "failed" and d["refusing"]["attempts"] == 1
        assert "rejected-permanent" in d["refusing"]["error"]
        assert d["hung"]["state"] in ("pending", "sending")
        assert f"within {timeout:g} s" in d["hung"]["error"]
        assert node.study(small_study.uid)["state"] == "done"  # not 'sent': one destination failed for good
        text = node.cli("status", "--study", small_study.uid)
        assert text.returncode == 0
        assert "-> refusing: failed after 1 attempt(s)" in text.stdout and "rejected-permanent" in text.stdout
        as_json = json.loads(node.cli("status", "--json", "--study", small_study.uid).stdout)
        (refused,) = [x for x in as_json["studies"][0]["case"]["deliveries"] if x["destination"] == "refusing"]
        assert refused["state"] == "failed" and "rejected-permanent" in refused["error"]
        # The real PACS comes back on the hung one's port: delivered, once.
        hung.close()
        t0 = time.monotonic()
        got_back = stack.enter_context(storescp(tmp_path / "back", port=hung_port))
        assert got_back == hung_port
        wait_for(lambda: deliveries()["hung"]["state"] == "sent", 60, "the delivery once the PACS is back")
        back_s = time.monotonic() - t0
        assert deliveries()["refusing"]["attempts"] == 1  # never retried
        for folder in ("ok", "back"):
            copies = _received_by_sop_uid(tmp_path / folder)
            assert len(copies) == 2 and set(copies.values()) == {1}, (folder, copies)
        assert not any((tmp_path / "refusing").iterdir())
        print(f"\nrefusing/hung/ok destinations: permanent refusal failed after 1 attempt, never retried; hung "
              f"one timed out after {timeout:g} s per attempt, delivered once at attempt "
              f"{deliveries()['hung']['attempts']}, {back_s:.1f} s after a PACS listened on its port again")


# --------------------------------------------------------------------------- hung callers


def _p_data_fragment(context_id: int) -> bytes:
    """A P-DATA-TF PDU carrying the first fragment of a DIMSE command (not the last: more must follow)."""
    fragment = b"\x00\x00\x00\x00"
    pdv = struct.pack(">IBB", 2 + len(fragment), context_id, 0x01) + fragment  # 0x01: command, not last
    return struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv


def test_hung_callers_are_released_and_others_served_meanwhile(tmp_path: Path, model: Path) -> None:
    """(a) a TCP connection that never sends an A-ASSOCIATE-RQ is closed after ``node.acse_timeout_seconds``;
    (b) an association that stops in the middle of a DIMSE message is aborted after the DIMSE / network
    timeout. Meanwhile the node answers C-ECHO and C-STORE from others."""
    acse, dimse, network = 2.0, 2.0, 3.0
    cfg = node_config(tmp_path, model=model, node={"acse_timeout_seconds": acse, "dimse_timeout_seconds": dimse,
                                                   "network_timeout_seconds": network, "max_associations": 4})
    with NodeProcess(cfg) as node:
        silent = socket.create_connection(("127.0.0.1", node.port), timeout=30)
        t_silent = time.monotonic()
        ae = AE(ae_title="STALLER")
        ae.add_requested_context(Verification)
        ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = 60
        stalled = ae.associate("127.0.0.1", node.port, ae_title="ILD_NODE")
        assert stalled.is_established
        stalled.dul.socket.send(_p_data_fragment(stalled.accepted_contexts[0].context_id))
        t_stalled = time.monotonic()
        # Served meanwhile, on other associations.
        echo = subprocess.run(["echoscu", "-aet", "PACS", "-aec", "ILD_NODE", "127.0.0.1", str(node.port)],
                              capture_output=True, text=True, timeout=30, check=False, env=DCMTK_ENV)
        assert echo.returncode == 0, echo.stderr
        real = sorted((REAL_DWI).iterdir())[:3]
        stored = storescu(node.port, real)
        assert stored.returncode == 0, stored.stderr
        assert silent.recv(1) == b""  # closed by the node (blocks at most the socket's 30 s)
        silent_s = time.monotonic() - t_silent
        wait_for(lambda: not stalled.is_established, 30, "the node to abort the stalled association")
        stalled_s = time.monotonic() - t_stalled
        silent.close()
        assert stalled.is_aborted
        wait_for(lambda: "association from AE 'STALLER' at 127.0.0.1 aborted" in node.log(), 10,
                 "the abort in the node's log")
        assert acse * 0.9 <= silent_s < acse + 10
        assert min(dimse, network) * 0.9 <= stalled_s < max(dimse, network) + 10
        ok = node.cli("echo", "127.0.0.1", str(node.port), "ILD_NODE")
        assert ok.returncode == 0, ok.stdout + ok.stderr
    print(f"\nhung callers: silent TCP connection closed after {silent_s:.1f} s (acse {acse:g} s); association "
          f"stalled mid-DIMSE aborted after {stalled_s:.1f} s (dimse {dimse:g} s, network {network:g} s)")
