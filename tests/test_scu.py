"""The node's DICOM SCU (``dicom_node.scu``) and ``dicom-node echo`` / ``send``, against real peers.

Peers are DCMTK ``storescp`` subprocesses on free loopback ports, or, where DCMTK cannot express the
behaviour (a given C-STORE status, a transient rejection, a slow answer), a small pynetdicom SCP in
the test process. No networking is mocked. Every test uses its own ports and folders (pytest-xdist).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import typer
from node_harness import DCMTK_ENV, free_port
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import Verification
from typer.testing import CliRunner

from dicom_node.cli.network import echo as echo_command
from dicom_node.cli.network import send as send_command
from dicom_node.scu import (
    NOT_SENT,
    Peer,
    SendError,
    classify_status,
    client_ssl_context,
    echo,
    iter_dicom_files,
    send_files,
)

STORESCP = shutil.which("storescp")
OPENSSL = shutil.which("openssl")
REAL_TS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real-dicom" / "dcm_qa_ts" / "ax_asc_35sl"
needs_storescp = pytest.mark.skipif(STORESCP is None, reason="DCMTK storescp is not installed")
needs_real_ts = pytest.mark.skipif(not REAL_TS.is_dir(), reason="shared/data/real-dicom not checked out")

ME = "TEST_SCU"
runner = CliRunner()


# ------------------------------------------------------------------------------------ helpers


def closed_peer() -> Peer:
    return Peer("NOBODY", "127.0.0.1", free_port())


def _wait_listening(port: int, proc: subprocess.Popen[bytes], deadline_s: float = 10.0) -> bool:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.02)
    return False


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[Callable[..., tuple[Peer, Path]]]:
    """Start ``storescp`` (AE title DEST, bit-preserving, own output folder) with extra options."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(*options: str, aet: str = "DEST") -> tuple[Peer, Path]:
        out = tmp_path / f"received-{len(procs)}"
        out.mkdir()
        for _ in range(5):  # the free port may be taken between choosing it and binding it
            port = free_port()
            proc = subprocess.Popen(
                [str(STORESCP), "--aetitle", aet, "-od", str(out), *options, str(port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                # DCMTK keeps Nagle's algorithm on unless told: ~45 ms per response against our delayed ACKs
                env=DCMTK_ENV,
            )
            procs.append(proc)
            if _wait_listening(port, proc):
                return Peer(aet, "127.0.0.1", port), out
            proc.kill()
        raise RuntimeError(f"storescp did not start: {proc.stderr.read().decode() if proc.stderr else ''}")

    yield start
    for proc in procs:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture
def scp() -> Iterator[Callable[..., Peer]]:
    """A pynetdicom storage SCP in this process: ``start(handler=..., **ae_attributes)``."""
    servers = []

    def start(handler: Callable[[evt.Event], int] | None = None, *, aet: str = "PYSCP", sop_classes=(MRImageStorage,),
              **ae_attrs: object) -> Peer:
        ae = AE(ae_title=aet)
        for name, value in ae_attrs.items():
            setattr(ae, name, value)
        ae.add_supported_context(Verification)
        for sop in sop_classes:
            ae.add_supported_context(sop, ALL_TRANSFER_SYNTAXES)
        handlers = [(evt.EVT_C_STORE, handler or (lambda event: 0x0000))]
        server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
        servers.append(server)
        return Peer(aet, "127.0.0.1", server.server_address[1])

    yield start
    for server in servers:
        server.shutdown()


def make_series(folder: Path, n: int = 3, tsyntax: UID = ExplicitVRLittleEndian, size: int = 16) -> list[Path]:
    """``n`` tiny synthetic MR slices (uint16, ``size`` x ``size``) with fresh UIDs, fake names only."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    rng = np.random.default_rng(len(list(folder.iterdir())))
    paths = []
    for i in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = tsyntax
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Test^Synthetic", "SYN0001", "19700101"
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "MR", 3, i + 1
        ds.SeriesDescription = "Ax 3D BRAVO +GAD"
        ds.ImagePositionPatient = [0.0, 0.0, float(i)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 1.0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = rng.integers(0, 4096, (size, size), dtype=np.uint16).tobytes()
        path = folder / f"IM{i + 1:04d}.dcm"
        ds.save_as(path, implicit_vr=tsyntax == ImplicitVRLittleEndian, enforce_file_format=True)
        paths.append(path)
    return paths


def received(out: Path) -> dict[str, Path]:
    """SOP Instance UID -> received file."""
    return {str(read_file_meta_info(p).MediaStorageSOPInstanceUID): p for p in out.iterdir() if p.is_file()}


def dataset_bytes(path: Path) -> bytes:
    """The bytes after the File Meta Information (what goes on the wire when a file is sent as stored)."""
    _, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def cli_app() -> typer.Typer:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command("echo")(echo_command)
    app.command("send")(send_command)
    return app


# ------------------------------------------------------------------------------ pure parts


def test_peer_parse() -> None:
    assert Peer.parse("127.0.0.1:104:PACS") == Peer("PACS", "127.0.0.1", 104)
    assert Peer.parse("pacs.example.org:11112:ILD NODE ") == Peer("ILD NODE", "pacs.example.org", 11112)
    v6 = Peer.parse("[::1]:4242:ORTHANC", tls=True)
    assert (v6.host, v6.port, v6.ae_title, v6.tls) == ("::1", 4242, "ORTHANC", True)
    assert str(v6) == "ORTHANC@[::1]:4242"
    assert str(Peer.parse("10.0.0.5:104:A:B")) == "A:B@10.0.0.5:104"  # ':' is allowed in an AE title
    for bad in ("badvalue", "host:104", "::1:104:X", "host:0:X", "host:70000:X", "host:abc:X", ":104:X",
                "host:104:", "host:104:THIS_AE_IS_FAR_TOO_LONG", "[nothex]:104:X", "host:104:A\\B"):
        with pytest.raises(ValueError, match="expected HOST:PORT:AET"):
            Peer.parse(bad)


def test_classify_status() -> None:
    kinds = {s: classify_status(s).kind for s in (0x0000, 0xB000, 0xB006, 0xB007, 0xA700, 0xA7FF, 0x0213, 0x0110,
                                                   0x0210, 0x0122, 0x0124, 0xA900, 0xA9FF, 0xC000, 0xCFFF, 0x0117,
                                                   0x0211, 0x0212, 0x1234)}
    assert kinds == {0x0000: "success", 0xB000: "warning", 0xB006: "warning", 0xB007: "warning",
                     0xA700: "transient", 0xA7FF: "transient", 0x0213: "transient", 0x0110: "transient",
                     0x0210: "transient", 0x0122: "permanent", 0x0124: "permanent", 0xA900: "permanent",
                     0xA9FF: "permanent", 0xC000: "permanent", 0xCFFF: "permanent", 0x0117: "permanent",
                     0x0211: "permanent", 0x0212: "permanent", 0x1234: "permanent"}
    assert classify_status(0xA702).meaning == "out of resources"


def test_iter_dicom_files(tmp_path: Path) -> None:
    files = make_series(tmp_path / "a" / "b", 2) + make_series(tmp_path / "c", 1)
    (tmp_path / "a" / "notes.txt").write_text("not DICOM")
    (tmp_path / "tiny").write_bytes(b"x")
    found = iter_dicom_files(tmp_path)
    assert found == sorted(files) and found.skipped == 2
    single = iter_dicom_files(files[0])
    assert single == [files[0]] and single.skipped == 0
    assert iter_dicom_files(tmp_path / "tiny") == []
    with pytest.raises(FileNotFoundError):
        iter_dicom_files(tmp_path / "missing")


# ------------------------------------------------------------------------------------- echo


@needs_storescp
def test_echo_ok(storescp) -> None:
    peer, _ = storescp()
    rtt = echo(peer, calling_ae=ME, timeout=10)
    assert 0 < rtt < 5


def test_echo_closed_port_is_transient() -> None:
    peer = closed_peer()
    with pytest.raises(SendError) as err:
        echo(peer, calling_ae=ME, timeout=5)
    assert err.value.transient and err.value.reason == f"{peer}: connection refused"


def test_echo_silent_peer_times_out() -> None:
    """A TCP listener that never answers the A-ASSOCIATE-RQ: ACSE timeout, transient."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        peer = Peer("SILENT", "127.0.0.1", listener.getsockname()[1])
        t0 = time.monotonic()
        with pytest.raises(SendError) as err:
            echo(peer, calling_ae=ME, timeout=0.5)
    assert err.value.transient and "within 0.5 s" in err.value.reason
    assert time.monotonic() - t0 < 5


@needs_storescp
def test_refused_association_is_permanent(storescp) -> None:
    peer, _ = storescp("--refuse")
    with pytest.raises(SendError) as err:
        echo(peer, calling_ae=ME, timeout=10)
    assert not err.value.transient
    assert err.value.reason.startswith(f"{peer}: association rejected-permanent")


def test_wrong_called_ae_is_permanent(scp) -> None:
    peer = scp(aet="RIGHT", require_called_aet=True)
    wrong = Peer("WRONG", peer.host, peer.port)
    with pytest.raises(SendError) as err:
        echo(wrong, calling_ae=ME, timeout=10)
    assert not err.value.transient
    assert "rejected-permanent" in err.value.reason and "called ae title not recognised" in err.value.reason
    assert echo(peer, calling_ae=ME, timeout=10) > 0


def test_busy_peer_rejection_is_transient(scp) -> None:
    """pynetdicom rejects (transient, local limit exceeded) beyond maximum_associations."""
    peer = scp(maximum_associations=1)
    holder = AE(ae_title="HOLDER")
    holder.add_requested_context(Verification)
    held = holder.associate(peer.host, peer.port, ae_title=peer.ae_title)
    assert held.is_established
    try:
        with pytest.raises(SendError) as err:
            echo(peer, calling_ae=ME, timeout=10)
    finally:
        held.release()
    assert err.value.transient and "rejected-transient" in err.value.reason


@pytest.mark.skipif(STORESCP is None or OPENSSL is None, reason="needs storescp and openssl")
def test_echo_over_tls(storescp, tmp_path: Path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [str(OPENSSL), "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True,
    )
    plain, _ = storescp("+tls", str(key), str(cert), "-ic")
    peer = Peer(plain.ae_title, plain.host, plain.port, tls=True)
    assert echo(peer, calling_ae=ME, timeout=10, ssl_context=client_ssl_context(ca_file=cert)) > 0
    with pytest.raises(SendError) as err:  # the system CAs do not know this self-signed certificate
        echo(peer, calling_ae=ME, timeout=10)
    assert not err.value.transient and "TLS handshake failed" in err.value.reason
    args = ["echo", "127.0.0.1", str(peer.port), peer.ae_title, "--tls", "--ca-file", str(cert)]
    result = runner.invoke(cli_app(), args)
    assert result.exit_code == 0, result.output
    assert runner.invoke(cli_app(), args[:-2]).exit_code == 1


# ------------------------------------------------------------------------------------- send


@needs_storescp
def test_send_series_stored_as_sent(storescp, tmp_path: Path) -> None:
    peer, out = storescp("+B")
    files = make_series(tmp_path / "series", 4) + make_series(tmp_path / "implicit", 2, ImplicitVRLittleEndian)
    calls: list[tuple[int, int]] = []
    report = send_files(files, peer, calling_ae=ME, timeout=10, progress=lambda d, t: calls.append((d, t)))
    assert report.sent == 6 and report.failed == [] and report.seconds > 0
    assert calls == [(i, 6) for i in range(1, 7)]
    report.raise_for_status()
    got = received(out)
    assert len(got) == 6
    for f in report.files:
        assert f.ok and f.status == 0 and f.warning is None
        sent, back = dcmread(f.path), dcmread(got[f.sop_instance_uid])
        assert back.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID == f.transfer_syntax
        assert back == sent and back.PixelData == sent.PixelData
        assert dataset_bytes(got[f.sop_instance_uid]) == dataset_bytes(f.path)  # byte for byte, as stored


@needs_storescp
@needs_real_ts
def test_send_compressed_files_keep_their_transfer_syntax(storescp) -> None:
    """The 9 dcm_qa_ts files (7 transfer syntaxes incl. big endian, RLE, JPEG, JPEG-LS, J2K) as stored."""
    peer, out = storescp("+xa", "+B")
    files = iter_dicom_files(REAL_TS)
    assert len(files) == 9
    report = send_files(files, peer, calling_ae=ME, timeout=10)
    assert report.sent == 9, [f.status_text for f in report.failed]
    got = received(out)
    for f in report.files:
        sent, back = dcmread(f.path), dcmread(got[f.sop_instance_uid])
        assert back.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID == f.transfer_syntax
        assert back.PixelData == sent.PixelData and back == sent


@needs_storescp
@needs_real_ts
def test_peer_without_compressed_syntaxes_fails_those_files_permanently(storescp, tmp_path: Path) -> None:
    """Default storescp accepts uncompressed syntaxes only: the others are reported, not re-encoded."""
    peer, out = storescp()
    report = send_files(iter_dicom_files(REAL_TS), peer, calling_ae=ME, timeout=10)
    assert sorted(str(f.transfer_syntax) for f in report.files if f.ok) == sorted(
        ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2"])
    assert len(report.failed) == 6 and len(received(out)) == 3
    for f in report.failed:
        assert f.status == NOT_SENT and "peer accepted no presentation context" in f.error
    with pytest.raises(SendError) as err:
        report.raise_for_status()
    assert not err.value.transient and "6 of 9 instance(s) not stored" in err.value.reason


@needs_storescp
def test_uncompressed_files_are_reencoded_when_their_syntax_is_refused(storescp, tmp_path: Path) -> None:
    peer, out = storescp("+xi")  # implicit VR little endian only
    files = make_series(tmp_path / "explicit", 2)
    report = send_files(files, peer, calling_ae=ME, timeout=10)
    assert report.sent == 2 and {f.transfer_syntax for f in report.files} == {ImplicitVRLittleEndian}
    got = received(out)
    for f in report.files:
        back = dcmread(got[f.sop_instance_uid])
        assert back.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
        assert back == dcmread(f.path)


@needs_storescp
def test_peer_accepting_no_sop_class_of_ours_is_permanent(storescp, tmp_path: Path) -> None:
    cfg = tmp_path / "ct-only.cfg"
    cfg.write_text(
        "[[TransferSyntaxes]]\n[Uncompressed]\nTransferSyntax1 = LocalEndianExplicit\n"
        "TransferSyntax2 = LittleEndianImplicit\n"
        "[[PresentationContexts]]\n[CTOnly]\nPresentationContext1 = VerificationSOPClass\\Uncompressed\n"
        "PresentationContext2 = CTImageStorage\\Uncompressed\n"
        "[[Profiles]]\n[CT]\nPresentationContexts = CTOnly\n"
    )
    peer, out = storescp("-xf", str(cfg), "CT")
    assert echo(peer, calling_ae=ME, timeout=10) > 0
    with pytest.raises(SendError) as err:
        send_files(make_series(tmp_path / "mr", 2), peer, calling_ae=ME, timeout=10)
    assert not err.value.transient and "accepted no presentation context" in err.value.reason
    assert "MR Image Storage" in err.value.reason and list(out.iterdir()) == []


@needs_storescp
def test_abort_mid_batch_is_transient(storescp, tmp_path: Path) -> None:
    peer, _ = storescp("--abort-after")
    with pytest.raises(SendError) as err:
        send_files(make_series(tmp_path / "s", 3), peer, calling_ae=ME, timeout=10)
    assert err.value.transient and "after 0 of 3 instance(s) stored" in err.value.reason
    assert err.value.report is not None and err.value.report.sent == 0


def test_send_to_closed_port_is_transient(tmp_path: Path) -> None:
    with pytest.raises(SendError) as err:
        send_files(make_series(tmp_path / "s", 1), closed_peer(), calling_ae=ME, timeout=5)
    assert err.value.transient and err.value.reason.endswith("connection refused")


def _status_after(n_ok: int, status: int) -> Callable[[evt.Event], int]:
    """A C-STORE handler: success for the first ``n_ok`` requests, then ``status``."""
    seen: list[str] = []
    lock = threading.Lock()

    def handler(event: evt.Event) -> int:
        with lock:
            seen.append(event.request.AffectedSOPInstanceUID)
            return 0x0000 if len(seen) <= n_ok else status

    return handler


def test_out_of_resources_is_transient(scp, tmp_path: Path) -> None:
    peer = scp(_status_after(2, 0xA700))
    with pytest.raises(SendError) as err:
        send_files(make_series(tmp_path / "s", 4), peer, calling_ae=ME, timeout=10)
    assert err.value.transient
    assert "status 0xA700 (out of resources) after 2 of 4 instance(s) stored" in err.value.reason
    report = err.value.report
    assert report is not None and report.sent == 2 and len(report.files) == 3  # stopped at the failure


def test_permanent_status_is_reported_and_the_batch_goes_on(scp, tmp_path: Path) -> None:
    peer = scp(_status_after(1, 0xA900))
    report = send_files(make_series(tmp_path / "s", 3), peer, calling_ae=ME, timeout=10)
    assert [f.status for f in report.files] == [0x0000, 0xA900, 0xA900] and report.sent == 1
    assert report.failed[0].status_text == "0xA900 (data set does not match SOP class)"
    with pytest.raises(SendError) as err:
        report.raise_for_status()
    assert not err.value.transient and report.failed[0].sop_instance_uid in err.value.reason


def test_warning_counts_as_stored(scp, tmp_path: Path) -> None:
    peer = scp(_status_after(0, 0xB000))
    report = send_files(make_series(tmp_path / "s", 2), peer, calling_ae=ME, timeout=10)
    assert report.sent == 2 and report.failed == []
    assert all(f.warning == "coercion of data elements" for f in report.files)


def test_no_store_response_in_time_is_transient(scp, tmp_path: Path) -> None:
    answer = threading.Event()

    def slow(event: evt.Event) -> int:
        answer.wait(10)
        return 0x0000

    peer = scp(slow)
    try:
        with pytest.raises(SendError) as err:
            send_files(make_series(tmp_path / "s", 1), peer, calling_ae=ME, timeout=2)
    finally:
        answer.set()
    assert err.value.transient and "no C-STORE response within 2 s" in err.value.reason


class _LateWake(threading.Event):
    """A reactor checkpoint whose ``wait()`` returns 0.2 s late: the association reactor descheduled just
    after its checkpoint opened, before it marks itself unpaused (the window of the race below)."""

    def wait(self, timeout: float | None = None) -> bool:
        opened = super().wait(timeout)
        time.sleep(0.2)
        return opened


@needs_storescp
def test_answer_taken_by_a_late_reactor_still_reaches_the_sender(storescp, tmp_path: Path, monkeypatch) -> None:
    """#19: pynetdicom's requestor reactor, descheduled between its checkpoint ``wait()`` and ``_is_paused =
    False``, takes the C-STORE answer off the DIMSE queue and drops it; unmended, each store here waits the
    whole 3 s DIMSE timeout and the send fails after storescp stored the file (and a retry stores it twice)."""
    real_associate = AE.associate

    def associate_late_reactor(self: AE, *args: object, **kwargs: object):
        assoc = real_associate(self, *args, **kwargs)
        checkpoint = _LateWake()
        checkpoint.set()
        assoc._reactor_checkpoint = checkpoint
        send_msg = assoc.dimse.send_msg

        def send_then_deschedule(primitive: object, context_id: int) -> None:
            send_msg(primitive, context_id)
            time.sleep(0.4)  # the sender thread descheduled before it waits: the answer is in before it

        assoc.dimse.send_msg = send_then_deschedule
        time.sleep(0.05)  # the reactor is now past the old checkpoint, sleeping in the new one's late wake
        return assoc

    monkeypatch.setattr(AE, "associate", associate_late_reactor)
    peer, out = storescp()
    report = send_files(make_series(tmp_path / "s", 3), peer, calling_ae=ME, timeout=3)
    assert report.sent == 3 and len(received(out)) == 3
    assert report.seconds < 3 * 1.5  # three stores of ~0.4 s each: no answer waited for until the timeout


def test_unreadable_file_is_reported_without_sending(scp, tmp_path: Path) -> None:
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"\0" * 128 + b"DICM" + b"garbage")
    peer = scp()
    report = send_files([bad, *make_series(tmp_path / "s", 1)], peer, calling_ae=ME, timeout=10)
    assert report.sent == 1 and report.failed[0].path == bad and report.failed[0].status == NOT_SENT


def test_send_nothing_opens_no_association() -> None:
    report = send_files([], closed_peer(), calling_ae=ME)
    assert report.sent == 0 and report.files == []


def test_mixed_sop_classes_one_association(scp, tmp_path: Path) -> None:
    associations: set[int] = set()

    def handler(event: evt.Event) -> int:
        associations.add(id(event.assoc))
        return 0x0000

    peer = scp(handler, sop_classes=(MRImageStorage, CTImageStorage))
    files = make_series(tmp_path / "mr", 2)
    ct = dcmread(files[0])
    ct.SOPClassUID = ct.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ct.SOPInstanceUID = ct.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ct.save_as(tmp_path / "ct.dcm", enforce_file_format=True)
    report = send_files([*files, tmp_path / "ct.dcm"], peer, calling_ae=ME, timeout=10)
    assert report.sent == 3 and len(associations) == 1


# ----------------------------------------------------------------------------------------- CLI


@needs_storescp
def test_cli_send_and_echo(storescp, tmp_path: Path) -> None:
    peer, out = storescp()
    folder = tmp_path / "study"
    make_series(folder / "s1", 3)
    make_series(folder / "s2", 2)
    (folder / "README.txt").write_text("not DICOM")
    to = f"127.0.0.1:{peer.port}:DEST"
    result = runner.invoke(cli_app(), ["send", str(folder), "--to", to, "--calling-aet", ME, "--no-progress"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"sent 5 of 5 instance(s) to DEST@127.0.0.1:{peer.port} in ")
    assert "instances/s)" in result.stdout and len(received(out)) == 5
    result = runner.invoke(cli_app(), ["echo", "127.0.0.1", str(peer.port), "DEST"])  # calling AE from the config
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"C-ECHO DEST@127.0.0.1:{peer.port}: OK in ")


def test_cli_failures(tmp_path: Path) -> None:
    files = make_series(tmp_path / "s", 1)
    closed = closed_peer()
    app = cli_app()

    bad = runner.invoke(app, ["send", str(files[0]), "--to", "badvalue"])
    assert bad.exit_code == 2 and bad.stderr.startswith("error: --to: expected HOST:PORT:AET")

    down = runner.invoke(app, ["send", str(files[0]), "--to", f"127.0.0.1:{closed.port}:X", "--timeout", "5"])
    assert down.exit_code == 1
    assert down.stderr.strip().splitlines() == [f"error: X@127.0.0.1:{closed.port}: connection refused"]

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("x")
    none = runner.invoke(app, ["send", str(empty), "--to", f"127.0.0.1:{closed.port}:X"])
    assert none.exit_code == 1 and "no DICOM files found" in none.stderr

    echo_down = runner.invoke(app, ["echo", "127.0.0.1", str(closed.port), "X", "--timeout", "5"])
    assert echo_down.exit_code == 1
    assert echo_down.stderr.strip().splitlines() == [f"error: X@127.0.0.1:{closed.port}: connection refused"]

    assert runner.invoke(app, ["echo", "127.0.0.1", "notaport", "X"]).exit_code == 2
    bad_aet = runner.invoke(app, ["echo", "127.0.0.1", "104", "X", "--calling-aet", "WAY_TOO_LONG_AE_TITLE"])
    assert bad_aet.exit_code == 2 and "calling AE title" in bad_aet.stderr


def test_cli_send_lists_failures(scp, tmp_path: Path) -> None:
    peer = scp(_status_after(1, 0xC001))
    files = make_series(tmp_path / "s", 2)
    result = runner.invoke(cli_app(), ["send", str(tmp_path / "s"), "--to", f"127.0.0.1:{peer.port}:{peer.ae_title}"])
    assert result.exit_code == 1
    assert result.stdout.startswith("sent 1 of 2 instance(s)")
    uid = str(read_file_meta_info(files[1]).MediaStorageSOPInstanceUID)
    assert f"  failed: {uid} 0xC001 (cannot understand)" in result.stdout
    assert result.stderr.strip() == "error: 1 of 2 instance(s) not stored"
