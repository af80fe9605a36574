"""Where received instances and results live on disk (:class:`StorageLayout`, the one owner of the
layout), and how they get there without being lost.

Layout under ``storage.root``:

- ``incoming/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``: received instances;
- ``results/<StudyInstanceUID>/`` (version 1) and ``results/<StudyInstanceUID>/version-N/`` (N >= 2): a case
  version's result files (:func:`pipeline.outputs.result_names`), written under ``results/.tmp/`` first and
  moved into place by :meth:`StorageLayout.publish`, ``summary.json`` last;
- ``quarantine/<YYYYMMDD>/``: refused instances (see below).

Every UID comes from the network, so :func:`instance_path` checks each one against the DICOM UID
syntax before it becomes part of a path: a UID such as ``1.2/../../x`` never reaches the
filesystem.

:func:`write_durably` writes a file so that, once it returns, the file is complete under its final
name and survives a power cut: a temporary file in the same folder, ``fsync``, ``os.replace`` into
place, ``fsync`` of the folder. A second write of the same path replaces the file atomically, so a
repeated C-STORE of the same instance is idempotent.

Instances refused for their content are kept, for an administrator to inspect, by
:func:`quarantine`: ``<storage.root>/quarantine/<YYYYMMDD>/<sha256 of the bytes, 16 hex>.dcm`` with a
``.json`` of the same name saying why (status, reason, UIDs, calling AE; never patient data). Nothing
under ``quarantine/`` is indexed or routed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.outputs import drop_stale_results, result_names

INCOMING = "incoming"
RESULTS = "results"
QUARANTINE = "quarantine"
_TMP = ".tmp"  # under results/: result files being written, not yet published

_DIR_MODE = 0o750
_FILE_MODE = 0o640
# Components are "0" or digits without a leading zero; dot-separated; at most 64 characters.
_UID_RE = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*")
_UID_MAX = 64


class UIDError(ValueError):
    """A UID from the network is not a valid DICOM UID (and must not become part of a path)."""


def valid_uid(uid: str) -> bool:
    """True when ``uid`` is a syntactically valid DICOM UID (PS3.5 9.1)."""
    return isinstance(uid, str) and 0 < len(uid) <= _UID_MAX and _UID_RE.fullmatch(uid) is not None


def _short(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_uid(uid: str, what: str) -> str:
    """Return ``uid`` unchanged, or raise :class:`UIDError` naming ``what`` (e.g. "SOPInstanceUID")."""
    if not valid_uid(uid):
        raise UIDError(f"invalid {what} {_short(uid)}")
    return uid


@dataclass(frozen=True)
class StorageLayout:
    """Every path under ``root`` (= ``storage.root``): see the module docstring."""

    root: Path

    @property
    def incoming(self) -> Path:
        return Path(self.root) / INCOMING

    @property
    def quarantine_root(self) -> Path:
        return Path(self.root) / QUARANTINE

    def study_incoming(self, study_uid: str) -> Path:
        """``incoming/<study>``: the study's received series (``study_uid`` as indexed, validated on receipt)."""
        return self.incoming / study_uid

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """``incoming/<study>/<series>/<sop>.dcm``; :class:`UIDError` when any UID is invalid."""
        check_uid(study_uid, "StudyInstanceUID")
        check_uid(series_uid, "SeriesInstanceUID")
        check_uid(sop_uid, "SOPInstanceUID")
        return self.study_incoming(study_uid) / series_uid / (sop_uid + ".dcm")

    def study_results(self, study_uid: str) -> Path:
        """``results/<study>``: every version's results of the study."""
        return Path(self.root) / RESULTS / study_uid

    def results_dir(self, study_uid: str, version: int) -> Path:
        """Where a case version's results live: a later version never overwrites the results already sent."""
        base = self.study_results(study_uid)
        return base if version == 1 else base / f"version-{version}"

    def tmp_dir(self, name: str) -> Path:
        """``results/.tmp/<name>``: where a run writes its results before :meth:`publish`."""
        return Path(self.root) / RESULTS / _TMP / name

    def quarantine_dir(self, now: float) -> Path:
        """``quarantine/<YYYYMMDD>`` of the UTC day of ``now`` (seconds since the epoch)."""
        return self.quarantine_root / time.strftime("%Y%m%d", time.gmtime(now))

    @staticmethod
    def publish(tmp: Path, final: Path) -> None:
        """Move the result files written in ``tmp`` into ``final``, ``summary.json`` last (the completion
        marker); a SEG or key images left in ``final`` by an earlier attempt go when this one has none."""
        final.mkdir(parents=True, exist_ok=True)
        names = result_names(tmp)
        drop_stale_results(final, keep=set(names))
        for name in names:
            os.replace(tmp / name, final / name)
        _fsync_dir(final)
        shutil.rmtree(tmp, ignore_errors=True)


def instance_path(root: Path, study_uid: str, series_uid: str, sop_uid: str) -> Path:
    """``root/incoming/<study>/<series>/<sop>.dcm``; :class:`UIDError` when any UID is invalid."""
    return StorageLayout(Path(root)).instance_path(study_uid, series_uid, sop_uid)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs(folder: Path) -> None:
    """Create ``folder`` and missing parents (mode 0o750), fsyncing each parent that got a new entry."""
    if os.path.isdir(folder):
        return
    missing: list[Path] = []
    p = folder
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, _DIR_MODE)
        except FileExistsError:
            if not d.is_dir():
                raise
            continue
        # Make the new directory entry itself durable, like the file's.
        _fsync_dir(d.parent)


def write_durably(path: Path, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` atomically and durably (see the module docstring).

    Parents are created with mode 0o750, the file gets mode 0o640 (before the umask). On any
    failure the temporary file is removed and the exception is re-raised; ``path`` is then either
    absent or still holds its previous complete content.
    """
    path = Path(path)
    folder = path.parent
    _make_dirs(folder)
    tmp = folder / f".{path.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), _FILE_MODE)
    try:
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(folder)


def free_gb(path: Path) -> float:
    """Free space (GB = 1e9 bytes, available to unprivileged users) on the filesystem of ``path``.

    ``path`` need not exist yet: the nearest existing parent is measured.
    """
    try:
        st = os.statvfs(path)
    except FileNotFoundError:
        p = Path(path).absolute()
        while not p.exists() and p.parent != p:
            p = p.parent
        st = os.statvfs(p)
    return st.f_bavail * st.f_frsize / 1e9


def quarantine(root: Path, data: bytes, reason: dict[str, Any], *, now: float | None = None) -> Path:
    """Keep refused ``data`` under ``root/quarantine/<day>/`` with ``reason`` (JSON) beside it; returns the file.

    Named by the SHA-256 of ``data``, so a peer that retries the same bytes overwrites one entry
    instead of filling the disk, and no value from the network becomes part of the path. ``reason``
    must hold no patient data (UIDs, status, calling AE). The ``.json`` is written last: it marks a
    complete entry (:func:`quarantine_count` counts those).
    """
    now = time.time() if now is None else now
    folder = StorageLayout(Path(root)).quarantine_dir(now)
    path = folder / f"{hashlib.sha256(data).hexdigest()[:16]}.dcm"
    write_durably(path, data)
    record = {**reason, "file": path.name, "size_bytes": len(data),
              "quarantined_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))}
    write_durably(path.with_suffix(".json"), (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())
    return path


def quarantine_count(root: Path) -> int:
    """How many entries ``root/quarantine`` holds (for ``dicom-node status``); 0 when there is none."""
    folder = StorageLayout(Path(root)).quarantine_root
    return sum(1 for _ in folder.glob("*/*.json")) if folder.is_dir() else 0
