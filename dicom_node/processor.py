"""The worker: claims queued cases, runs the pipeline with a warm model, and stores the results.

Results go where :class:`~dicom_node.storage.StorageLayout` says (``results/<StudyInstanceUID>/``, a later
version N >= 2 in ``.../version-N/``): written to a temporary folder first and published into place,
``summary.json`` last, so that a ``summary.json`` present means the version's results are complete.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import traceback
import uuid

from dicom_node import __version__, metrics
from dicom_node.config import NodeConfig
from dicom_node.db import Database
from dicom_node.queue import ClaimedCase, claim, complete, fail, release, renew
from dicom_node.storage import StorageLayout

log = logging.getLogger(__name__)

class Processor:
    """One worker: a warm model and a loop that processes cases until told to stop."""

    def __init__(self, db: Database, config: NodeConfig, *, owner: str | None = None) -> None:
        from pipeline.checkpoint import load_checkpoint, select_threshold

        self.db = db
        self.config = config
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        t = time.perf_counter()
        # Loaded once and kept: loading per case would add seconds to every study.
        self.model, meta = load_checkpoint(config.model.path)
        self.meta = select_threshold(meta, config.model.threshold)  # checked at start-up (config.check_files)
        log.info("model %s %s loaded in %.1f s (threshold %g, %s)", self.meta.model_name, self.meta.model_version,
                 time.perf_counter() - t, self.meta.threshold, self.meta.threshold_rule)
        self.current: ClaimedCase | None = None
        self.idle = threading.Event()
        self.idle.set()

    def run_once(self) -> bool:
        """Claim and process one case; False when the queue is empty."""
        q = self.config.queue
        case = claim(self.db, self.owner, q.lease_seconds)
        if case is None:
            return False
        self.idle.clear()
        self.current = case
        stop_heartbeat = threading.Event()
        heartbeat = threading.Thread(target=self._heartbeat, args=(case, stop_heartbeat), daemon=True,
                                     name=f"lease-{case.id}")
        heartbeat.start()
        try:
            self._process(case)
        finally:
            stop_heartbeat.set()
            heartbeat.join()
            self.current = None
            self.idle.set()
        return True

    def run_forever(self, stop: threading.Event) -> None:
        """Process cases until ``stop`` is set (checked between cases)."""
        while not stop.is_set():
            try:
                busy = self.run_once()
            except Exception:  # the database went away for a moment: keep the worker alive
                log.exception("worker: unexpected error; retrying in %g s", self.config.queue.poll_seconds)
                busy = False
            if not busy:
                stop.wait(self.config.queue.poll_seconds)

    def release_current(self, why: str) -> None:
        """Give the running case back to the queue (graceful shutdown past the grace period)."""
        case = self.current
        if case is not None and release(self.db, case.id, self.owner, why):
            log.warning("case %d (study %s version %d) re-queued: %s", case.id, case.study_uid, case.version, why)

    def _heartbeat(self, case: ClaimedCase, stop: threading.Event) -> None:
        lease = self.config.queue.lease_seconds
        while not stop.wait(lease / 3):
            try:
                if not renew(self.db, case.id, self.owner, lease):
                    log.warning("case %d: lease lost (another worker may run it now)", case.id)
                    return
            except Exception:
                log.exception("case %d: could not renew the lease; retrying", case.id)

    def _process(self, case: ClaimedCase) -> None:
        from pipeline.io import SeriesLoadError
        from pipeline.outputs import write_outputs
        from pipeline.registration import RegistrationSettings
        from pipeline.study import StudyError, StudySettings, run_study

        cfg = self.config
        root = cfg.storage.root
        log.info("case %d: study %s version %d, attempt %d, roles %s", case.id, case.study_uid, case.version,
                 case.attempt, ", ".join(case.inputs))
        t = time.perf_counter()
        try:
            files = {role: [root / p for p in paths] for role, paths in case.inputs.items()}
            missing = [str(p.relative_to(root)) for ps in files.values() for p in ps if not p.is_file()]
            if missing:
                raise StudyError(f"{len(missing)} input file(s) no longer on disk (purged?), e.g. {missing[0]}")
            threads = cfg.queue.worker_threads
            settings = StudySettings(device=cfg.model.device, software_version=__version__, threads=threads,
                                     registration=RegistrationSettings(threads=threads),
                                     secondary_capture=cfg.outputs.secondary_capture)
            result = run_study(files, self.model, self.meta, settings=settings)
            layout = StorageLayout(root)
            final = layout.results_dir(case.study_uid, case.version)
            tmp = layout.tmp_dir(f"{case.id}-{uuid.uuid4().hex[:8]}")
            write_outputs(result, tmp)
            layout.publish(tmp, final)
        except (StudyError, SeriesLoadError) as exc:
            # The study itself cannot be processed: retrying gives the same answer.
            fail(self.db, case.id, self.owner, str(exc), max_attempts=cfg.queue.max_attempts, permanent=True)
            metrics.case_failed(permanent=True)
            log.error("case %d (study %s version %d) failed: %s", case.id, case.study_uid, case.version, exc)
            return
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            state = fail(self.db, case.id, self.owner, error, max_attempts=cfg.queue.max_attempts, permanent=False)
            metrics.case_failed(permanent=False)
            log.error("case %d (study %s version %d) attempt %d failed (%s); now %s\n%s", case.id, case.study_uid,
                      case.version, case.attempt, error, state or "lease lost", traceback.format_exc())
            return
        summary = result.summary()
        metrics.case_finished(summary)
        rel = final.relative_to(root).as_posix()
        if complete(self.db, case.id, self.owner, rel, summary, [d.name for d in cfg.destinations]):
            log.info("case %d: study %s version %d done in %.1f s: %d lesion(s), %d >= 10 mm3; results in %s",
                     case.id, case.study_uid, case.version, time.perf_counter() - t, summary["lesion_count"],
                     summary["lesion_count_ge_10mm3"], rel)
        else:
            log.warning("case %d: finished after its lease was lost; results kept in %s, state left to the "
                        "worker that holds it", case.id, rel)
