"""Load and scale-out helpers for tests and ``bench/load.py``: many small studies from one template, sent
over parallel associations, extra worker processes (``serve --worker-only``), and the figures read back
from the node's database.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pydicom
from node_harness import (
    DICOM_NODE,
    ROOT,
    NodeProcess,
    node_config,
    storescp,
    storescu,
    wait_for,
)
from sqlalchemy import func, select

from dicom_node.db import DONE, SENT, Case, Delivery, Instance, Study, open_database

_SUFFIX = 6  # digits of the last UID component replaced per copy (its generated components are ~38 digits)


@dataclass(frozen=True)
class LoadStudy:
    uid: str  # StudyInstanceUID
    folder: Path
    n_instances: int


def study_copies(template: Path, out: Path, n: int) -> list[LoadStudy]:
    """``n`` copies of the study in ``template`` with new Study, Series and SOP Instance UIDs.

    Each UID keeps its length (its last 6 digits become the copy's number), so the bytes are patched in
    place, without re-encoding: 50 copies of a 250-file study take seconds, not minutes."""
    files = sorted(p for p in template.rglob("*.dcm"))
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    study_uid = str(headers[0].StudyInstanceUID)
    series_uids = sorted({str(h.SeriesInstanceUID) for h in headers})
    blobs = [p.read_bytes() for p in files]
    copies = []
    for i in range(n):
        def renamed(uid: str, i: int = i) -> bytes:
            last = uid.rsplit(".", 1)[-1]
            if len(last) <= _SUFFIX:
                raise ValueError(f"UID {uid}: last component too short to number copies in place")
            return (uid[:-_SUFFIX] + f"{i + 1:0{_SUFFIX}d}").encode()

        shared = [(study_uid.encode(), renamed(study_uid))] + [(u.encode(), renamed(u)) for u in series_uids]
        folder = out / f"study-{i + 1:03d}"
        for path, header, blob in zip(files, headers, blobs, strict=True):
            for old, new in [*shared, (str(header.SOPInstanceUID).encode(), renamed(str(header.SOPInstanceUID)))]:
                blob = blob.replace(old, new)
            target = folder / path.relative_to(template)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(blob)
        copies.append(LoadStudy(renamed(study_uid).decode(), folder, len(files)))
    return copies


#: Seconds within which every C-STORE of a load run must be answered (a PACS's usual DIMSE timeout).
DIMSE_TIMEOUT = 30


def send_parallel(port: int, studies: Sequence[LoadStudy], associations: int,
                  timeout: float = 600) -> list[subprocess.CompletedProcess[str]]:
    """Send ``studies`` over ``associations`` concurrent DCMTK ``storescu`` runs (study i on run i mod K,
    each run one association, every answer due within DIMSE_TIMEOUT s)."""
    results: list[subprocess.CompletedProcess[str]] = []
    lock = threading.Lock()

    def send(part: Sequence[LoadStudy]) -> None:
        r = storescu(port, [s.folder for s in part], timeout=timeout, dimse_timeout=DIMSE_TIMEOUT)
        with lock:
            results.append(r)

    threads = [threading.Thread(target=send, args=(studies[k::associations],)) for k in range(associations)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


class WorkerProcess(NodeProcess):
    """``dicom-node serve --worker-only --config FILE``: an extra worker on the node's database and storage,
    with its own log (``<name>.log`` beside the config)."""

    def __init__(self, config: Path, name: str) -> None:
        super().__init__(config)
        self.log_path = config.parent / f"{name}.log"

    def start(self, timeout: float = 60) -> WorkerProcess:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([*DICOM_NODE, "serve", "--worker-only", "--config", str(self.config)],
                                         stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        wait_for(lambda: "ready in" in self.log() or self.proc.poll() is not None, timeout, "the worker to start")
        if self.proc.poll() is not None:
            raise AssertionError(f"the worker exited with {self.proc.returncode}:\n{self.log()}")
        return self


_DONE_LINE = re.compile(r"case (\d+): study \S+ version \d+ done in ")


def cases_done_in(log: str) -> list[int]:
    """Case ids a node or worker log says it finished ("case N: study ... version V done in ...")."""
    return [int(m.group(1)) for m in _DONE_LINE.finditer(log)]


@dataclass(frozen=True)
class LoadFigures:
    """What a load run did, from the node's database. Times in seconds."""

    studies: int
    studies_finished: int  # cases done or sent (latest version)
    instances: int
    receive_seconds: float  # first to last instance indexed
    queue_latency: tuple[float, float]  # case made (study complete) -> case started: median, max
    end_to_end: tuple[float, float]  # first instance received -> last result delivered: median, max
    attempts_max: int

    @property
    def instances_per_second(self) -> float:
        return self.instances / self.receive_seconds if self.receive_seconds > 0 else float("nan")

    def lines(self) -> list[str]:
        return [
            f"studies {self.studies_finished}/{self.studies} processed; {self.instances} instances indexed",
            f"receive: {self.receive_seconds:.1f} s, {self.instances_per_second:.0f} instances/s",
            (f"queue latency (study complete -> case started): median {self.queue_latency[0]:.1f} s, "
            f"max {self.queue_latency[1]:.1f} s"),
            (f"end to end (first instance -> results delivered): median {self.end_to_end[0]:.1f} s, "
            f"max {self.end_to_end[1]:.1f} s"),
            f"attempts per case: at most {self.attempts_max}",
        ]


def _median_max(values: list[float]) -> tuple[float, float]:
    return (statistics.median(values), max(values)) if values else (float("nan"), float("nan"))


def load_figures(url: str) -> LoadFigures:
    """Read the figures of a load run from the node's database (``database.url``)."""
    db = open_database(url, migrate_schema=False)
    try:
        with db.read() as s:
            n_studies = s.execute(select(func.count(Study.id))).scalar_one()
            first, last, n = s.execute(select(func.min(Instance.received_at), func.max(Instance.received_at),
                                              func.count(Instance.id))).one()
            cases = s.execute(select(Case, Study.first_received_at).join(Study, Study.id == Case.study_id)).all()
            sent_at = dict(s.execute(select(Delivery.case_id, func.max(Delivery.sent_at))
                                     .group_by(Delivery.case_id)).all())
    finally:
        db.dispose()
    finished = [(c, t0) for c, t0 in cases if c.state in (DONE, SENT)]
    return LoadFigures(
        studies=n_studies, studies_finished=len(finished), instances=n or 0,
        receive_seconds=(last - first) if n else 0.0,
        queue_latency=_median_max([c.started_at - c.created_at for c, _ in finished if c.started_at]),
        end_to_end=_median_max([sent_at[c.id] - t0 for c, t0 in finished if sent_at.get(c.id)]),
        attempts_max=max((c.attempts for c, _ in cases), default=0))


def wait_all_sent(url: str, n: int, timeout: float) -> None:
    """Poll the database until ``n`` cases are sent (AssertionError with the states on timeout)."""
    db = open_database(url, migrate_schema=False)

    def states() -> dict[str, int]:
        with db.read() as s:
            return dict(s.execute(select(Case.state, func.count(Case.id)).group_by(Case.state)).all())

    try:
        started = time.monotonic()
        try:
            wait_for(lambda: states().get(SENT, 0) >= n, timeout, f"{n} cases sent", interval=1.0)
        except AssertionError as exc:
            raise AssertionError(f"{exc} after {time.monotonic() - started:.0f} s; cases: {states()}") from None
    finally:
        db.dispose()


@dataclass(frozen=True)
class LoadRun:
    """One load run: figures from the database, wall time of the sends and of the whole run, per-process
    case counts (from their logs: the node first, then each extra worker) and what the destination got."""

    figures: LoadFigures
    send_seconds: float
    total_seconds: float
    cases_per_process: list[list[int]]
    results_at_destination: dict[str, dict[str, int]]  # StudyInstanceUID -> {"SEG": n, "SR": n}
    store_failures: list[str]  # storescu runs that did not exit 0 (their stderr tail)


def _destination_counts(dest: Path) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for path in dest.rglob("*"):
        if path.is_file():
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            per = counts.setdefault(str(ds.StudyInstanceUID), {})
            per[str(ds.Modality)] = per.get(str(ds.Modality), 0) + 1
    return counts


@contextmanager
def load_node(tmp: Path, model: Path, url: str, workers: int) -> Iterator[tuple[NodeProcess, list[WorkerProcess]]]:
    """A receiving node with one storescp destination and ``workers - 1`` extra worker processes, all on
    ``url`` and one storage folder; the destination's folder is ``tmp / "dest"``."""
    with storescp(tmp / "dest") as dest_port:
        cfg = node_config(tmp, model=model, destinations=[
            {"name": "pacs", "ae_title": "DEST", "host": "127.0.0.1", "port": dest_port}],
            database={"url": url}, web={"enabled": False},
            completion={"series_quiet_seconds": 1.0, "study_quiet_seconds": 1.5, "max_wait_seconds": 600,
                        "start_when_roles_complete": True})
        extra = [WorkerProcess(cfg, f"worker-{i + 2}") for i in range(workers - 1)]
        with NodeProcess(cfg) as node:
            try:
                for w in extra:
                    w.start()
                yield node, extra
            finally:
                for w in extra:
                    w.stop()


def run_load(tmp: Path, studies: Sequence[LoadStudy], *, model: Path, url: str, associations: int, workers: int,
             timeout: float) -> LoadRun:
    """Send ``studies`` over ``associations`` parallel associations to a node with ``workers`` worker
    processes, wait until every case is sent (``timeout`` s), and collect the figures."""
    with load_node(tmp, model, url, workers) as (node, extra):
        t0 = time.monotonic()
        sends = send_parallel(node.port, studies, associations, timeout=timeout)
        send_seconds = time.monotonic() - t0
        failures = [r.stderr[-500:] for r in sends if r.returncode != 0]
        if not failures:
            wait_all_sent(url, len(studies), timeout)
        total = time.monotonic() - t0
        logs = [node.log()] + [w.log() for w in extra]
    return LoadRun(load_figures(url), send_seconds, total, [cases_done_in(log) for log in logs],
                   _destination_counts(tmp / "dest"), failures)
