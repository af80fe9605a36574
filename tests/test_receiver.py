"""The DICOM receiver (issue #5) against real peers: DCMTK echoscu/storescu and pynetdicom as SCU.

Every test starts its own :class:`Receiver` on 127.0.0.1, on a port the kernel picks (bind to port
0, read back ``Receiver.port``: no race between pytest-xdist workers), storing under ``tmp_path``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from node_harness import DCMTK_ENV, wait_for
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE, _config
from pynetdicom.sop_class import Verification
from tls_certs import make_certificates

from dicom_node.config import NodeConfig
from dicom_node.logs import setup_logging
from dicom_node.receiver import (
    STATUS_CANNOT_PARSE,
    STATUS_DATASET_MISMATCH,
    STATUS_INVALID_UID,
    STATUS_OUT_OF_RESOURCES,
    ReceivedInstance,
    Receiver,
    StoreRefused,
    file_meta_bytes,
    read_header,
    transfer_syntaxes,
)
from dicom_node.storage import (
    UIDError,
    free_gb,
    instance_path,
    valid_uid,
    write_durably,
)

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real-dicom"
needs_real = pytest.mark.skipif(not (REAL / "manifest.json").is_file(), reason="shared/data/real-dicom not checked out")
needs_dcmtk = pytest.mark.skipif(shutil.which("storescu") is None, reason="DCMTK not installed")

AET = "ILD_NODE"


# --------------------------------------------------------------------------- helpers


class Sink:
    """Collects what the receiver hands on; optionally raises."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.items: list[ReceivedInstance] = []
        self.threads: set[str] = set()
        self.error = error
        self._lock = threading.Lock()

    def __call__(self, instance: ReceivedInstance) -> None:
        with self._lock:
            self.items.append(instance)
            self.threads.add(threading.current_thread().name)
        if self.error is not None:
            raise self.error


def make_config(root: Path, **node: Any) -> NodeConfig:
    storage = {"root": str(root), "min_free_gb": node.pop("min_free_gb", 0.0)}
    config = NodeConfig(node={"bind_address": "127.0.0.1", **node}, storage=storage)
    # Port 0: the kernel picks a free port (the schema wants 1-65535, hence the unvalidated copy).
    return config.model_copy(update={"node": config.node.model_copy(update={"port": 0})})


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., tuple[Receiver, Sink]]]:
    started: list[Receiver] = []

    def _start(sink: Sink | None = None, **node: Any) -> tuple[Receiver, Sink]:
        sink = sink if sink is not None else Sink()
        receiver = Receiver(make_config(tmp_path / "storage", **node), sink)
        receiver.start()
        started.append(receiver)
        return receiver, sink

    yield _start
    for r in started:
        r.stop()


def dataset(
    study: str, series: str, number: int, *, sop_class: str = MRImageStorage, size: int = 16,
    modality: str = "MR", patient: tuple[str, str, str] = ("Test^Receiver", "RCV0001", "19800101"),
    sop_uid: str | None = None,
) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid or generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = patient
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, 7, number
    ds.SeriesDescription = "AX T1 SE"
    ds.ImagePositionPatient = [0.0, 0.0, float(number)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing, ds.SliceThickness = [0.9, 0.9], 1.0
    ds.Rows = ds.Columns = size
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = np.random.default_rng(number).integers(0, 4000, (size, size), dtype=np.uint16).tobytes()
    return ds


def write_series(folder: Path, n: int = 4, **kw: Any) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    paths = []
    for i in range(n):
        p = folder / f"IM{i + 1:04d}.dcm"
        dataset(study, series, i + 1, **kw).save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def storescu(port: int, *paths: Path, aec: str = AET, aet: str = "STORESCU", extra: tuple[str, ...] = ()
             ) -> subprocess.CompletedProcess[str]:
    cmd = ["storescu", "-d", "-aet", aet, "-aec", aec, *extra, "127.0.0.1", str(port), *map(str, paths)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=DCMTK_ENV, check=False)


def echoscu(port: int, aec: str = AET, aet: str = "ECHOSCU", extra: tuple[str, ...] = ()
            ) -> subprocess.CompletedProcess[str]:
    cmd = ["echoscu", "-v", "-aet", aet, "-aec", aec, *extra, "127.0.0.1", str(port)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=DCMTK_ENV, check=False)


def dimse_statuses(run: subprocess.CompletedProcess[str]) -> list[int]:
    """The C-STORE response statuses storescu -d printed."""
    return [int(s, 16) for s in re.findall(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})", run.stdout + run.stderr)]


def pynetdicom_store(port: int, datasets: list[Dataset], aet: str = "PYSCU", raw_file: Path | None = None
                     ) -> list[int]:
    """Send with pynetdicom as SCU (it sends what storescu would refuse); the statuses."""
    ae = AE(ae_title=aet)
    classes = {str(ds.SOPClassUID) for ds in datasets} or {MRImageStorage}
    for uid in classes:
        ae.add_requested_context(uid, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title=AET)
    assert assoc.is_established
    try:
        out = []
        for ds in datasets:
            status = assoc.send_c_store(ds)
            out.append(int(status.Status))
        if raw_file is not None:
            status = assoc.send_c_store(raw_file)
            out.append(int(status.Status))
        return out
    finally:
        assoc.release()


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset of a Part 10 file, after its File Meta Information."""
    data = path.read_bytes()
    fp = io.BytesIO(data)
    pydicom.filereader.read_preamble(fp, False)
    pydicom.filereader._read_file_meta_info(fp)
    return data[fp.tell():]


def stored_files(root: Path) -> list[Path]:
    """Instances stored for the node to use (the quarantine is elsewhere)."""
    return sorted(p for p in (root / "incoming").rglob("*") if p.is_file())


def quarantined(root: Path) -> list[dict[str, Any]]:
    """The reasons kept beside each quarantined instance, oldest file name first."""
    return [json.loads(p.read_text()) for p in sorted((root / "quarantine").glob("*/*.json"))]


# --------------------------------------------------------------------------- storage helpers


def test_valid_uid() -> None:
    for good in ("1.2.840.10008.5.1.4.1.1.4", "0", "1.0.3", "2.25.1234567890123456789"):
        assert valid_uid(good), good
    for bad in ("", "1..2", ".1", "1.", "1.02", "01.2", "1.2/../../x", "1.2.a", "1 .2", "1." + "1" * 63,
                "1.2\x00", "../1"):
        assert not valid_uid(bad), bad


def test_instance_path_checks_every_uid(tmp_path: Path) -> None:
    assert instance_path(tmp_path, "1.2", "1.3", "1.4") == tmp_path / "incoming" / "1.2" / "1.3" / "1.4.dcm"
    with pytest.raises(UIDError, match=re.escape("SeriesInstanceUID '1.2/../x'")):
        instance_path(tmp_path, "1.2", "1.2/../x", "1.4")
    with pytest.raises(UIDError, match=r"SOPInstanceUID '1111+\.\.\.$"):  # a long value is truncated
        instance_path(tmp_path, "1.2", "1.3", "1" * 200)
    with pytest.raises(UIDError, match="StudyInstanceUID"):
        instance_path(tmp_path, "", "1.3", "1.4")


def test_write_durably_is_atomic_and_idempotent(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "x.dcm"
    write_durably(target, b"first")
    write_durably(target, memoryview(b"second"))
    assert target.read_bytes() == b"second"
    assert os.listdir(target.parent) == ["x.dcm"]  # no temp file left behind
    assert target.stat().st_mode & 0o777 == 0o640 & ~_umask()
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o750 & ~_umask()
    # A failing replace (the target is a folder) leaves no temp file and re-raises.
    (tmp_path / "a" / "b" / "dir.dcm").mkdir()
    with pytest.raises(OSError):
        write_durably(tmp_path / "a" / "b" / "dir.dcm", b"data")
    assert sorted(os.listdir(target.parent)) == ["dir.dcm", "x.dcm"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_free_gb_uses_the_nearest_existing_parent(tmp_path: Path) -> None:
    assert free_gb(tmp_path / "not" / "yet") == pytest.approx(free_gb(tmp_path), rel=0.01)
    assert 0.0 < free_gb(tmp_path / "x") < 1e9


def test_file_meta_bytes_parse_like_pydicom_meta() -> None:
    data = file_meta_bytes(MRImageStorage, "1.2.3", "1.2.840.10008.1.2.1", "PACS")
    fp = io.BytesIO(data)
    pydicom.filereader.read_preamble(fp, False)
    meta = pydicom.filereader._read_file_meta_info(fp)
    assert fp.tell() == len(data)
    assert meta.MediaStorageSOPClassUID == MRImageStorage
    assert meta.MediaStorageSOPInstanceUID == "1.2.3"
    assert meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert meta.SourceApplicationEntityTitle == "PACS"
    assert meta.FileMetaInformationGroupLength == len(data) - 132 - 12


def test_accepted_transfer_syntaxes_include_the_compressed_ones() -> None:
    ts = set(transfer_syntaxes())
    for uid in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99",
                "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
                "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81",
                "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.5"):
        assert uid in ts, uid


def test_read_header_stops_before_pixels_and_reads_deflated() -> None:
    ds = dataset(generate_uid(), generate_uid(), 1)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    stream = dataset_bytes_from(buf.getvalue())
    got = read_header(stream, "1.2.840.10008.1.2.1")
    assert got.dataset.SOPInstanceUID == ds.SOPInstanceUID and "PixelData" not in got.dataset
    # It stopped at the pixel data and knows its length and how many bytes follow.
    assert got.pixel_length == got.pixel_available == len(ds.PixelData) == 16 * 16 * 2
    deflated = ds.copy()
    deflated.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1.99"
    buf = io.BytesIO()
    deflated.save_as(buf, enforce_file_format=True)
    got = read_header(dataset_bytes_from(buf.getvalue()), "1.2.840.10008.1.2.1.99")
    assert got.dataset.SeriesInstanceUID == ds.SeriesInstanceUID
    with pytest.raises(ValueError):
        read_header(b"", "1.2.840.10008.1.2.1")


def dataset_bytes_from(data: bytes) -> bytes:
    fp = io.BytesIO(data)
    pydicom.filereader.read_preamble(fp, False)
    pydicom.filereader._read_file_meta_info(fp)
    return data[fp.tell():]


# --------------------------------------------------------------------------- association


@needs_dcmtk
def test_echo(start: Callable[..., tuple[Receiver, Sink]]) -> None:
    receiver, _ = start()
    run = echoscu(receiver.port)
    assert run.returncode == 0, run.stderr
    assert "Received Echo Response (Success)" in run.stdout + run.stderr


@needs_dcmtk
def test_wrong_called_ae_title_is_refused(start: Callable[..., tuple[Receiver, Sink]],
                                          caplog: pytest.LogCaptureFixture) -> None:
    receiver, _ = start()
    with caplog.at_level(logging.WARNING, logger="dicom_node.receiver"):
        run = echoscu(receiver.port, aec="SOMEONE_ELSE")
    assert run.returncode != 0
    assert "Called AE Title Not Recognized" in run.stdout + run.stderr
    refused = [r.getMessage() for r in caplog.records if "refused association" in r.getMessage()]
    assert refused and "'ECHOSCU' at 127.0.0.1" in refused[0] and "'SOMEONE_ELSE'" in refused[0]


@needs_dcmtk
def test_allowed_callers(start: Callable[..., tuple[Receiver, Sink]], caplog: pytest.LogCaptureFixture) -> None:
    receiver, _ = start(allowed_callers=[
        {"ae_title": "ANYWHERE"}, {"ae_title": "LOCAL", "host": "127.0.0.1"}, {"ae_title": "FAR", "host": "10.9.9.9"},
    ])
    assert echoscu(receiver.port, aet="ANYWHERE").returncode == 0
    assert echoscu(receiver.port, aet="LOCAL").returncode == 0
    with caplog.at_level(logging.WARNING, logger="dicom_node.receiver"):
        for aet in ("STRANGER", "FAR"):
            run = echoscu(receiver.port, aet=aet)
            assert run.returncode != 0, aet
            assert "Rejected Permanent" in run.stdout + run.stderr
            assert "Calling AE Title Not Recognized" in run.stdout + run.stderr
    messages = " | ".join(r.getMessage() for r in caplog.records)
    assert "'STRANGER' at 127.0.0.1: calling AE title not in node.allowed_callers" in messages
    assert "'FAR' at 127.0.0.1: calling AE title allowed only from 10.9.9.9" in messages


def test_too_many_associations_are_refused(start: Callable[..., tuple[Receiver, Sink]],
                                           caplog: pytest.LogCaptureFixture) -> None:
    receiver, _ = start(max_associations=1)
    ae = AE(ae_title="FIRST")
    ae.add_requested_context(Verification)
    held = ae.associate("127.0.0.1", receiver.port, ae_title=AET)
    assert held.is_established
    try:
        with caplog.at_level(logging.WARNING, logger="dicom_node.receiver"):
            second = ae.associate("127.0.0.1", receiver.port, ae_title=AET)
        assert second.is_rejected
        assert any("too many associations" in r.getMessage() for r in caplog.records)
    finally:
        held.release()


# --------------------------------------------------------------------------- storing


@needs_dcmtk
def test_store_series(tmp_path: Path, start: Callable[..., tuple[Receiver, Sink]]) -> None:
    receiver, sink = start()
    files = write_series(tmp_path / "src", 4)
    run = storescu(receiver.port, *files)
    assert run.returncode == 0, run.stderr
    assert dimse_statuses(run) == [0] * 4
    root = tmp_path / "storage"
    assert len(sink.items) == 4
    for src, item in zip(files, sorted(sink.items, key=lambda i: i.header.instance_number), strict=True):
        ds = pydicom.dcmread(src)
        assert item.path == instance_path(root, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        assert item.path.is_absolute() and item.path.is_file()
        assert item.relative_path == item.path.relative_to(root).as_posix()
        assert item.relative_path.startswith("incoming/")
        assert (item.sop_instance_uid, item.sop_class_uid) == (ds.SOPInstanceUID, MRImageStorage)
        assert (item.study_instance_uid, item.series_instance_uid) == (ds.StudyInstanceUID, ds.SeriesInstanceUID)
        assert item.transfer_syntax_uid == ExplicitVRLittleEndian
        assert item.size_bytes == item.path.stat().st_size
        assert (item.calling_ae_title, item.peer_address) == ("STORESCU", "127.0.0.1")
        assert item.routable
        assert item.header is not None and item.header.path == str(item.path)
        assert item.header.features.series_description == "AX T1 SE"
        assert item.header.positions == ((0.0, 0.0, float(ds.InstanceNumber)),)
        # The dataset is stored exactly as it was sent.
        assert dataset_bytes(item.path) == dataset_bytes(src)
        stored = pydicom.dcmread(item.path)
        assert stored.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert stored.file_meta.SourceApplicationEntityTitle == "STORESCU"
        assert np.array_equal(stored.pixel_array, ds.pixel_array)
    assert len(stored_files(root)) == 4


@needs_dcmtk
def test_repeated_send_is_idempotent(tmp_path: Path, start: Callable[..., tuple[Receiver, Sink]]) -> None:
    receiver, sink = start()
    files = write_series(tmp_path / "src", 2)
    assert storescu(receiver.port, *files).returncode == 0
    first = {p: p.read_bytes() for p in stored_files(tmp_path / "storage")}
    assert storescu(receiver.port, *files).returncode == 0
    again = {p: p.read_bytes() for p in stored_files(tmp_path / "storage")}
    assert first == again and len(again) == 2
    assert len(sink.items) == 4  # the sink sees the repeat; it decides what a duplicate means


@needs_dcmtk
def test_low_disk_refuses_with_out_of_resources(tmp_path: Path, start: Callable[..., tuple[Receiver, Sink]],
                                               caplog: pytest.LogCaptureFixture) -> None:
    receiver, sink = start(min_free_gb=1e9)
    files = write_series(tmp_path / "src", 2)
    with caplog.at_level(logging.WARNING, logger="dicom_node.receiver"):
        run = storescu(receiver.port, *files)
    assert run.returncode != 0
    assert dimse_statuses(run)[:1] == [STATUS_OUT_OF_RESOURCES]
    assert "Refused: Out of resources" in run.stdout + run.stderr
    assert stored_files(tmp_path / "storage") == [] and sink.items == []
    assert any("GB free" in r.getMessage() for r in caplog.records)


class Disk:
    """A free-space probe (GB) that answers from a script, one value per C-STORE, then the last forever."""

    def __init__(self, *free_gb: float) -> None:
        self.script = list(free_gb)
        self.calls = 0

    def __call__(self, path: Path) -> float:
        self.calls += 1
        return self.script.pop(0) if len(self.script) > 1 else self.script[0]


def test_low_disk_loses_nothing_accepted_and_recovers(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The disk drops below storage.min_free_gb in the middle of an association and comes back."""
    root = tmp_path / "storage"
    disk = Disk(100.0, 100.0, 1.5, 1.5, 100.0)
    sink = Sink()
    receiver = Receiver(make_config(root, min_free_gb=2.0), sink, free_space=disk)
    receiver.start()
    try:
        study, series = generate_uid(), generate_uid()
        sent = [dataset(study, series, n) for n in range(1, 7)]
        with caplog.at_level(logging.WARNING, logger="dicom_node.receiver"):
            statuses = pynetdicom_store(receiver.port, sent)
        assert statuses == [0, 0, STATUS_OUT_OF_RESOURCES, STATUS_OUT_OF_RESOURCES, 0, 0]
        assert sum("1.50 GB free, storage.min_free_gb is 2" in r.getMessage() for r in caplog.records) == 2
        accepted = [sent[i] for i in (0, 1, 4, 5)]
        # Nothing answered with success is missing or altered; nothing refused was written anywhere.
        on_disk = {p.stem: p for p in stored_files(root)}
        assert set(on_disk) == {str(ds.SOPInstanceUID) for ds in accepted}
        for ds in accepted:
            assert np.array_equal(pydicom.dcmread(on_disk[str(ds.SOPInstanceUID)]).pixel_array, ds.pixel_array)
        assert [i.sop_instance_uid for i in sink.items] == [str(ds.SOPInstanceUID) for ds in accepted]
        assert not (root / "quarantine").exists()
        # The sender retries the refused two once space is back: all six are there, each once.
        assert pynetdicom_store(receiver.port, [sent[2], sent[3]]) == [0, 0]
        assert sorted(p.stem for p in stored_files(root)) == sorted(str(ds.SOPInstanceUID) for ds in sent)
        assert len(sink.items) == 6 and disk.calls == 8
    finally:
        receiver.stop()


def test_one_patient_per_study_also_after_a_restart(tmp_path: Path, start: Callable[..., tuple[Receiver, Sink]]) -> None:
    study = generate_uid()
    first = ("Test^First", "PID-FIRST", "19800101")
    second = ("Test^Second", "PID-SECOND", "19900101")
    receiver, sink = start()
    assert pynetdicom_store(receiver.port, [dataset(study, generate_uid(), 1, patient=first),
                                            dataset(study, generate_uid(), 1, patient=second)]) == \
        [0, STATUS_DATASET_MISMATCH]
    assert len(sink.items) == 1
    receiver.stop()
    # A new receiver remembers nothing: it reads the patient back from the stored instance.
    receiver, sink = start()
    series = generate_uid()
    assert pynetdicom_store(receiver.port, [dataset(study, series, 1, patient=second),
                                            dataset(study, series, 2, patient=first)]) == [STATUS_DATASET_MISMATCH, 0]
    assert [i.header.instance_number for i in sink.items if i.header] == [2]
    assert [r["reason"] for r in quarantined(tmp_path / "storage")] == \
        ["PatientID differs from earlier instances of this study"] * 2
    assert "PID-" not in json.dumps(quarantined(tmp_path / "storage"))


def test_sink_refusal_and_failure(tmp_path: Path, start: Callable[..., tuple[Receiver, Sink]]) -> None:
    study, series = generate_uid(), generate_uid()
    receiver, _ = start(sink=Sink(StoreRefused(0xA7FE, "index is full")))
    assert pynetdicom_store(receiver.port, [dataset(study, series, 1)]) == [0xA7FE]
    # Any other sink error: 0xA700, the file stays (a retry is idempotent).
    receiver, sink = start(sink=Sink(RuntimeError("database is locked")))
    assert pynetdicom_store(receiver.port, [dataset(study, series, 2)]) == [STATUS_OUT_OF_RESOURCES]
    assert sink.items[0].path.is_file()


def test_path_characters_in_uids_are_refused(tmp_path: Path, start: Callable[..., tuple[Receiver, Sink]]) -> None:
    receiver, sink = start()
    study, series = generate_uid(), generate_uid()
    evil_sop = dataset(study, series, 1, sop_uid="1.2/../../../../x")
    evil_series = dataset(study, "1.2/../../..", 2)
    evil_study = dataset("..", series, 3)
    statuses = pynetdicom_store(receiver.port, [evil_sop, evil_series, evil_study, dataset(study, series, 4)])
    assert statuses == [STATUS_INVALID_UID] * 3 + [0]
    assert len(sink.items) == 1
    # Outside the quarantine (files named by content hash) only the good instance was written.
    quarantine = tmp_path / "storage" / "quarantine"
    files = [p for p in tmp_path.rglob("*") if p.is_file() and quarantine not in p.parents]
    assert files == [sink.items[0].path]
    kept = sorted(quarantine.glob("*/*.json"))
    assert len(kept) == 3 and all(re.fullmatch(r"[0-9a-f]{16}\.json", k.name) for k in kept)
    reasons = [json.loads(k.read_text()) for k in kept]
    assert {r["status"] for r in reasons} == {"0xC212"}
    assert all(k.with_suffix(".dcm").is_file() for k in kept)


def send_raw(port: int, path: Path, transfer_syntax: str = ExplicitVRLittleEndian) -> int:
    """Send a Part 10 file's dataset bytes untouched (pynetdicom reads the request's UIDs from its File Meta)."""
    meta = pydicom.filereader.read_file_meta_info(path)
    raw = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        ae = AE(ae_title="PYSCU")
        ae.add_requested_context(meta.MediaStorageSOPClassUID, transfer_syntax)
        assoc = ae.associate("127.0.0.1", port, ae_title=AET)
        assert assoc.is_established
        try:
            return int(assoc.send_c_store(path).Status)
        finally:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = raw


def with_meta(path: Path, stream: bytes, sop_class: str, sop_uid: str) -> Path:
    path.write_bytes(file_meta_bytes(sop_class, sop_uid, ExplicitVRLittleEndian, "") + stream)
    return path


def test_dataset_must_match_the_request(tmp_path: Path, start: Callable[..., tuple[Receiver, Sink]]) -> None:
    receiver, sink = start()
    good = dataset(generate_uid(), generate_uid(), 1)
    src = tmp_path / "good.dcm"
    good.save_as(src, enforce_file_format=True)
    stream = dataset_bytes(src)
    # The request (taken from the File Meta) names another instance, then another SOP class.
    assert send_raw(receiver.port, with_meta(tmp_path / "a.dcm", stream, MRImageStorage, generate_uid())) == \
        STATUS_DATASET_MISMATCH
    assert send_raw(receiver.port, with_meta(tmp_path / "b.dcm", stream, CTImageStorage, good.SOPInstanceUID)) == \
        STATUS_DATASET_MISMATCH
    assert sink.items == [] and stored_files(tmp_path / "storage") == []
    assert sorted(r["reason"] for r in quarantined(tmp_path / "storage")) == [
        "SOPClassUID differs from the request", "SOPInstanceUID differs from the request"]
    # The very same bytes with a matching request are stored as they are.
    assert send_raw(receiver.port, src) == 0
    assert dataset_bytes(sink.items[0].path) == stream


def test_unparseable_dataset_is_refused_and_the_receiver_keeps_serving(
    tmp_path: Path, start: Callable[..., tuple[Receiver, Sink]]
) -> None:
    receiver, sink = start()
    good = dataset(generate_uid(), generate_uid(), 1)
    # An undefined-length sequence whose "item" is a plain element: pydicom cannot read past it.
    broken = b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff" + b"\x08\x00\x16\x00UI\x04\x001.2\x00"
    src = with_meta(tmp_path / "broken.dcm", broken, MRImageStorage, good.SOPInstanceUID)
    assert send_raw(receiver.port, src) == STATUS_CANNOT_PARSE
    # Bytes that parse but lack the identity are not this SOP instance.
    assert send_raw(receiver.port, with_meta(tmp_path / "noise.dcm", bytes(range(256)) * 4, MRImageStorage,
                                             good.SOPInstanceUID)) == STATUS_DATASET_MISMATCH
    assert sink.items == [] and stored_files(tmp_path / "storage") == []
    assert sorted(r["status"] for r in quarantined(tmp_path / "storage")) == ["0xA900", "0xC210"]
    assert pynetdicom_store(receiver.port, [good]) == [0]
    assert len(sink.items) == 1


@needs_dcmtk
def test_non_mr_is_stored_but_not_routable(tmp_path: Path, start: Callable[..., tuple[Receiver, Sink]],
                                           caplog: pytest.LogCaptureFixture) -> None:
    receiver, sink = start()
    files = write_series(tmp_path / "ct", 3, sop_class=CTImageStorage, modality="CT")
    with caplog.at_level(logging.INFO, logger="dicom_node.receiver"):
        run = storescu(receiver.port, *files)
    assert run.returncode == 0, run.stderr
    assert len(sink.items) == 3 and not any(i.routable for i in sink.items)
    assert all(i.path.is_file() and i.sop_class_uid == CTImageStorage for i in sink.items)
    notes = [r.getMessage() for r in caplog.records if "never routed to the model" in r.getMessage()]
    assert len(notes) == 1 and "CT Image Storage" in notes[0] and sink.items[0].series_instance_uid in notes[0]


@needs_dcmtk
@needs_real
def test_real_secondary_capture_sr_and_enhanced_mr(start: Callable[..., tuple[Receiver, Sink]]) -> None:
    receiver, sink = start()
    sc = sorted((REAL / "dcm_qa_xa30i" / "19001_Perfusion_Weighted_SC").iterdir())[:3]
    sr = list((REAL / "dcm_qa_xa30i" / "99_Phoenix_Document").glob("*.dcm"))
    enhanced = list((REAL / "dcm_qa_xa30" / "6_anat-T1w_acq-tfl").glob("*.dcm"))
    run = storescu(receiver.port, *sc, *sr, *enhanced)
    assert run.returncode == 0, run.stderr
    by_uid = {i.sop_instance_uid: i for i in sink.items}
    assert len(by_uid) == 5
    for src in [*sc, *sr, *enhanced]:
        ds = pydicom.dcmread(src)
        item = by_uid[ds.SOPInstanceUID]
        assert item.routable == (src in enhanced)
        # storescu re-encodes on the way (undefined-length sequences get explicit lengths), so
        # compare element by element here ...
        assert pydicom.dcmread(item.path) == ds
    e = by_uid[pydicom.dcmread(enhanced[0], stop_before_pixels=True).SOPInstanceUID]
    assert e.header is not None and e.header.features.enhanced and len(e.header.positions) == 96
    # ... and byte for byte when the peer sends the file's bytes untouched.
    for src in (enhanced[0], sr[0]):
        sink.items.clear()
        assert send_raw(receiver.port, src) == 0
        assert dataset_bytes(sink.items[0].path) == dataset_bytes(src)


PROPOSE = {
    "1.2.840.10008.1.2.5": ("-xr",),
    "1.2.840.10008.1.2.4.70": ("-xs",),
    "1.2.840.10008.1.2.4.80": ("-xt",),
    "1.2.840.10008.1.2.4.90": ("-xv",),
}


@needs_dcmtk
@needs_real
def test_real_transfer_syntaxes_are_stored_as_sent(start: Callable[..., tuple[Receiver, Sink]]) -> None:
    """dcm_qa_ts: the same EPI mosaic in 7 transfer syntaxes; each stored in its own syntax, byte for byte."""
    receiver, sink = start()
    folder = REAL / "dcm_qa_ts" / "ax_asc_35sl"
    sources = {}
    for src in sorted(folder.glob("*.dcm")):
        meta = pydicom.dcmread(src, stop_before_pixels=True)
        sources[meta.SOPInstanceUID] = (src, meta.file_meta.TransferSyntaxUID)
        # storescu proposes uncompressed syntaxes only, unless told which compressed one to add.
        run = storescu(receiver.port, src, extra=PROPOSE.get(meta.file_meta.TransferSyntaxUID, ()))
        assert run.returncode == 0, (src.name, run.stderr[-2000:])
    assert len(sink.items) == 9
    expected = None
    for item in sink.items:
        src, ts = sources[item.sop_instance_uid]
        stored = pydicom.dcmread(item.path)
        if ts == "1.2.840.10008.1.2.2":  # storescu converts big endian to little endian on the way
            assert item.transfer_syntax_uid == stored.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        else:
            assert item.transfer_syntax_uid == stored.file_meta.TransferSyntaxUID == ts, src.name
            assert dataset_bytes(item.path) == dataset_bytes(src), src.name
        pixels = stored.pixel_array.astype(np.uint16)
        expected = pixels if expected is None else expected
        assert np.array_equal(pixels, expected), src.name
        assert item.header is not None and item.routable


@needs_dcmtk
def test_concurrent_associations(tmp_path: Path, start: Callable[..., tuple[Receiver, Sink]]) -> None:
    receiver, sink = start()
    a = write_series(tmp_path / "a", 5)
    b = write_series(tmp_path / "b", 5, sop_class=CTImageStorage, modality="CT")
    runs: list[subprocess.CompletedProcess[str]] = []
    threads = [threading.Thread(target=lambda f=f: runs.append(storescu(receiver.port, *f))) for f in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.returncode for r in runs] == [0, 0]
    assert len(sink.items) == 10 and len(stored_files(tmp_path / "storage")) == 10


def test_rle_over_pynetdicom(tmp_path: Path, start: Callable[..., tuple[Receiver, Sink]]) -> None:
    receiver, sink = start()
    ds = dataset(generate_uid(), generate_uid(), 1)
    ds.compress(RLELossless)
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(MRImageStorage, RLELossless)
    assoc = ae.associate("127.0.0.1", receiver.port, ae_title=AET)
    try:
        assert assoc.send_c_store(ds).Status == 0
    finally:
        assoc.release()
    (item,) = sink.items
    assert item.transfer_syntax_uid == RLELossless
    assert np.array_equal(pydicom.dcmread(item.path).pixel_array, ds.pixel_array)


# --------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_certificates(tmp_path_factory.mktemp("pki"))


@needs_dcmtk
def test_tls(tmp_path: Path, certificates: Path, start: Callable[..., tuple[Receiver, Sink]],
             caplog: pytest.LogCaptureFixture) -> None:
    d = certificates
    receiver, sink = start(tls={
        "enabled": True, "certificate": str(d / "server.crt"), "private_key": str(d / "server.key"),
        "ca_certificates": str(d / "ca.crt"), "require_client_certificate": True,
    })
    tls = ("+tls", str(d / "client.key"), str(d / "client.crt"), "+cf", str(d / "ca.crt"))
    run = echoscu(receiver.port, extra=tls)
    assert run.returncode == 0, run.stdout + run.stderr
    files = write_series(tmp_path / "src", 2)
    run = storescu(receiver.port, *files, extra=tls)
    assert run.returncode == 0, run.stdout + run.stderr
    assert len(sink.items) == 2 and dataset_bytes(sink.items[0].path) in {dataset_bytes(f) for f in files}
    with caplog.at_level(logging.WARNING, logger="dicom_node.receiver"):
        # Plain DICOM to the TLS port fails, and so does TLS without a client certificate.
        assert echoscu(receiver.port).returncode != 0
        assert echoscu(receiver.port, extra=("+tla", "+cf", str(d / "ca.crt"))).returncode != 0
        # The refusal is logged by the connection's own thread, possibly just after the client exits.
        wait_for(lambda: len([r for r in caplog.records if "refused TLS connection from 127.0.0.1" in r.getMessage()])
                 == 2, 10, "two refused TLS connections in the log")
    # The receiver still serves TLS peers afterwards.
    assert echoscu(receiver.port, extra=tls).returncode == 0


# --------------------------------------------------------------------------- no patient data in logs


@needs_dcmtk
def test_logs_carry_uids_but_no_patient_data(tmp_path: Path, start: Callable[..., tuple[Receiver, Sink]]) -> None:
    name, pid, birth = "Quuxly^Zebedee", "PID-8675309", "19121231"
    stream = io.StringIO()
    root = logging.getLogger()
    old_level, old_handlers = root.level, list(root.handlers)
    old_pnd = logging.getLogger("pynetdicom").level
    setup_logging("DEBUG", stream=stream)
    try:
        receiver, sink = start(sink=Sink())
        files = write_series(tmp_path / "src", 2, patient=(name, pid, birth))
        assert storescu(receiver.port, *files).returncode == 0
        # pynetdicom as SCU too (its DEBUG logs are in this process), plus refusals that log.
        ds = dataset(generate_uid(), generate_uid(), 9, patient=(name, pid, birth))
        bad = dataset(generate_uid(), "1.2/../x", 10, patient=(name, pid, birth))
        assert pynetdicom_store(receiver.port, [ds, bad]) == [0, STATUS_INVALID_UID]
        receiver.stop()
    finally:
        for h in list(root.handlers):
            if h not in old_handlers:
                root.removeHandler(h)
        root.setLevel(old_level)
        logging.getLogger("pynetdicom").setLevel(old_pnd)
    text = stream.getvalue()
    assert "DEBUG pynetdicom" in text  # DEBUG really was on
    for uid in [i.sop_instance_uid for i in sink.items]:
        assert uid in text
    for secret in (name, "Quuxly", "Zebedee", pid, birth):
        assert secret not in text


def test_log_filter_drops_dataset_dumps_and_credentials() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    old_level, old_handlers = root.level, list(root.handlers)
    try:
        setup_logging("DEBUG", stream=stream)
        assert _config.LOG_REQUEST_IDENTIFIERS is False and _config.LOG_RESPONSE_IDENTIFIERS is False
        lg = logging.getLogger("pynetdicom._handlers")
        for line in ("(0010,0010) PN [Secret^Name]", "  (Sequence item #1)", " 04 00 00 00 53 65 63 72",
                     "  Username: [secret-user]", "  Password: [hunter2]", "# DICOM Dataset"):
            lg.debug(line)
        lg.debug("Affected SOP Instance UID     : 1.2.3.4")
        logging.getLogger("pydicom").warning("Invalid value for VR PN: 'Secret^Name'")
        setup_logging("INFO", stream=stream)  # replaces its own handler, pynetdicom back to WARNING
        assert logging.getLogger("pynetdicom").level == logging.WARNING
        assert sum(getattr(h, "_dicom_node", False) for h in root.handlers) == 1
    finally:
        for h in list(root.handlers):
            if h not in old_handlers:
                root.removeHandler(h)
        root.setLevel(old_level)
    text = stream.getvalue()
    assert "1.2.3.4" in text
    for secret in ("Secret", "secret-user", "hunter2", "53 65 63", "DICOM Dataset"):
        assert secret not in text


def test_a_slow_store_logs_every_threads_stack_once(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A C-STORE stuck somewhere (here: the free-space probe) is reported with the stacks, and still answered."""
    monkeypatch.setattr("dicom_node.receiver.SLOW_STORE_SECONDS", 0.4)

    def slow_disk(_path: Path) -> float:
        time.sleep(1.5)
        return 100.0

    receiver = Receiver(make_config(tmp_path / "storage"), Sink(), free_space=slow_disk)
    receiver.start()
    try:
        ds = dataset(generate_uid(), generate_uid(), 1)
        with caplog.at_level(logging.WARNING, logger="dicom_node.receiver"):
            assert pynetdicom_store(receiver.port, [ds]) == [0]
        reports = [r.getMessage() for r in caplog.records if "has run for" in r.getMessage()]
        assert len(reports) == 1, reports
        assert str(ds.SOPInstanceUID) in reports[0]
        assert "in slow_disk" in reports[0] and "_handle_store" in reports[0]  # where it was waiting, and why
    finally:
        receiver.stop()
