"""The node's database: studies, series and instances received, the case queue and deliveries.

SQLAlchemy 2 on SQLite (default; WAL mode) or PostgreSQL, the same code for both. The schema is
created and migrated automatically when the node opens the database (:func:`open_database`):
``schema_version`` holds the number of the last migration applied, and :data:`MIGRATIONS` lists
every migration in order, so a database made by an older node is brought up to date in place.

Times are UTC seconds since the epoch (float): portable across both databases and trivial to
compare with ``time.time()``.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from sqlalchemy import (
    Boolean,
    Connection,
    Engine,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    text,
)
from sqlalchemy.engine import CursorResult
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.sql import Executable

from dicom_node.states import (  # noqa: F401 - re-exported: the queue's modules name states with the tables
    CASE_STATES,
    DELIVERY_STATES,
    DONE,
    FAILED,
    PENDING,
    QUEUED,
    RUNNING,
    SENDING,
    SENT,
    SKIPPED,
)

log = logging.getLogger(__name__)

UID = String(64)



class Base(DeclarativeBase):
    pass


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(UID, unique=True)
    first_received_at: Mapped[float] = mapped_column(Float)
    last_received_at: Mapped[float] = mapped_column(Float)
    n_instances: Mapped[int] = mapped_column(Integer, default=0)
    # Set by the first instance not yet part of a case; cleared when a case is made (or late
    # instances are ignored). The completion check looks only at studies where it is set.
    pending_since: Mapped[float | None] = mapped_column(Float, nullable=True, index=True)
    latest_version: Mapped[int] = mapped_column(Integer, default=0)
    ignored_instances: Mapped[int] = mapped_column(Integer, default=0)


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    modality: Mapped[str] = mapped_column(String(16), default="")
    series_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    description: Mapped[str] = mapped_column(String(256), default="")
    routable: Mapped[bool] = mapped_column(Boolean, default=False)
    # SeriesFeatures.to_dict() of the first instance with readable features (JSON); the per-instance
    # geometry in Instance.geometry completes it into the series' features at completion.
    features: Mapped[str | None] = mapped_column(Text, nullable=True)
    n_instances: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[float] = mapped_column(Float)
    last_received_at: Mapped[float] = mapped_column(Float)


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    sop_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(String(512))  # relative to storage.root, posix
    size_bytes: Mapped[int] = mapped_column(Integer)
    transfer_syntax: Mapped[str] = mapped_column(UID, default="")
    instance_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # positions / orientations (LPS, mm) per frame, acquisition datetime, max b-value, frames (JSON)
    geometry: Mapped[str | None] = mapped_column(Text, nullable=True)
    received_at: Mapped[float] = mapped_column(Float)
    calling_ae: Mapped[str] = mapped_column(String(16), default="")


class Case(Base):
    __tablename__ = "cases"
    __table_args__ = (UniqueConstraint("study_id", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str] = mapped_column(Text, default="")  # why skipped / the last error
    trigger: Mapped[str] = mapped_column(String(64), default="")  # what completed the study
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    n_instances: Mapped[int] = mapped_column(Integer, default=0)
    assignment: Mapped[str] = mapped_column(Text, default="{}")  # StudyAssignment.to_dict() (JSON)
    inputs: Mapped[str] = mapped_column(Text, default="{}")  # role -> [relative paths] (JSON), frozen
    result_dir: Mapped[str | None] = mapped_column(String(512), nullable=True)  # relative to storage.root
    summary: Mapped[str | None] = mapped_column(Text, nullable=True)  # summary.json (JSON)


class Delivery(Base):
    __tablename__ = "deliveries"
    __table_args__ = (UniqueConstraint("case_id", "destination"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("cases.id", ondelete="CASCADE"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[float] = mapped_column(Float)
    lease_expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_error: Mapped[str] = mapped_column(Text, default="")
    sent_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    updated_at: Mapped[float] = mapped_column(Float)


# --------------------------------------------------------------------------- migrations


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    apply: Callable[[Connection], None]


def _initial(conn: Connection) -> None:
    Base.metadata.create_all(conn)


#: Every schema change, in order. Append only; never edit a released migration.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "studies, series, instances, cases, deliveries", _initial),
)
SCHEMA_VERSION = MIGRATIONS[-1].version


class DatabaseError(RuntimeError):
    """The database cannot be opened or is newer than this node."""


def _schema_version(conn: Connection) -> int:
    conn.execute(text("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"))
    row = conn.execute(text("SELECT max(version) FROM schema_version")).scalar()
    return int(row or 0)


def migrate(engine: Engine) -> int:
    """Apply every pending migration, each in its own transaction; returns the schema version.

    Safe when several nodes start at once on PostgreSQL (an advisory lock serialises them) or SQLite
    (``BEGIN IMMEDIATE`` takes the write lock before reading the version).
    """
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_lock(7302151)"))
            conn.commit()
        try:
            while True:
                with conn.begin():
                    current = _schema_version(conn)
                    if current > SCHEMA_VERSION:
                        raise DatabaseError(
                            f"database schema version {current} is newer than this node's ({SCHEMA_VERSION}); "
                            "upgrade the node")
                    pending = [m for m in MIGRATIONS if m.version > current]
                    if not pending:
                        return current
                    m = pending[0]
                    m.apply(conn)
                    conn.execute(text("INSERT INTO schema_version (version) VALUES (:v)"), {"v": m.version})
                    log.info("database migrated to schema version %d (%s)", m.version, m.description)
        finally:
            if engine.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_unlock(7302151)"))
                conn.commit()


# --------------------------------------------------------------------------- engine


class Database:
    """An engine plus a session factory; ``with db.session() as s:`` commits on success."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._readers = sessionmaker(engine.execution_options(read_only=True), expire_on_commit=False)
        # SQLite has one writer at a time. Threads of this process that meet at BEGIN IMMEDIATE would wait in
        # SQLite's busy handler, which sleeps 1, 2, 5, 10 ... 100 ms between tries: with four associations
        # indexing at once the receiver spent most of its time asleep there. Writers of one process take
        # turns on this lock instead (woken the moment it is free); other processes still meet the busy handler.
        self._write_turn = threading.RLock() if engine.dialect.name == "sqlite" else None

    @contextmanager
    def writing(self) -> Iterator[None]:
        """This process's turn to write (SQLite; no-op on PostgreSQL, which has row locks): hold it around a
        write transaction made on ``engine`` directly. :meth:`session` holds it itself."""
        if self._write_turn is None:
            yield
            return
        with self._write_turn:
            yield

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self.writing(), self._sessions() as s, s.begin():
            yield s

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A session for reads only (status pages, polls). On SQLite it does not take the write lock, so
        readers never delay the receiver's index (WAL lets them read while it writes)."""
        with self._readers() as s, s.begin():
            yield s

    def dispose(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(engine: Engine, busy_timeout_ms: int) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record) -> None:
        # pysqlite's own transaction handling is switched off so that BEGIN IMMEDIATE below is
        # the only BEGIN: a writer takes the lock up front instead of failing to upgrade later.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode survives a process crash (kill -9); received files are fsynced and
        # re-indexed at start-up (index.reindex_missing), which covers a power cut.
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        # Writers take the lock up front (no failed lock upgrade half-way); readers do not take it.
        conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get("read_only") else "BEGIN IMMEDIATE")


T = TypeVar("T")


def rows_changed(session: Session, statement: Executable) -> int:
    """Rows an UPDATE or DELETE changed: the compare-and-set of a claim or a lease (``Session.execute`` is typed as
    returning a plain ``Result``; for these statements it is a ``CursorResult``)."""
    return cast("CursorResult[Any]", session.execute(statement)).rowcount


def transient(exc: BaseException) -> bool:
    """Whether a database error may go away by itself: SQLite busy/locked past the busy timeout, or a
    PostgreSQL connection lost (server restarted, network cut) or refused while the server starts."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if not isinstance(exc, OperationalError):
        return False
    if isinstance(exc.orig, sqlite3.OperationalError):  # also "no such table", "disk I/O error": not transient
        return "locked" in str(exc.orig) or "busy" in str(exc.orig)
    return True  # PostgreSQL: connection refused or closed, server shutting down, deadlock, lock timeout


def retry_transient(fn: Callable[[], T], what: str, *, attempts: int = 6, first_wait_s: float = 0.2) -> T:
    """Run ``fn`` (one whole transaction) again after a transient database error, waiting 0.2, 0.4, 0.8 ...
    seconds (about 6 s over 6 attempts); other errors, and the last transient one, propagate.

    Only for transactions that are safe to repeat: each queue transition is one conditional UPDATE, so
    a repeat after a commit whose answer was lost finds the row already moved and changes nothing."""
    wait = first_wait_s
    for attempt in range(1, attempts):
        try:
            return fn()
        except Exception as exc:
            if not transient(exc):
                raise
            log.warning("database busy or unreachable during %s (attempt %d/%d, retry in %.1f s): %s", what,
                        attempt, attempts, wait, str(exc).splitlines()[0])
            time.sleep(wait)
            wait *= 2
    return fn()


def open_database(url: str, *, busy_timeout_s: float = 30.0, migrate_schema: bool = True) -> Database:
    """Open (and create or migrate) the database at a SQLAlchemy URL (``sqlite:///FILE`` or ``postgresql://``).

    ``busy_timeout_s``: how long a SQLite writer waits for another process's write lock, and how long a
    PostgreSQL connection attempt may take, before the operation fails (the caller retries or refuses).
    SQLite files are created with their folder; the node's umask keeps them private (see README).
    """
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        from pathlib import Path

        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": busy_timeout_s})
        _sqlite_pragmas(engine, int(busy_timeout_s * 1000))
    else:
        # pool_pre_ping: a connection the server dropped (restart) is replaced at checkout, not used.
        engine = create_engine(url, pool_pre_ping=True, pool_size=8, max_overflow=8,
                               connect_args={"connect_timeout": max(1, int(busy_timeout_s))})
    if migrate_schema:
        started = time.monotonic()
        while True:
            try:
                migrate(engine)
                break
            except DatabaseError:
                raise
            except Exception as exc:  # a database still starting: retry for the busy timeout
                if time.monotonic() - started > busy_timeout_s:
                    raise DatabaseError(f"cannot open the database: {type(exc).__name__}: {exc}") from exc
                time.sleep(0.5)
    return Database(engine)
