"""Issue #8, bad input: a corpus of malformed and hostile instances sent over the network to the real node.

Every attempt is built here from a small valid MR instance, written as a Part 10 file with a File
Meta header that names the request's SOP class / instance, and sent with pynetdicom, which sends the
data set bytes after the File Meta exactly as they are (DCMTK's storescu would refuse to read most
of them). Each must be refused with its status, logged with its reason (UIDs only) and, when its
bytes are the problem, kept in ``<storage>/quarantine`` with a JSON reason; or, for the study-level
cases, be stored and have its study skipped (or the odd instances left out) with a reason. The node
must keep serving: a good study sent afterwards comes back as SEG + SR at the destination.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
import test_node
from node_harness import NodeProcess, wait_for
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pynetdicom import AE, _config
from support.studies import lesion_study, write_study
from test_receiver import dataset

from dicom_node.receiver import (
    STATUS_CANNOT_PARSE,
    STATUS_DATASET_MISMATCH,
    STATUS_INCONSISTENT,
    STATUS_INVALID_UID,
    file_meta_bytes,
)
from dicom_node.scu import keep_answers_the_reactor_takes
from dicom_node.storage import quarantine_count

pytestmark = pytest.mark.slow

# test_node's module fixtures: one node with a DCMTK storescp destination, and its known-function model.
node, model = test_node.node, test_node.model

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
# Distinctive patient data: none of it may appear in the node's log or in a quarantine reason.
PATIENT = ("Hostile^Corpus^Phi", "PHI-CORPUS-4711", "19700101")
OTHER_PATIENT = ("Other^Patient^Phi", "PHI-OTHER-0815", "19800101")
SUCCESS = 0x0000


@dataclass(frozen=True)
class Attempt:
    """One C-STORE of the corpus and what the node must answer."""

    name: str  # what is wrong with it (the table's first column)
    stream: bytes  # the data set bytes as sent
    sop_class: str  # the request's Affected SOP Class UID
    sop_uid: str  # the request's Affected SOP Instance UID
    expect: int  # the C-STORE status the node must answer
    reason: str = ""  # for a refusal: a regular expression its logged reason must match
    transfer_syntax: str = ExplicitVRLittleEndian


def encode(ds: Dataset, *, implicit: bool = False) -> bytes:
    """The data set encoded as it goes on the wire (little endian, no File Meta)."""
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = implicit, True
    write_dataset(fp, ds)
    return fp.getvalue()


def element_offset(stream: bytes, tag: int) -> int:
    """Where the element ``tag`` starts in an encoded little endian data set (its first occurrence)."""
    key = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    at = stream.find(key)
    assert at >= 0, f"({tag >> 16:04X},{tag & 0xFFFF:04X}) not in the stream"
    return at


def mr(study: str, series: str, number: int = 1, **kw: object) -> Dataset:
    return dataset(study, series, number, patient=PATIENT, **kw)  # type: ignore[arg-type]


def without(ds: Dataset, *keywords: str) -> Dataset:
    for k in keywords:
        delattr(ds, k)
    return ds


def non_image(ds: Dataset, sop_class: str, modality: str) -> Dataset:
    """``ds`` turned into an object without pixel data (an SR, say) of ``sop_class``."""
    without(ds, "PixelData", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
            "SamplesPerPixel", "PhotometricInterpretation", "ImagePositionPatient", "ImageOrientationPatient",
            "PixelSpacing", "SliceThickness")
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.Modality = modality
    ds.SeriesDescription = modality
    return ds


def attempt_of(name: str, ds: Dataset, expect: int, reason: str = "", **kw: object) -> Attempt:
    """An attempt whose request names the data set's own SOP class and instance."""
    return Attempt(name, encode(ds), str(ds.SOPClassUID), str(ds.SOPInstanceUID), expect, reason, **kw)  # type: ignore[arg-type]


def corpus(tmp: Path) -> tuple[list[Attempt], dict[str, str]]:
    """The malformed / hostile attempts in the order sent, and study name -> StudyInstanceUID of the
    study-level cases (stored, then skipped by the router)."""
    out: list[Attempt] = []
    study, series = generate_uid(), generate_uid()

    good = mr(study, series, 1)
    enc = encode(good)
    ipp = element_offset(enc, 0x00200032)
    out.append(Attempt("truncated in the header (inside ImagePositionPatient)", enc[: ipp + 8 + 3], MRImageStorage,
                       str(good.SOPInstanceUID), STATUS_INCONSISTENT, r"truncated: element \(0020,0032\)"))
    out.append(Attempt("truncated inside PixelData (100 bytes missing)", enc[:-100], MRImageStorage,
                       str(good.SOPInstanceUID), STATUS_INCONSISTENT, "truncated pixel data: 412 of 512 bytes"))
    p10 = tmp / "p10.dcm"
    good.save_as(p10, enforce_file_format=True)
    out.append(Attempt("a whole Part 10 file (preamble, DICM, File Meta) as the data set", p10.read_bytes(),
                       MRImageStorage, str(good.SOPInstanceUID), STATUS_DATASET_MISMATCH, "differs from the request"))
    noise = bytes(range(256)) * 8
    out.append(Attempt("2 KB of non-DICOM bytes", noise, MRImageStorage, generate_uid(), STATUS_DATASET_MISMATCH,
                       "differs from the request"))
    out.append(Attempt("zero-size data set", b"", MRImageStorage, generate_uid(), STATUS_CANNOT_PARSE,
                       r"cannot parse dataset \(ValueError\)"))

    ds2 = mr(study, series, 2)
    bad_vr = bytearray(encode(ds2))
    at = element_offset(bytes(bad_vr), 0x0008103E)
    bad_vr[at + 4: at + 6] = b"ZZ"
    out.append(Attempt("bad VR ('ZZ' on SeriesDescription)", bytes(bad_vr), MRImageStorage, str(ds2.SOPInstanceUID),
                       STATUS_INCONSISTENT, r"unknown VR 'ZZ' in element \(0008,103E\)"))

    ds3 = mr(study, series, 3)
    huge = bytearray(encode(ds3, implicit=True))
    at = element_offset(bytes(huge), 0x00200011)  # SeriesNumber (IS: at most 12 bytes)
    huge[at + 4: at + 8] = struct.pack("<I", 0xFFFFFFF0)
    out.append(Attempt("length 0xFFFFFFF0 on SeriesNumber (implicit VR)", bytes(huge), MRImageStorage,
                       str(ds3.SOPInstanceUID), STATUS_INCONSISTENT,
                       r"truncated: element \(0020,0011\) holds \d+ of the 4294967280 bytes",
                       transfer_syntax=ImplicitVRLittleEndian))

    no_sop = mr(study, series, 4)
    out.append(Attempt("no SOPInstanceUID in the data set", encode(without(no_sop, "SOPInstanceUID")),
                       MRImageStorage, str(no_sop.file_meta.MediaStorageSOPInstanceUID), STATUS_DATASET_MISMATCH,
                       "SOPInstanceUID differs from the request"))
    out.append(attempt_of("no StudyInstanceUID", without(mr(study, series, 5), "StudyInstanceUID"), STATUS_INVALID_UID,
                          "invalid StudyInstanceUID ''"))
    out.append(attempt_of("no SeriesInstanceUID", without(mr(study, series, 6), "SeriesInstanceUID"),
                          STATUS_INVALID_UID, "invalid SeriesInstanceUID ''"))
    out.append(attempt_of("SOPInstanceUID '1.2/../../../x' (path characters)",
                          mr(study, series, 7, sop_uid="1.2/../../../x"), STATUS_INVALID_UID,
                          "invalid SOPInstanceUID '1.2/../../../x'"))
    out.append(attempt_of("StudyInstanceUID '../../etc' (path characters)", mr("../../etc", series, 8),
                          STATUS_INVALID_UID, "invalid StudyInstanceUID '../../etc'"))
    ds9 = mr(study, series, 9)
    out.append(Attempt("SOP class in the data set (MR) differs from the request (CT)", encode(ds9), CTImageStorage,
                       str(ds9.SOPInstanceUID), STATUS_DATASET_MISMATCH, "SOPClassUID differs from the request"))
    wrong_size = mr(study, series, 10)
    wrong_size.Rows = wrong_size.Columns = 32
    out.append(attempt_of("PixelData for 16 x 16, Rows x Columns say 32 x 32", wrong_size, STATUS_INCONSISTENT,
                          "pixel data of 512 bytes, .* need 2048"))
    frames = mr(study, series, 11)
    frames.NumberOfFrames = 3
    out.append(attempt_of("NumberOfFrames 3, PixelData of one frame", frames, STATUS_INCONSISTENT,
                          "pixel data of 512 bytes, .* need 1536"))
    out.append(attempt_of("MR image without PixelData", without(mr(study, series, 12), "PixelData"),
                          STATUS_INCONSISTENT, "image without pixel data"))
    # One study, two patients: the first patient's instance is kept, the other's is refused.
    mixed_study = generate_uid()
    out.append(attempt_of("mixed patients: first patient's instance", mr(mixed_study, generate_uid(), 1), SUCCESS))
    out.append(attempt_of("mixed patients: same study, another PatientID",
                          dataset(mixed_study, generate_uid(), 1, patient=OTHER_PATIENT), STATUS_DATASET_MISMATCH,
                          "PatientID differs from earlier instances of this study"))

    # Study-level cases: valid objects, stored; the router skips their studies with a reason.
    studies = {name: generate_uid() for name in ("one slice", "CT", "SR", "SC")}
    out.append(attempt_of("a 1-slice MR series (its own study)", mr(studies["one slice"], generate_uid(), 1), SUCCESS))
    ct_series = generate_uid()
    for n in (1, 2, 3):
        out.append(attempt_of(f"CT series, slice {n} (its own study)",
                              mr(studies["CT"], ct_series, n, sop_class=CTImageStorage, modality="CT"), SUCCESS))
    out.append(attempt_of("an SR alone (its own study)",
                          non_image(mr(studies["SR"], generate_uid(), 1), BASIC_TEXT_SR, "SR"), SUCCESS))
    out.append(attempt_of("a secondary capture alone (its own study)",
                          mr(studies["SC"], generate_uid(), 1, sop_class=SecondaryCaptureImageStorage,
                             modality="OT"), SUCCESS))
    return out, studies


def send(port: int, attempts: list[Attempt], folder: Path) -> list[int]:
    """Send every attempt on one association (pynetdicom reads each request from the file's File Meta
    and sends the bytes after it untouched); the statuses."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, a in enumerate(attempts):
        path = folder / f"{i:03d}.dcm"
        path.write_bytes(file_meta_bytes(a.sop_class, a.sop_uid, a.transfer_syntax, "") + a.stream)
        paths.append(path)
    ae = AE(ae_title="HOSTILE")
    for sop_class in sorted({a.sop_class for a in attempts}):
        for ts in sorted({a.transfer_syntax for a in attempts}):
            ae.add_requested_context(sop_class, ts)
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes, never a re-encoded data set
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="ILD_NODE")
        assert assoc.is_established
        # this raw pynetdicom sender meets the same lost-answer race as the node's (#19): the same mend
        keep_answers_the_reactor_takes(assoc)
        try:
            return [int(assoc.send_c_store(p).Status) for p in paths]
        finally:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked


def table(rows: list[tuple[str, str]]) -> str:
    width = max(len(a) for a, _ in rows)
    return "\n".join(f"| {a:<{width}} | {b} |" for a, b in [("input", "outcome"), ("-" * width, "-------"), *rows])


def test_corpus_is_refused_or_quarantined_and_a_good_study_follows(node: NodeProcess, tmp_path: Path) -> None:
    attempts, studies = corpus(tmp_path)
    statuses = send(node.port, attempts, tmp_path / "corpus")
    storage = Path(node.settings["storage"]["root"])
    log = wait_for(lambda: node.log() if node.log().count("refused SOP instance") >= sum(
        a.expect != SUCCESS for a in attempts) else None, 10, "every refusal in the log")
    # One association: its C-STOREs are handled in order, so the k-th refusal line is the k-th refused attempt's.
    refusals = iter(re.findall(r"refused SOP instance (.+?) \((0x[0-9A-F]{4})\): (.*)", log))
    rows: list[tuple[str, str]] = []
    for a, got in zip(attempts, statuses, strict=True):
        if got == SUCCESS:
            rows.append((a.name, "0x0000 stored"))
            continue
        _, status, reason = next(refusals, ("", "", "(no log line)"))
        rows.append((a.name, f"0x{got:04X} {reason}"))
        assert status == f"0x{got:04X}" and re.search(a.reason, reason), (a.name, status, reason)
    assert statuses == [a.expect for a in attempts], table(rows)

    # Every refusal of non-empty bytes is in quarantine with its status and reason, nowhere else.
    kept = [json.loads(p.read_text()) for p in sorted((storage / "quarantine").glob("*/*.json"))]
    refused = [a for a in attempts if a.expect != SUCCESS and a.stream]
    assert sorted(k["status"] for k in kept) == sorted(f"0x{a.expect:04X}" for a in refused)
    assert quarantine_count(storage) == len(refused)
    # ... and `dicom-node status` (the real CLI) tells the admin how many.
    cli = node.cli("status", "--json")
    assert cli.returncode == 0 and json.loads(cli.stdout)["quarantined"] == len(refused), cli.stderr
    for k in kept:
        assert (storage / "quarantine").joinpath(k["quarantined_at"][:10].replace("-", ""), k["file"]).is_file()
    incoming = {p.name for p in (storage / "incoming").rglob("*.dcm")}
    assert incoming == {f"{a.sop_uid}.dcm" for a in attempts if a.expect == SUCCESS}

    # Study-level cases: stored, and their studies skipped with the reason.
    for name, why in (("one slice", "not a volume"), ("CT", "no usable series"), ("SR", "no usable series"),
                      ("SC", "no usable series")):
        st = node.wait_state(studies[name], {"skipped"}, timeout=30)
        assert why in st["case"]["error"], (name, st["case"])
        rows.append((f"study of: {name}", f"stored; study skipped: {st['case']['error']}"))
    print("\n" + table(rows))

    # The node keeps serving: a good study, with an SR and a secondary capture put into its FLAIR
    # series (sent in the same association, after the images), is processed; the two are left out.
    good = tmp_path / "good"
    write_study(lesion_study(3), good)
    files = sorted(p for p in good.rglob("*.dcm"))
    datasets = [pydicom.dcmread(p) for p in files]
    flair = next(ds for ds in datasets if "FLAIR" in str(ds.SeriesDescription).upper())
    intruders = []
    for sop_class, modality in ((BASIC_TEXT_SR, "SR"), (SecondaryCaptureImageStorage, "OT")):
        ds = dataset(str(flair.StudyInstanceUID), str(flair.SeriesInstanceUID), 999, sop_class=sop_class,
                     modality=modality, patient=(str(flair.PatientName), str(flair.PatientID),
                                                 str(flair.get("PatientBirthDate", ""))))
        intruders.append(non_image(ds, sop_class, modality) if modality == "SR" else ds)
    assert set(send(node.port, [attempt_of("good", ds, SUCCESS) for ds in datasets + intruders],
                    tmp_path / "good_sent")) == {SUCCESS}
    uid = str(flair.StudyInstanceUID)
    case = node.wait_state(uid, {"sent"})["case"]
    assert {"t1_cube_post", "flair"} <= set(case["roles"])
    assert re.search(rf"study {re.escape(uid)} series {re.escape(str(flair.SeriesInstanceUID))}: 2 instance\(s\) "
                     "of another SOP class than the series left out", node.log())

    def results() -> set[str] | None:
        got = {str(pydicom.dcmread(p, stop_before_pixels=True).Modality) for p in node.dest.rglob("*") if p.is_file()
               and str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID) == uid}
        return got if {"SEG", "SR"} <= got else None

    wait_for(results, 20, "SEG and SR of the good study at the destination")
    assert node.proc is not None and node.proc.poll() is None

    # No patient data in the log or in a quarantine reason.
    text = node.log() + json.dumps(kept)
    for value in (*PATIENT[:2], *OTHER_PATIENT[:2]):
        assert value not in text
