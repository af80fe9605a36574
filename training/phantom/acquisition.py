"""Acquisition geometry: per-series grids (FOV, matrix, slices, plane, oblique tilt), patient motion between
series, and the resampling that turns template-space signal into a series.

A series grid is fixed in scanner coordinates (LPS mm). During series ``k`` the patient's head has moved by the
rigid ``pose`` (patient space at the start of the exam -> scanner position now), so the tissue seen at scanner
point x is the one at patient point pose^-1(x), i.e. at template point deformation(pose^-1(x)).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from numpy.typing import NDArray
from scipy import ndimage as ndi

from training.phantom.anatomy import PatientDeformation, affine_transform, rigid_matrix
from training.phantom.types import Plane, SeriesKind

F32 = NDArray[np.float32]
M4 = NDArray[np.float64]

# (column direction, row direction) of each plane in LPS, as scanners write them: axial rows run anterior to
# posterior with the patient's left on the image right; sagittal and coronal rows run head to foot.
_FRAMES: dict[Plane, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    Plane.AXIAL: ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    Plane.SAGITTAL: ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
    Plane.CORONAL: ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
}


@dataclass(frozen=True)
class GridSpec:
    """A series' voxel grid in scanner coordinates."""

    size: tuple[int, int, int]  # (columns, rows, slices)
    spacing: tuple[float, float, float]  # mm between column, row and slice centres
    direction: M4  # 3x3; columns are the LPS unit vectors of the column, row and slice axes
    origin: tuple[float, float, float]  # LPS mm of the centre of voxel (0, 0, 0)
    thickness: float  # slice thickness, mm (== slice spacing for 3D, may be less for 2D with a gap)

    def resample(
        self, image: sitk.Image, transform: sitk.Transform, interpolator: int = sitk.sitkLinear,
        pixel: int = sitk.sitkFloat32, default: float = 0.0,
    ) -> sitk.Image:
        """Sample ``image`` on this grid; ``transform`` maps this grid's points to the image's space."""
        return sitk.Resample(
            image, list(self.size), transform, interpolator, list(self.origin), list(self.spacing),
            list(self.direction.ravel()), default, pixel,
        )

    def wrap(self, array: NDArray) -> sitk.Image:
        """A (slices, rows, columns) array as an image on this grid (copies)."""
        img = sitk.GetImageFromArray(array)
        img.SetSpacing(self.spacing)
        img.SetOrigin(self.origin)
        img.SetDirection(tuple(self.direction.ravel()))
        return img

    def centre(self) -> NDArray[np.float64]:
        """LPS mm of the grid's centre."""
        half = (np.asarray(self.size) - 1) / 2.0 * np.asarray(self.spacing)
        return np.asarray(self.origin) + self.direction @ half

    def index_of(self, lps: NDArray[np.float64]) -> NDArray[np.float64]:
        """Continuous (slice, row, column) index of an LPS point."""
        ijk = np.linalg.solve(self.direction, np.asarray(lps) - np.asarray(self.origin)) / np.asarray(self.spacing)
        return ijk[::-1]

    def subslices(self, n: int) -> list[GridSpec]:
        """``n`` copies of this grid whose slices sit at evenly spaced depths across the slice thickness (not
        the spacing: a gap between 2D slices stays unsampled), for averaging over the slice profile."""
        step = self.thickness / n
        return [self.shifted((k - (n - 1) / 2.0) * step) for k in range(n)]

    def window(self, lo: NDArray[np.intp], hi: NDArray[np.intp]) -> GridSpec:
        """The sub-grid of voxels lo..hi (inclusive, (column, row, slice) indices)."""
        origin = np.asarray(self.origin) + self.direction @ (np.asarray(lo) * np.asarray(self.spacing))
        size = tuple(int(v) for v in np.asarray(hi) - np.asarray(lo) + 1)
        return GridSpec(size, self.spacing, self.direction, _xyz(origin), self.thickness)

    def windows(
        self, points: NDArray[np.float64] | None, margin_mm: float, n_slabs: int = 8
    ) -> list[tuple[NDArray[np.intp], NDArray[np.intp]]]:
        """Sub-grids ((lo, hi) inclusive (column, row, slice) indices) that together cover every voxel within
        ``margin_mm`` of the LPS ``points`` (N, 3): the slices are cut into slabs and each slab keeps the
        in-plane box of the points near it. With no points, the whole grid."""
        full_hi = np.asarray(self.size) - 1
        if points is None:
            return [(np.zeros(3, np.intp), full_hi)]
        offsets = (np.asarray(points) - np.asarray(self.origin)).T
        ijk = np.linalg.solve(self.direction, offsets).T / np.asarray(self.spacing)
        pad = margin_mm / np.asarray(self.spacing)
        out = []
        edges = np.linspace(0, self.size[2], n_slabs + 1).round().astype(int)
        for s0, s1 in itertools.pairwise(edges):
            near = ijk[(ijk[:, 2] >= s0 - pad[2]) & (ijk[:, 2] <= s1 - 1 + pad[2])]
            if s1 <= s0 or len(near) == 0:
                continue
            lo = np.maximum(np.floor(near[:, :2].min(axis=0) - pad[:2]), 0).astype(np.intp)
            hi = np.minimum(np.ceil(near[:, :2].max(axis=0) + pad[:2]), full_hi[:2]).astype(np.intp)
            if np.all(hi >= lo):
                out.append((np.array([lo[0], lo[1], s0]), np.array([hi[0], hi[1], s1 - 1])))
        return out

    def shifted(self, mm: float) -> GridSpec:
        """The same grid moved by ``mm`` along the slice normal."""
        o = np.asarray(self.origin) + self.direction[:, 2] * mm
        return GridSpec(self.size, self.spacing, self.direction, _xyz(o), self.thickness)


def _xyz(v: NDArray[np.float64]) -> tuple[float, float, float]:
    return (float(v[0]), float(v[1]), float(v[2]))


def frame(plane: Plane, tilt_deg: float = 0.0) -> M4:
    """Orthonormal right-handed direction matrix (columns: column, row, slice axes) of a plane, optionally
    tilted about the patient's left-right axis (an AC-PC style oblique)."""
    col, row = (np.asarray(v) for v in _FRAMES[plane])
    d = np.column_stack([col, row, np.cross(col, row)])
    if tilt_deg:
        return rigid_matrix((tilt_deg, 0.0, 0.0), (0.0, 0.0, 0.0), (0.0, 0.0, 0.0))[:3, :3] @ d
    return d


def centred_grid(
    centre: NDArray[np.float64], direction: M4, size: tuple[int, int, int], spacing: tuple[float, float, float],
    thickness: float,
) -> GridSpec:
    """A grid of ``size`` voxels whose centre is ``centre`` (LPS mm)."""
    half = (np.asarray(size) - 1) / 2.0 * np.asarray(spacing)
    origin = np.asarray(centre) - direction @ half
    return GridSpec(
        size=tuple(int(v) for v in size),
        spacing=tuple(float(v) for v in spacing),
        direction=direction,
        origin=tuple(float(v) for v in origin),
        thickness=float(thickness),
    )


@dataclass(frozen=True)
class HeadBox:
    """Where the head is in patient space (LPS mm): what a technologist sees on the localizer."""

    centre: NDArray[np.float64]  # centre of the brain's bounding box
    half: NDArray[np.float64]  # half extents of the head's bounding box (brain + scalp) along x, y, z
    top: float  # LPS z of the vertex (scalp)
    pitch_deg: float  # head rotation about the left-right axis; axial slabs are often tilted to follow it


@dataclass(frozen=True)
class Geometry:
    """The drawn geometry of one series: acquired grid, stored (reconstructed) grid and flags."""

    plane: Plane
    is_3d: bool
    acquired: GridSpec
    stored: GridSpec  # == acquired, or the 512 interpolated reconstruction


def _matrix_fov(
    rng: np.random.Generator, fov: tuple[float, float], voxel_mm: float | None, matrix: int
) -> tuple[int, float]:
    """(matrix, pixel mm) of a square FOV drawn in ``fov`` mm, or of ``voxel_mm`` pixels covering it."""
    f = rng.uniform(*fov)
    if voxel_mm is not None:
        return int(math.ceil(f / voxel_mm)), float(voxel_mm)
    return matrix, f / matrix


def plan_geometry(
    rng: np.random.Generator, kind: SeriesKind, head: HeadBox, voxel_mm: float | None, plane: Plane, is_3d: bool,
    *, recon_512: bool = False,
) -> Geometry:
    """Draw a realistic prescription for a series: FOV covering the whole head, 0.9-1.2 mm 3D voxels or
    3-5 mm 2D slices, 128/256 matrices; with ``voxel_mm`` every voxel is that size (isotropic)."""
    if kind is SeriesKind.LOCALIZER:
        return _localizer(rng, head, voxel_mm, plane)
    if kind is SeriesKind.DWI:
        return _slab_2d(rng, head, voxel_mm, plane, fov=(230, 250), matrix=128, thickness=(4.0, 5.0), gap=(0.0, 1.0),
                        coverage=(140.0, 160.0), recon_512=False)
    if not is_3d:
        return _slab_2d(rng, head, voxel_mm, plane, fov=(220, 240), matrix=256, thickness=(3.0, 5.0), gap=(0.0, 1.0),
                        coverage=(150.0, 170.0), recon_512=recon_512)
    return _volume_3d(rng, head, voxel_mm, plane, recon_512=recon_512)


def _tilt(rng: np.random.Generator, head: HeadBox, plane: Plane) -> float:
    """Technologists often tilt axial slabs to the AC-PC line; sagittal blocks stay true."""
    if plane is Plane.AXIAL and rng.random() < 0.5:
        return float(head.pitch_deg * rng.uniform(0.4, 1.0))
    return 0.0


def _volume_3d(
    rng: np.random.Generator, head: HeadBox, voxel_mm: float | None, plane: Plane, recon_512: bool
) -> Geometry:
    """A 3D slab: axial from above the vertex to below the cerebellum, or a sagittal block across the head."""
    d = frame(plane, _tilt(rng, head, plane))
    n, px = _matrix_fov(rng, (240.0, 256.0), voxel_mm, 256)
    thk = float(voxel_mm) if voxel_mm is not None else float(rng.choice([1.0, 1.0, 1.1, 1.2]))
    if plane is Plane.AXIAL:
        coverage = rng.uniform(165.0, 185.0)  # vertex to below the cerebellum
        top = head.top + rng.uniform(0.0, 8.0)
        centre = head.centre + np.array([rng.uniform(-4, 4), rng.uniform(-6, 6), 0.0])
        centre[2] = top - coverage / 2.0
    else:  # sagittal (or coronal) block across the whole head
        width = 2.0 * head.half[0] if plane is Plane.SAGITTAL else 2.0 * head.half[1]
        coverage = width + rng.uniform(-6.0, 14.0)  # sometimes the ears or the nose tip fall outside
        centre = head.centre + np.array([rng.uniform(-3, 3), rng.uniform(-8, 8), rng.uniform(-20, -5)])
    n_slices = int(math.ceil(coverage / thk))
    acquired = centred_grid(centre, d, (n, n, n_slices), (px, px, thk), thk)
    stored = acquired
    if recon_512 and voxel_mm is None:
        stored = centred_grid(centre, d, (2 * n, 2 * n, n_slices), (px / 2.0, px / 2.0, thk), thk)
    return Geometry(plane=plane, is_3d=True, acquired=acquired, stored=stored)


def _slab_2d(
    rng: np.random.Generator, head: HeadBox, voxel_mm: float | None, plane: Plane, *, fov: tuple[float, float],
    matrix: int, thickness: tuple[float, float], gap: tuple[float, float], coverage: tuple[float, float],
    recon_512: bool,
) -> Geometry:
    """A 2D multi-slice stack from the vertex down, slices ``thickness`` mm thick with a ``gap`` mm gap."""
    d = frame(plane, _tilt(rng, head, plane))
    n, px = _matrix_fov(rng, fov, voxel_mm, matrix)
    if voxel_mm is not None:
        thk = spacing = float(voxel_mm)
    else:
        thk = float(rng.choice(np.arange(thickness[0], thickness[1] + 0.01, 0.5)))
        spacing = thk + float(rng.choice(np.arange(gap[0], gap[1] + 0.01, 0.5)))
    cov = rng.uniform(*coverage)
    n_slices = int(math.ceil(cov / spacing))
    centre = head.centre + np.array([rng.uniform(-4, 4), rng.uniform(-6, 6), 0.0])
    centre[2] = head.top - rng.uniform(0.0, 6.0) - cov / 2.0
    acquired = centred_grid(centre, d, (n, n, n_slices), (px, px, spacing), thk)
    stored = acquired
    if recon_512 and voxel_mm is None:
        stored = centred_grid(centre, d, (2 * n, 2 * n, n_slices), (px / 2.0, px / 2.0, spacing), thk)
    return Geometry(plane=plane, is_3d=False, acquired=acquired, stored=stored)


def _localizer(rng: np.random.Generator, head: HeadBox, voxel_mm: float | None, plane: Plane) -> Geometry:
    d = frame(plane)
    n, px = _matrix_fov(rng, (260.0, 300.0), voxel_mm, int(rng.choice([160, 192, 256])))
    if voxel_mm is not None:
        thk = float(voxel_mm)
        spacing = thk * rng.uniform(3.0, 6.0)
    else:
        thk = rng.uniform(6.0, 10.0)
        spacing = thk + rng.uniform(5.0, 15.0)
    n_slices = int(rng.integers(3, 6))
    centre = head.centre + rng.uniform(-8.0, 8.0, 3)
    g = centred_grid(centre, d, (n, n, n_slices), (px, px, spacing), thk)
    return Geometry(plane=plane, is_3d=False, acquired=g, stored=g)


def mpr_grid(rng: np.random.Generator, source: GridSpec, head: HeadBox, voxel_mm: float | None) -> GridSpec:
    """A coronal reformat of a 3D series: the source's in-plane spacing, 2-3 mm contiguous slices, whole head."""
    d = frame(Plane.CORONAL)
    px = float(voxel_mm) if voxel_mm is not None else max(0.9, float(min(source.spacing[:2])))
    thk = float(voxel_mm) if voxel_mm is not None else float(rng.choice([2.0, 2.5, 3.0]))
    fov = rng.uniform(230.0, 250.0)
    n = int(math.ceil(fov / px))
    cov = 2.0 * head.half[1] + rng.uniform(0.0, 10.0)
    return centred_grid(head.centre, d, (n, n, int(math.ceil(cov / thk))), (px, px, thk), thk)


def motion_poses(rng: np.random.Generator, n: int, centre: NDArray[np.float64]) -> list[M4]:
    """Rigid head poses (4x4, patient space -> scanner) for ``n`` consecutive series: a random walk of
    ~0.7 degree and ~1 mm steps about the head centre, bounded to a few degrees and millimetres."""
    angles = np.zeros(3)
    shift = np.zeros(3)
    poses = []
    for _ in range(n):
        angles = np.clip(angles + rng.normal(0.0, 0.7, 3), -2.5, 2.5)
        shift = np.clip(shift + rng.normal(0.0, 1.0, 3), -3.0, 3.0)
        poses.append(rigid_matrix(angles, shift, centre))
    return poses


def series_transform(
    deformation: PatientDeformation, pose: M4, distortion: sitk.Transform | None = None
) -> sitk.Transform:
    """Scanner point -> template point for a series acquired with the head at ``pose``; an optional
    ``distortion`` (scanner space, e.g. EPI) is applied first. The chain is baked into one displacement
    field on the deformation's grid: exact for the rigid part, and ~15 % cheaper per resampled voxel."""
    chain = [deformation.transform, affine_transform(np.linalg.inv(pose))]
    if distortion is not None:
        chain.append(distortion)
    n = deformation.field_size
    field = sitk.TransformToDisplacementField(
        sitk.CompositeTransform(chain), sitk.sitkVectorFloat64, [n, n, n], list(deformation.field_origin),
        [deformation.field_spacing] * 3, [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0],
    )
    return sitk.DisplacementFieldTransform(field)


def slice_subsamples(grid: GridSpec, template_spacing: float) -> int:
    """Sub-slices per slice so that thick slices average over their thickness (slice profile, partial
    volume) instead of point-sampling the template."""
    return int(min(_MAX_SUBSLICES, max(1, round(grid.thickness / template_spacing))))


_MAX_SUBSLICES = 4


def acquire(
    signal: sitk.Image, grid: GridSpec, transform: sitk.Transform, template_spacing: float,
    body: NDArray[np.float64] | None = None,
) -> F32:
    """Sample a template-space signal on a series grid through ``transform`` (linear), averaging sub-slices
    across the slice thickness. Returns (slices, rows, columns) float32.

    ``body`` (N, 3 scanner LPS mm) are points on the body's surface: only the parts of the grid near the body
    go through the (costly, non-linear) transform; elsewhere is air."""
    f_sl = slice_subsamples(grid, template_spacing)

    def sample(sub: GridSpec) -> F32:
        acc = np.zeros(sub.size[::-1], dtype=np.float32)
        for part in sub.subslices(f_sl):
            img = part.resample(signal, transform)
            acc += sitk.GetArrayViewFromImage(img)  # the view is valid while ``img`` lives
        if f_sl > 1:
            acc /= f_sl
        return acc

    return sample_windows(grid, body, sample, np.float32)


def sample_windows(
    grid: GridSpec, body: NDArray[np.float64] | None, sample: Callable[[GridSpec], NDArray], dtype: type
) -> NDArray:
    """Fill a (slices, rows, columns) array of ``grid`` by calling ``sample`` on the sub-grids covering the body
    (see ``GridSpec.windows``); the rest stays zero."""
    out = np.zeros(grid.size[::-1], dtype=dtype)
    for lo, hi in grid.windows(body, _BODY_MARGIN_MM):
        out[lo[2] : hi[2] + 1, lo[1] : hi[1] + 1, lo[0] : hi[0] + 1] = sample(grid.window(lo, hi))
    return out


_BODY_MARGIN_MM = 8.0  # covers the elastic deformation (<= 4 mm) and partial voxels at the edge


def point_spread(array: F32, grid: GridSpec, template_spacing: float) -> F32:
    """In-plane blur of voxels much coarser than the template (e.g. 128-matrix EPI): the sampled template
    would otherwise alias; a Gaussian of ~0.45 voxel mimics the acquisition's point-spread function."""
    px = min(grid.spacing[:2])
    if px < 1.5 * template_spacing:
        return array
    return ndi.gaussian_filter(array, (0.0, 0.45, 0.45), mode="nearest")


def resample_between(
    image: sitk.Image, target: GridSpec, point_map: M4 | None = None, interpolator: int = sitk.sitkLinear,
    pixel: int = sitk.sitkFloat32,
) -> sitk.Image:
    """Resample an image onto another scanner grid; ``point_map`` (4x4) maps target points to source points
    (identity for a reconstruction or a reformat of the same acquisition)."""
    tx = affine_transform(point_map) if point_map is not None else sitk.Transform()
    return target.resample(image, tx, interpolator, pixel)


def reformat(image: sitk.Image, target: GridSpec, template_spacing: float) -> F32:
    """A multiplanar reformat: thick-slab average of an acquired series over each target slice."""
    parts = target.subslices(slice_subsamples(target, template_spacing))
    acc = sum(sitk.GetArrayFromImage(resample_between(image, p)) for p in parts)
    return np.asarray(acc / len(parts), dtype=np.float32)


def epi_distortion(rng: np.random.Generator, head: HeadBox, direction: M4) -> sitk.Transform:
    """Susceptibility distortion of an EPI series: a smooth shift (mm) along the phase-encoding axis
    (the grid's row axis, anterior-posterior for axial), strongest near the skull base and frontal sinus."""
    spacing = 8.0
    half = 160.0
    n = int(2 * half / spacing) + 1
    ax = np.arange(n) * spacing - half
    zz, yy, xx = np.meshgrid(ax + head.centre[2], ax + head.centre[1], ax + head.centre[0], indexing="ij")
    hot = head.centre + np.array([0.0, -55.0, -35.0])  # frontal sinus / anterior skull base
    r2 = ((xx - hot[0]) / 35.0) ** 2 + ((yy - hot[1]) / 25.0) ** 2 + ((zz - hot[2]) / 20.0) ** 2
    shift = rng.uniform(2.0, 5.0) * np.exp(-r2) + rng.uniform(-1.0, 1.0) * np.exp(
        -(((zz - head.centre[2]) / 80.0) ** 2)
    )
    pe = direction[:, 1]
    disp = shift[..., None] * pe[None, None, None, :]
    field = sitk.GetImageFromArray(disp.astype(np.float64), isVector=True)
    field.SetOrigin(tuple(float(v) for v in head.centre - half))
    field.SetSpacing((spacing,) * 3)
    return sitk.DisplacementFieldTransform(field)
