"""The case queue: atomic claims with leases, outcomes, and recovery of cases whose worker died.

Every transition is one conditional UPDATE (``... WHERE state = 'queued'``, ``... WHERE lease_owner =
me``) whose row count says whether this worker won: correct with several worker threads,
processes or hosts on one PostgreSQL database, and with SQLite's single writer. Each transition is
retried after a transient database error (:func:`~dicom_node.db.retry_transient`: SQLite locked by another
process past its busy timeout, PostgreSQL restarted): repeating a conditional UPDATE is harmless.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update

from dicom_node.db import (
    DONE,
    FAILED,
    PENDING,
    QUEUED,
    RUNNING,
    Case,
    Database,
    Delivery,
    Study,
    retry_transient,
    rows_changed,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClaimedCase:
    """A case this worker holds the lease of."""

    id: int
    study_uid: str
    version: int
    attempt: int
    inputs: dict[str, list[str]]  # role -> instance paths relative to storage.root


def claim(db: Database, owner: str, lease_seconds: float, *, now: float | None = None) -> ClaimedCase | None:
    """Take the oldest queued case (state -> running, attempts + 1, lease until now + lease_seconds)."""
    return retry_transient(lambda: _claim(db, owner, lease_seconds, now), "claim")


def _claim(db: Database, owner: str, lease_seconds: float, now: float | None) -> ClaimedCase | None:
    for _ in range(5):  # another worker may win the race for the same row; try the next one
        now = time.time() if now is None else now
        with db.session() as s:
            row = s.execute(select(Case.id).where(Case.state == QUEUED).order_by(Case.created_at, Case.id).limit(1)
                            ).scalar_one_or_none()
            if row is None:
                return None
            won = rows_changed(s, update(Case).where(Case.id == row, Case.state == QUEUED).values(
                state=RUNNING, lease_owner=owner, lease_expires_at=now + lease_seconds,
                attempts=Case.attempts + 1, started_at=now, updated_at=now))
            if not won:
                continue
            case = s.get_one(Case, row)
            study_uid = s.execute(select(Study.study_uid).where(Study.id == case.study_id)).scalar_one()
            return ClaimedCase(case.id, study_uid, case.version, case.attempts, json.loads(case.inputs))
    return None


def renew(db: Database, case_id: int, owner: str, lease_seconds: float) -> bool:
    """Extend the lease; False when this worker no longer holds it (it expired and the case was re-queued)."""
    def txn() -> bool:
        now = time.time()
        with db.session() as s:
            return bool(rows_changed(s, update(Case)
                                     .where(Case.id == case_id, Case.state == RUNNING, Case.lease_owner == owner)
                                     .values(lease_expires_at=now + lease_seconds, updated_at=now)))

    return retry_transient(txn, f"lease renewal of case {case_id}")


def complete(db: Database, case_id: int, owner: str, result_dir: str, summary: dict[str, Any],
             destinations: list[str]) -> bool:
    """Record success: state done, results, and one pending delivery per destination (same transaction)."""
    def txn() -> bool:
        now = time.time()
        with db.session() as s:
            won = rows_changed(s, update(Case)
                               .where(Case.id == case_id, Case.state == RUNNING, Case.lease_owner == owner)
                               .values(state=DONE, result_dir=result_dir, summary=json.dumps(summary), reason="",
                                       finished_at=now, updated_at=now, lease_owner=None, lease_expires_at=None))
            if not won:
                return False
            for name in destinations:
                s.add(Delivery(case_id=case_id, destination=name, state=PENDING, attempts=0, next_attempt_at=now,
                               updated_at=now))
        return True

    return retry_transient(txn, f"completion of case {case_id}")


def fail(db: Database, case_id: int, owner: str, error: str, *, max_attempts: int, permanent: bool) -> str:
    """Record a failed attempt: re-queued, or failed for good when ``permanent`` or out of attempts.
    Returns the new state ('' when the lease was lost meanwhile)."""
    def txn() -> str:
        now = time.time()
        with db.session() as s:
            case = s.get(Case, case_id)
            if case is None or case.state != RUNNING or case.lease_owner != owner:
                return ""
            state = FAILED if permanent or case.attempts >= max_attempts else QUEUED
            case.state, case.reason, case.updated_at = state, error, now
            case.lease_owner = case.lease_expires_at = None
            if state == FAILED:
                case.finished_at = now
        return state

    return retry_transient(txn, f"failure of case {case_id}")


def release(db: Database, case_id: int, owner: str, why: str) -> bool:
    """Give a running case back to the queue without counting the attempt (graceful shutdown)."""
    def txn() -> bool:
        now = time.time()
        with db.session() as s:
            return bool(rows_changed(s, update(Case)
                                     .where(Case.id == case_id, Case.state == RUNNING, Case.lease_owner == owner)
                                     .values(state=QUEUED, attempts=Case.attempts - 1, reason=why, lease_owner=None,
                                             lease_expires_at=None, started_at=None, updated_at=now)))

    return retry_transient(txn, f"release of case {case_id}")


def recover_expired(db: Database, max_attempts: int, *, now: float | None = None) -> int:
    """Re-queue running cases whose lease expired (their worker crashed or hung); fail those out of attempts."""
    now = time.time() if now is None else now
    why = "the worker's lease expired (crashed, killed or hung) during attempt"
    with db.session() as s:
        expired = s.execute(select(Case).where(Case.state == RUNNING, Case.lease_expires_at < now)).scalars().all()
        for case in expired:
            case.state = FAILED if case.attempts >= max_attempts else QUEUED
            case.reason = f"{why} {case.attempts}"
            case.lease_owner = case.lease_expires_at = None
            case.updated_at = now
            log.warning("case %d (version %d): %s %d; now %s", case.id, case.version, why, case.attempts, case.state)
        return len(expired)


def recover_orphans(db: Database, hostname: str, max_attempts: int, *, now: float | None = None,
                    found: str = "at start-up") -> int:
    """At start-up: re-queue cases this host's earlier, now dead, node processes held (kill -9, power cut),
    without waiting for their leases to expire. Owners are ``host:pid:nonce``; a live pid is left alone.
    The interrupted attempt counts: a study that kills the node every time ends failed, not in a loop."""

    now = time.time() if now is None else now
    n = 0
    with db.session() as s:
        running = s.execute(select(Case).where(Case.state == RUNNING, Case.lease_owner.like(f"{hostname}:%"))
                            ).scalars().all()
        for case in running:
            try:
                pid = int((case.lease_owner or "").split(":")[1])
                os.kill(pid, 0)
                if pid != os.getpid():
                    continue  # another live node process on this host holds it
            except (ValueError, IndexError, ProcessLookupError):
                pass
            except PermissionError:
                continue  # a live process of another user
            case.state = FAILED if case.attempts >= max_attempts else QUEUED
            case.reason = f"the node process running attempt {case.attempts} had stopped (found {found})"
            case.lease_owner = case.lease_expires_at = None
            case.updated_at = now
            n += 1
            log.warning("case %d (version %d): its node process had stopped; now %s", case.id, case.version, case.state)
    return n
