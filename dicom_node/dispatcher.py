"""Send results back: C-STORE of each done case's SEG and SR (and its Secondary Capture key images, when
``outputs.secondary_capture`` made them) to every configured destination.

One delivery row per (case, destination). A transient failure (connection refused, timeout, out of
resources, rejected-transient) is retried with exponential backoff: ``send.retry_initial_seconds``
doubling up to ``send.retry_max_seconds``, at most ``send.max_attempts`` times. A permanent refusal
(rejected AE title, unsupported SOP class, a failure status) fails the delivery at once: retrying
would only repeat it. A case becomes ``sent`` when every destination has its results. The SEG and
SR keep their SOP Instance UIDs across retries, so a PACS that got them before a lost answer
stores them once.

Deliveries are claimed one at a time (state 'sending' with a lease of ``LEASE_SECONDS``, renewed
while the send runs). A node killed mid-send leaves its delivery 'sending'; once the lease runs out
it is due again and sent whole: delivery is at-least-once, and what the PACS got before the crash
arrives a second time with the same SOP Instance UIDs (tests/test_faults.py counts how often).
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from pathlib import Path

from sqlalchemy import func, select, update

from dicom_node import metrics
from dicom_node.config import Destination, NodeConfig
from dicom_node.db import (
    DONE,
    FAILED,
    PENDING,
    SENDING,
    SENT,
    Case,
    Database,
    Delivery,
    Study,
    rows_changed,
)
from dicom_node.scu import Peer, SendError, client_ssl_context, send_files
from pipeline.outputs import dicom_files

log = logging.getLogger(__name__)

#: Seconds a claimed delivery stays 'sending' without renewal; renewed every third of it while the send
#: runs (however long the peer takes), so a killed sender's delivery is due again within this.
LEASE_SECONDS = 15.0


def backoff_seconds(attempts: int, initial: float, maximum: float) -> float:
    """Wait before retry number ``attempts`` (1 = first retry): initial * 2^(attempts-1), capped."""
    return min(maximum, initial * 2 ** max(0, attempts - 1))


def destination_ssl_context(config: NodeConfig) -> ssl.SSLContext:
    """TLS context for destinations with ``tls: true``: peers verified against node.tls.ca_certificates,
    the node's own certificate presented when it has one."""
    tls = config.node.tls
    ctx = client_ssl_context(tls.ca_certificates, tls.certificate, tls.private_key)
    ctx.check_hostname = False  # PACS are addressed by IP, rarely in their certificate; the chain is verified
    return ctx


def result_files(storage_root: Path, result_dir: str) -> list[Path]:
    """The DICOM results of a case in sending order: SEG (when there are lesions), the SR that cites it, then
    the Secondary Capture instances (when switched on)."""
    return dicom_files(storage_root / result_dir)


def _claim_next(db: Database, now: float, tried: set[int]) -> int | None:
    """Claim the delivery due longest, not in ``tried`` (state 'sending', leased); None when none is due.

    One at a time: a claimed delivery's lease is only renewed while it is being sent."""
    with db.session() as s:
        # A sender that died mid-send (kill -9, power cut) leaves 'sending' behind: its lease, no longer
        # renewed, expires within LEASE_SECONDS and the delivery is due again.
        s.execute(update(Delivery).where(Delivery.state == SENDING, Delivery.lease_expires_at < now)
                  .values(state=PENDING, updated_at=now))
        due = s.execute(select(Delivery.id).where(Delivery.state == PENDING, Delivery.next_attempt_at <= now,
                                                  Delivery.id.not_in(tried))
                        .order_by(Delivery.next_attempt_at, Delivery.id)).scalars().all()
        for did in due:
            if rows_changed(s, update(Delivery).where(Delivery.id == did, Delivery.state == PENDING).values(
                    state=SENDING, lease_expires_at=time.time() + LEASE_SECONDS, updated_at=now)):
                return did
        return None


def _keep_lease(db: Database, delivery_id: int, stop: threading.Event) -> None:
    """Renew a claimed delivery's lease every third of LEASE_SECONDS until ``stop`` is set.

    The expiry time set by the last renewal is the holder's token: a renewal only succeeds while the row
    still carries it, so a sender whose lease was taken over (another node process) stops renewing."""
    with db.read() as s:
        token = s.execute(select(Delivery.lease_expires_at).where(Delivery.id == delivery_id)).scalar_one()
    while not stop.wait(LEASE_SECONDS / 3):
        new = time.time() + LEASE_SECONDS
        try:
            with db.session() as s:
                held = rows_changed(s, update(Delivery).where(Delivery.id == delivery_id, Delivery.state == SENDING,
                                                              Delivery.lease_expires_at == token)
                                    .values(lease_expires_at=new))
        except Exception:  # the database busy for a moment: the lease still has two thirds left
            log.exception("delivery %d: could not renew the lease; retrying", delivery_id)
            continue
        if not held:
            log.warning("delivery %d: lease lost (another sender may send it too)", delivery_id)
            return
        token = new


def _finish_case_if_sent(db: Database, case_id: int, now: float) -> None:
    with db.session() as s:
        open_ = s.execute(select(func.count(Delivery.id)).where(Delivery.case_id == case_id,
                                                                Delivery.state != SENT)).scalar_one()
        if open_ == 0:
            s.execute(update(Case).where(Case.id == case_id, Case.state == DONE).values(state=SENT, updated_at=now))


def deliver_one(db: Database, config: NodeConfig, delivery_id: int) -> str:
    """Send one claimed delivery; returns its new state."""
    cfg = config.send
    with db.session() as s:
        d = s.get_one(Delivery, delivery_id)
        case = s.get_one(Case, d.case_id)
        study_uid = s.execute(select(Study.study_uid).where(Study.id == case.study_id)).scalar_one()
        name, attempts, result_dir, version = d.destination, d.attempts + 1, case.result_dir, case.version
    dest: Destination | None = next((x for x in config.destinations if x.name == name), None)
    now = time.time()
    state, error, sent_at, next_at = FAILED, "", None, now
    files = result_files(config.storage.root, result_dir or "")
    if dest is None or not files:
        error = (f"destination {name!r} is no longer in the configuration" if dest is None
                 else f"no result files in {result_dir} (purged?)")
        log.error("study %s version %d: delivery to %s failed: %s", study_uid, version, name, error)
        metrics.send_failed(name, transient=False)
    else:
        peer = Peer(dest.ae_title, dest.host, dest.port, tls=dest.tls)
        stop_renewing = threading.Event()
        renewer = threading.Thread(target=_keep_lease, args=(db, delivery_id, stop_renewing), daemon=True,
                                   name=f"delivery-lease-{delivery_id}")
        renewer.start()
        try:
            report = send_files(files, peer, calling_ae=config.node.ae_title, timeout=cfg.timeout_seconds,
                                ssl_context=destination_ssl_context(config) if dest.tls else None)
            report.raise_for_status()
            state, sent_at = SENT, time.time()
            log.info("study %s version %d: SEG/SR sent to %s (%s@%s:%d), attempt %d", study_uid, version, name,
                     dest.ae_title, dest.host, dest.port, attempts)
        except SendError as exc:
            error = exc.reason
            metrics.send_failed(name, transient=exc.transient)
            if exc.transient and attempts < cfg.max_attempts:
                state = PENDING
                next_at = time.time() + backoff_seconds(attempts, cfg.retry_initial_seconds, cfg.retry_max_seconds)
                log.warning("study %s version %d: sending to %s failed (attempt %d/%d, retry in %.0f s): %s",
                            study_uid, version, name, attempts, cfg.max_attempts, next_at - time.time(), error)
            else:
                why = "permanent refusal" if not exc.transient else f"{attempts} attempts"
                log.error("study %s version %d: sending to %s failed for good (%s): %s", study_uid, version, name,
                          why, error)
        finally:
            stop_renewing.set()
            renewer.join()
    with db.session() as s:
        s.execute(update(Delivery).where(Delivery.id == delivery_id).values(
            state=state, attempts=attempts, last_error=error, sent_at=sent_at, next_attempt_at=next_at,
            lease_expires_at=None, updated_at=time.time()))
    if state == SENT:
        _finish_case_if_sent(db, d.case_id, time.time())
    return state


def dispatch_due(db: Database, config: NodeConfig, *, now: float | None = None) -> int:
    """Send every delivery that is due; returns how many were attempted."""
    now = time.time() if now is None else now
    tried: set[int] = set()  # each delivery once per pass, whatever its retry time
    while (did := _claim_next(db, now, tried)) is not None:
        tried.add(did)
        deliver_one(db, config, did)
    return len(tried)


def resend(db: Database, config: NodeConfig, study_uid: str, *, now: float | None = None) -> int:
    """Send the latest results of a study again to every configured destination (``dicom-node resend``).

    Deliveries of the latest version with results are reset to pending (attempts 0); destinations added
    to the config since get one. Returns the number of deliveries queued; KeyError for an unknown
    study, ValueError when it has no results yet."""
    now = time.time() if now is None else now
    with db.session() as s:
        study = s.execute(select(Study).where(Study.study_uid == study_uid)).scalar_one_or_none()
        if study is None:
            raise KeyError(study_uid)
        case = s.execute(select(Case).where(Case.study_id == study.id, Case.result_dir.is_not(None))
                         .order_by(Case.version.desc()).limit(1)).scalar_one_or_none()
        if case is None:
            raise ValueError(f"study {study_uid} has no results yet")
        existing = {d.destination: d for d in s.execute(select(Delivery).where(Delivery.case_id == case.id)).scalars()}
        for dest in config.destinations:
            d = existing.get(dest.name)
            if d is None:
                s.add(Delivery(case_id=case.id, destination=dest.name, state=PENDING, attempts=0,
                               next_attempt_at=now, updated_at=now))
            else:
                d.state, d.attempts, d.next_attempt_at, d.last_error, d.updated_at = PENDING, 0, now, "", now
        if config.destinations:
            case.state, case.updated_at = DONE, now
        return len(config.destinations)
