"""What reading DICOM needs before any image library: the one folder walk and the one functional-group lookup.

Kept apart from :mod:`pipeline.io` (SimpleITK) because the node's receiver, its sender and its command line use
them and must stay light to import.
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

__all__ = ["files_under", "functional_group"]


def files_under(root: str | PathLike[str]) -> list[Path]:
    """``root`` itself when it is a file, else every regular file under it (recursive), sorted by path: the one
    folder walk of the project (no extension filter: GE files have none)."""
    root = Path(root)
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file())


def functional_group(ds: Dataset, keyword: str, frame: int = 0) -> Any:
    """Functional group macro ``keyword`` (e.g. ``"PlanePositionSequence"``, a sequence) of 0-based ``frame`` of
    an enhanced (multi-frame) instance: the frame's Per-Frame Functional Groups item, else the Shared one (a
    macro belongs in one of them, PS3.3 C.7.6.16); None when neither has it. The one lookup of the project."""
    for seq_kw, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        groups = ds.get(seq_kw)
        try:
            macro = groups[index].get(keyword) if groups is not None and len(groups) > index else None
        except (TypeError, AttributeError):  # a malformed file: not a sequence of items
            macro = None
        if macro:
            return macro
    return None
