"""The files of one study's results and how they are written: ``seg.dcm`` (only with lesions), ``sr.dcm``,
``overview.png`` and ``summary.json``.

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

__all__ = ["OUTPUT_FILES", "OVERVIEW_FILE", "SEG_FILE", "SR_FILE", "SUMMARY_FILE", "drop_stale_seg", "write_outputs"]

SEG_FILE = "seg.dcm"
SR_FILE = "sr.dcm"
OVERVIEW_FILE = "overview.png"
SUMMARY_FILE = "summary.json"
#: Every file a result folder can hold, in the order they are written and published (summary.json last).
OUTPUT_FILES = (SEG_FILE, SR_FILE, OVERVIEW_FILE, SUMMARY_FILE)


def drop_stale_seg(folder: Path, *, has_seg: bool) -> None:
    """Remove ``folder/seg.dcm`` when the new results have no SEG: a count-0 SR must never sit next to an
    earlier run's SEG."""
    stale = folder / SEG_FILE
    if not has_seg and stale.exists():
        stale.unlink()


def write_outputs(result: StudyResult, out_dir: str | PathLike[str], *, overview: bool = True) -> dict[str, Path]:
    """Write ``result``'s files into ``out_dir`` (created), ``summary.json`` last so that its ``timings_s``
    includes ``outputs``. Returns name ("seg", "sr", "overview", "summary") -> path of what was written."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    drop_stale_seg(out, has_seg=result.seg is not None)
    if result.seg is not None:
        result.seg.save_as(out / SEG_FILE, enforce_file_format=True)
        written["seg"] = out / SEG_FILE
    result.sr.save_as(out / SR_FILE, enforce_file_format=True)
    written["sr"] = out / SR_FILE
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
