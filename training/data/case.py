"""The unit every training data source yields: one patient's role images and ground truth.

A :class:`Case` is in the *reference frame*: ``images[reference_role]`` defines it, every other role either
lies on it already (co-registered NIfTI, BrainMetShare PNG stacks) or carries a rigid ``transforms[role]``
mapping reference points to that role's points (DICOM series registered by ``pipeline.registration``),
exactly as :func:`pipeline.preprocess.prepare_study` expects. Coordinates are LPS mm (SimpleITK/DICOM).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import SimpleITK as sitk

from pipeline.roles import ROLES

__all__ = ["Case", "CaseError", "check_case_id", "find_case_folders"]

_CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class CaseError(ValueError):
    """A case that cannot be used for training; ``str()`` names the case (by its id, never patient data)."""


def check_case_id(case_id: str) -> str:
    """``case_id`` when it is a safe folder name (letters, digits, ``._-``; <= 128 characters)."""
    if not _CASE_ID.match(case_id or ""):
        raise CaseError(f"case id {case_id!r}: use letters, digits, '.', '_' or '-' (at most 128 characters)")
    return case_id


def find_case_folders(root: str | Path, is_case: Callable[[Path], bool]) -> list[Path]:
    """The case folders directly under ``root`` (or ``root`` itself when it is one), sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise CaseError(f"{root}: not a folder")
    if is_case(root):
        return [root]
    return sorted(p for p in root.iterdir() if p.is_dir() and is_case(p))


@dataclass
class Case:
    """One patient. ``label``: lesion mask on any grid of the reference frame (non-zero = lesion);
    ``brain_mask``: optional, same convention (metrics use it for the voxel AUC); ``source``: where it came
    from (a path and the reader's kind), for logs and the model card."""

    case_id: str
    reference_role: str
    images: dict[str, sitk.Image]
    label: sitk.Image
    brain_mask: sitk.Image | None = None
    transforms: dict[str, sitk.Transform] = field(default_factory=dict)
    source: str = ""

    def __post_init__(self) -> None:
        check_case_id(self.case_id)
        unknown = sorted(set(self.images) - set(ROLES))
        if unknown:
            raise CaseError(f"case {self.case_id}: unknown role(s) {unknown}; known: {list(ROLES)}")
        if not self.images:
            raise CaseError(f"case {self.case_id}: no role image")
        if self.reference_role not in self.images:
            raise CaseError(f"case {self.case_id}: reference role {self.reference_role!r} has no image")
        for name, img in [("label", self.label), ("brain_mask", self.brain_mask), *self.images.items()]:
            if img is not None and img.GetDimension() != 3:
                raise CaseError(f"case {self.case_id}: {name} is not a 3D image")

    @property
    def roles_present(self) -> tuple[str, ...]:
        return tuple(r for r in ROLES if r in self.images)
