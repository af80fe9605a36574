"""The DICOM receiver (Storage SCP): accepts C-ECHO and C-STORE, writes each instance durably, hands it on.

One :class:`Receiver` runs a pynetdicom server in background threads. For every C-STORE it

1. refuses with ``0xA700`` (out of resources) when the storage root has less than
   ``storage.min_free_gb`` free;
2. reads the header of the received bytes (up to the pixel data, never decoding pixels) and checks
   that its SOPClassUID / SOPInstanceUID agree with the request (else ``0xA900``), that its
   Study / Series / SOP Instance UIDs are valid UIDs (else ``0xC212``; unparseable bytes ``0xC210``),
   that it is consistent (:func:`content_problem`: no value shorter than its length field, known
   VRs, pixel data of the length Rows x Columns x frames x samples x bits say; else ``0xC213``) and
   that its PatientID is the one already received for its StudyInstanceUID (else ``0xA900``);
   each of these refusals keeps the bytes in quarantine (:func:`~dicom_node.storage.quarantine`);
3. writes the bytes as they came (preamble + File Meta Information + the dataset exactly as
   encoded by the peer) to ``<root>/incoming/<study>/<series>/<sop>.dcm`` with
   :func:`~dicom_node.storage.write_durably` (``0xA700`` if that fails);
4. calls the sink ``on_instance`` with a :class:`ReceivedInstance`; a sink refuses one instance
   by raising :class:`StoreRefused`, any other exception answers ``0xA700`` (the file stays on
   disk; a repeated C-STORE of the same instance is idempotent);
5. answers ``0x0000``, never before the file is renamed into place and fsynced.

Status codes (all failures carry a short ErrorComment without patient data):

======  ==============================================================================
0x0000  success
0xA700  out of resources: disk below ``min_free_gb``, write failed, or the sink failed
0xA900  dataset does not match the request (SOPClassUID or SOPInstanceUID differ), or its
        StudyInstanceUID was received before for another PatientID
0xC210  cannot understand: the dataset cannot be parsed
0xC211  cannot understand: unexpected error in the receiver (logged with a traceback)
0xC212  cannot understand: a Study/Series/SOP Instance UID is missing or invalid
0xC213  cannot understand: the dataset is inconsistent (truncated, unknown VR, wrong pixel data length)
======  ==============================================================================

Refusals for the content (0xA900, 0xC210, 0xC212, 0xC213) are failures, not "success, quarantined":
the sending PACS shows the error to its administrator at once, and the bytes are kept under
``<storage.root>/quarantine/`` with the reason for them to inspect. A PACS that retries overwrites
the same quarantine entry (named by content hash).

Threading: pynetdicom runs one thread per association, so ``on_instance`` is called
concurrently from several threads (at most ``node.max_associations``) and must be thread-safe.
Calls for one association are sequential, in the order the peer sent the instances.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import io
import logging
import secrets
import ssl
import struct
import sys
import threading
import time
import traceback
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from pydicom.valuerep import VR
from pynetdicom import (
    AE,
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    Association,
    evt,
)
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification

from dicom_node.config import NodeConfig
from dicom_node.headers import (
    ENHANCED_MR_IMAGE_STORAGE,
    LEGACY_CONVERTED_ENHANCED_MR_IMAGE_STORAGE,
    MR_IMAGE_STORAGE,
    InstanceHeader,
    MalformedHeaderError,
    SeriesFeatures,
    instance_header_from_dataset,
)
from dicom_node.logs import install_filters
from dicom_node.storage import (
    StorageLayout,
    UIDError,
    check_uid,
    free_gb,
    instance_path,
    quarantine,
    valid_uid,
    write_durably,
)

log = logging.getLogger(__name__)

ROUTABLE_SOP_CLASSES = frozenset(
    {MR_IMAGE_STORAGE, ENHANCED_MR_IMAGE_STORAGE, LEGACY_CONVERTED_ENHANCED_MR_IMAGE_STORAGE}
)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_PARSE = 0xC210
STATUS_INTERNAL_ERROR = 0xC211
STATUS_INVALID_UID = 0xC212
STATUS_INCONSISTENT = 0xC213
# Refusals for what the bytes hold (not for the node's state): their bytes go to quarantine.
_CONTENT_STATUSES = frozenset({STATUS_DATASET_MISMATCH, STATUS_CANNOT_PARSE, STATUS_INVALID_UID, STATUS_INCONSISTENT})

# Uncompressed first: an SCU proposing several syntaxes in one context gets its own first choice
# that we support (pynetdicom keeps the requestor's order).
_NATIVE_SYNTAXES = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired)
)
_COMPRESSED_SYNTAXES = (
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (Process 2 & 4)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless (Process 14)
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203",  # HTJ2K
    "1.2.840.10008.1.2.5",  # RLE Lossless
)

# Bytes in a C-STORE-RSP ErrorComment (LO: 64 characters).
_COMMENT_MAX = 64
# How many series we remember having logged "stored but not routed" for.
_UNROUTED_MEMORY = 4096
# Series whose features are kept for their next instances (cleared when full: a cheap bound).
_SERIES_FEATURES_CACHED = 1024
# Studies whose patient fingerprint is remembered (oldest forgotten first; re-read from disk when needed).
_STUDY_PATIENTS_CACHED = 4096
# Received PDUs up to this size; larger PDUs mean fewer trips through pynetdicom's reactor.
MAX_PDU_SIZE = 1 << 20
#: A C-STORE still unanswered after this long gets every thread's stack logged (see _watch_slow_stores).
SLOW_STORE_SECONDS = 10.0


def transfer_syntaxes() -> list[str]:
    """Every transfer syntax the receiver accepts: the native ones and each compressed one pydicom can decode."""
    from pydicom.pixels import get_decoder

    out = list(_NATIVE_SYNTAXES)
    for ts in _COMPRESSED_SYNTAXES:
        try:
            if get_decoder(UID(ts)).is_available:
                out.append(ts)
        except (NotImplementedError, ValueError):  # no decoder at all for this syntax
            continue
    return out


@dataclass(frozen=True)
class ReceivedInstance:
    """One instance written to storage, as handed to the sink."""

    path: Path  # absolute path of the final file
    relative_path: str  # relative to storage.root, posix separators
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    size_bytes: int
    calling_ae_title: str
    peer_address: str
    routable: bool  # an MR / Enhanced MR / Legacy Converted Enhanced MR image: may go to the model
    header: InstanceHeader | None  # None when the header could not be read into features


class StoreRefused(Exception):
    """Raised by a sink to refuse one instance with a C-STORE failure ``status`` (e.g. 0xA700)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"0x{status:04X}: {reason}")
        self.status = status
        self.reason = reason


class _Refusal(Exception):
    """Internal: answer the C-STORE with ``status`` and a log line."""

    def __init__(self, status: int, comment: str, level: int = logging.WARNING) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment
        self.level = level


class _PolicyAE(AE):
    """An AE whose calling-AE check also looks at the peer's IP address.

    pynetdicom checks ``require_calling_aet`` inside the association's own thread while it
    negotiates an association request; at that moment the requestor's AE title and address are
    known, so the property answers per association: an empty list (accept) when our policy allows
    the peer, else a list no AE title matches, which makes pynetdicom reject with
    "rejected-permanent, calling AE title not recognised". Everywhere else it behaves as usual.
    """

    _caller_allowed: Callable[[str, str], bool] | None = None

    @property
    def require_calling_aet(self) -> list[str]:
        thread = threading.current_thread()
        check = self._caller_allowed
        if check is not None and isinstance(thread, Association) and thread.is_acceptor:
            return [] if check(thread.requestor.ae_title, thread.requestor.address) else ["\\"]
        return AE.require_calling_aet.fget(self)  # type: ignore[attr-defined]

    @require_calling_aet.setter
    def require_calling_aet(self, ae_titles: list[str]) -> None:
        AE.require_calling_aet.fset(self, ae_titles)  # type: ignore[attr-defined]


class _DeferredHandshakeContext:
    """Wrap accepted sockets for TLS without doing the handshake in the listening thread.

    pynetdicom wraps each accepted socket in its accept loop; a handshake there would let one
    silent peer stall every other connection. The handshake is done instead in the connection's
    own thread (the EVT_CONN_OPEN handler), bounded by the ACSE timeout.
    """

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context

    def wrap_socket(self, sock: Any, server_side: bool = True, **kwargs: Any) -> ssl.SSLSocket:
        return self.context.wrap_socket(sock, server_side=server_side, do_handshake_on_connect=False)


def build_ssl_context(config: NodeConfig) -> ssl.SSLContext:
    """Server-side TLS context from ``node.tls``: our certificate and key; client certificates
    verified against ``ca_certificates`` when given, and required when ``require_client_certificate``.
    """
    tls = config.node.tls
    if tls.certificate is None or tls.private_key is None:
        raise ValueError("node.tls needs certificate and private_key")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certfile=str(tls.certificate), keyfile=str(tls.private_key))
    if tls.ca_certificates is not None:
        ctx.load_verify_locations(cafile=str(tls.ca_certificates))
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _comment(text: str) -> str:
    text = text.encode("ascii", "replace").decode("ascii").replace("\\", "/")
    return text[:_COMMENT_MAX]


def _uid_str(value: Any) -> str:
    return str(value).strip(" \x00") if value is not None else ""


def _sop_class_name(uid: str) -> str:
    try:
        name = UID(uid).name
    except Exception:
        name = ""
    return name if name and name != uid else uid



# --------------------------------------------------------------------------- bytes


_PIXEL_DATA = 0x7FE00010
_PIXEL_TAGS = frozenset({_PIXEL_DATA, 0x7FE00008, 0x7FE00009})  # Pixel Data, Float / Double Float Pixel Data
_UNDEFINED_LENGTH = 0xFFFFFFFF
_KNOWN_VRS = frozenset(vr.value for vr in VR)


@dataclass(frozen=True)
class EncodedHeader:
    """A received dataset read up to its pixel data, with what :func:`content_problem` needs of the rest."""

    dataset: Dataset  # the elements before the pixel data, values still raw
    pixel_tag: int | None  # the pixel data element the read stopped at; None when there is none
    pixel_length: int  # its length field in bytes (0xFFFFFFFF: undefined, i.e. encapsulated); 0 without one
    pixel_available: int  # bytes of the stream after that element's header (what the peer really sent)


def read_header(stream: bytes, transfer_syntax: str) -> EncodedHeader:
    """Parse an encoded dataset (no File Meta) up to its pixel data, in ``transfer_syntax``.

    Values stay raw until read, so pixel data is never decoded and unused elements cost little.
    Raises ValueError (unknown transfer syntax, empty dataset) or whatever pydicom or zlib raise
    on bytes that do not parse.
    """
    ts = UID(transfer_syntax)
    if ts == DeflatedExplicitVRLittleEndian:
        stream = zlib.decompress(stream, -zlib.MAX_WBITS)
        implicit, little = False, True
    elif ts.is_transfer_syntax:
        implicit, little = ts.is_implicit_VR, ts.is_little_endian
    else:
        raise ValueError("unknown transfer syntax")
    pixels: list[tuple[int, str | None, int]] = []

    def at_pixels(tag: Any, vr: str | None, length: int) -> bool:
        if tag in _PIXEL_TAGS:
            pixels.append((int(tag), vr, length))
            return True
        return False

    fp = io.BytesIO(stream)
    ds = read_dataset(fp, implicit, little, stop_when=at_pixels)
    if not len(ds):
        raise ValueError("empty dataset")
    if not pixels:
        return EncodedHeader(ds, None, 0, 0)
    tag, vr, length = pixels[-1]
    # pydicom rewinds to the element's start; its header is 8 bytes, 12 for explicit OB/OW/OF/OD/UN.
    header = 8 if implicit or vr not in ("OB", "OW", "OF", "OD", "OL", "OV", "UN") else 12
    return EncodedHeader(ds, tag, length, len(stream) - fp.tell() - header)


def _count(ds: Dataset, keyword: str) -> int | None:
    """A non-negative integer attribute, None when absent or unreadable (bad VR, not a number)."""
    try:
        value = ds.get(keyword)
        number = int(value) if value is not None and value != "" else None
    except Exception:
        return None
    return number if number is not None and number >= 0 else None


def expected_pixel_bytes(ds: Dataset) -> int | None:
    """Bytes of native (uncompressed) Pixel Data that Rows x Columns x frames x samples x BitsAllocated
    need (1-bit data packed, rounded up), without the padding byte to an even length; None when any
    of them is missing or unreadable."""
    dims = [_count(ds, k) for k in ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated")]
    frames = _count(ds, "NumberOfFrames") if "NumberOfFrames" in ds else 1
    if frames is None or any(d is None for d in dims):
        return None
    rows, columns, samples, bits = (int(d) for d in dims)  # type: ignore[arg-type]
    return (rows * columns * samples * max(frames, 1) * bits + 7) // 8


def content_problem(header: EncodedHeader, transfer_syntax: str, routable: bool) -> str | None:
    """Why a parsed dataset is inconsistent, in one line naming tags but never values; None when it is fine.

    Cheap checks on what the header read already has: an element shorter than its length field (a
    truncated stream, or a hostile length such as 0xFFFFFFF0), an unknown VR, a pixel data element
    cut short, an image (``routable``) without pixel data, and uncompressed pixel data whose length
    differs from Rows x Columns x frames x samples x BitsAllocated.
    """
    ds = header.dataset
    for tag in ds.keys():
        raw = ds.get_item(tag)
        if not isinstance(raw, RawDataElement):
            continue  # sequences are parsed eagerly: a truncated one fails the read itself
        if raw.VR is not None and raw.VR not in _KNOWN_VRS:
            return f"unknown VR {raw.VR[:2]!r} in element {tag}"
        if raw.length != _UNDEFINED_LENGTH and raw.value is not None and len(raw.value) < raw.length:
            return f"truncated: element {tag} holds {len(raw.value)} of the {raw.length} bytes its length says"
    if header.pixel_tag is None:
        return "image without pixel data" if routable else None
    if header.pixel_length != _UNDEFINED_LENGTH and header.pixel_available < header.pixel_length:
        return f"truncated pixel data: {max(0, header.pixel_available)} of {header.pixel_length} bytes"
    if header.pixel_tag != _PIXEL_DATA or UID(transfer_syntax).is_compressed:
        return None
    if header.pixel_length == _UNDEFINED_LENGTH:
        return "encapsulated pixel data in an uncompressed transfer syntax"
    expected = expected_pixel_bytes(ds)
    if expected is None:
        return "pixel data without readable Rows, Columns, SamplesPerPixel or BitsAllocated"
    if header.pixel_length not in (expected, expected + (expected & 1)):
        return (f"pixel data of {header.pixel_length} bytes, Rows x Columns x frames x samples x bits "
                f"need {expected}")
    return None


def _element(tag: int, vr: bytes, value: bytes) -> bytes:
    group, elem = tag >> 16, tag & 0xFFFF
    if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT", b"UC", b"UR"):
        return struct.pack("<HH2sHI", group, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def _text(value: str, pad: bytes) -> bytes:
    raw = value.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def file_meta_bytes(sop_class: str, sop_uid: str, transfer_syntax: str, source_ae: str) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information (PS3.10 7.1) for one received dataset.

    The same elements pynetdicom's ``Event.file_meta`` gives (its implementation UID and version),
    plus (0002,0016) Source Application Entity Title = the calling AE title, encoded directly
    (pydicom's writer costs ~0.3 ms per instance).
    """
    body = b"".join((
        _element(0x00020001, b"OB", b"\x00\x01"),
        _element(0x00020002, b"UI", _text(sop_class, b"\x00")),
        _element(0x00020003, b"UI", _text(sop_uid, b"\x00")),
        _element(0x00020010, b"UI", _text(transfer_syntax, b"\x00")),
        _element(0x00020012, b"UI", _text(PYNETDICOM_IMPLEMENTATION_UID, b"\x00")),
        _element(0x00020013, b"SH", _text(PYNETDICOM_IMPLEMENTATION_VERSION, b" ")),
        _element(0x00020016, b"AE", _text(source_ae.strip(), b" ")) if source_ae.strip() else b"",
    ))
    return b"".join((b"\x00" * 128, b"DICM", _element(0x00020000, b"UL", struct.pack("<I", len(body))), body))


class Receiver:
    """The node's Storage SCP (see the module docstring)."""

    def __init__(self, config: NodeConfig, on_instance: Callable[[ReceivedInstance], object], *,
                 free_space: Callable[[Path], float] = free_gb) -> None:
        """``free_space``: GB free on the filesystem of a path (tests inject a low disk)."""
        self._config = config
        self._free_space = free_space
        self._on_instance = on_instance
        self._root = Path(config.storage.root).absolute()
        self._min_free_gb = config.storage.min_free_gb
        self._ae_title = config.node.ae_title
        self._callers: dict[str, set[str | None]] = {}
        for caller in config.node.allowed_callers:
            self._callers.setdefault(caller.ae_title, set()).add(caller.host)
        self._server: Any = None
        self._ae: _PolicyAE | None = None
        self._lock = threading.Lock()
        self._unrouted: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._series_features: dict[str, SeriesFeatures] = {}
        self._counts: dict[int, list[int]] = {}
        # StudyInstanceUID -> keyed hash of its PatientID. The key lives only in this process, so
        # nothing here can be turned back into a patient identifier.
        self._patient_key = secrets.token_bytes(32)
        self._study_patients: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        # Handler thread id -> (monotonic start, shown SOP UID, reported) of each C-STORE in progress.
        self._in_progress: dict[int, list[Any]] = {}
        self._watchdog_stop = threading.Event()

    # ------------------------------------------------------------------ lifecycle

    @property
    def port(self) -> int:
        """The TCP port the server is bound to (the configured one; the real one after start with port 0)."""
        if self._server is not None:
            return int(self._server.server_address[1])
        return self._config.node.port

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        """Start listening in background threads (returns at once). Raises OSError if the port is taken."""
        if self._server is not None:
            raise RuntimeError("receiver already started")
        install_filters()
        node = self._config.node
        ae = _PolicyAE(ae_title=node.ae_title)
        ae.require_called_aet = True
        ae._caller_allowed = self._caller_allowed if self._callers else None
        ae.maximum_associations = node.max_associations
        ae.acse_timeout = node.acse_timeout_seconds
        ae.dimse_timeout = node.dimse_timeout_seconds
        ae.network_timeout = node.network_timeout_seconds
        ae.maximum_pdu_size = MAX_PDU_SIZE

        syntaxes = transfer_syntaxes()
        ae.add_supported_context(Verification, syntaxes)
        for uid in (cx.abstract_syntax for cx in AllStoragePresentationContexts if cx.abstract_syntax):
            ae.add_supported_context(uid, syntaxes)

        handlers: list[Any] = [
            (evt.EVT_C_ECHO, self._handle_echo),
            (evt.EVT_C_STORE, self._handle_store),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_ended),
            (evt.EVT_ABORTED, self._on_ended),
        ]
        ssl_context: Any = None
        if node.tls.enabled:
            ssl_context = _DeferredHandshakeContext(build_ssl_context(self._config))
            handlers.append((evt.EVT_CONN_OPEN, self._tls_handshake))
        self._root.mkdir(parents=True, exist_ok=True, mode=0o750)
        self._server = ae.start_server(
            (node.bind_address, node.port), block=False, evt_handlers=handlers, ssl_context=ssl_context
        )
        self._ae = ae
        self._watchdog_stop.clear()
        threading.Thread(target=self._watch_slow_stores, name="receiver-watchdog", daemon=True).start()
        log.info(
            "DICOM receiver %s listening on %s:%d%s, storing under %s",
            node.ae_title, node.bind_address, self.port, " (TLS)" if node.tls.enabled else "", self._root,
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Stop listening and abort open associations (their current C-STORE finishes first)."""
        ae, self._ae = self._ae, None
        server, self._server = self._server, None
        if ae is None or server is None:
            return
        self._watchdog_stop.set()
        # Only associations that carry data are waited for: a connection that never sent an
        # A-ASSOCIATE (a port probe, a load balancer's health check) would hold the stop for its
        # ACSE timeout, and its (daemon) thread has nothing to finish.
        threads = [t for t in ae.active_associations if t.is_established]
        ae.shutdown()
        deadline = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        log.info("DICOM receiver %s stopped", self._ae_title)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ association policy

    def _caller_allowed(self, calling_ae: str, address: str) -> bool:
        hosts = self._callers.get(calling_ae.strip())
        if hosts is None:
            return False
        return None in hosts or address in hosts

    def _refusal_reason(self, assoc: Association) -> str:
        calling = assoc.requestor.ae_title
        address = assoc.requestor.address
        reasons = []
        primitive = assoc.requestor.primitive
        called = primitive.called_ae_title if primitive is not None else ""
        if called != self._ae_title:
            reasons.append(f"called AE title {called!r} is not {self._ae_title!r}")
        if self._callers:
            hosts = self._callers.get(calling.strip())
            if hosts is None:
                reasons.append("calling AE title not in node.allowed_callers")
            elif None not in hosts and address not in hosts:
                reasons.append(f"calling AE title allowed only from {', '.join(sorted(h for h in hosts if h))}")
        if not reasons:
            reasons.append(f"too many associations (node.max_associations = {self._config.node.max_associations})")
        return "; ".join(reasons)

    def _on_rejected(self, event: evt.Event) -> None:
        assoc = event.assoc
        log.warning(
            "refused association from AE %r at %s: %s",
            assoc.requestor.ae_title, assoc.requestor.address, self._refusal_reason(assoc),
        )

    def _on_accepted(self, event: evt.Event) -> None:
        assoc = event.assoc
        with self._lock:
            self._counts[id(assoc)] = [0, 0]
        log.info(
            "accepted association from AE %r at %s (%d presentation contexts)",
            assoc.requestor.ae_title, assoc.requestor.address, len(assoc.accepted_contexts),
        )

    def _on_ended(self, event: evt.Event) -> None:
        assoc = event.assoc
        with self._lock:
            counts = self._counts.pop(id(assoc), None)
        if counts is not None:
            how = "released" if event.event is evt.EVT_RELEASED else "aborted"
            log.info(
                "association from AE %r at %s %s: %d instances stored, %d refused",
                assoc.requestor.ae_title, assoc.requestor.address, how, counts[0], counts[1],
            )

    def _count(self, event: evt.Event, ok: bool) -> None:
        with self._lock:
            counts = self._counts.get(id(event.assoc))
            if counts is not None:
                counts[0 if ok else 1] += 1

    def _tls_handshake(self, event: evt.Event) -> None:
        """EVT_CONN_OPEN (TLS only): finish the handshake in the connection's thread, bounded in time."""
        assoc = event.assoc
        transport = assoc.dul.socket
        sock = transport.socket if transport is not None else None
        if not isinstance(sock, ssl.SSLSocket):
            return
        try:
            sock.settimeout(self._config.node.acse_timeout_seconds)
            sock.do_handshake()
            sock.settimeout(None)
        except (OSError, ValueError) as exc:
            # EVT_CONN_OPEN events carry the peer's (host, port) as ``address``
            log.warning("refused TLS connection from %s: %s", getattr(event, "address", ("?",))[0], exc)
            if transport is not None:
                transport.close()
            # No A-ASSOCIATE-RQ can come now: end the association at once instead of after the ACSE timeout.
            assoc.acse_timeout = 0.01

    def _watch_slow_stores(self) -> None:
        """Log every thread's stack, once per C-STORE, when one has run for SLOW_STORE_SECONDS: a sender
        gives up after its DIMSE timeout (often 30 s), and the stacks say where the node was waiting.
        Stacks hold code locations only, no data."""
        while not self._watchdog_stop.wait(SLOW_STORE_SECONDS / 4):
            now = time.monotonic()
            with self._lock:
                slow = [(tid, e[1], now - e[0]) for tid, e in self._in_progress.items()
                        if not e[2] and now - e[0] >= SLOW_STORE_SECONDS]
                for tid, _, _ in slow:
                    self._in_progress[tid][2] = True
            if slow:
                frames = sys._current_frames()
                names = {t.ident: t.name for t in threading.enumerate()}
                stacks = "".join(f"--- thread {names.get(tid, tid)}\n" + "".join(traceback.format_stack(f))
                                 for tid, f in frames.items())
                for tid, shown, seconds in slow:
                    log.warning("C-STORE of SOP instance %s in thread %s has run for %.0f s; every thread's stack:\n%s",
                                shown, names.get(tid, tid), seconds, stacks)

    # ------------------------------------------------------------------ DIMSE handlers

    def _handle_echo(self, event: evt.Event) -> int:
        return STATUS_SUCCESS

    def _handle_store(self, event: evt.Event) -> int | Dataset:
        request = event.request
        sop_uid = _uid_str(getattr(request, "AffectedSOPInstanceUID", ""))
        # A UID that is not one may carry anything (a name, a path): it is never logged.
        shown = sop_uid if valid_uid(sop_uid) else "(invalid UID)"
        me = threading.get_ident()
        with self._lock:
            self._in_progress[me] = [time.monotonic(), shown, False]
        try:
            status, comment = self._store(event, request, sop_uid)
        except _Refusal as r:
            status, comment = r.status, r.comment
            kept = self._quarantine(event, status, comment) if status in _CONTENT_STATUSES else ""
            log.log(r.level, "refused SOP instance %s (0x%04X): %s%s", shown, status, comment, kept)
        except Exception:
            status, comment = STATUS_INTERNAL_ERROR, "internal error in the receiver"
            log.exception("refused SOP instance %s (0x%04X): unexpected error", shown, status)
        finally:
            with self._lock:
                self._in_progress.pop(me, None)
        self._count(event, status == STATUS_SUCCESS)
        if status == STATUS_SUCCESS:
            return STATUS_SUCCESS
        rsp = Dataset()
        rsp.Status = status
        rsp.ErrorComment = _comment(comment)
        return rsp

    def _store(self, event: evt.Event, request: Any, sop_uid: str) -> tuple[int, str]:
        sop_class = _uid_str(getattr(request, "AffectedSOPClassUID", ""))
        transfer_syntax = str(event.context.transfer_syntax)
        stream = request.DataSet.getvalue()
        calling_ae = event.assoc.requestor.ae_title

        # (1) room on disk (first: a refused instance must not fill the quarantine either)
        free = self._free_space(self._root)
        if free < self._min_free_gb:
            raise _Refusal(
                STATUS_OUT_OF_RESOURCES,
                f"out of resources: {free:.2f} GB free, storage.min_free_gb is {self._min_free_gb:g}",
            )

        # (2) the header, up to the pixel data, and its consistency
        try:
            header = read_header(stream, transfer_syntax)
            ds = header.dataset
            ds_sop_class = _uid_str(ds.get("SOPClassUID"))
            ds_sop_uid = _uid_str(ds.get("SOPInstanceUID"))
            study_uid = _uid_str(ds.get("StudyInstanceUID"))
            series_uid = _uid_str(ds.get("SeriesInstanceUID"))
        except Exception as exc:
            raise _Refusal(STATUS_CANNOT_PARSE, f"cannot parse dataset ({type(exc).__name__})") from None
        if ds_sop_class != sop_class:
            raise _Refusal(STATUS_DATASET_MISMATCH, "SOPClassUID differs from the request")
        if ds_sop_uid != sop_uid:
            raise _Refusal(STATUS_DATASET_MISMATCH, "SOPInstanceUID differs from the request")
        try:
            check_uid(sop_class, "SOPClassUID")
            check_uid(transfer_syntax, "TransferSyntaxUID")
            path = instance_path(self._root, study_uid, series_uid, sop_uid)
        except UIDError as exc:
            raise _Refusal(STATUS_INVALID_UID, str(exc)) from None
        routable = sop_class in ROUTABLE_SOP_CLASSES
        problem = content_problem(header, transfer_syntax, routable)
        if problem is not None:
            raise _Refusal(STATUS_INCONSISTENT, problem)
        self._check_patient(study_uid, ds)

        # (3) the bytes as they came (with a File Meta Information header), durably
        data = file_meta_bytes(sop_class, sop_uid, transfer_syntax, calling_ae) + stream
        try:
            write_durably(path, data)
        except OSError as exc:
            raise _Refusal(
                STATUS_OUT_OF_RESOURCES, f"out of resources: could not write ({exc.strerror or exc})",
                level=logging.ERROR,
            ) from None

        # (4) the sink
        features = self._header(ds, path, sop_uid, series_uid)
        if not routable:
            self._note_unrouted(series_uid, sop_class)
        instance = ReceivedInstance(
            path=path,
            relative_path=path.relative_to(self._root).as_posix(),
            sop_class_uid=sop_class,
            sop_instance_uid=sop_uid,
            study_instance_uid=study_uid,
            series_instance_uid=series_uid,
            transfer_syntax_uid=transfer_syntax,
            size_bytes=len(data),
            calling_ae_title=calling_ae,
            peer_address=event.assoc.requestor.address,
            routable=routable,
            header=features,
        )
        try:
            self._on_instance(instance)
        except StoreRefused as exc:
            raise _Refusal(exc.status, exc.reason) from None
        except Exception:
            log.exception("sink failed for SOP instance %s (stored at %s)", sop_uid, instance.relative_path)
            raise _Refusal(
                STATUS_OUT_OF_RESOURCES, "out of resources: could not index", level=logging.DEBUG
            ) from None
        # (5) success: the file is in place and fsynced, and the sink has it
        return STATUS_SUCCESS, ""

    def _header(self, ds: Dataset, path: Path, sop_uid: str, series_uid: str) -> InstanceHeader | None:
        try:
            # Series-level features are read once per series: a full feature pass per instance
            # would cost ~1 ms of every C-STORE.
            header = instance_header_from_dataset(ds, str(path), self._series_features.get(series_uid))
            if series_uid not in self._series_features:
                if len(self._series_features) >= _SERIES_FEATURES_CACHED:
                    self._series_features.clear()
                self._series_features[series_uid] = header.features
            return header
        except MalformedHeaderError as exc:
            cause = type(exc.__cause__).__name__ if exc.__cause__ is not None else "ValueError"
            log.info("SOP instance %s stored, but its header has no usable features (%s)", sop_uid, cause)
        except ValueError as exc:
            log.info("SOP instance %s stored, but its header has no usable features (%s)", sop_uid, exc)
        except Exception as exc:
            log.info("SOP instance %s stored, but its header has no usable features (%s)", sop_uid,
                     type(exc).__name__)
        return None

    def _quarantine(self, event: evt.Event, status: int, comment: str) -> str:
        """Keep a refused instance's bytes with the reason; returns " (kept in quarantine/...)" for the log."""
        request: Any = event.request  # a C-STORE request (this is the C-STORE handler's)
        stream = request.DataSet.getvalue()
        if not stream:
            return ""
        sop_class = _uid_str(getattr(request, "AffectedSOPClassUID", ""))
        sop_uid = _uid_str(getattr(request, "AffectedSOPInstanceUID", ""))
        transfer_syntax = str(event.context.transfer_syntax)
        calling_ae = event.assoc.requestor.ae_title
        uids = {k: v for k, v in (("sop_class_uid", sop_class), ("sop_instance_uid", sop_uid),
                                  ("transfer_syntax_uid", transfer_syntax)) if valid_uid(v)}
        reason = {"status": f"0x{status:04X}", "reason": comment, "calling_ae_title": calling_ae,
                  "peer_address": event.assoc.requestor.address, **uids}
        data = file_meta_bytes(uids.get("sop_class_uid", ""), uids.get("sop_instance_uid", ""),
                               uids.get("transfer_syntax_uid", ""), calling_ae) + stream
        try:
            path = quarantine(self._root, data, reason)
        except OSError as exc:
            log.error("could not quarantine a refused instance: %s", exc.strerror or exc)
            return ""
        return f" (kept in {path.relative_to(self._root).as_posix()})"

    def _patient_of(self, ds: Dataset) -> bytes | None:
        try:
            patient_id = str(ds.get("PatientID", "") or "").strip(" \x00")
        except Exception:
            return None
        if not patient_id:
            return None
        return hmac.new(self._patient_key, patient_id.encode("utf-8", "replace"), hashlib.sha256).digest()

    def _stored_patient(self, study_uid: str) -> bytes | None:
        """The patient of an instance of ``study_uid`` already on disk (after a restart the memory is empty)."""
        for path in StorageLayout(self._root).study_incoming(study_uid).glob("*/*.dcm"):
            try:
                return self._patient_of(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"]))
            except Exception as exc:
                log.debug("study %s: %s unreadable (%s)", study_uid, path.name, type(exc).__name__)
        return None

    def _check_patient(self, study_uid: str, ds: Dataset) -> None:
        """Refuse an instance whose PatientID differs from the one its StudyInstanceUID came with first.

        One study, one patient: a result computed on a study that mixes patients would be filed
        under one of them. The first patient's instances are kept; the others are refused (0xA900)
        so that the sending PACS shows the collision.
        """
        mine = self._patient_of(ds)
        if mine is None:
            return
        with self._lock:
            known = self._study_patients.get(study_uid)
        if known is None:
            stored = self._stored_patient(study_uid)
            with self._lock:
                known = self._study_patients.setdefault(study_uid, stored or mine)
                if len(self._study_patients) > _STUDY_PATIENTS_CACHED:
                    self._study_patients.popitem(last=False)
        if known != mine:
            raise _Refusal(STATUS_DATASET_MISMATCH, "PatientID differs from earlier instances of this study")

    def _note_unrouted(self, series_uid: str, sop_class: str) -> None:
        with self._lock:
            if series_uid in self._unrouted:
                return
            self._unrouted[series_uid] = None
            if len(self._unrouted) > _UNROUTED_MEMORY:
                self._unrouted.popitem(last=False)
        log.info(
            "series %s: SOP class %s is stored but never routed to the model", series_uid, _sop_class_name(sop_class)
        )
