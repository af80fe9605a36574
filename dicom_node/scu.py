"""The node's own DICOM SCU: C-ECHO a peer, C-STORE files to it (issue #5, "send back").

No database and no config loading: the dispatcher and the ``dicom-node echo`` / ``send`` commands
pass a :class:`Peer`, the calling AE title, a timeout and optionally an SSL context.

Files are sent **as stored**: the dataset bytes after the File Meta Information are streamed from
disk without decoding the pixel data (pynetdicom's chunked mode). Only when the peer accepted none
of a file's own transfer syntax, but did accept another uncompressed little-endian one for its SOP
class (explicit <-> implicit VR, deflated <-> inflated), is the dataset read and re-encoded, still
without touching the pixel data. Compressed or big-endian files never change encoding.

Failures are :class:`SendError` with ``transient`` telling the caller whether to retry the whole
batch (a receiving PACS treats a repeated SOP Instance UID as the same instance):

=============================================================  =========
what happened                                                   transient
=============================================================  =========
TCP connection refused / unreachable / timed out                yes
no A-ASSOCIATE answer in time (ACSE timeout), no DIMSE answer   yes
association rejected, result 0x02 (rejected-transient)          yes
association aborted by the peer (negotiation or mid-batch)      yes
C-STORE 0xA7xx out of resources, 0x0213 resource limitation     yes
C-STORE 0x0110 processing failure (the peer's own trouble)      yes
C-STORE 0x0210 duplicate invocation (a message-ID clash)        yes
TLS handshake or certificate verification failure               no
association rejected, result 0x01 (rejected-permanent),        no
e.g. called or calling AE title not recognised
no presentation context accepted at all (unsupported SOP class) no
C-STORE 0x0122 SOP class not supported, 0x0124 not authorised   no
C-STORE 0xA9xx data set does not match SOP class               no
C-STORE 0xCxxx cannot understand, 0x0117 invalid SOP instance   no
C-STORE 0x0211 unrecognised operation, 0x0212 mistyped arg.    no
any other failure status                                        no
=============================================================  =========

Warnings (0xB000 coercion, 0xB006 elements discarded, 0xB007 data set does not match SOP class,
any other 0xBxxx, and 0x0001 / 0x0107 / 0x0116) count as stored, with the warning reported.

A transient C-STORE status or an abort stops the batch and raises ``SendError(transient=True)``
(``error.report`` says what was stored before). Permanent per-file failures (a failure status, or
no accepted presentation context for that file's SOP class / transfer syntax while others were
accepted) do not stop the batch: they are returned in the :class:`SendReport`; call
:meth:`SendReport.raise_for_status` to turn them into a permanent :class:`SendError`.

Logs (logger ``dicom_node.scu``) name peers as ``AET@host:port`` and instances by SOP Instance
UID only: never patient names, IDs or birth dates. All durations are in seconds.
"""

from __future__ import annotations

import ipaddress
import logging
import queue
import re
import socket
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import Verification

from dicom_node.config import check_ae_title
from pipeline.dicom_basics import files_under

LOG = logging.getLogger("dicom_node.scu")

MAX_CONTEXTS = 128  # presentation contexts per association (the DICOM limit is 128 odd IDs)
NOT_SENT = -1  # FileResult.status of a file that never went on the wire (unreadable, no context)

_UNCOMPRESSED_LE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


# ----------------------------------------------------------------------------------------- peer


def _check_ae_title(value: str, what: str) -> str:
    try:
        return check_ae_title(value)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}, got {value!r}") from None


@dataclass(frozen=True)
class Peer:
    """A DICOM peer: called AE title, host name or IP address, TCP port, and whether it speaks DICOM TLS."""

    ae_title: str
    host: str
    port: int
    tls: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "ae_title", _check_ae_title(self.ae_title, "AE title"))
        if not self.host or any(c.isspace() for c in self.host):
            raise ValueError(f"expected a host name or IP address, got {self.host!r}")
        if not isinstance(self.port, int) or not 1 <= self.port <= 65535:
            raise ValueError(f"expected a TCP port 1-65535, got {self.port!r}")

    @classmethod
    def parse(cls, text: str, *, tls: bool = False) -> Peer:
        """Parse ``HOST:PORT:AET`` (an IPv6 address in brackets: ``[::1]:104:PACS``).

        Raises ``ValueError`` with one line saying what was expected.
        """
        usage = f"expected HOST:PORT:AET such as 127.0.0.1:104:PACS or [::1]:104:PACS, got {text!r}"
        m = re.fullmatch(r"\[([0-9A-Fa-f:.%\w]+)\]:([^:]*):(.*)", text)
        if m:
            host, port_text, aet = m.groups()
            try:
                ipaddress.IPv6Address(host.split("%")[0])
            except ValueError:
                raise ValueError(f"{usage}: {host!r} is not an IPv6 address") from None
        else:
            parts = text.split(":", 2)
            if len(parts) != 3 or not parts[0]:
                raise ValueError(usage)
            host, port_text, aet = parts
            if not port_text.strip().isdigit():
                raise ValueError(usage)
        if not port_text.strip().isdigit() or not 1 <= int(port_text) <= 65535:
            raise ValueError(f"{usage}: the port must be a number 1-65535")
        try:
            return cls(ae_title=aet, host=host, port=int(port_text), tls=tls)
        except ValueError as exc:
            raise ValueError(f"{usage}: {exc}") from None

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.ae_title}@{host}:{self.port}"


# ---------------------------------------------------------------------------------- results


class SendError(Exception):
    """Sending or echoing failed. ``transient``: retrying later may succeed; ``reason``: one line naming the peer."""

    def __init__(self, reason: str, *, transient: bool, report: SendReport | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.transient = transient
        self.report = report  # what was stored before the failure (send_files only)


class StatusClass(NamedTuple):
    """What a DIMSE status means: ``kind`` is success, warning, transient or permanent."""

    kind: str
    meaning: str


def classify_status(status: int) -> StatusClass:
    """Classify a C-STORE response status (see the module docstring for the table)."""
    exact = {
        0x0000: ("success", "success"),
        0x0001: ("warning", "requested optional attributes not supported"),
        0x0107: ("warning", "attribute list error"),
        0x0116: ("warning", "attribute value out of range"),
        0xB000: ("warning", "coercion of data elements"),
        0xB006: ("warning", "elements discarded"),
        0xB007: ("warning", "data set does not match SOP class"),
        0x0110: ("transient", "processing failure"),
        0x0117: ("permanent", "invalid SOP instance"),
        0x0122: ("permanent", "SOP class not supported"),
        0x0124: ("permanent", "not authorised"),
        0x0210: ("transient", "duplicate invocation"),
        0x0211: ("permanent", "unrecognised operation"),
        0x0212: ("permanent", "mistyped argument"),
        0x0213: ("transient", "resource limitation"),
    }
    if status in exact:
        return StatusClass(*exact[status])
    high = status & 0xFF00
    if high == 0xA700:
        return StatusClass("transient", "out of resources")
    if high == 0xA900:
        return StatusClass("permanent", "data set does not match SOP class")
    if status & 0xF000 == 0xC000:
        return StatusClass("permanent", "cannot understand")
    if status & 0xF000 == 0xB000:
        return StatusClass("warning", "warning")
    return StatusClass("permanent", "unknown failure status")


@dataclass(frozen=True)
class FileResult:
    """The outcome of one file: DIMSE ``status`` (``NOT_SENT`` = -1 when it never went on the wire)."""

    path: Path
    sop_instance_uid: str
    status: int
    ok: bool
    warning: str | None = None
    error: str | None = None  # meaning of a failure status, or why the file was not sent
    transfer_syntax: str | None = None  # the transfer syntax used on the wire

    @property
    def status_text(self) -> str:
        """``0xA900 (data set does not match SOP class)``, or ``not sent (why)``."""
        if self.status == NOT_SENT:
            return f"not sent ({self.error})"
        meaning = self.warning if self.ok else self.error
        return f"0x{self.status:04X} ({meaning or classify_status(self.status).meaning})"


@dataclass
class SendReport:
    """Per-file outcomes of one ``send_files`` call; ``seconds`` is the association's duration."""

    peer: Peer
    files: list[FileResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def sent(self) -> int:
        """Number of instances the peer stored (warnings included)."""
        return sum(1 for f in self.files if f.ok)

    @property
    def failed(self) -> list[FileResult]:
        """Files the peer did not store."""
        return [f for f in self.files if not f.ok]

    def raise_for_status(self) -> None:
        """Raise a permanent ``SendError`` listing the failed SOP Instance UIDs, if any failed."""
        failed = self.failed
        if failed:
            listed = ", ".join(f"{f.sop_instance_uid or '(unreadable file)'} {f.status_text}" for f in failed[:5])
            more = f" and {len(failed) - 5} more" if len(failed) > 5 else ""
            raise SendError(
                f"{self.peer}: {len(failed)} of {len(self.files)} instance(s) not stored: {listed}{more}",
                transient=False,
                report=self,
            )


# ------------------------------------------------------------------------------------- files


class DicomFiles(list[Path]):
    """The DICOM files found by :func:`iter_dicom_files`; ``skipped`` counts the other files."""

    skipped: int = 0


def _is_dicom_part10(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def iter_dicom_files(path: Path) -> DicomFiles:
    """A DICOM file, or every DICOM Part 10 file (``DICM`` at byte 128) under a folder, sorted.

    Other files are skipped and counted in ``.skipped``; raises ``FileNotFoundError`` if ``path``
    does not exist.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    candidates = files_under(path)
    found = DicomFiles(p for p in candidates if _is_dicom_part10(p))
    found.skipped = len(candidates) - len(found)
    if found.skipped:
        LOG.info("%s: skipped %d file(s) that are not DICOM Part 10", path, found.skipped)
    return found


@dataclass(frozen=True)
class _Header:
    path: Path
    sop_class: UID | None
    sop_instance: str
    transfer_syntax: UID | None
    error: str | None = None


def _read_header(path: Path) -> _Header:
    """SOP class, instance and transfer syntax from the File Meta Information (no pixel data read)."""
    try:
        meta = read_file_meta_info(path)
    except Exception as exc:
        return _Header(path, None, "", None, f"unreadable File Meta Information: {type(exc).__name__}")
    sop_class = meta.get("MediaStorageSOPClassUID")
    sop_instance = str(meta.get("MediaStorageSOPInstanceUID", "") or "")
    tsyntax = meta.get("TransferSyntaxUID")
    if not sop_class or not sop_instance or not tsyntax:
        return _Header(path, None, sop_instance, None,
                       "File Meta Information lacks the SOP class, SOP instance or transfer syntax UID")
    return _Header(path, UID(str(sop_class)), sop_instance, UID(str(tsyntax)))


def _convertible(tsyntax: UID) -> bool:
    """pynetdicom re-encodes only between uncompressed little-endian syntaxes (explicit, implicit, deflated)."""
    return not tsyntax.is_compressed and tsyntax.is_little_endian


def _plan_contexts(headers: Sequence[_Header]) -> list[PresentationContext]:
    """One context per (SOP class, own transfer syntax), then one per SOP class with the LE fallbacks."""
    exact: dict[tuple[str, str], None] = {}  # insertion-ordered sets
    fallback: dict[str, None] = {}
    for h in headers:
        if h.sop_class is None or h.transfer_syntax is None:
            continue
        exact[(h.sop_class, h.transfer_syntax)] = None
        if _convertible(h.transfer_syntax):
            fallback[h.sop_class] = None
    contexts = [build_context(sop, [ts]) for sop, ts in exact]
    if len(contexts) > MAX_CONTEXTS:
        return contexts  # the caller refuses; no point in adding fallbacks
    for sop in fallback:
        extra: list[str | UID] = [ts for ts in _UNCOMPRESSED_LE if (sop, ts) not in exact]
        if extra and len(contexts) < MAX_CONTEXTS:
            contexts.append(build_context(sop, extra))
    return contexts


# ------------------------------------------------------------------------- association set-up

_CONNECT_ERRORS: OrderedDict[int, BaseException | str] = OrderedDict()
_CONNECT_LOCK = threading.Lock()


class _ConnectErrorFilter(logging.Filter):
    """Remembers, per association thread, why pynetdicom's TCP/TLS connect failed (it only logs it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            found: BaseException | str | None = record.exc_info[1]
        elif msg.startswith("TCP Initialisation Error:"):
            found = msg.split(":", 1)[1].strip()
        else:
            found = None
        if found is not None and record.thread is not None:
            with _CONNECT_LOCK:
                if isinstance(_CONNECT_ERRORS.get(record.thread), BaseException):
                    return True  # keep the exception (more precise than the message)
                _CONNECT_ERRORS[record.thread] = found
                while len(_CONNECT_ERRORS) > 64:
                    _CONNECT_ERRORS.popitem(last=False)
        return True


logging.getLogger("pynetdicom.transport").addFilter(_ConnectErrorFilter())


def _pop_connect_error(assoc: Association) -> BaseException | str | None:
    """The connect error logged by the association's threads (the DUL thread connects), if any."""
    found = None
    with _CONNECT_LOCK:
        for thread in (assoc, assoc.dul):
            if thread.ident is not None:
                found = _CONNECT_ERRORS.pop(thread.ident, None) or found
    return found


def _connect_failure(peer: Peer, error: BaseException | str | None, seconds: float, timeout: float) -> SendError:
    if isinstance(error, ssl.SSLError):
        detail = getattr(error, "verify_message", None) or error.reason or str(error)
        return SendError(f"{peer}: TLS handshake failed: {detail}", transient=False)
    if isinstance(error, ConnectionRefusedError):
        why = "connection refused"
    elif isinstance(error, TimeoutError):
        why = f"no TCP connection within {timeout:g} s"
    elif isinstance(error, OSError):
        why = f"cannot connect: {error.strerror or error}"
    elif isinstance(error, str) and error:
        text = error.lower()
        if "refused" in text:
            why = "connection refused"
        elif "timed out" in text:
            why = f"no TCP connection within {timeout:g} s"
        elif "ssl" in text or "certificate" in text:
            return SendError(f"{peer}: TLS handshake failed: {error}", transient=False)
        else:
            why = f"cannot connect: {error}"
    else:
        why = "cannot connect" + (f" (timed out after {seconds:.1f} s)" if seconds >= timeout else "")
    return SendError(f"{peer}: {why}", transient=True)


def _unread_answer(assoc: Association, wait: float = 0.2) -> A_ASSOCIATE | None:
    """An A-ASSOCIATE answer that pynetdicom received but did not read.

    When a peer rejects and closes the connection at once (DCMTK does), pynetdicom may see the
    closed socket before it reads the A-ASSOCIATE-RJ and report a plain abort; the rejection,
    permanent or transient, is still in the DUL's queue.
    """
    pending = getattr(getattr(assoc, "dul", None), "to_user_queue", None)
    if pending is None:
        return None
    deadline = time.monotonic() + wait
    while True:
        try:
            item = pending.get_nowait()
        except queue.Empty:
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.01)
            continue
        if isinstance(item, A_ASSOCIATE):
            return item


def _association_failure(assoc: Association, peer: Peer, connected: bool, seconds: float, timeout: float) -> SendError:
    """Explain why ``assoc`` is not established, as a transient or permanent ``SendError``."""
    rsp = assoc.acceptor.primitive
    rejected = assoc.is_rejected
    if rsp is None and connected:
        late = _unread_answer(assoc)
        if late is not None and late.result in (0x01, 0x02):
            rsp, rejected = late, True
    if rejected and rsp is not None:
        transient = rsp.result == 0x02
        kind = "rejected-transient" if transient else "rejected-permanent"
        return SendError(
            f"{peer}: association {kind} by {rsp.source_str.lower()}: {rsp.reason_str.lower()}",
            transient=transient,
        )
    if rsp is not None and rsp.result == 0x00 and not assoc.accepted_contexts:
        refused = sorted({str(UID(cx.abstract_syntax or "").name) for cx in assoc.rejected_contexts})
        return SendError(
            f"{peer}: the peer accepted no presentation context (SOP class / transfer syntax) of "
            f"{', '.join(refused) or 'ours'}",
            transient=False,
        )
    if not connected:
        error = _pop_connect_error(assoc)
        return _connect_failure(peer, error, seconds, timeout)
    if seconds >= timeout * 0.95:
        return SendError(f"{peer}: no answer to the association request within {timeout:g} s", transient=True)
    return SendError(f"{peer}: association aborted by the peer during negotiation", transient=True)


def _open(
    peer: Peer,
    contexts: list[PresentationContext],
    calling_ae: str,
    timeout: float,
    ssl_context: ssl.SSLContext | None,
) -> Association:
    """Request an association; raise ``SendError`` unless it is established."""
    calling = _check_ae_title(calling_ae, "calling AE title")
    ae = AE(ae_title=calling)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.connection_timeout = timeout
    if ssl_context is None and peer.tls:
        ssl_context = ssl.create_default_context()
    tls_args = (ssl_context, peer.host) if ssl_context is not None else None
    connected = threading.Event()

    def on_open(event: evt.Event) -> None:
        connected.set()
        sock = getattr(event.assoc.dul.socket, "socket", None)
        if sock is not None:  # no Nagle: a PDU-sized write must not wait for the peer's delayed ACK
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    handlers: list[Any] = [(evt.EVT_CONN_OPEN, on_open)]
    start = time.monotonic()
    try:
        assoc = ae.associate(
            peer.host, peer.port, contexts=contexts, ae_title=peer.ae_title, tls_args=tls_args, evt_handlers=handlers
        )
    except OSError as exc:  # host name resolution happens here, before any thread starts
        error = SendError(f"{peer}: cannot resolve the host name: {exc.strerror or exc}", transient=True)
        LOG.warning("%s", error.reason)
        raise error from None
    if not assoc.is_established:
        error = _association_failure(assoc, peer, connected.is_set(), time.monotonic() - start, timeout)
        LOG.warning("%s", error.reason)
        raise error
    _pop_connect_error(assoc)
    keep_answers_the_reactor_takes(assoc)
    return assoc


def keep_answers_the_reactor_takes(assoc: Association) -> None:
    """Give back to the waiting ``send_c_*`` call any answer that pynetdicom's association reactor takes.

    pynetdicom (3.0.4 and its main branch) pauses the requestor's reactor for a request by clearing
    ``_reactor_checkpoint`` and polling ``_is_paused``, but the reactor sets ``_is_paused = False`` only *after*
    its ``wait()`` returns. A reactor thread descheduled between those two lines looks paused; the request goes
    out, the peer answers at once, and the reactor then takes the answer off the DIMSE queue and drops it as an
    "unexpected" message: the sender waits its whole DIMSE timeout for an answer the peer gave, and sends again
    (a C-STORE stored twice). Under CPU load this hit about one demo run in six (#19). The reactor of a
    requestor serves no requests of ours, so an answer reaching it is put back where the sender waits.
    """
    serve = assoc._serve_request

    def serve_or_give_back(msg: Any, context_id: int) -> None:
        if msg.is_valid_response:
            assoc.dimse.msg_queue.put((context_id, msg))
        else:
            serve(msg, context_id)

    assoc._serve_request = serve_or_give_back  # type: ignore[method-assign]


def _release(assoc: Association) -> None:
    if assoc.is_established:
        try:
            assoc.release()
        except Exception:
            assoc.abort()


def _no_response(peer: Peer, what: str, seconds: float, timeout: float) -> str:
    if seconds >= timeout * 0.95:
        return f"{peer}: no {what} response within {timeout:g} s"
    return f"{peer}: association aborted during {what}"


# -------------------------------------------------------------------------------------- echo


def echo(
    peer: Peer,
    *,
    calling_ae: str,
    timeout: float = 30.0,
    ssl_context: ssl.SSLContext | None = None,
) -> float:
    """C-ECHO ``peer``; return the C-ECHO round trip in seconds (association set-up not included).

    ``timeout`` (seconds) bounds the TCP connection, the association negotiation and the response.
    TLS is used when ``ssl_context`` is given or ``peer.tls`` is set. Raises ``SendError``.
    """
    start = time.monotonic()
    assoc = _open(peer, [build_context(Verification)], calling_ae, timeout, ssl_context)
    try:
        t0 = time.monotonic()
        status = assoc.send_c_echo()
        rtt = time.monotonic() - t0
        if "Status" not in status:
            raise SendError(_no_response(peer, "C-ECHO", rtt, timeout), transient=True)
        if status.Status != 0x0000:
            raise SendError(f"{peer}: C-ECHO answered with status 0x{status.Status:04X}", transient=False)
    except SendError as exc:
        LOG.warning("%s", exc.reason)
        raise
    finally:
        _release(assoc)
    LOG.info("C-ECHO %s OK: %.1f ms round trip, %.3f s with association", peer, rtt * 1e3, time.monotonic() - start)
    return rtt


# -------------------------------------------------------------------------------------- send


def _not_sent(h: _Header, why: str) -> FileResult:
    return FileResult(h.path, h.sop_instance, NOT_SENT, False, error=why)


def _store_one(assoc: Association, h: _Header, msg_id: int) -> tuple[Dataset, str]:
    """C-STORE one file: as stored when its own syntax was accepted, else re-encoded; return (status, syntax)."""
    accepted = [cx for cx in assoc.accepted_contexts if cx.abstract_syntax == h.sop_class and cx.as_scu]
    own = next((cx for cx in accepted if cx.transfer_syntax[0] == h.transfer_syntax), None)
    if own is not None:
        # Stream the dataset bytes from disk: no decoding, no re-encoding (global pynetdicom switch:
        # it only changes how file paths are sent, never Dataset objects).
        _config.STORE_SEND_CHUNKED_DATASET = True
        return assoc.send_c_store(h.path, msg_id=msg_id), str(h.transfer_syntax)
    assert h.transfer_syntax is not None
    other = next((cx for cx in accepted if _convertible(h.transfer_syntax) and _convertible(cx.transfer_syntax[0])), None)
    if other is None:
        raise LookupError
    ds = dcmread(h.path)  # pixel data stays bytes: only the element encoding changes
    return assoc.send_c_store(ds, msg_id=msg_id), str(other.transfer_syntax[0])


def send_files(
    paths: Sequence[Path],
    peer: Peer,
    *,
    calling_ae: str,
    timeout: float = 30.0,
    ssl_context: ssl.SSLContext | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SendReport:
    """C-STORE ``paths`` to ``peer`` over one association, as stored; return per-file outcomes.

    ``timeout`` (seconds) bounds the TCP connection, the negotiation and each C-STORE response.
    ``progress(done, total)`` is called after each file. Raises ``SendError`` when no association
    can be made (transient or permanent) and on a transient status or abort mid-batch (transient,
    ``error.report`` holding what was stored); permanent per-file failures are in the report.
    """
    report = SendReport(peer)
    total = len(paths)
    if not paths:
        return report
    start = time.monotonic()
    headers = [_read_header(Path(p)) for p in paths]
    pending: list[_Header] = []
    for n, h in enumerate(headers, 1):
        if h.error is not None:
            report.files.append(_not_sent(h, h.error))
            # no file name in logs: exported folders and files are often named after the patient
            LOG.warning("%s: file %d of %d not sent: %s", peer, n, total, h.error)
        else:
            pending.append(h)
    contexts = _plan_contexts(pending)
    if len(contexts) > MAX_CONTEXTS:
        raise SendError(
            f"{peer}: {len(contexts)} SOP class / transfer syntax combinations, more than the "
            f"{MAX_CONTEXTS} presentation contexts of one association: send fewer at once",
            transient=False,
            report=report,
        )
    done = len(report.files)
    if progress and done:
        progress(done, total)
    if not pending:
        return report
    assoc = _open(peer, contexts, calling_ae, timeout, ssl_context)
    try:
        for i, h in enumerate(pending):
            t0 = time.monotonic()
            try:
                status, used = _store_one(assoc, h, msg_id=i % 65535 + 1)
            except LookupError:
                assert h.sop_class is not None and h.transfer_syntax is not None
                why = f"peer accepted no presentation context for {h.sop_class.name} in {h.transfer_syntax.name}"
                report.files.append(_not_sent(h, why))
                LOG.warning("%s: %s not sent: %s", peer, h.sop_instance, why)
            except (OSError, ValueError, AttributeError, RuntimeError) as exc:
                if not assoc.is_established:
                    raise SendError(
                        f"{peer}: association aborted after {report.sent} of {total} instance(s) stored",
                        transient=True, report=report,
                    ) from None
                why = f"cannot send the file: {type(exc).__name__}"
                report.files.append(_not_sent(h, why))
                LOG.warning("%s: %s not sent: %s", peer, h.sop_instance, why)
            else:
                if "Status" not in status:
                    reason = _no_response(peer, "C-STORE", time.monotonic() - t0, timeout)
                    raise SendError(f"{reason}, after {report.sent} of {total} instance(s) stored",
                                    transient=True, report=report)
                code = int(status.Status)
                kind, meaning = classify_status(code)
                ok = kind in ("success", "warning")
                result = FileResult(
                    h.path, h.sop_instance, code, ok,
                    warning=meaning if kind == "warning" else None,
                    error=None if ok else meaning,
                    transfer_syntax=used,
                )
                report.files.append(result)
                if kind != "success":
                    LOG.warning("%s: C-STORE %s: status 0x%04X (%s)", peer, h.sop_instance, code, meaning)
                if kind == "transient":
                    raise SendError(
                        f"{peer}: C-STORE status 0x{code:04X} ({meaning}) after {report.sent} of {total} "
                        "instance(s) stored",
                        transient=True, report=report,
                    )
            if progress:
                progress(len(report.files), total)
    except SendError as exc:
        report.seconds = time.monotonic() - start
        LOG.warning("%s", exc.reason)
        raise
    finally:
        _release(assoc)
    report.seconds = time.monotonic() - start
    LOG.info("sent %d of %d instance(s) to %s in %.2f s", report.sent, total, peer, report.seconds)
    return report


def client_ssl_context(ca_file: Path | None = None, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """A TLS client context: verify the peer against ``ca_file`` (system CAs if None), optional client cert."""
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    if cert is not None:
        context.load_cert_chain(str(cert), str(key) if key else None)
    return context
