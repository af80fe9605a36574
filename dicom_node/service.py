"""The running node: receiver, completion check, worker and dispatcher in one process (``dicom-node serve``).

Data flow: receiver (C-STORE -> file + index) -> router (completion -> case) -> processor (case ->
results) -> dispatcher (results -> destinations). The receiver serves on pynetdicom's threads; the
processor runs in ``queue.workers`` worker processes of their own (``dicom_node/worker.py``: a case takes
the cores for tens of seconds, and must not take them from C-STORE), or with ``queue.workers: 0`` and
in ``serve --worker-only`` on a thread of this process; APScheduler runs the periodic passes
(completion, sending, lease recovery) every ``queue.poll_seconds``. With ``web.enabled`` the dashboard,
JSON API and /metrics (``dicom_node/web``) are served by uvicorn on a thread, on ``web.host:web.port``.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import threading
import time
from typing import TYPE_CHECKING

from apscheduler.schedulers.background import BackgroundScheduler

from dicom_node.config import NodeConfig
from dicom_node.db import Database, open_database
from dicom_node.dispatcher import dispatch_due
from dicom_node.index import Index, reindex_missing
from dicom_node.processor import Processor
from dicom_node.queue import recover_expired, recover_orphans
from dicom_node.receiver import Receiver
from dicom_node.router import route_complete_studies
from dicom_node.rules import load_rules
from dicom_node.worker import WorkerSupervisor

if TYPE_CHECKING:
    from dicom_node.web import WebServer
    from pipeline.checkpoint import CheckpointMeta

log = logging.getLogger(__name__)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class Node:
    """Everything ``serve`` runs; :meth:`start` returns once the node listens, :meth:`stop` is graceful."""

    def __init__(self, config: NodeConfig, *, receive: bool = True) -> None:
        """``receive=False``: a worker only (``serve --worker-only``): it claims cases from the shared queue,
        processes and sends them; the receiving node runs the listener, completion check and dashboard."""
        self.config = config
        self.receive = receive
        self.db: Database | None = None
        self.receiver: Receiver | None = None
        self.processor: Processor | None = None
        self.workers: WorkerSupervisor | None = None
        self._model_meta: CheckpointMeta | None = None
        self._scheduler: BackgroundScheduler | None = None
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self.web: WebServer | None = None  # when web.enabled
        self.started = time.time()

    def start(self) -> None:
        cfg = self.config
        t = time.perf_counter()
        cfg.storage.root.mkdir(parents=True, exist_ok=True, mode=0o750)
        self.rules = load_rules(cfg.rules)
        self.db = db = open_database(cfg.database.url, busy_timeout_s=cfg.database.busy_timeout_seconds)
        recover_orphans(db, socket.gethostname(), cfg.queue.max_attempts)
        if self.receive and cfg.queue.workers > 0:
            from pipeline.checkpoint import load_checkpoint, select_threshold

            # what the dashboard shows; the workers load their own
            self._model_meta = select_threshold(load_checkpoint(cfg.model.path)[1], cfg.model.threshold)
            self.workers = WorkerSupervisor(cfg, on_exit=self._worker_died)
        else:
            self.processor = Processor(db, cfg)
        if self.receive:
            reindex_missing(db, cfg.storage.root)
            self.receiver = receiver = Receiver(cfg, Index(db).record)
            receiver.start()
        every = cfg.queue.poll_seconds
        self._scheduler = BackgroundScheduler(job_defaults={"coalesce": True, "max_instances": 1,
                                                            "misfire_grace_time": None})
        if self.receive:
            self._scheduler.add_job(self._route, "interval", seconds=every, id="completion")
        self._scheduler.add_job(self._dispatch, "interval", seconds=every, id="dispatch")
        self._scheduler.add_job(self._recover, "interval", seconds=max(every, 5.0), id="leases")
        self._scheduler.start()
        if self.workers is not None:
            self.workers.start()
        else:
            assert self.processor is not None
            self._worker = threading.Thread(target=self.processor.run_forever, args=(self._stop,), name="worker",
                                            daemon=True)
            self._worker.start()
        if not self.receive:
            log.info("worker %s (pid %d) ready in %.1f s: processing the shared queue; storage %s",
                     cfg.node.ae_title, os.getpid(), time.perf_counter() - t, cfg.storage.root)
            return
        if cfg.web.enabled:
            self._start_web()
        log.info("node %s listening on %s:%d (pid %d), ready in %.1f s; storage %s", cfg.node.ae_title,
                 cfg.node.bind_address, receiver.port, os.getpid(), time.perf_counter() - t, cfg.storage.root)

    def _start_web(self) -> None:
        from dicom_node.web import WebServer, create_app

        web = self.config.web
        app = create_app(self.config, self.database, rules=self.rules, model_info=self.model_info,
                         started=self.started)
        self.web = server = WebServer(app, web.host, web.port)
        server.start()
        log.info("dashboard and API on http://%s:%d/ (%s)", web.host, web.port,
                 "token required" if web.token else "no token")
        if web.token is None and not _loopback(web.host):
            log.warning("web.host %s is not a loopback address and web.token is not set: anyone who reaches "
                        "this port can reprocess and resend studies; set web.token", web.host)

    @property
    def database(self) -> Database:
        """The node's database, open from :meth:`start` on."""
        if self.db is None:
            raise RuntimeError("the node has not been started")
        return self.db

    def model_info(self) -> dict | None:
        """The model for the dashboard's health (None before it is loaded)."""
        meta = self._model_meta or (self.processor.meta if self.processor is not None else None)
        if meta is None:
            return None
        return {"name": meta.model_name, "version": meta.model_version, "threshold": meta.threshold,
                "file": self.config.model.path.name, "device": self.config.model.device}

    def _worker_died(self, pid: int) -> None:
        # its case goes back to the queue now (the attempt counts), not when its lease expires
        recover_orphans(self.database, socket.gethostname(), self.config.queue.max_attempts, found="after its worker died")

    def _route(self) -> None:
        try:
            route_complete_studies(self.database, self.config.completion, self.rules)
        except Exception:
            log.exception("completion check failed; retrying on the next pass")

    def _dispatch(self) -> None:
        try:
            dispatch_due(self.database, self.config)
        except Exception:
            log.exception("dispatch pass failed; retrying on the next pass")

    def _recover(self) -> None:
        try:
            recover_expired(self.database, self.config.queue.max_attempts)
        except Exception:
            log.exception("lease recovery failed; retrying on the next pass")

    def case_in_flight(self) -> bool:
        """Whether the worker thread is still running a case (after :meth:`stop` gave it back to the queue)."""
        return self._worker is not None and self._worker.is_alive()

    def stop(self) -> None:
        """Stop accepting associations, finish (or re-queue) the running case, stop the periodic passes."""
        grace = self.config.queue.shutdown_grace_seconds
        log.info("stopping: no new associations; waiting up to %g s for the running case", grace)
        self._stop.set()  # first: no new case is claimed while the listener closes
        if self.receiver is not None:
            self.receiver.stop()
        if self.workers is not None:
            self.workers.stop(grace + 10)  # each worker has the grace period to finish or re-queue its case
        if self.processor is not None and not self.processor.idle.wait(grace):
            self.processor.release_current(f"node stopped (SIGTERM) before the case finished ({grace:g} s grace)")
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=True)
        if self.web is not None:
            self.web.stop()
        if self.db is not None:
            self.db.dispose()
        log.info("stopped")
