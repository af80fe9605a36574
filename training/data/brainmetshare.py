"""Cases from the Stanford BrainMetShare layout: co-registered, skull-stripped PNG slice stacks::

    <root>/<case>/0/*.png      t1_bravo_post  (post-contrast T1 3D gradient echo)
    <root>/<case>/1/*.png      t1_cube_pre    (pre-contrast T1 3D fast spin echo)
    <root>/<case>/2/*.png      t1_cube_post   (post-contrast T1 3D fast spin echo)
    <root>/<case>/3/*.png      flair
    <root>/<case>/seg/*.png    lesion mask (0 / 255; lesion where > 0)

A missing role folder is a missing role (at least one is needed, and ``seg``). Slices are ordered by the last
number in the file name, numerically (``2.png`` before ``10.png``); every folder of a case must hold the same
number of slices of one size. 8- or 16-bit greyscale PNGs are read as they are; colour or palette PNGs are
converted to 8-bit grey (ITU-R 601 luma).

PNGs carry no geometry, so every image of a case is put on one grid: voxel size ``spacing_mm`` = (column,
row, slice) mm, origin 0, identity direction in LPS: column index -> patient left, row index -> posterior (PNG
rows are taken as anterior -> posterior, the radiological display of axial slices), slice index -> superior.
Only the voxel size matters to the model (the grid is resampled to the model's); a flipped axis would not.
The default (0.94, 0.94, 1.0) mm is an assumption (a 0.94 mm in-plane, 1 mm slice 3D protocol): the
voxel size of the released PNGs could not be confirmed from a published source, so pass the right one when
known.

There is no brain mask (the images are skull-stripped): :func:`training.data.cache.prepare_case` falls back to
the head foreground. The reference role is the first present in :data:`pipeline.roles.REFERENCE_PREFERENCE`.
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image

from pipeline.roles import choose_reference
from training.data.cache import CaseSource, file_fingerprint
from training.data.case import Case, CaseError, find_case_folders

__all__ = ["DEFAULT_SPACING_MM", "FOLDERS", "brainmetshare_sources", "find_brainmetshare_cases",
           "load_brainmetshare_case"]

FOLDERS: dict[str, str] = {"0": "t1_bravo_post", "1": "t1_cube_pre", "2": "t1_cube_post", "3": "flair"}
"""Folder name -> role."""
DEFAULT_SPACING_MM: tuple[float, float, float] = (0.94, 0.94, 1.0)
"""Assumed voxel size (column, row, slice) in mm; see the module doc."""

_NUMBER = re.compile(r"\d+")
_GREY_BANDS = {("L",), ("I",), ("F",), ("1",)}  # 8-bit, 16/32-bit integer, float, bilevel: read as they are


def _is_case(folder: Path) -> bool:
    return any((folder / name).is_dir() for name in (*FOLDERS, "seg"))


def find_brainmetshare_cases(root: str | Path) -> list[Path]:
    """The case folders directly under ``root`` (or ``root`` itself when it is one), sorted by name."""
    return find_case_folders(root, _is_case)


def _slices(folder: Path, case_id: str) -> list[Path]:
    """The PNGs of ``folder`` in numeric order of the last number of their names."""
    numbered = []
    for p in folder.iterdir():
        if p.is_file() and p.suffix.lower() == ".png":
            numbers = _NUMBER.findall(p.stem)
            if not numbers:
                raise CaseError(f"case {case_id}: {folder.name}/{p.name} has no slice number in its name")
            numbered.append((int(numbers[-1]), p))
    numbered.sort()
    if len({n for n, _ in numbered}) != len(numbered):
        raise CaseError(f"case {case_id}: folder {folder.name} has two PNGs with one slice number")
    if not numbered:
        raise CaseError(f"case {case_id}: folder {folder.name} holds no PNG")
    return [p for _, p in numbered]


def _read_png(path: Path, case_id: str) -> np.ndarray:
    try:
        with Image.open(path) as img:
            grey = img if img.getbands() in _GREY_BANDS else img.convert("L")
            return np.asarray(grey, dtype=np.float32)
    except OSError as exc:  # also PIL's UnidentifiedImageError
        raise CaseError(f"case {case_id}: cannot read {path.parent.name}/{path.name}: {exc}") from None


def _stack(folder: Path, case_id: str) -> np.ndarray:
    """The PNGs of ``folder`` as a float32 (slice, row, column) array."""
    planes = [_read_png(p, case_id) for p in _slices(folder, case_id)]
    if len({p.shape for p in planes}) != 1:
        raise CaseError(f"case {case_id}: folder {folder.name} holds PNGs of different sizes")
    return np.stack(planes)


def _image(array: np.ndarray, spacing_mm: tuple[float, float, float]) -> sitk.Image:
    img = sitk.GetImageFromArray(array)  # origin 0, identity direction
    img.SetSpacing([float(s) for s in spacing_mm])
    return img


def load_brainmetshare_case(folder: str | Path,
                            spacing_mm: tuple[float, float, float] = DEFAULT_SPACING_MM) -> Case:
    """Read one case folder (see the module doc)."""
    folder = Path(folder)
    case_id = folder.name
    if not (folder / "seg").is_dir():
        raise CaseError(f"case {case_id}: no seg folder (the lesion mask)")
    stacks = {"seg": _stack(folder / "seg", case_id)}
    stacks.update({name: _stack(folder / name, case_id) for name in FOLDERS if (folder / name).is_dir()})
    if len(stacks) == 1:
        raise CaseError(f"case {case_id}: none of the role folders {sorted(FOLDERS)} is present")
    shape = stacks["seg"].shape
    for name, stack in stacks.items():
        if stack.shape != shape:
            raise CaseError(f"case {case_id}: folder {name} has {stack.shape[0]} slices of {stack.shape[2]} x "
                            f"{stack.shape[1]}, seg has {shape[0]} of {shape[2]} x {shape[1]}")
    images = {FOLDERS[name]: _image(stacks[name], spacing_mm) for name in FOLDERS if name in stacks}
    return Case(
        case_id=case_id,
        reference_role=choose_reference(images),
        images=images,
        label=_image((stacks["seg"] > 0).astype(np.uint8), spacing_mm),
        source=f"brainmetshare:{folder}",
    )


def brainmetshare_sources(root: str | Path,
                          spacing_mm: tuple[float, float, float] = DEFAULT_SPACING_MM) -> list[CaseSource]:
    """A :class:`CaseSource` per case folder under ``root`` (see :func:`find_brainmetshare_cases`).

    The voxel size is part of the fingerprint: another ``spacing_mm`` rebuilds the cached cases."""
    if len(spacing_mm) != 3 or not all(s > 0 for s in spacing_mm):
        raise ValueError(f"spacing_mm must be three positive sizes (column, row, slice) in mm, got {spacing_mm}")
    out = []
    for folder in find_brainmetshare_cases(root):
        files = [p for name in (*FOLDERS, "seg") if (folder / name).is_dir()
                 for p in (folder / name).iterdir() if p.is_file()]
        fingerprint = file_fingerprint(files) + "-" + "x".join(f"{s:g}" for s in spacing_mm)
        out.append(CaseSource(case_id=folder.name, kind="brainmetshare", path=folder.resolve(),
                              fingerprint=fingerprint, load=partial(load_brainmetshare_case, folder, spacing_mm)))
    return out
