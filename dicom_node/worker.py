"""Worker processes: the model and registration run apart from the receiver (``dicom-node serve``).

A case takes the CPU for tens of seconds (registration, inference). In the receiver's process it took the
cores and the GIL from the C-STORE handlers: receiving ran at ~0.56x its idle rate while a case ran. Here
each worker is a child process (``multiprocessing`` spawn: no threads or locks inherited from the
receiver) that runs :class:`dicom_node.processor.Processor` on the shared queue, at a lower CPU priority
(``queue.worker_nice``) so the receiver always gets a core when it needs one, with ``queue.worker_threads``
torch/SimpleITK threads.

:class:`WorkerSupervisor` (in the receiving node) starts ``queue.workers`` of them, restarts one that dies
(its case is re-queued at once, the attempt counted, as after a kill -9 of a whole node), and stops them
with the node: SIGTERM, then each finishes its case or re-queues it after ``queue.shutdown_grace_seconds``.
A worker dies with its node (``PR_SET_PDEATHSIG``): a kill -9 of ``serve`` leaves no orphan processing.

Prometheus counters the processor feeds live in the receiving node (it serves /metrics): a worker sends
each metric event over a queue, and the supervisor applies it there.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing as mp
import multiprocessing.queues
import os
import queue
import signal
import sys
import threading
import time
from typing import Any

from dicom_node import metrics
from dicom_node.config import NodeConfig

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies (as if the worker had been a thread of it)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def worker_main(config_json: str, events: mp.queues.Queue[Any] | None, parent_pid: int, slot: int) -> None:
    """Entry point of one worker process: process cases until SIGTERM (or until the parent dies)."""
    _die_with_parent()
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent decides
    config = NodeConfig.model_validate_json(config_json)
    q = config.queue
    if q.worker_nice:
        os.nice(q.worker_nice)

    from dicom_node.db import open_database
    from dicom_node.logs import setup_logging
    from dicom_node.processor import Processor

    setup_logging(config.logging.level)
    if events is not None:
        metrics.forward_to(events.put)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    db = open_database(config.database.url, busy_timeout_s=config.database.busy_timeout_seconds)
    processor = Processor(db, config)
    log.info("worker %d (pid %d, nice %d, %s thread(s)) ready", slot, os.getpid(), os.nice(0),
             q.worker_threads or "all")
    loop = threading.Thread(target=processor.run_forever, args=(stop,), name="worker", daemon=True)
    loop.start()
    stop.wait()
    if not processor.idle.wait(q.shutdown_grace_seconds):
        processor.release_current(f"node stopped (SIGTERM) before the case finished "
                                  f"({q.shutdown_grace_seconds:g} s grace)")
    loop.join(timeout=5)
    db.dispose()
    logging.shutdown()
    # A case given back may still be inside native code (ITK, torch) on the loop thread: interpreter
    # teardown would abort on it, so leave at once (everything is flushed and the database closed).
    os._exit(0)


class WorkerSupervisor:
    """Starts ``config.queue.workers`` worker processes, restarts those that die, stops them all."""

    def __init__(self, config: NodeConfig, *, on_exit: Any = None) -> None:
        """``on_exit(pid)`` runs after a worker died unexpectedly (the node re-queues its case there)."""
        self.config = config
        self._on_exit = on_exit
        self._ctx = mp.get_context("spawn")
        self._events: mp.queues.Queue[Any] = self._ctx.Queue()
        # the web token is the receiver's business only, and SecretStr does not survive JSON
        self._config_json = config.model_copy(update={"web": config.web.model_copy(update={"token": None})}
                                              ).model_dump_json()
        self._procs: list[Any] = [None] * config.queue.workers
        self._deaths = [0] * config.queue.workers
        self._next_start = [0.0] * config.queue.workers
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p is not None and p.is_alive()]

    def start(self) -> None:
        for slot in range(len(self._procs)):
            self._spawn(slot)
        self._threads = [threading.Thread(target=self._watch, name="worker-supervisor", daemon=True),
                         threading.Thread(target=self._relay, name="worker-metrics", daemon=True)]
        for t in self._threads:
            t.start()

    def _spawn(self, slot: int) -> None:
        proc = self._ctx.Process(target=worker_main, name=f"dicom-node-worker-{slot}",
                                 args=(self._config_json, self._events, os.getpid(), slot), daemon=False)
        proc.start()
        self._procs[slot] = proc
        log.info("worker %d started (pid %d)", slot, proc.pid)

    def _watch(self) -> None:
        while not self._stopping.wait(0.5):
            for slot, proc in enumerate(self._procs):
                if proc is None or proc.is_alive() or self._stopping.is_set():
                    continue
                if self._next_start[slot] == 0.0:
                    delay = _RESTART_BACKOFF_S[min(self._deaths[slot], len(_RESTART_BACKOFF_S) - 1)]
                    self._deaths[slot] += 1
                    self._next_start[slot] = time.monotonic() + delay
                    log.error("worker %d (pid %d) exited with code %s; restarting it in %g s", slot, proc.pid,
                              proc.exitcode, delay)
                    if self._on_exit is not None:
                        try:
                            self._on_exit(proc.pid)
                        except Exception:
                            log.exception("worker %d: could not re-queue its case; its lease will expire", slot)
                elif time.monotonic() >= self._next_start[slot]:
                    self._next_start[slot] = 0.0
                    self._spawn(slot)

    def _relay(self) -> None:
        while not self._stopping.is_set():
            try:
                name, kwargs = self._events.get(timeout=0.5)
            except queue.Empty:
                continue
            except (EOFError, OSError):
                return
            metrics.apply(name, kwargs)

    def stop(self, timeout: float) -> None:
        """SIGTERM every worker and wait up to ``timeout`` s (each finishes or re-queues its case); then kill."""
        self._stopping.set()
        alive = [p for p in self._procs if p is not None and p.is_alive()]
        for p in alive:
            p.terminate()
        deadline = time.monotonic() + timeout
        for p in alive:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                log.error("worker pid %d did not stop within %g s; killing it", p.pid, timeout)
                p.kill()
                p.join(5)
        for t in self._threads:
            t.join(timeout=2)
        self._events.close()
