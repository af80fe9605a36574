"""Retention: remove studies older than a limit, their received files, results and index rows (``dicom-node purge``).

A study is old when its last instance arrived more than ``older_than_days`` ago. Studies with a
case queued or running, or with results still waiting to be sent, are kept whatever their age:
purging them would lose data a destination has not received yet.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import delete, select

from dicom_node.db import (
    PENDING,
    QUEUED,
    RUNNING,
    SENDING,
    Case,
    Database,
    Delivery,
    Instance,
    Series,
    Study,
)
from dicom_node.storage import StorageLayout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PurgeReport:
    studies: list[str]  # StudyInstanceUIDs removed (or that would be, in a dry run)
    kept_busy: list[str]  # old but kept: a case queued/running or a delivery open
    bytes_freed: int


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def purge(db: Database, storage_root: Path, older_than_days: float, *, dry_run: bool = False,
          now: float | None = None) -> PurgeReport:
    """Remove the studies last received more than ``older_than_days`` days ago (files first, then rows)."""
    now = time.time() if now is None else now
    cutoff = now - older_than_days * 86400.0
    removed: list[str] = []
    busy: list[str] = []
    freed = 0
    with db.session() as s:
        old = s.execute(select(Study.id, Study.study_uid).where(Study.last_received_at < cutoff)).all()
        busy_ids = set(s.execute(select(Case.study_id).where(Case.state.in_((QUEUED, RUNNING)))).scalars())
        busy_ids |= set(s.execute(select(Case.study_id).join(Delivery).where(
            Delivery.state.in_((PENDING, SENDING)))).scalars())
    for study_id, uid in old:
        if study_id in busy_ids:
            busy.append(uid)
            continue
        layout = StorageLayout(storage_root)
        folders = [layout.study_incoming(uid), layout.study_results(uid)]
        freed += sum(_size(f) for f in folders)
        removed.append(uid)
        if dry_run:
            continue
        for f in folders:
            shutil.rmtree(f, ignore_errors=True)
        with db.session() as s:
            # Explicit deletes, children first: SQLite enforces ON DELETE CASCADE only with its pragma on.
            case_ids = select(Case.id).where(Case.study_id == study_id)
            s.execute(delete(Delivery).where(Delivery.case_id.in_(case_ids)))
            s.execute(delete(Case).where(Case.study_id == study_id))
            s.execute(delete(Instance).where(Instance.series_id.in_(select(Series.id).where(Series.study_id == study_id))))
            s.execute(delete(Series).where(Series.study_id == study_id))
            s.execute(delete(Study).where(Study.id == study_id))
        log.info("purged study %s (last instance older than %g days)", uid, older_than_days)
    return PurgeReport(removed, busy, freed)
