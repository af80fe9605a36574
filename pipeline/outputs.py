"""The files of one study's results and how they are written: ``seg.dcm`` (only with lesions), ``sr.dcm``,
``sc-0001.dcm``... (only when the Secondary Capture series is switched on: ``sc-0001.dcm`` the summary, then
one key image per lesion, named by Instance Number), ``overview.png`` and ``summary.json``.

Named here once for every reader (the node's storage publishes them, its dispatcher sends the DICOM ones).
A ``summary.json`` present means the folder's results are complete: it is always written (and moved) last.
"""

from __future__ import annotations

import json
import time
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.result import StudyResult

__all__ = ["OUTPUT_FILES", "OVERVIEW_FILE", "SC_PATTERN", "SEG_FILE", "SR_FILE", "SUMMARY_FILE", "dicom_files",
           "drop_stale_results", "result_names", "sc_file", "write_outputs"]

SEG_FILE = "seg.dcm"
SR_FILE = "sr.dcm"
OVERVIEW_FILE = "overview.png"
SUMMARY_FILE = "summary.json"
SC_PATTERN = "sc-*.dcm"  # the Secondary Capture instances (see sc_file)
#: The files of fixed name a result folder can hold, in the order they are written and published (summary.json
#: last); the Secondary Capture files (SC_PATTERN) come after SR_FILE.
OUTPUT_FILES = (SEG_FILE, SR_FILE, OVERVIEW_FILE, SUMMARY_FILE)


def sc_file(instance_number: int) -> str:
    """File name of the Secondary Capture instance ``instance_number`` (1 = the summary): ``sc-0001.dcm``."""
    return f"sc-{instance_number:04d}.dcm"


def _sc_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob(SC_PATTERN))


def result_names(folder: Path) -> list[str]:
    """The result files in ``folder``, in publishing order: SEG, SR, Secondary Capture, overview, summary."""
    names = [n for n in (SEG_FILE, SR_FILE) if (folder / n).exists()] + _sc_names(folder)
    return names + [n for n in (OVERVIEW_FILE, SUMMARY_FILE) if (folder / n).exists()]


def dicom_files(folder: Path) -> list[Path]:
    """The DICOM results in ``folder`` in sending order: SEG (when lesions), the SR that cites it, then the
    Secondary Capture instances (summary first)."""
    return [folder / n for n in result_names(folder) if n.endswith(".dcm")]


def drop_stale_results(folder: Path, keep: set[str]) -> None:
    """Remove the DICOM results of ``folder`` that the new results (file names ``keep``) do not have: a count-0
    SR must never sit next to an earlier run's SEG, nor key images of lesions no longer found."""
    for name in [SEG_FILE, *_sc_names(folder)]:
        if name not in keep and (folder / name).exists():
            (folder / name).unlink()


def write_outputs(result: StudyResult, out_dir: str | PathLike[str], *, overview: bool = True) -> dict[str, Path]:
    """Write ``result``'s files into ``out_dir`` (created), ``summary.json`` last so that its ``timings_s``
    includes ``outputs``. Returns name ("seg", "sr", "sc-0001"..., "overview", "summary") -> path of what was
    written."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    sc_names = [sc_file(int(ds.InstanceNumber)) for ds in result.secondary_capture]
    drop_stale_results(out, keep=set(sc_names) | ({SEG_FILE} if result.seg is not None else set()))
    if result.seg is not None:
        result.seg.save_as(out / SEG_FILE, enforce_file_format=True)
        written["seg"] = out / SEG_FILE
    result.sr.save_as(out / SR_FILE, enforce_file_format=True)
    written["sr"] = out / SR_FILE
    for name, ds in zip(sc_names, result.secondary_capture):
        ds.save_as(out / name, enforce_file_format=True)
        written[name.removesuffix(".dcm")] = out / name
    if overview:
        # numpy, SimpleITK and matplotlib load only when an overview is drawn: the node's storage module
        # imports this one for the file names.
        from pipeline.overview import write_overview

        written["overview"] = write_overview(result, out / OVERVIEW_FILE)
    result.timings_s["outputs"] = time.perf_counter() - t0
    result.timings_s["total"] = sum(v for k, v in result.timings_s.items() if k != "total")
    path = out / SUMMARY_FILE
    path.write_text(json.dumps(result.summary(), indent=2) + "\n", encoding="utf-8")
    written["summary"] = path
    return written
