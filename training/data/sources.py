"""One entry point for every training data layout: ``find_sources(kind, path)`` -> the cases, not yet read.

``kind`` is ``nifti`` (:mod:`training.data.nifti`), ``dicom`` (:mod:`training.data.dicom`, needs
``assign_roles``) or ``brainmetshare`` (:mod:`training.data.brainmetshare`, optional ``spacing_mm``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

from training.data.brainmetshare import DEFAULT_SPACING_MM, brainmetshare_sources
from training.data.cache import CaseSource
from training.data.case import CaseError
from training.data.dicom import RoleAssigner, dicom_sources
from training.data.nifti import nifti_sources

__all__ = ["SourceKind", "find_sources"]

SourceKind = Literal["nifti", "dicom", "brainmetshare"]


def find_sources(kind: SourceKind, path: str | Path, *, assign_roles: RoleAssigner | None = None,
                 assignment_key: str = "", spacing_mm: tuple[float, float, float] | None = None,
                 ) -> list[CaseSource]:
    """The cases of layout ``kind`` under ``path``.

    ``assign_roles`` and ``assignment_key`` (see :func:`training.data.dicom.dicom_sources`) are for ``dicom``
    only, ``spacing_mm`` (column, row, slice) mm for ``brainmetshare`` only. Raises ``ValueError`` for an
    unknown kind or an option the kind does not take, :class:`CaseError` when ``path`` is not a folder or
    holds no case."""
    kinds = get_args(SourceKind)
    if kind not in kinds:
        raise ValueError(f"unknown data kind {kind!r}; expected one of {list(kinds)}")
    if kind != "dicom" and (assign_roles is not None or assignment_key):
        raise ValueError(f"assign_roles and assignment_key apply to dicom data only, not to {kind}")
    if kind != "brainmetshare" and spacing_mm is not None:
        raise ValueError(f"spacing_mm applies to brainmetshare data only ({kind} images carry their geometry)")
    if kind == "dicom":
        if assign_roles is None:
            raise ValueError("dicom data needs assign_roles (case folder -> role -> files), e.g. the node's "
                             "series rules (dicom_node.cli.roles_for_training)")
        sources = dicom_sources(path, assign_roles, assignment_key=assignment_key)
    elif kind == "brainmetshare":
        sources = brainmetshare_sources(path, spacing_mm or DEFAULT_SPACING_MM)
    else:
        sources = nifti_sources(path)
    if not sources:
        raise CaseError(f"{path}: no {kind} case found (see the layout in training/data/{kind}.py)")
    return sources
