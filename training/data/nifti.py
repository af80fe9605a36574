"""Cases from NIfTI folders: the synthetic studies' ``dicom-node phantom --format nifti`` output, or a site's
own data in the same layout::

    <case>/nifti/<role>.nii.gz          one or more of t1_bravo_post, t1_cube_pre, t1_cube_post, flair,
                                        co-registered (any grid of one frame; .nii also accepted)
    <case>/truth/label.nii.gz           lesion mask (non-zero = lesion), same frame
    <case>/truth/brain_mask.nii.gz      optional brain mask (for the voxel AUC)

The reference role is the first present in :data:`pipeline.roles.REFERENCE_PREFERENCE` (post-contrast T1,
as at inference). The case id is the folder name.
"""

from __future__ import annotations

import functools
from pathlib import Path

import SimpleITK as sitk

from pipeline.roles import ROLES, choose_reference
from training.data.cache import CaseSource, file_fingerprint
from training.data.case import Case, CaseError, find_case_folders

__all__ = ["find_image", "find_nifti_cases", "is_nifti_case", "load_nifti_case", "nifti_sources",
           "read_image"]


def find_image(folder: Path, stem: str) -> Path | None:
    """``folder/<stem>.nii.gz`` (or ``.nii``) when it exists."""
    for ext in (".nii.gz", ".nii"):
        p = folder / f"{stem}{ext}"
        if p.is_file():
            return p
    return None


def is_nifti_case(folder: Path) -> bool:
    """Whether ``folder`` has the layout above (at least one role image and a label)."""
    return (find_image(folder / "truth", "label") is not None
            and any(find_image(folder / "nifti", r) is not None for r in ROLES))


def find_nifti_cases(root: str | Path) -> list[Path]:
    """The case folders directly under ``root`` (or ``root`` itself when it is one), sorted by name."""
    return find_case_folders(root, is_nifti_case)


def read_image(path: Path, case_id: str) -> sitk.Image:
    """The image at ``path``; a :class:`CaseError` naming the case and the file name when unreadable."""
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unreadable"
        raise CaseError(f"case {case_id}: cannot read {path.name}: {first}") from None


def load_nifti_case(folder: str | Path) -> Case:
    """Read one case folder (see the module doc)."""
    folder = Path(folder)
    case_id = folder.name
    images = {}
    for role in ROLES:
        p = find_image(folder / "nifti", role)
        if p is not None:
            images[role] = read_image(p, case_id)
    label_path = find_image(folder / "truth", "label")
    if not images or label_path is None:
        raise CaseError(f"case {case_id}: needs nifti/<role>.nii.gz for at least one of {list(ROLES)} "
                        f"and truth/label.nii.gz")
    brain_path = find_image(folder / "truth", "brain_mask")
    return Case(
        case_id=case_id,
        reference_role=choose_reference(images),
        images=images,
        label=read_image(label_path, case_id),
        brain_mask=read_image(brain_path, case_id) if brain_path is not None else None,
        source=f"nifti:{folder}",
    )


def nifti_sources(root: str | Path) -> list[CaseSource]:
    """A :class:`CaseSource` per case folder under ``root`` (see :func:`find_nifti_cases`)."""
    out = []
    for folder in find_nifti_cases(root):
        files = [p for sub in ("nifti", "truth") for p in (folder / sub).iterdir() if p.is_file()]
        out.append(CaseSource(case_id=folder.name, kind="nifti", path=folder.resolve(),
                              fingerprint=file_fingerprint(files),
                              load=functools.partial(load_nifti_case, folder)))
    return out
