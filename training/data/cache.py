"""Cases pre-processed once, by the SAME code as inference, and kept on disk so that epochs only read arrays.

:func:`prepare_case` runs :func:`pipeline.preprocess.prepare_study` (model grid of the reference role,
resampling through the registration transforms, per-slice normalisation) and resamples the label and brain
mask onto that grid by nearest neighbour. :func:`cache_case` stores the result under
``<cache>/<case_id>-<key>/``::

    meta.json       case id, source, reference role, roles present, grid geometry, spacing (slice, row, column)
                    mm, lesion count (26-connected), slices with lesion, cache key
    <role>.npy      float16 (slice, row, column) normalised to [0, 1], one per present role
    label.npy       uint8 0/1 lesion mask on the model grid
    brain.npy       uint8 0/1 brain mask (the source's; without one, the head foreground, see below)

The key hashes the source's fingerprint (file sizes and modification times), the grid settings, the
normalisation version and :data:`CACHE_VERSION`: change any and the case is rebuilt; otherwise it is read back
with memory-mapping (no copy until a slice is used). Writing goes to a temporary folder renamed into place, so
an interrupted run never leaves a half-written case that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from pipeline.lesions import STRUCTURE_26
from pipeline.preprocess import (
    NORMALISATION_NAME,
    NORMALISATION_VERSION,
    PreparedStudy,
    prepare_study,
    resample_to_grid,
)
from pipeline.roles import ROLES
from training.data.case import Case, CaseError

__all__ = ["CACHE_VERSION", "CachedCase", "CaseSource", "GridSettings", "cache_case", "file_fingerprint",
           "prepare_case"]

CACHE_VERSION = "1"
_KEY = re.compile(r"[0-9a-f]{12}")
_HEAD_FRACTION = 0.05  # of the normalised range: above it a voxel is head, not air (masks missing brain masks)


@dataclass(frozen=True)
class GridSettings:
    """The model grid a cache is built for (must match the model's checkpoint)."""

    size: int = 256
    through_plane_mm: float = 1.0
    slices_per_role: int = 5


@dataclass(frozen=True)
class CaseSource:
    """A case not yet loaded: ``load()`` reads it; ``fingerprint`` changes whenever its files do."""

    case_id: str
    kind: str  # "nifti" | "dicom" | "brainmetshare"
    path: Path
    fingerprint: str
    load: Callable[[], Case]


def file_fingerprint(paths: Sequence[Path]) -> str:
    """A short hash of the files' names, sizes and modification times (cheap: no contents read)."""
    h = hashlib.sha256()
    for p in sorted(Path(x) for x in paths):
        st = p.stat()
        h.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


@dataclass
class CachedCase:
    """A pre-processed case (arrays memory-mapped read-only). ``volumes[role]`` is None for a missing role."""

    folder: Path
    meta: dict[str, Any]
    volumes: dict[str, np.ndarray | None]
    label: np.ndarray
    brain: np.ndarray

    @property
    def case_id(self) -> str:
        return str(self.meta["case_id"])

    @property
    def roles_present(self) -> tuple[str, ...]:
        return tuple(r for r in ROLES if self.volumes.get(r) is not None)

    @property
    def n_slices(self) -> int:
        return int(self.label.shape[0])

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """Voxel size (slice, row, column) in mm."""
        s = self.meta["spacing_zyx_mm"]
        return float(s[0]), float(s[1]), float(s[2])

    @property
    def n_lesions(self) -> int:
        return int(self.meta["n_lesions"])

    @property
    def lesion_slices(self) -> np.ndarray:
        return np.asarray(self.meta["lesion_slices"], dtype=np.intp)

    def grid(self) -> sitk.Image:
        """The model grid (geometry only, uint8 zeros), as :func:`pipeline.preprocess.model_grid` made it."""
        g = self.meta["grid"]
        img = sitk.Image([int(v) for v in g["size_xyz"]], sitk.sitkUInt8)
        img.SetSpacing([float(v) for v in g["spacing_xyz_mm"]])
        img.SetOrigin([float(v) for v in g["origin_lps_mm"]])
        img.SetDirection([float(v) for v in g["direction"]])
        return img

    def prepared(self, roles: Sequence[str] | None = None, slices_per_role: int = 5) -> PreparedStudy:
        """A :class:`PreparedStudy` for inference with only ``roles`` (default: all present) given."""
        keep = set(self.roles_present if roles is None else roles)
        missing = sorted(keep - set(self.roles_present))
        if missing:
            raise CaseError(f"case {self.case_id}: role(s) {missing} not present")
        vols = {r: (np.asarray(self.volumes[r], dtype=np.float32) if r in keep else None) for r in ROLES}
        return PreparedStudy(grid=self.grid(), reference_role=str(self.meta["reference_role"]), roles=ROLES,
                             volumes=vols, mask=None, slices_per_role=slices_per_role)


def _grid_meta(grid: sitk.Image) -> dict[str, Any]:
    return {"size_xyz": list(grid.GetSize()), "spacing_xyz_mm": list(grid.GetSpacing()),
            "origin_lps_mm": list(grid.GetOrigin()), "direction": list(grid.GetDirection())}


def prepare_case(case: Case, settings: GridSettings = GridSettings()) -> tuple[PreparedStudy, np.ndarray, np.ndarray]:
    """``case`` on the model grid: (prepared study, label uint8 0/1, brain uint8 0/1), all (slice, row, column).

    Without a brain mask the head foreground is used instead: voxels where any present role is above 5 % of
    its normalised range, holes filled per slice (documented in the model card: the AUC is then computed in
    the head, a slightly easier region)."""
    prepared = prepare_study(case.images, case.transforms, case.reference_role, ROLES, size=settings.size,
                             through_plane_mm=settings.through_plane_mm, slices_per_role=settings.slices_per_role)
    label = (resample_to_grid(case.label, prepared.grid, None, sitk.sitkNearestNeighbor) > 0).astype(np.uint8)
    if case.brain_mask is not None:
        brain = (resample_to_grid(case.brain_mask, prepared.grid, None, sitk.sitkNearestNeighbor) > 0)
    else:
        head = np.zeros(label.shape, dtype=bool)
        for volume in prepared.present_volumes().values():
            head |= volume > _HEAD_FRACTION
        brain = np.stack([ndimage.binary_fill_holes(s) for s in head]) if head.any() else head
    brain = (brain | (label > 0)).astype(np.uint8)  # a lesion voxel is always scored
    return prepared, label, brain


def _key(source: CaseSource, settings: GridSettings) -> str:
    text = json.dumps([source.kind, str(source.path), source.fingerprint, settings.size, settings.through_plane_mm,
                       NORMALISATION_NAME, NORMALISATION_VERSION, CACHE_VERSION])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _open(folder: Path) -> CachedCase:
    meta = json.loads((folder / "meta.json").read_text())
    vols: dict[str, np.ndarray | None] = {r: None for r in ROLES}
    for r in meta["roles_present"]:
        vols[r] = np.load(folder / f"{r}.npy", mmap_mode="r")
    return CachedCase(folder=folder, meta=meta, volumes=vols, label=np.load(folder / "label.npy", mmap_mode="r"),
                      brain=np.load(folder / "brain.npy", mmap_mode="r"))


def cache_case(source: CaseSource, cache_root: str | Path, settings: GridSettings = GridSettings()) -> CachedCase:
    """The cached form of ``source``: read back when its key matches, otherwise loaded, prepared and written."""
    root = Path(cache_root)
    key = _key(source, settings)
    folder = root / f"{source.case_id}-{key}"
    if (folder / "meta.json").is_file():
        return _open(folder)
    root.mkdir(parents=True, exist_ok=True)
    case = source.load()
    prepared, label, brain = prepare_case(case, settings)
    _, n_lesions = ndimage.label(label, structure=STRUCTURE_26)
    meta = {
        "case_id": case.case_id, "source": case.source, "kind": source.kind, "key": key,
        "reference_role": case.reference_role, "roles_present": list(prepared.present),
        "grid": _grid_meta(prepared.grid),
        "spacing_zyx_mm": list(reversed(prepared.grid.GetSpacing())),
        "n_lesions": int(n_lesions), "lesion_voxels": int(label.sum()),
        "lesion_slices": [int(k) for k in np.flatnonzero(label.reshape(label.shape[0], -1).any(axis=1))],
        "normalisation": NORMALISATION_NAME, "normalisation_version": NORMALISATION_VERSION,
        "cache_version": CACHE_VERSION,
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".{source.case_id}-", dir=root))
    try:
        for r, volume in prepared.present_volumes().items():
            np.save(tmp / f"{r}.npy", volume.astype(np.float16))
        np.save(tmp / "label.npy", label)
        np.save(tmp / "brain.npy", brain)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        for stale in root.glob(f"{source.case_id}-*"):  # older keys of the same case
            if stale.is_dir() and stale != folder and _KEY.fullmatch(stale.name[len(source.case_id) + 1:]):
                shutil.rmtree(stale, ignore_errors=True)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _open(folder)
