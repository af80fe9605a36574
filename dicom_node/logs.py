"""Logging set-up for the node: one format, and no patient data in any log line.

Rule of the project: logs carry UIDs, AE titles and IP addresses, never patient names, IDs or
birth dates. Three sources could break it, and :func:`setup_logging` closes each:

* pynetdicom dumps whole datasets (C-FIND/C-GET/C-MOVE identifiers, N-service attribute lists)
  at INFO when ``_config.LOG_REQUEST_IDENTIFIERS`` / ``LOG_RESPONSE_IDENTIFIERS`` are on (the
  default): both are switched off. Its standard DEBUG handlers (``pynetdicom/_handlers.py``) log
  only UIDs, AE titles and presentation contexts for C-STORE and A-ASSOCIATE, except the user
  identity negotiation (``Username: [...]``, ``Password: [...]``) and, when ``debug_data`` is bound,
  hex dumps of whole PDUs (which hold the dataset bytes). :class:`NoDatasetDumpFilter` drops those
  lines, and any dataset element dump (``(0010,0010) PN [...]``) should one slip through.
* pydicom reports invalid element values by quoting the value (``Invalid value for VR PN: ...``),
  both through its logger and through :mod:`warnings`: its log records below ERROR are dropped and
  its warnings are ignored.
* Our own modules log UIDs only (reviewed per module).
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from typing import TextIO

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Lines of pynetdicom's logs that could carry patient data (or credentials).
_DUMP_PATTERNS = (
    re.compile(r"^\s*\([0-9A-Fa-f]{4},[0-9A-Fa-f]{4}\)"),  # pretty_dataset: "(0010,0010) PN [DOE^JOHN]"
    re.compile(r"^\s*\(Sequence item #\d+\)"),  # pretty_dataset: sequence items
    re.compile(r"^\s*(?:[0-9a-fA-F]{2}[ ]+)*[0-9a-fA-F]{2}\s*$"),  # pretty_bytes hex dump line
    re.compile(r"ENCODED PDU"),  # debug_data banner around a raw PDU dump
    re.compile(r"^\s*(?:Username|Password):\s*\["),  # user identity negotiation
    re.compile(r"^\s*#\s*(?:DICOM Dataset|Request Identifier|Response Identifier)"),
)


class NoDatasetDumpFilter(logging.Filter):
    """Drop pynetdicom log lines that dump dataset elements, raw PDU bytes or user credentials."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("pynetdicom"):
            return True
        try:
            message = record.getMessage()
        except Exception:
            return False
        return not any(p.search(message) for p in _DUMP_PATTERNS)


class PydicomValueFilter(logging.Filter):
    """Drop pydicom's records below ERROR: they are value-validation notes that quote the value."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith("pydicom") or record.levelno >= logging.ERROR


_PYNETDICOM_FILTER = NoDatasetDumpFilter()
_PYDICOM_FILTER = PydicomValueFilter()


def _install(prefix: str, flt: logging.Filter) -> None:
    """Add ``flt`` to the ``prefix`` logger and every existing child (filters do not inherit)."""
    names = [prefix] + [n for n in logging.Logger.manager.loggerDict if n.startswith(prefix + ".")]
    for name in names:
        logger = logging.getLogger(name)
        if flt not in logger.filters:
            logger.addFilter(flt)


def quiet_pynetdicom_identifiers() -> None:
    """Switch off pynetdicom's dataset dumps (idempotent; also done by :func:`setup_logging`)."""
    from pynetdicom import _config

    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False


def install_filters() -> None:
    """Install the patient-data filters on pynetdicom's and pydicom's loggers (idempotent)."""
    import pydicom  # noqa: F401 - import first so that its loggers exist
    import pynetdicom  # noqa: F401

    quiet_pynetdicom_identifiers()
    _install("pynetdicom", _PYNETDICOM_FILTER)
    _install("pydicom", _PYDICOM_FILTER)
    # pydicom's value warnings (printed to stderr, i.e. the journal) quote the value too.
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is when a record is emitted, not as it was at set-up: a command run
    in-process (tests, typer's runner) swaps stderr and closes its stand-in afterwards."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:  # StreamHandler.__init__ assigns it
        pass


def setup_logging(level: str, stream: TextIO | None = None) -> None:
    """Configure the root logger: ``LOG_FORMAT`` to ``stream`` (stderr) at ``level``.

    pynetdicom's loggers stay at WARNING unless ``level`` is DEBUG. Calling it again replaces the
    handler it installed before (the level may change at run time).
    """
    level = level.upper()
    levels = logging.getLevelNamesMapping()
    if level not in levels:
        raise ValueError(f"unknown log level {level!r}")
    numeric = levels[level]
    install_filters()

    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_dicom_node", False):
            root.removeHandler(h)
            h.close()
    handler: logging.Handler = logging.StreamHandler(stream) if stream is not None else _CurrentStderrHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    # The same filters on the handler cover loggers created after this call.
    handler.addFilter(_PYNETDICOM_FILTER)
    handler.addFilter(_PYDICOM_FILTER)
    handler._dicom_node = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(numeric)
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)
    # APScheduler logs every run of a periodic pass at INFO, and at WARNING each run skipped because the
    # previous one is still going (intended: one pass at a time); job exceptions are ERROR and stay.
    logging.getLogger("apscheduler").setLevel(logging.DEBUG if level == "DEBUG" else logging.ERROR)
    # highdicom narrates every module it copies into a SEG/SR at INFO.
    logging.getLogger("highdicom").setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)
