"""Receive speed of the node's DICOM receiver against DCMTK storescp, for the same storescu transfer on loopback.

    .venv/bin/python bench/receive_speed.py [--instances 800] [--repeat 3] [--work DIR] [--nagle both|off|on]
                                            [--sink index|none] [--associations 1,4]

A synthetic classic MR series (256 x 256 uint16, ~130 KB per instance, Explicit VR Little Endian) is
generated once (kept under ``--work`` when given, else in a temporary folder). Each round sends the whole
study with K concurrent ``storescu +sd`` runs, one association each, the study split into K equal folders
(``--associations``: one table per K, default 1 and 4, as a PACS often opens several), to

* DCMTK ``storescp`` (default options, writing into a fresh temporary folder; note that storescp does
  NOT fsync the files it writes), and
* our :class:`dicom_node.receiver.Receiver` (in this process) with the node's own sink, the index on a
  fresh SQLite database (``--sink index``, default: the real receive path of ``dicom-node serve``) or
  none (``--sink none``: the receiver alone); it fsyncs every file and its folder before answering success,

* pynetdicom alone: an SCP that answers success without storing anything, with the receiver's maximum PDU
  size (the ceiling of any receiver on pynetdicom, the library the design requires),

timing each from the first storescu start to the last exit. The table gives the median over ``--repeat``
rounds of instances/s and MB/s (1 MB = 1e6 bytes of files sent) and the ratios ours / storescp and
ours / pynetdicom alone (target >= 0.90 of pynetdicom alone, issue #19).

Nagle: this Debian DCMTK build leaves Nagle's algorithm on unless the environment says ``TCP_NODELAY=1``;
then every C-STORE round trip with storescp stalls ~40 ms on delayed ACKs (storescp manages ~21
instances/s). ``--nagle both`` (default) runs both ways: ``on`` = DCMTK as shipped, ``off`` = DCMTK
tools started with ``TCP_NODELAY=1`` (storescp's best case, the meaningful comparison).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the loopback helpers the tests use

from node_harness import free_port, port_open, wait_for  # noqa: E402 - found through the path above

from dicom_node.config import NodeConfig  # noqa: E402
from dicom_node.logs import setup_logging  # noqa: E402
from dicom_node.receiver import MAX_PDU_SIZE, ReceivedInstance, Receiver  # noqa: E402

AE_TITLE = "ILD_NODE"


def make_study(folder: Path, n: int, size: int = 256) -> list[Path]:
    """``n`` classic MR instances of one series (``size`` x ``size`` uint16), realistic header, no PHI."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    head = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (0.4 * size) ** 2).astype(np.uint16) * 900
    paths = []
    for i in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = sop = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, sop
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = "20240101"
        ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = "120000"
        ds.Modality, ds.Manufacturer, ds.ManufacturerModelName = "MR", "GE MEDICAL SYSTEMS", "SIGNA Premier"
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Bench^Receive", "BENCH0001", "19700101", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyID, ds.SeriesNumber, ds.InstanceNumber, ds.AcquisitionNumber = "1", 5, i + 1, 1
        ds.SeriesDescription = ds.ProtocolName = "Sag 3D BRAVO"
        ds.ScanningSequence, ds.SequenceVariant = ["GR", "IR"], ["SS", "SP", "SK"]
        ds.ScanOptions, ds.MRAcquisitionType = ["FAST_GEMS", "EDR_GEMS"], "3D"
        ds.RepetitionTime, ds.EchoTime, ds.InversionTime, ds.FlipAngle = 7.6, 3.1, 450, 12
        ds.SliceThickness = ds.SpacingBetweenSlices = 1.0
        ds.ImagePositionPatient = [-120.0 + i * 0.3, -128.0, 128.0]
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
        ds.SliceLocation = -120.0 + i * 0.3
        ds.PixelSpacing = [1.0, 1.0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        pixels = head + rng.integers(0, 200, (size, size), dtype=np.uint16)
        ds.PixelData = pixels.astype(np.uint16).tobytes()
        path = folder / f"IM{i + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def study_files(work: Path, n: int) -> list[Path]:
    """Reuse ``work/mr<n>`` when it holds ``n`` files, else (re)generate it."""
    folder = work / f"mr{n}"
    files = sorted(folder.glob("*.dcm")) if folder.is_dir() else []
    if len(files) != n:
        shutil.rmtree(folder, ignore_errors=True)
        t0 = time.perf_counter()
        files = make_study(folder, n)
        print(f"generated {n} instances in {time.perf_counter() - t0:.1f} s under {folder}", flush=True)
    return files


def split_folders(files: list[Path], k: int, work: Path) -> list[Path]:
    """``files`` in ``k`` folders of (nearly) equal size (hard links), one per association."""
    parts = [work / f"part-{k}-{i}" for i in range(k)]
    for i, folder in enumerate(parts):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for f in files[i::k]:
            os.link(f, folder / f.name)
    return parts


def dcmtk_env(nagle: bool) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TCP_NODELAY", None)
    if not nagle:
        env["TCP_NODELAY"] = "1"
    return env


def storescu(port: int, folders: list[Path], nagle: bool) -> float:
    """Send each of ``folders`` over its own association, all at once; seconds from start to the last exit."""
    errors: list[str] = []

    def one(folder: Path) -> None:
        cmd = ["storescu", "-aec", AE_TITLE, "+sd", "-r", "127.0.0.1", str(port), str(folder)]
        run = subprocess.run(cmd, check=False, capture_output=True, text=True, env=dcmtk_env(nagle))
        if run.returncode != 0 or "E:" in run.stderr:
            errors.append(f"storescu failed ({run.returncode}): {run.stderr[-2000:]}")

    threads = [threading.Thread(target=one, args=(f,)) for f in folders]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise RuntimeError(errors[0])
    return elapsed


def round_storescp(folders: list[Path], n: int, nagle: bool) -> float:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="storescp-") as out:
        proc = subprocess.Popen(["storescp", "-aet", AE_TITLE, "-od", out, str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dcmtk_env(nagle))
        try:
            wait_for(lambda: port_open(port), 10, f"storescp on port {port}", interval=0.02)
            elapsed = storescu(port, folders, nagle)
        finally:
            proc.terminate()
            proc.wait(10)
        got = sum(1 for p in Path(out).iterdir() if p.is_file())
        if got != n:
            raise RuntimeError(f"storescp wrote {got} files, expected {n}")
    return elapsed


def round_ours(folders: list[Path], n: int, nagle: bool,
               sink_factory: Callable[[NodeConfig], Callable[[ReceivedInstance], object]] | None) -> float:
    with tempfile.TemporaryDirectory(prefix="receiver-") as out:
        base = NodeConfig()
        config = base.model_copy(update={
            "node": base.node.model_copy(update={"port": free_port(), "bind_address": "127.0.0.1"}),
            "storage": base.storage.model_copy(update={"root": Path(out), "min_free_gb": 0.0}),
        })
        count = [0]

        lock = threading.Lock()

        def no_op(instance: ReceivedInstance) -> None:
            with lock:
                count[0] += 1

        sink = sink_factory(config) if sink_factory is not None else no_op
        receiver = Receiver(config, sink)
        receiver.start()
        try:
            elapsed = storescu(receiver.port, folders, nagle)
        finally:
            receiver.stop()
        got = sum(1 for _ in (Path(out) / "incoming").rglob("*.dcm"))
        if got != n or (sink_factory is None and count[0] != n):
            raise RuntimeError(f"receiver stored {got} files (sink saw {count[0]}), expected {n}")
    return elapsed


def round_floor(folders: list[Path], n: int, nagle: bool) -> float:
    """pynetdicom alone: an SCP whose C-STORE handler answers success without looking at or storing anything.
    The ceiling of any receiver built on pynetdicom (the library the design requires)."""
    from pynetdicom import AE, evt
    from pynetdicom.presentation import AllStoragePresentationContexts

    ae = AE(ae_title=AE_TITLE)
    ae.maximum_pdu_size = MAX_PDU_SIZE  # as the receiver: the same PDUs come in
    for uid in (cx.abstract_syntax for cx in AllStoragePresentationContexts if cx.abstract_syntax):
        ae.add_supported_context(uid)
    seen = [0]
    lock = threading.Lock()

    def answer(_event: object) -> int:
        with lock:
            seen[0] += 1
        return 0x0000

    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, answer)])
    assert server is not None  # block=False returns the running server
    try:
        elapsed = storescu(port, folders, nagle)
    finally:
        server.shutdown()
    if seen[0] != n:
        raise RuntimeError(f"pynetdicom saw {seen[0]} instances, expected {n}")
    return elapsed


def index_sink(config: NodeConfig) -> Callable[[ReceivedInstance], object]:
    """The node's sink: the index on a fresh SQLite database beside the storage folder (WAL, as the default)."""
    from dicom_node.db import open_database
    from dicom_node.index import Index

    return Index(open_database(f"sqlite:///{config.storage.root / 'node.db'}")).record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--instances", type=int, default=800, help="instances in the study (default 800)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds per receiver; the median is reported (default 3)")
    ap.add_argument("--work", type=Path, help="keep the generated study here and reuse it (default: temporary)")
    ap.add_argument("--sink", choices=("index", "none"), default="index",
                    help="index: the node's index on SQLite, as `serve` runs it (default); none: the receiver alone")
    ap.add_argument("--nagle", choices=("both", "off", "on"), default="both",
                    help="DCMTK tools with Nagle's algorithm off (TCP_NODELAY=1), on (as shipped) or both (default)")
    ap.add_argument("--associations", default="1,4",
                    help="comma-separated numbers of concurrent associations, one table each (default 1,4)")
    ap.add_argument("--log-level", default="WARNING", help="log level during the runs (default WARNING)")
    args = ap.parse_args()
    counts = [int(k) for k in args.associations.split(",")]
    for tool in ("storescu", "storescp"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} (DCMTK) not found on PATH")
    setup_logging(args.log_level)
    sink_factory = index_sink if args.sink == "index" else None

    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="receive-speed-")
        work = Path(tmp.name)
    else:
        work = args.work
        work.mkdir(parents=True, exist_ok=True)
    try:
        files = study_files(work, args.instances)
        n = len(files)
        megabytes = sum(p.stat().st_size for p in files) / 1e6
        print(f"study: {n} instances, {megabytes:.1f} MB ({megabytes * 1e3 / n:.0f} KB each), Explicit VR LE; "
              f"storescu +sd, loopback; {args.repeat} rounds, alternating; {os.cpu_count()} CPUs")
        sink = "index on SQLite" if args.sink == "index" else "no sink"
        labels = {"storescp": "DCMTK storescp (default options, no fsync)", "ours": f"Receiver ({sink}, fsync per file)",
                  "floor": "pynetdicom alone (answers, stores nothing)"}
        modes = {"both": (False, True), "off": (False,), "on": (True,)}[args.nagle]
        for nagle in modes:
            for k in counts:
                folders = split_folders(files, k, work)
                title = "Nagle on (DCMTK as shipped)" if nagle else "Nagle off (DCMTK tools with TCP_NODELAY=1)"
                print(f"\n== {title}, {k} association(s)")
                times: dict[str, list[float]] = {"storescp": [], "ours": [], "floor": []}
                for r in range(args.repeat):
                    times["storescp"].append(round_storescp(folders, n, nagle))
                    times["ours"].append(round_ours(folders, n, nagle, sink_factory))
                    times["floor"].append(round_floor(folders, n, nagle))
                    print(f"  round {r + 1}: storescp {times['storescp'][-1]:.2f} s, ours {times['ours'][-1]:.2f} s, "
                          f"pynetdicom alone {times['floor'][-1]:.2f} s", flush=True)
                print(f"  {'receiver':<46} {'median s':>9} {'inst/s':>8} {'MB/s':>7}")
                med = {key: statistics.median(v) for key, v in times.items()}
                for key, label in labels.items():
                    print(f"  {label:<46} {med[key]:9.2f} {n / med[key]:8.0f} {megabytes / med[key]:7.1f}")
                to_floor = med["floor"] / med["ours"]
                print(f"  ratio ours / pynetdicom alone: {to_floor:.2f} (target >= 0.90: "
                      f"{'OK' if to_floor >= 0.9 else 'BELOW'}); ours / storescp: {med['storescp'] / med['ours']:.2f}; "
                      f"pynetdicom alone / storescp: {med['storescp'] / med['floor']:.2f}", flush=True)
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
