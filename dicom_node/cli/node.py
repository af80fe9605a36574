"""``serve``, ``status``, ``reprocess``, ``resend`` and ``purge``: run and operate the node.

All take ``--config`` (the same file ``serve`` runs with) and work on its database and storage, so
they can be used while the node is running (another process) or stopped.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

import typer

from dicom_node.cli.exits import EXIT_FAILED, EXIT_USAGE, fail
from dicom_node.config import ConfigError, NodeConfig, check_files, check_ports_free, load_config
from dicom_node.paths import DEFAULT_CONFIG

ConfigOption = typer.Option(
    DEFAULT_CONFIG, "--config", "-c", show_default="config/node.yaml",
    help="YAML config file (defaults: config/node.yaml; relative paths inside it are resolved against its folder).")


def load_or_exit(path: Path) -> NodeConfig:
    """The resolved config, or exit 2 with the one-line error."""
    try:
        return load_config(path)
    except ConfigError as exc:
        raise fail(str(exc), EXIT_USAGE) from None


def _database(config: NodeConfig):
    from dicom_node.db import DatabaseError, open_database

    try:
        return open_database(config.database.url, busy_timeout_s=config.database.busy_timeout_seconds)
    except DatabaseError as exc:
        raise fail(str(exc)) from None


def serve(
    config: Path = ConfigOption,
    worker_only: bool = typer.Option(
        False, "--worker-only",
        help="Only process queued cases and send results: no DICOM listener, no completion check, no dashboard. "
             "For extra workers sharing a PostgreSQL database.url and storage.root with a receiving node "
             "(docs/node.md, \"Several workers and hosts\")."),
) -> None:
    """Run the node until SIGTERM or Ctrl-C: receive studies over DICOM, process them, send SEG + SR back.

    Logs go to stderr (UIDs only, never patient data). On SIGTERM the node stops accepting associations,
    waits up to queue.shutdown_grace_seconds for the running case and re-queues it if it is not done.
    Exit codes: 0 stopped by a signal, 1 could not start (model, database), 2 bad configuration or port in use."""
    from dicom_node.logs import setup_logging
    from dicom_node.rules import RulesError
    from dicom_node.service import Node
    from pipeline.checkpoint import CheckpointError

    cfg = load_or_exit(config)
    try:
        check_files(cfg, config)
        if not worker_only:
            check_ports_free(cfg, config)
    except ConfigError as exc:
        raise fail(str(exc), EXIT_USAGE) from None
    setup_logging(cfg.logging.level)
    os.umask(0o027)  # received files, results and the SQLite file: owner and group only
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    node = Node(cfg, receive=not worker_only)
    try:
        node.start()
    except RulesError as exc:
        node.stop()
        raise fail(str(exc), EXIT_USAGE) from None
    except CheckpointError as exc:
        node.stop()
        raise fail(f"invalid model: {exc}", EXIT_FAILED) from None
    except Exception as exc:
        node.stop()
        raise fail(f"the node could not start: {type(exc).__name__}: {exc}", EXIT_FAILED) from None
    stop.wait()
    node.stop()
    if node.case_in_flight():
        # The re-queued case's thread is still inside native code (ITK, torch); letting the interpreter
        # tear it down aborts the process ("exception not rethrown", exit -6). Its case is already back
        # in the queue and the database closed: leave now, with the logs flushed.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def status(
    config: Path = ConfigOption,
    as_json: bool = typer.Option(False, "--json", help="Print JSON (for scripts) instead of text."),
    study: str = typer.Option(None, "--study", help="Only this StudyInstanceUID."),
    limit: int = typer.Option(50, "--limit", min=1, help="Most recent studies shown."),
) -> None:
    """Show the queue and the recent studies: state, roles found, lesion counts, deliveries, errors."""
    from dicom_node.status import format_status, node_status

    cfg = load_or_exit(config)
    report = node_status(_database(cfg), limit=limit, study_uid=study, storage_root=cfg.storage.root)
    if study is not None and not report["studies"]:
        raise fail(f"unknown study {study}")
    typer.echo(json.dumps(report, indent=2) if as_json else format_status(report))


def reprocess(
    study_uid: str = typer.Argument(..., metavar="STUDY_UID", help="StudyInstanceUID of a received study."),
    config: Path = ConfigOption,
) -> None:
    """Queue a new version of a study's case from every instance received so far (roles assigned again).

    Earlier versions and their results are kept; the new results go to results/<STUDY_UID>/version-N/."""
    from dicom_node.router import reprocess as make_version
    from dicom_node.rules import RulesError, load_rules

    cfg = load_or_exit(config)
    try:
        rules = load_rules(cfg.rules)
    except RulesError as exc:
        raise fail(str(exc), EXIT_USAGE) from None
    try:
        case = make_version(_database(cfg), study_uid, rules)
    except KeyError:
        raise fail(f"unknown study {study_uid}") from None
    typer.echo(f"study {study_uid}: version {case.version} {case.state}" + (f" ({case.reason})" if case.reason else ""))


def resend(
    study_uid: str = typer.Argument(..., metavar="STUDY_UID", help="StudyInstanceUID of a processed study."),
    config: Path = ConfigOption,
) -> None:
    """Send a study's latest SEG and SR again to every configured destination (the running node sends them)."""
    from dicom_node.dispatcher import resend as queue_resend

    cfg = load_or_exit(config)
    if not cfg.destinations:
        raise fail(f"{config}: destinations: none configured; nothing to send to", EXIT_USAGE)
    try:
        n = queue_resend(_database(cfg), cfg, study_uid)
    except KeyError:
        raise fail(f"unknown study {study_uid}") from None
    except ValueError as exc:
        raise fail(str(exc)) from None
    typer.echo(f"study {study_uid}: {n} deliver{'y' if n == 1 else 'ies'} queued "
               f"({', '.join(d.name for d in cfg.destinations)})")


def purge(
    older_than: float = typer.Option(..., "--older-than", min=0, metavar="DAYS",
                                     help="Remove studies whose last instance arrived more than DAYS days ago."),
    config: Path = ConfigOption,
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be removed; remove nothing."),
) -> None:
    """Retention: delete old studies' received files, results and index rows.

    Studies with a case queued or running, or results not yet delivered, are kept whatever their age."""
    from dicom_node.cleaner import purge as run_purge

    cfg = load_or_exit(config)
    report = run_purge(_database(cfg), cfg.storage.root, older_than, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    typer.echo(f"{verb} {len(report.studies)} study(ies), {report.bytes_freed / 1e6:.1f} MB"
               + (f"; kept {len(report.kept_busy)} old study(ies) still in the queue or being sent"
                  if report.kept_busy else ""))
    for uid in report.studies:
        typer.echo(f"  {uid}")
