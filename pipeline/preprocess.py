"""The model grid, resampling, intensity normalisation and the 2.5D input stack (method spec, "Pre-processing").

Shared by inference and training: ``normalise_slices`` and ``stack_25d`` exist only here.

Model-grid convention (``model_grid``)
--------------------------------------
* The grid's three axes are the reference series' own axes, re-ordered and re-signed; nothing is rotated, so
  a grid slice is exactly parallel to a plane of the reference (for an oblique axial BRAVO: its own slices).
* SLICE axis (numpy axis 0, SimpleITK axis 2): the reference axis closest to superior-inferior, signed so
  that the slice index increases towards SUPERIOR (+S, LPS +z).
* COLUMN axis (numpy axis 2, SimpleITK axis 0): of the two remaining axes, the one closest to left-right,
  signed towards patient LEFT (+x); ROW axis (numpy axis 1): the last one, signed towards POSTERIOR (+y).
  This is how a radiologist sees an axial image (patient's right on the image's left, anterior on top).
* In-plane: ``size`` x ``size`` SQUARE pixels of ``max(FOV_column, FOV_row) / size`` mm, centred on the
  reference's centre, so the whole reference field of view is covered and shapes are not distorted (the
  shorter side is padded with zeros). Through-plane: ``round(FOV_slice / through_plane_mm)`` slices evenly
  covering the reference's extent along that axis (spacing ~``through_plane_mm``).
* FOV means the voxel-edge extent (size x spacing) of the reference along each of its axes.
* The grid is a geometry-only ``sitk.Image`` (uint8, all zeros); arrays on it are (slice, row, column).

Normalisation (``normalise_slices``): per slice and per sequence, a linear map of the slice's robust intensity
range (1st -> 99.5th percentile of its foreground) onto [0, 1], clipped to [0, 1]. Foreground = ``mask`` when
given (and the slice has enough mask voxels), otherwise voxels above 10 % of the slice's robust range
(min -> 99.9th percentile), which excludes air; with fewer than 32 such voxels the whole slice's percentiles are
used (so a slice with next to no content, e.g. one hot voxel, gives zeros). The result is invariant to any gain
> 0 and offset of the input; a constant (e.g. all-zero, outside the field of view) slice gives zeros. Values above
the 99.5th percentile (the brightest vessels, fat, enhancement) saturate at 1.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from numpy.typing import NDArray

from pipeline.registration import ROLES

F32 = NDArray[np.float32]

#: Name and version of ``normalise_slices`` recorded in checkpoints and training caches; bump the version
#: whenever its output changes, so stale caches are rebuilt and old checkpoints can be told apart.
NORMALISATION_NAME = "per-slice-robust-percentile"
NORMALISATION_VERSION = "1"


# --- grid --------------------------------------------------------------------------------------------------


def model_grid(reference: sitk.Image, size: int = 256, through_plane_mm: float = 1.0) -> sitk.Image:
    """The axial model grid of ``reference`` (see the module doc for the convention)."""
    if reference.GetDimension() != 3:
        raise ValueError("the reference must be a 3D image")
    if size < 1 or not through_plane_mm > 0:
        raise ValueError("size must be >= 1 and through_plane_mm > 0")
    d = np.asarray(reference.GetDirection(), dtype=np.float64).reshape(3, 3)  # columns = axis directions
    ref_size = np.asarray(reference.GetSize(), dtype=np.float64)
    fov = ref_size * np.asarray(reference.GetSpacing(), dtype=np.float64)

    slice_ax = int(np.argmax(np.abs(d[2, :])))
    rest = [a for a in range(3) if a != slice_ax]
    col_ax = max(rest, key=lambda a: abs(d[0, a]))
    row_ax = next(a for a in rest if a != col_ax)
    axes = (col_ax, row_ax, slice_ax)
    toward = (0, 1, 2)  # column -> +x (L), row -> +y (P), slice -> +z (S)
    direction = np.stack([d[:, a] * (1.0 if d[t, a] >= 0 else -1.0) for a, t in zip(axes, toward)], axis=1)

    pixel = max(fov[col_ax], fov[row_ax]) / size
    n_slices = max(1, round(fov[slice_ax] / through_plane_mm))
    spacing = np.array([pixel, pixel, fov[slice_ax] / n_slices])
    grid_size = np.array([size, size, n_slices])

    centre = np.asarray(reference.TransformContinuousIndexToPhysicalPoint(tuple((ref_size - 1.0) / 2.0)))
    origin = centre - direction @ ((grid_size - 1.0) / 2.0 * spacing)

    grid = sitk.Image([int(v) for v in grid_size], sitk.sitkUInt8)
    grid.SetSpacing([float(v) for v in spacing])
    grid.SetDirection([float(v) for v in direction.ravel()])
    grid.SetOrigin([float(v) for v in origin])
    return grid


def resample_to_grid(
    image: sitk.Image, grid: sitk.Image, transform: sitk.Transform | None = None,
    interpolator: int = sitk.sitkLinear,
) -> F32:
    """``image`` sampled on ``grid`` as float32 (slice, row, column); ``transform`` maps grid (reference) points
    to ``image`` points (a ``RegistrationResult.transform``; None = scanner coordinates). Outside ``image``: 0."""
    tx = transform if transform is not None else sitk.Transform(3, sitk.sitkIdentity)
    out = sitk.Resample(image, grid, tx, interpolator, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out).astype(np.float32, copy=False)


#: Log-odds bounds of :func:`probability_to_reference` (float32 probabilities of exactly 0 or 1, a saturated
#: sigmoid, have infinite log-odds): in float32, sigmoid(-104) is 0 and sigmoid(17) is 1.
_LOGIT_MIN, _LOGIT_MAX = -104.0, 17.0


def probability_to_reference(prob: np.ndarray, grid: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """A model-grid probability map (slice, row, column) resampled onto the reference series' own grid (float32;
    0 outside the model grid).

    The LOG-ODDS are interpolated (trilinearly), then mapped back through the sigmoid: this continues the model's
    own bilinear upsampling of its logits, so a voxel between model-grid points gets the probability the model's
    logit field has there. Interpolating the probability itself would put a low threshold's contour in the wrong
    place wherever the model grid is coarser than the reference: across a boundary the probability changes by
    orders of magnitude from one model voxel to the next, and its linear interpolation stays above e.g. 0.00045
    almost up to the outer voxel, a staircase of whole model voxels grown outwards (``tests/test_edge_quality.py``).
    On model-grid points the value is unchanged (to float32 rounding), so a threshold calibrated on the model grid
    holds here; thresholding still happens on the reference grid (:func:`pipeline.lesions.find_lesions`).
    Log-odds are clipped to [-104, 17] (finite; 0 and 1 stay 0 and 1)."""
    arr = np.asarray(prob, dtype=np.float32)
    expected = tuple(reversed(grid.GetSize()))
    if arr.shape != expected:
        raise ValueError(f"probability shape {arr.shape} does not match the grid {expected}")
    with np.errstate(divide="ignore"):  # p = 1: odds inf; p = 0: log(0) = -inf; both clipped below
        logit = np.log(arr / (np.float32(1.0) - arr))
    np.clip(logit, _LOGIT_MIN, _LOGIT_MAX, out=logit)
    img = sitk.GetImageFromArray(logit)
    img.CopyInformation(grid)
    on_ref = sitk.GetArrayFromImage(sitk.Resample(img, reference, sitk.Transform(3, sitk.sitkIdentity),
                                                  sitk.sitkLinear, _LOGIT_MIN, sitk.sitkFloat32))
    # sigmoid in place (3x faster than sitk.Sigmoid); exp(104) overflows to inf, whose reciprocal is the 0 wanted
    with np.errstate(over="ignore"):
        np.exp(np.negative(on_ref, out=on_ref), out=on_ref)
    on_ref += np.float32(1.0)
    np.reciprocal(on_ref, out=on_ref)
    out = sitk.GetImageFromArray(on_ref)
    out.CopyInformation(reference)
    return out


# --- normalisation -----------------------------------------------------------------------------------------

_LOW_PCT = 1.0
_HIGH_PCT = 99.5
_FOREGROUND_FRACTION = 0.10
_MIN_FOREGROUND = 32  # voxels of a slice needed to estimate its range


def normalise_slices(volume: np.ndarray, mask: np.ndarray | None = None) -> F32:
    """Per-slice robust intensity scaling of one sequence's (slice, row, column) volume to [0, 1] (float32).

    See the module doc. ``mask`` (same shape, non-zero = foreground, e.g. the head or brain on the model grid)
    only chooses the voxels whose percentiles set the scaling; every voxel of the slice is scaled."""
    vol = np.asarray(volume, dtype=np.float32)
    if vol.ndim != 3:
        raise ValueError(f"expected a (slice, row, column) volume, got shape {vol.shape}")
    if mask is not None and np.shape(mask) != vol.shape:
        raise ValueError(f"mask shape {np.shape(mask)} differs from volume shape {vol.shape}")
    out = np.zeros(vol.shape, dtype=np.float32)
    for k in range(vol.shape[0]):
        sl = vol[k]
        fg = None
        if mask is not None:
            m = np.asarray(mask[k]) != 0
            if np.count_nonzero(m) >= _MIN_FOREGROUND:
                fg = sl[m]
        if fg is None:
            lo, hi = float(sl.min()), float(np.percentile(sl, 99.9))
            if not hi > lo:
                continue  # constant slice: stays zero
            fg = sl[sl > lo + _FOREGROUND_FRACTION * (hi - lo)]
            if fg.size < _MIN_FOREGROUND:
                fg = sl.ravel()
        p_lo, p_hi = (float(v) for v in np.percentile(fg, (_LOW_PCT, _HIGH_PCT)))
        if not p_hi - p_lo > 1e-6 * max(1.0, abs(p_hi), abs(p_lo)):
            continue
        np.clip((sl - np.float32(p_lo)) * np.float32(1.0 / (p_hi - p_lo)), 0.0, 1.0, out=out[k])
    return out


# --- 2.5D stack --------------------------------------------------------------------------------------------


def stack_25d(
    volumes: Mapping[str, np.ndarray | None], roles: Sequence[str], slices_per_role: int = 5,
    indices: Sequence[int] | range | None = None,
) -> F32:
    """The 2.5D model input for the centre slices ``indices`` (default: all):
    (len(indices), len(roles) * slices_per_role, rows, columns) float32.

    Channels are role-major: role0 slices -h..+h (h = slices_per_role // 2), then role1, ...; slices beyond the
    volume's ends repeat the edge slice; a role that is missing (absent from ``volumes`` or None) is zeros. No
    input-level-dropout scaling is applied here (the model does that)."""
    if slices_per_role < 1 or slices_per_role % 2 == 0:
        raise ValueError("slices_per_role must be odd and positive")
    present = [np.asarray(volumes[r]) for r in roles if volumes.get(r) is not None]
    if not present:
        raise ValueError("no volume present for any of the roles")
    shape = present[0].shape
    if len(shape) != 3 or any(v.shape != shape for v in present):
        raise ValueError(f"volumes must be 3D and share one shape, got {[v.shape for v in present]}")
    n = shape[0]
    centres = np.arange(n) if indices is None else np.asarray(list(indices), dtype=np.intp)
    if centres.size and (centres.min() < 0 or centres.max() >= n):
        raise IndexError(f"slice indices must lie in [0, {n})")
    h = slices_per_role // 2
    picks = np.clip(centres[:, None] + np.arange(-h, h + 1)[None, :], 0, n - 1)  # (len, slices_per_role)
    out = np.zeros((centres.size, len(roles) * slices_per_role, shape[1], shape[2]), dtype=np.float32)
    for i, role in enumerate(roles):
        vol = volumes.get(role)
        if vol is None:
            continue
        # index first, then convert: a float16 memory-mapped training cache is never converted whole
        out[:, i * slices_per_role:(i + 1) * slices_per_role] = np.asarray(vol)[picks]
    return out


# --- whole study -------------------------------------------------------------------------------------------


@dataclass
class PreparedStudy:
    """A study on the model grid: normalised float32 volumes per role (None = missing), ready for slicing."""

    grid: sitk.Image
    reference_role: str
    roles: tuple[str, ...]
    volumes: dict[str, F32 | None]
    mask: np.ndarray | None = None
    slices_per_role: int = 5

    @property
    def n_slices(self) -> int:
        return int(self.grid.GetSize()[2])

    @property
    def present(self) -> tuple[str, ...]:
        return tuple(r for r in self.roles if self.volumes.get(r) is not None)

    def present_volumes(self) -> dict[str, F32]:
        """The volumes of the roles present, by role (in :attr:`roles` order)."""
        return {r: v for r in self.roles if (v := self.volumes.get(r)) is not None}

    def stack(self, indices: Sequence[int] | range | None = None) -> F32:
        """The 2.5D input for centre slices ``indices`` (a batch), see ``stack_25d``."""
        return stack_25d(self.volumes, self.roles, self.slices_per_role, indices)

    def batches(self, batch_size: int) -> Iterator[tuple[range, F32]]:
        """Yield ``(range, stack)`` over all slices, ``batch_size`` centre slices at a time (bounded memory)."""
        for a in range(0, self.n_slices, batch_size):
            r = range(a, min(a + batch_size, self.n_slices))
            yield r, self.stack(r)


def prepare_study(
    images: Mapping[str, sitk.Image], transforms: Mapping[str, sitk.Transform], reference_role: str,
    roles: Sequence[str] = ROLES, *, size: int = 256, through_plane_mm: float = 1.0,
    mask: sitk.Image | None = None, slices_per_role: int = 5,
) -> PreparedStudy:
    """Resample every present role onto the model grid of ``images[reference_role]`` through its registration
    transform (reference -> series; a role without one is taken in scanner coordinates) and normalise it.

    ``mask`` (optional, on any grid in the reference frame, e.g. a brain or head mask) is resampled by nearest
    neighbour and used for the normalisation statistics."""
    if reference_role not in images:
        raise ValueError(f"reference role {reference_role!r} has no image")
    grid = model_grid(images[reference_role], size=size, through_plane_mm=through_plane_mm)
    mask_arr = None
    if mask is not None:
        mask_arr = resample_to_grid(mask, grid, None, sitk.sitkNearestNeighbor) > 0
    volumes: dict[str, F32 | None] = {}
    for role in roles:
        if role not in images or images[role] is None:
            volumes[role] = None
            continue
        tx = None if role == reference_role else transforms.get(role)
        volumes[role] = normalise_slices(resample_to_grid(images[role], grid, tx), mask_arr)
    return PreparedStudy(grid=grid, reference_role=reference_role, roles=tuple(roles), volumes=volumes,
                         mask=mask_arr, slices_per_role=slices_per_role)


def grid_covers(grid: sitk.Image, image: sitk.Image, tol_mm: float = 1e-3) -> bool:
    """Whether every voxel-box corner of ``image`` lies inside the voxel-box of ``grid`` (to ``tol_mm``)."""
    corners = _box_corners(image)
    d = np.asarray(grid.GetDirection()).reshape(3, 3)
    sp = np.asarray(grid.GetSpacing())
    rel = (corners - np.asarray(grid.GetOrigin())) @ d  # coordinates along the grid's axes
    lo = -0.5 * sp - tol_mm
    hi = (np.asarray(grid.GetSize()) - 0.5) * sp + tol_mm
    return bool(np.all(rel >= lo) and np.all(rel <= hi))


def _box_corners(image: sitk.Image) -> np.ndarray:
    size = np.asarray(image.GetSize(), dtype=np.float64)
    out = []
    for i in (-0.5, size[0] - 0.5):
        for j in (-0.5, size[1] - 0.5):
            for k in (-0.5, size[2] - 0.5):
                out.append(image.TransformContinuousIndexToPhysicalPoint((float(i), float(j), float(k))))
    return np.asarray(out)

