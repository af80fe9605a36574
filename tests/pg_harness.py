"""A throw-away PostgreSQL server for tests and benches: Debian's ``postgresql`` binaries, ``initdb`` into a
temporary folder, ``pg_ctl`` on a free loopback port, stopped and deleted at the end.

initdb refuses to run as root (CI runs as root): the server then runs as the ``postgres`` user the Debian
package creates (or ``nobody``), and its folder is given to that user. Authentication is ``trust`` on
127.0.0.1 only; nothing listens elsewhere.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from node_harness import free_port

USER = "node"  # the database role the node connects as (superuser of this throw-away cluster)


def pg_bindir() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin with initdb and pg_ctl, or None when not installed."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return found[-1].parent if found else None


def _server_user() -> str | None:
    """Who runs the server: None (this process) unless root, then ``postgres`` or ``nobody``."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise RuntimeError("running as root and neither the postgres nor the nobody user exists: initdb refuses root")


@dataclass
class PostgresServer:
    """One running cluster; :meth:`database` makes a fresh database and returns its SQLAlchemy URL."""

    bindir: Path
    datadir: Path
    port: int
    run_as: str | None

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.run_as is not None:
            cmd = ["runuser", "-u", self.run_as, "--", *cmd]
        # cwd: a folder the server user may enter (pg_ctl chdirs back to it)
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False,
                              cwd=self.datadir.parent)

    def _checked(self, *args: str, timeout: float = 60) -> None:
        r = self._run(*args, timeout=timeout)
        if r.returncode != 0:
            log = self.datadir.parent / "server.log"
            raise RuntimeError(f"{' '.join(args[:2])} failed ({r.returncode}): {r.stderr or r.stdout}\n"
                               f"{log.read_text(errors='replace')[-2000:] if log.exists() else ''}")

    def start(self) -> None:
        self._checked("pg_ctl", "start", "-D", str(self.datadir), "-w", "-t", "60",
                      "-l", str(self.datadir.parent / "server.log"),
                      "-o", f"-p {self.port} -k {self.datadir.parent} -c listen_addresses=127.0.0.1")

    def stop(self, mode: str = "fast") -> None:
        self._checked("pg_ctl", "stop", "-D", str(self.datadir), "-w", "-t", "60", "-m", mode)

    def restart(self) -> None:
        """Stop (fast: every connection is cut) and start again on the same port."""
        self.stop()
        self.start()

    def url(self, dbname: str) -> str:
        return f"postgresql+psycopg://{USER}@127.0.0.1:{self.port}/{dbname}"

    def database(self, dbname: str) -> str:
        """Create an empty database (dropped first if it exists) and return its URL."""
        import psycopg

        with psycopg.connect(self.url("postgres").replace("+psycopg", ""), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{dbname}"')
        return self.url(dbname)


@contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """initdb + pg_ctl start on a free loopback port; stopped and removed on exit."""
    bindir = pg_bindir()
    if bindir is None:
        raise RuntimeError("PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin: "
                           "apt-get install postgresql (make debian-tools does)")
    run_as = _server_user()
    base = Path(tempfile.mkdtemp(prefix="node-pg-"))
    try:
        base.chmod(0o755)
        datadir = base / "data"
        if run_as is not None:
            pw = pwd.getpwnam(run_as)
            os.chown(base, pw.pw_uid, pw.pw_gid)
        server = PostgresServer(bindir, datadir, free_port(), run_as)
        server._checked("initdb", "-D", str(datadir), "-U", USER, "--auth=trust", "--encoding=UTF8",
                        "--no-sync", timeout=120)
        # fsync off: a test cluster lives for minutes and is thrown away; keeps the 2-core CI fast
        with open(datadir / "postgresql.conf", "a") as f:
            f.write("fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 200\n")
        server.start()
        try:
            yield server
        finally:
            server.stop("immediate")
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One PostgreSQL server for a test session (per xdist worker); import this fixture into a test module."""
    with postgres_server() as server:
        yield server
