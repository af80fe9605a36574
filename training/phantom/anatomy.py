"""Head anatomy of the phantom: template loading, tissue fractions, skull and scalp, deformation.

Two spaces are involved:

* **Template space**: the MNI ICBM152 2009a (symmetric) space, converted to LPS mm. All tissue maps,
  lesions and vessels are built here on an axis-aligned isotropic grid (``Grid``; identity direction).
* **Patient space**: scanner coordinates (LPS mm) of the patient's head at the start of the exam. A per-patient
  random affine plus a smooth elastic field maps patient space to template space (``PatientDeformation``), so no
  two patients share a brain.

Arrays are always in numpy (z, y, x) order, points in (x, y, z) LPS order.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage as ndi

TISSUES: tuple[str, ...] = (
    "wm",
    "gm",
    "csf",
    "dura",
    "bone",
    "marrow",
    "fat",
    "muscle",
    "skin",
    "vessel",
    "choroid",
    "edema",
    "tumor_hi",  # enhancing tumour, strong gadolinium uptake (end member of a per-voxel mixture)
    "tumor_lo",  # enhancing tumour, weak uptake
    "necrosis",
)
"""Tissue classes whose volume fractions describe every template voxel (the rest is air)."""

F32 = NDArray[np.float32]

_TEMPLATE_FILE = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
# The head grid pads the 1 mm template: the skull and scalp need ~25 mm around the brain and the neck
# continues 60 mm below the template's last slice.
_TEMPLATE_SHAPE = (197, 233, 189)
_TEMPLATE_ORIGIN_RAS = (-98.0, -134.0, -72.0)
_TEMPLATE_ORIGIN_LPS = (-98.0, -98.0, -72.0)  # of voxel (0, 0, 0) after flipping: RAS (98, 98, -72) -> LPS
_PAD_VOXELS = {"x": (4, 8), "y": (5, 8), "z": (60, 6)}  # (low, high) 1 mm voxels added around the template
_BRAIN_T1_THRESHOLD = 0.02  # of the template's 0..1 range; the template is skull-stripped with zeros outside
_ENVELOPE_CLOSING_MM = 15.0  # closes sulcal openings so the skull follows the brain's envelope, not its gyri
_DIST_SPACING_MM = 2.0  # distance maps are computed at this spacing then interpolated (EDT at 1 mm is ~3 s)


@dataclass(frozen=True)
class Grid:
    """Axis-aligned isotropic grid in template space (identity direction, LPS mm)."""

    origin: tuple[float, float, float]  # LPS mm (x, y, z) of the centre of voxel [0, 0, 0]
    spacing: float  # mm
    shape: tuple[int, int, int]  # array shape (nz, ny, nx)

    def to_index(self, lps: ArrayLike) -> NDArray[np.float64]:
        """LPS mm points (..., 3) as (x, y, z) -> continuous array indices (..., 3) as (z, y, x)."""
        p = (np.asarray(lps, dtype=np.float64) - np.asarray(self.origin)) / self.spacing
        return p[..., ::-1]

    def to_lps(self, zyx: ArrayLike) -> NDArray[np.float64]:
        """Continuous array indices (..., 3) as (z, y, x) -> LPS mm points (..., 3) as (x, y, z)."""
        i = np.asarray(zyx, dtype=np.float64)[..., ::-1]
        return i * self.spacing + np.asarray(self.origin)

    def axes_mm(self, box: tuple[slice, slice, slice]) -> tuple[F32, F32, F32]:
        """1-D LPS coordinates (z, y, x) in mm of the voxel centres of an array box."""
        out = []
        for ax, sl in enumerate(box):
            o = self.origin[2 - ax]
            idx = np.arange(sl.start, sl.stop, dtype=np.float32)
            out.append((idx * self.spacing + o).astype(np.float32))
        return out[0], out[1], out[2]

    def box(self, centre_lps: ArrayLike, half_mm: float) -> tuple[slice, slice, slice]:
        """Array box (z, y, x slices) around an LPS point, clipped to the grid."""
        c = self.to_index(centre_lps)
        h = half_mm / self.spacing
        return tuple(  # type: ignore[return-value]
            slice(int(max(0, np.floor(c[a] - h))), int(min(self.shape[a], np.ceil(c[a] + h) + 1)))
            for a in range(3)
        )

    def image(self, array: NDArray) -> sitk.Image:
        """Wrap a (z, y, x) array of this grid as a SimpleITK image (copies)."""
        img = sitk.GetImageFromArray(array)
        img.SetOrigin(self.origin)
        img.SetSpacing((self.spacing,) * 3)
        return img


def sample(grid: Grid, array: F32, lps: ArrayLike, order: int = 1) -> F32:
    """Values of a (z, y, x) map on ``grid`` at LPS mm points (..., 3); edge values extend outward."""
    p = np.asarray(lps, dtype=np.float64)
    idx = grid.to_index(p.reshape(-1, 3)).T
    v = ndi.map_coordinates(array, idx, order=order, mode="nearest", output=np.float32)
    return v.reshape(p.shape[:-1])


def box_points(grid: Grid, box: tuple[slice, slice, slice]) -> NDArray[np.float64]:
    """LPS mm (x, y, z) of every voxel centre of an array box, shape box_shape + (3,)."""
    z, y, x = grid.axes_mm(box)
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    return np.stack([xx, yy, zz], axis=-1).astype(np.float64)


@dataclass(frozen=True)
class Template:
    """Patient-independent head model on a template-space grid; arrays are read-only, (z, y, x) order."""

    grid: Grid
    gm: F32  # grey-matter fraction inside the brain mask
    wm: F32  # white-matter fraction inside the brain mask
    csf: F32  # CSF fraction inside the brain mask (sulci, ventricles, cisterns): 1 - gm - wm
    brain: NDArray[np.bool_]  # brain mask (template T1 > threshold, holes filled; plus the spinal cord below)
    coarse: Grid  # the 2 mm grid of the distance maps below
    brain_depth: F32  # on ``coarse``: mm inside the brain mask (0 outside)
    brain_dist: F32  # on ``coarse``: mm outside the brain mask (0 inside)
    ventricle_dist: F32  # on ``coarse``: mm to the nearest ventricle voxel
    envelope_coarse: F32  # on ``coarse``: signed mm outside the closed intracranial envelope (< 0 inside)
    csf_coarse: F32  # on ``coarse``: CSF fraction inside the brain mask
    shell_index: NDArray[np.intp]  # flat indices of the voxels outside the brain that may hold head tissue
    shell_envelope_dist: F32  # at shell_index: signed mm outside the closed intracranial envelope, but no
    # less than the distance to the brain minus _CISTERN_MM (deep concavities of the envelope are skull base)
    shell_neck_depth: F32  # at shell_index: mm below the neck cylinder's surface (< 0 outside it)
    shell_temporal: F32  # at shell_index: 0..1 weight of the temporalis muscle
    shell_coarse_index: NDArray[np.intp]  # at shell_index: flat index of the enclosing ``coarse`` voxel
    cord_xy: tuple[float, float]  # LPS (x, y) mm of the spinal cord's axis
    centre: tuple[float, float, float]  # LPS mm: centre of the brain's bounding box (cerebrum and cerebellum)
    extent: tuple[tuple[float, float], ...]  # (min, max) LPS mm of the brain along x, y, z (cord excluded)
    body_surface: NDArray[np.float64]  # (N, 3) LPS mm: outer voxels (2 mm grid) of where tissue may be
    brain_surface: NDArray[np.float64]  # (N, 3) LPS mm: outer voxels (2 mm grid) of the brain mask


def nilearn_data_dir() -> Path:
    """Folder of nilearn's bundled data files, found without importing nilearn (which is slow)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the nilearn package (its MNI template data files) is not installed")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data"


def _read_lps(name: str) -> F32:
    """One template map as float32 0..1 in LPS (z, y, x) order. The files are RAS with a 1 mm identity affine
    whose voxel (0, 0, 0) is at RAS (-98, -134, -72); anything else is refused rather than misread."""
    img = cast(nib.Nifti1Image, nib.load(nilearn_data_dir() / _TEMPLATE_FILE.format(name)))
    expected = np.eye(4)
    expected[:3, 3] = _TEMPLATE_ORIGIN_RAS
    if img.shape != _TEMPLATE_SHAPE or not np.allclose(img.affine, expected):
        raise RuntimeError(f"unexpected geometry of the {name} template: {img.shape}, {img.affine.tolist()}")
    a = np.asarray(img.dataobj, dtype=np.float32) / 255.0
    # RAS (x grows toward the patient's Right, y toward Anterior) -> LPS: flip the first two axes
    return np.ascontiguousarray(a[::-1, ::-1, :].transpose(2, 1, 0))


def _pad(a: F32, value: float = 0.0) -> F32:
    (zl, zh), (yl, yh), (xl, xh) = _PAD_VOXELS["z"], _PAD_VOXELS["y"], _PAD_VOXELS["x"]
    return np.pad(a, ((zl, zh), (yl, yh), (xl, xh)), constant_values=value)


def _block_mean(a: NDArray, f: int) -> F32:
    """Downsample a (z, y, x) array by an integer factor (mean of f^3 blocks; the edge is cropped)."""
    if f == 1:
        return a.astype(np.float32, copy=False)
    s = [n // f * f for n in a.shape]
    v = a[: s[0], : s[1], : s[2]].astype(np.float32)
    return v.reshape(s[0] // f, f, s[1] // f, f, s[2] // f, f).mean(axis=(1, 3, 5))


def _upsample_to(a: F32, shape: tuple[int, int, int], factor: float) -> F32:
    """Trilinear interpolation of a coarse (z, y, x) map onto a grid ``factor`` times finer, both grids
    sharing the outer corner of voxel (0, 0, 0); edge values are extended."""
    if a.shape == shape:
        return a
    src = sitk.GetImageFromArray(np.ascontiguousarray(a, dtype=np.float32))
    src.SetSpacing((float(factor),) * 3)
    src.SetOrigin(((factor - 1.0) / 2.0,) * 3)
    ref = sitk.Image(shape[2], shape[1], shape[0], sitk.sitkFloat32)
    out = sitk.Resample(src, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32, True)
    return sitk.GetArrayFromImage(out)


def _edt(mask: NDArray[np.bool_], spacing: float) -> F32:
    return ndi.distance_transform_edt(mask, sampling=spacing).astype(np.float32)


@functools.lru_cache(maxsize=2)
def load_template(spacing_mm: float = 1.0) -> Template:
    """The head model on a template grid of ``spacing_mm`` (1 or 2 mm); cached per process.

    Brain tissue comes from the MNI ICBM152 2009a maps: CSF = brain mask - GM - WM. Below the template's last
    slice the medulla is extruded as a spinal cord so that the neck has a cord and a canal.
    """
    if spacing_mm not in (1.0, 2.0):
        raise ValueError("the template grid spacing must be 1 or 2 mm")
    grid, gm, wm, brain, first_z = _brain_maps(int(round(spacing_mm)))
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0) * brain
    c = int(round(_DIST_SPACING_MM / grid.spacing))
    coarse_grid = Grid(
        origin=tuple(o + (c - 1) * grid.spacing / 2.0 for o in grid.origin),
        spacing=_DIST_SPACING_MM,
        shape=tuple(n // c for n in grid.shape),
    )
    coarse = _block_mean(brain, c) >= 0.5
    csf_coarse = _block_mean(csf, c)
    dist = _distance_maps(coarse, csf_coarse)

    b_lo, b_hi = _bounds(brain[first_z:])
    lo, hi = grid.to_lps(b_lo + [first_z, 0, 0]), grid.to_lps(b_hi + [first_z, 0, 0])
    centre = tuple(float(v) for v in (lo + hi) / 2.0)
    cy, cx = ndi.center_of_mass(brain[first_z])
    cord_xy = tuple(float(v) for v in grid.to_lps([first_z, cy, cx])[:2])

    shells = _shell_voxels(grid, brain, dist, c, cord_xy, centre)
    body = _block_mean(_unflatten(shells["shell_index"], grid.shape) | brain, c) > 0
    arrays = dict(
        gm=gm,
        wm=wm,
        csf=csf,
        brain=brain,
        csf_coarse=csf_coarse,
        brain_depth=dist["inside"],
        brain_dist=dist["outside"],
        ventricle_dist=dist["ventricles"],
        envelope_coarse=dist["envelope"],
        **shells,
    )
    for a in arrays.values():
        a.setflags(write=False)
    return Template(
        grid=grid,
        coarse=coarse_grid,
        cord_xy=cord_xy,
        centre=centre,
        extent=tuple((float(lo[i]), float(hi[i])) for i in range(3)),
        body_surface=coarse_grid.to_lps(np.argwhere(_surface_voxels(body)).astype(np.float64)),
        brain_surface=coarse_grid.to_lps(np.argwhere(_surface_voxels(coarse)).astype(np.float64)),
        **arrays,
    )


def _brain_maps(f: int) -> tuple[Grid, F32, F32, NDArray[np.bool_], int]:
    """Grid, GM and WM fractions and brain mask at ``f`` mm on the padded head grid, and the index of the
    template's first slice (below it the cord is extruded)."""
    t1, gm, wm = (_pad(_read_lps(n)) for n in ("t1", "gm", "wm"))
    zl = _PAD_VOXELS["z"][0]
    brain = _fill_holes(t1 > _BRAIN_T1_THRESHOLD)
    brain[:zl] = brain[zl]  # the medulla's cross-section in the template's last slice continues as the cord
    for a in (gm, wm):
        a[:zl] = a[zl]
    origin = tuple(
        _TEMPLATE_ORIGIN_LPS[i] - _PAD_VOXELS[a][0] + (f - 1) / 2.0 for i, a in enumerate(("x", "y", "z"))
    )
    if f > 1:
        gm, wm = (_block_mean(a * brain, f) for a in (gm, wm))
        brain = _block_mean(brain, f) >= 0.5
    gm *= brain
    wm *= brain
    tissue = gm + wm
    over = tissue > 1.0
    gm[over] /= tissue[over]
    wm[over] /= tissue[over]
    grid = Grid(origin=origin, spacing=float(f), shape=gm.shape)
    return grid, gm, wm, brain, int(np.ceil((zl + 0.5) / f - 0.5))


def _distance_maps(brain: NDArray[np.bool_], csf: F32) -> dict[str, F32]:
    """Distance maps (mm) on the coarse grid: inside and outside the brain, to the ventricles, and the signed
    distance to the closed intracranial envelope (< 0 inside)."""
    s = _DIST_SPACING_MM
    outside = _edt(~brain, s)
    inside = _edt(brain, s)
    closed = _edt(outside <= _ENVELOPE_CLOSING_MM, s) > _ENVELOPE_CLOSING_MM
    # to the surface between voxel centres, hence the half voxel
    envelope = np.where(closed, s / 2.0 - _edt(closed, s), _edt(~closed, s) - s / 2.0).astype(np.float32)
    ventricles = (csf > 0.6) & (inside > 8.0)
    lab, n = ndi.label(ventricles)
    if n:
        sizes = ndi.sum_labels(ventricles, lab, index=np.arange(1, n + 1))
        keep = np.concatenate([[False], sizes >= 0.2 * sizes.max()])  # lateral, third and fourth ventricles
        ventricles = keep[lab]
    return {"outside": outside, "inside": inside, "envelope": envelope, "ventricles": _edt(~ventricles, s)}


def _shell_voxels(
    grid: Grid, brain: NDArray[np.bool_], dist: dict[str, F32], c: int, cord_xy: tuple[float, float],
    centre: tuple[float, float, float],
) -> dict[str, NDArray]:
    """The voxels outside the brain that skull, scalp or neck may fill, with what ``build_tissues`` needs at
    each: envelope distance, neck depth, temporalis weight and enclosing coarse voxel."""
    envelope = _upsample_to(dist["envelope"], grid.shape, c)
    neck = _neck_depth(grid, cord_xy)
    iz, iy, ix = np.nonzero(~brain & ((envelope < _SHELL_MAX_MM) | (neck > -2.0 * grid.spacing)))
    index = (iz * grid.shape[1] + iy) * grid.shape[2] + ix
    z, y, x = grid.axes_mm(tuple(slice(0, n) for n in grid.shape))
    wz, wy, wx = _temporal_weight(centre, x, y, z)
    to_brain = _upsample_to(dist["outside"], grid.shape, c).ravel()[index]
    cs = dist["outside"].shape
    return {
        "shell_index": index,
        # deep concavities of the closed envelope, far from the brain, are skull base rather than CSF
        "shell_envelope_dist": np.maximum(envelope.ravel()[index], to_brain - _CISTERN_MM),
        "shell_neck_depth": neck.ravel()[index],
        "shell_temporal": wz[iz] * wy[iy] * wx[ix],
        "shell_coarse_index": (
            (np.minimum(iz // c, cs[0] - 1) * cs[1] + np.minimum(iy // c, cs[1] - 1)) * cs[2]
            + np.minimum(ix // c, cs[2] - 1)
        ),
    }


def _unflatten(index: NDArray[np.intp], shape: tuple[int, int, int]) -> NDArray[np.bool_]:
    mask = np.zeros(shape, dtype=bool)
    mask.ravel()[index] = True
    return mask


def _surface_voxels(mask: NDArray[np.bool_]) -> NDArray[np.bool_]:
    return mask & ~ndi.binary_erosion(mask)


def _fill_holes(mask: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """``mask`` with every enclosed cavity filled: background not connected to the array's border."""
    lab, n = ndi.label(~mask)
    border = np.zeros(n + 1, dtype=bool)
    for face in (lab[0], lab[-1], lab[:, 0], lab[:, -1], lab[:, :, 0], lab[:, :, -1]):
        border[face] = True
    border[0] = False
    return ~border[lab]


def _bounds(mask: NDArray[np.bool_]) -> tuple[NDArray[np.intp], NDArray[np.intp]]:
    """(first, last) (z, y, x) indices of a mask's bounding box."""
    lo, hi = [], []
    for ax in range(3):
        idx = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != ax)))
        lo.append(idx[0])
        hi.append(idx[-1])
    return np.array(lo), np.array(hi)


_CISTERN_MM = 4.0  # CSF reaches this far from the brain into the envelope's concavities (cisterns, fissures)
_SHELL_MAX_MM = 40.0  # the thickest skull + scalp + temporalis stays well inside this distance
# The neck: an elliptic cylinder below the posterior fossa, centred a little in front of the cord.
_NECK_TOP_Z = -45.0  # LPS z (mm) where the neck cylinder starts fading into the head shells
_NECK_SEMI_AXES = (52.0, 56.0)  # mm, left-right and antero-posterior
_NECK_ANTERIOR_SHIFT = 14.0  # mm in front of the cord


def _neck_depth(grid: Grid, cord_xy: tuple[float, float]) -> F32:
    """Depth (mm, > 0 inside) below the neck's skin surface; it shrinks to nothing above the skull base."""
    z, y, x = grid.axes_mm(tuple(slice(0, n) for n in grid.shape))
    ax, ay = _NECK_SEMI_AXES
    cy = cord_xy[1] - _NECK_ANTERIOR_SHIFT
    rho = np.sqrt(((x[None, :] - cord_xy[0]) / ax) ** 2 + ((y[:, None] - cy) / ay) ** 2)
    depth_xy = ((1.0 - rho) * min(ax, ay)).astype(np.float32)
    # a rounded shoulder: the neck tapers over ~35 mm above its top instead of ending in a flat step
    rise = np.clip((z - _NECK_TOP_Z) / 35.0, 0.0, None)
    taper = (-min(ax, ay) * rise**2).astype(np.float32)
    return depth_xy[None, :, :] + taper[:, None, None]


def _temporal_weight(centre: tuple[float, float, float], x: F32, y: F32, z: F32) -> tuple[F32, F32, F32]:
    """Separable factors (z, y, x) of the 0..1 weight of the temporalis muscle: lateral, above the zygoma,
    over the temporal squama (LPS mm)."""
    wx = np.clip((np.abs(x - centre[0]) - 40.0) / 15.0, 0.0, 1.0)
    wy = np.exp(-(((y - (centre[1] - 10.0)) / 40.0) ** 2))
    wz = np.exp(-(((z - (centre[2] - 15.0)) / 30.0) ** 2))
    return wz.astype(np.float32), wy.astype(np.float32), wx.astype(np.float32)


class TissueStack:
    """Volume fractions of every tissue of ``TISSUES`` on a template grid: data[t, z, y, x] in 0..1."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.data: F32 = np.zeros((len(TISSUES),) + grid.shape, dtype=np.float32)

    def __getitem__(self, name: str) -> F32:
        return self.data[TISSUES.index(name)]

    def put(self, where: tuple[slice, slice, slice] | NDArray[np.intp], fractions: dict[str, F32]) -> None:
        """Set the named tissues to ``fractions`` at ``where`` (a (z, y, x) box or flat voxel indices; their sum
        must stay <= 1); every other tissue shrinks in proportion so that a voxel never sums above 1."""
        ids = [TISSUES.index(n) for n in fractions]
        if isinstance(where, tuple):
            region = self.data[(slice(None),) + where]
        else:
            region = self.data.reshape(len(TISSUES), -1)[:, where]
        old = region[ids].sum(axis=0)
        new = np.zeros_like(old)
        for f in fractions.values():
            new += f
        scale = np.where(old < 1.0, (1.0 - new) / np.maximum(1.0 - old, 1e-6), 0.0).astype(np.float32)
        np.clip(scale, 0.0, None, out=scale)
        region *= scale[None]
        for i, f in zip(ids, fractions.values()):
            region[i] = f
        if not isinstance(where, tuple):
            self.data.reshape(len(TISSUES), -1)[:, where] = region


@dataclass(frozen=True)
class ShellThickness:
    """Per-patient thickness (mm) of the layers outside the brain, innermost first."""

    csf: float
    dura: float
    inner_table: float
    diploe: float
    outer_table: float
    scalp: float  # everything between the outer table and the air
    skin: float
    fat: float
    temporalis: float  # extra lateral muscle thickness over the temporal bone


def sample_shells(rng: np.random.Generator) -> ShellThickness:
    """Draw plausible adult skull and scalp thicknesses (mm)."""
    skin = rng.uniform(1.5, 2.5)
    fat = rng.uniform(1.5, 6.5)
    return ShellThickness(
        csf=rng.uniform(1.0, 3.5),
        dura=0.8,
        inner_table=rng.uniform(1.2, 2.2),
        diploe=rng.uniform(1.5, 4.5),
        outer_table=rng.uniform(1.2, 2.2),
        scalp=skin + fat + rng.uniform(0.8, 2.0),
        skin=skin,
        fat=fat,
        temporalis=rng.uniform(5.0, 11.0),
    )


def _smooth_max(a: F32, b: F32, radius_mm: float) -> F32:
    """max(a, b) with the corner rounded over ~radius_mm: the union of two bodies given by depths (mm)."""
    k = np.log(2.0) / radius_mm
    out = np.maximum(a, b)
    d = np.abs(a - b)
    near = np.flatnonzero(d < 8.0 * radius_mm)  # elsewhere the rounding term is below 0.005 mm
    out[near] += np.log1p(np.exp(-d[near] * k)) / k
    return out.astype(np.float32, copy=False)


_NECK_FILLET_MM = 8.0


def _band(d: F32, lo: F32 | float, hi: F32 | float, h: float) -> F32:
    """Partial-volume fraction of the layer lo <= d < hi for voxels of size h (linear edge ramps)."""
    a = np.clip((d - lo) * (1.0 / h) + 0.5, 0.0, 1.0)
    a -= np.clip((d - hi) * (1.0 / h) + 0.5, 0.0, 1.0)
    return a


def smooth_noise(
    rng: np.random.Generator, shape: tuple[int, int, int], spacing: float, scale_mm: float, z_stretch: float = 1.0
) -> F32:
    """Smooth random field (z, y, x) of about unit standard deviation, correlation length ~scale_mm in-plane
    and ``z_stretch`` times that along z."""
    step = max(1, int(round(scale_mm / 2.0 / spacing)))
    coarse_shape = tuple(-(-n // step) + 1 for n in shape)
    c = ndi.gaussian_filter(rng.standard_normal(coarse_shape).astype(np.float32), (z_stretch, 1.0, 1.0), mode="wrap")
    c /= c.std() + 1e-6
    return _upsample_to(c, shape, float(step))


def build_tissues(template: Template, rng: np.random.Generator) -> TissueStack:
    """Per-patient tissue fractions: template brain, CSF rim, dura, skull (tables and diploe), scalp
    (skin, fat, galea and temporalis) and neck (muscle under fat and skin, cervical spine, airway)."""
    g = template.grid
    h = g.spacing
    t = sample_shells(rng)
    stack = TissueStack(g)
    stack["gm"][:] = template.gm
    stack["wm"][:] = template.wm
    stack["csf"][:] = template.csf

    idx = template.shell_index
    e = template.shell_envelope_dist
    noise = smooth_noise(rng, template.coarse.shape, template.coarse.spacing, 40.0).ravel()[
        template.shell_coarse_index
    ]
    b0 = t.csf
    b1 = b0 + t.dura
    b2 = b1 + t.inner_table
    b3 = b2 + t.diploe * np.clip(1.0 + 0.35 * noise, 0.3, None)
    b4 = b3 + t.outer_table
    b5 = b4 + t.scalp + t.temporalis * template.shell_temporal
    layers = {
        "csf": np.clip((b0 - e) * (1.0 / h) + 0.5, 0.0, 1.0),
        "dura": _band(e, b0, b1, h),
        "bone": _band(e, b1, b2, h) + _band(e, b3, b4, h),
        "marrow": _band(e, b2, b3, h),
    }
    skull = np.clip((b4 - e) * (1.0 / h) + 0.5, 0.0, 1.0)  # == the sum of the layers above
    # soft tissue: depth below the skin, the union of the scalp shell and the neck cylinder
    depth = _smooth_max(b5 - e, template.shell_neck_depth, _NECK_FILLET_MM)
    free = 1.0 - skull
    skin = _band(depth, 0.0, t.skin, h) * free
    fat_bottom = (t.skin + t.fat) * np.clip(1.0 + 0.3 * noise, 0.3, None)
    fat = _band(depth, t.skin, fat_bottom, h) * free
    body = np.clip(depth * (1.0 / h) + 0.5, 0.0, 1.0) * free
    deep = np.clip(body - skin - fat, 0.0, None)
    # fat planes between the neck muscles: thin sheets where a second smooth field crosses zero
    septa_field = smooth_noise(rng, template.coarse.shape, template.coarse.spacing, 20.0, z_stretch=3.0).ravel()[
        template.shell_coarse_index
    ]
    septa = np.clip(1.0 - np.abs(septa_field) / 0.15, 0.0, 0.8) * (template.shell_neck_depth > fat_bottom + 3.0)
    layers["skin"] = skin
    layers["fat"] = fat + deep * septa
    layers["muscle"] = deep * (1.0 - septa)
    for name, frac in layers.items():
        stack[name].ravel()[idx] = frac
    _add_spine(stack, template, rng)
    _add_falx(stack, template)
    return stack


def _add_falx(stack: TissueStack, template: Template) -> None:
    """The falx cerebri: a ~1 mm dural sheet in the interhemispheric fissure (CSF at the midline), above the
    corpus callosum; it enhances mildly after contrast like the rest of the dura."""
    g = stack.grid
    h = g.spacing
    half = 4.0 * h
    ix = g.to_index((0.0, 0.0, 0.0))[2]
    box = (slice(int(g.to_index((0, 0, _FALX_BOTTOM_Z))[0]), g.shape[0]), slice(0, g.shape[1]),
           slice(int(np.floor(ix - half / h)), int(np.ceil(ix + half / h)) + 1))
    _, _, x = g.axes_mm(box)
    sheet = np.clip(0.5 + (0.5 * _FALX_THICKNESS_MM - np.abs(x)) / h, 0.0, 1.0)[None, None, :]
    fissure = np.clip((stack["csf"][box] - 0.3) / 0.4, 0.0, 1.0) * template.brain[box]
    falx = (sheet * fissure * stack["csf"][box]).astype(np.float32)
    stack.put(box, {"dura": stack["dura"][box] + falx, "csf": stack["csf"][box] - falx})


_FALX_BOTTOM_Z = 15.0  # LPS z (mm): the falx's free edge lies above the corpus callosum
_FALX_THICKNESS_MM = 1.0


def _add_spine(stack: TissueStack, template: Template, rng: np.random.Generator) -> None:
    """Upper cervical vertebral bodies (marrow in a cortical rim, separated by discs) in front of the cord, and
    the pharyngeal airway in front of them; both only below the skull base."""
    g = stack.grid
    h = g.spacing
    cx, cy = template.cord_xy
    lo = g.to_index((cx - 25.0, cy - 55.0, g.origin[2]))
    hi = g.to_index((cx + 25.0, cy + 5.0, _SPINE_TOP_Z + 8.0))
    box = tuple(slice(max(0, int(lo[a])), min(g.shape[a], int(hi[a]) + 2)) for a in range(3))
    z, y, x = g.axes_mm(box)
    canal = sample(template.coarse, template.brain_dist, box_points(g, box))
    outside_canal = canal > 2.5
    below_base = (z < _SPINE_TOP_Z)[:, None, None]
    # vertebral bodies ~15 mm tall with ~4 mm discs, counted down from the top of the dens
    level = np.mod(_SPINE_TOP_Z - z, rng.uniform(17.0, 20.0))
    disc = np.clip((level - 14.5) / h + 0.5, 0.0, 1.0) * np.clip((18.5 - level) / h + 0.5, 0.0, 1.0)
    disc[z > _SPINE_TOP_Z - 22.0] = 0.0  # the dens and the body of C2 are one bone
    r_body = rng.uniform(7.5, 9.5)
    by = cy - rng.uniform(16.0, 19.0)  # anterior is -y in LPS
    rb = np.sqrt((x[None, :] - cx) ** 2 + ((y[:, None] - by) * 1.2) ** 2)[None]
    column = np.clip((r_body - rb) / h + 0.5, 0.0, 1.0) * below_base * outside_canal
    core = np.clip((r_body - 1.5 - rb) / h + 0.5, 0.0, 1.0) * below_base * outside_canal
    bone_frac = (column - core) * (1.0 - disc[:, None, None])
    marrow_frac = core * (1.0 - disc[:, None, None])
    # the pharynx: wider at the top (naso- and oropharynx), narrowing down
    ay = by - r_body - rng.uniform(7.0, 10.0)
    widen = 1.0 + 0.5 * np.clip((z - (_SPINE_TOP_Z - 40.0)) / 40.0, 0.0, 1.0)
    ra = np.sqrt(
        ((x[None, None, :] - cx) / (rng.uniform(8.0, 12.0) * widen[:, None, None])) ** 2
        + ((y[None, :, None] - ay) / rng.uniform(5.0, 8.0)) ** 2
    )
    airway = np.clip((1.0 - ra) * 6.0 / h + 0.5, 0.0, 1.0) * (canal > 10.0)
    stack.put(box, {
        "bone": np.maximum(stack["bone"][box], bone_frac).astype(np.float32),
        "marrow": np.maximum(stack["marrow"][box], marrow_frac).astype(np.float32),
        "muscle": np.maximum(stack["muscle"][box], column * disc[:, None, None]).astype(np.float32),  # disc
    })
    stack.data[(slice(None),) + box] *= (1.0 - airway).astype(np.float32)[None]


_SPINE_TOP_Z = -62.0  # LPS z (mm) of the top of the dens, just below the foramen magnum


@dataclass(frozen=True)
class PatientDeformation:
    """Maps patient space to template space (LPS mm); ``forward`` is the affine part template -> patient."""

    transform: sitk.Transform  # patient point -> template point (affine + elastic), for resampling
    forward: NDArray[np.float64]  # 4x4 affine template -> patient (without the elastic part)
    field_origin: tuple[float, float, float]  # LPS mm: the displacement field's grid (cubic, identity direction)
    field_size: int
    field_spacing: float
    head_centre: tuple[float, float, float]  # LPS mm, patient space
    pitch_deg: float  # head flexion about the left-right axis (technologists tilt axial slabs to follow it)


def _rotation(rx: float, ry: float, rz: float) -> NDArray[np.float64]:
    """Rotation matrix from angles (radians) about the x, y and z axes, applied in that order."""
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    mx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    my = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    mz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return mz @ my @ mx


def rigid_matrix(angles_deg: ArrayLike, shift_mm: ArrayLike, centre: ArrayLike) -> NDArray[np.float64]:
    """4x4 rigid transform rotating by ``angles_deg`` (x, y, z) about ``centre`` then shifting (LPS mm)."""
    r = _rotation(*np.deg2rad(np.asarray(angles_deg, dtype=np.float64)))
    c = np.asarray(centre, dtype=np.float64)
    m = np.eye(4)
    m[:3, :3] = r
    m[:3, 3] = c - r @ c + np.asarray(shift_mm, dtype=np.float64)
    return m


def affine_transform(m: NDArray[np.float64]) -> sitk.AffineTransform:
    """A 4x4 point mapping as a SimpleITK transform."""
    t = sitk.AffineTransform(3)
    t.SetMatrix(tuple(m[:3, :3].ravel()))
    t.SetTranslation(tuple(m[:3, 3]))
    return t


_FIELD_SPACING_MM = 8.0
_FIELD_HALF_MM = 200.0  # the field covers every FOV: outside it ITK would use a zero displacement


def random_deformation(template: Template, rng: np.random.Generator) -> PatientDeformation:
    """Per-patient affine (scale 0.9-1.1 per axis, small rotation and shear, a head position in the scanner)
    and a smooth elastic field (amplitude ~2-4 mm, correlation ~30 mm)."""
    scale = rng.uniform(0.9, 1.1, size=3)
    shear = rng.uniform(-0.04, 0.04, size=3)
    pitch = rng.uniform(-10.0, 10.0)
    angles = np.array([pitch, rng.uniform(-4.0, 4.0), rng.uniform(-4.0, 4.0)])
    lin = _rotation(*np.deg2rad(angles)) @ np.array(
        [[1.0, shear[0], shear[1]], [0.0, 1.0, shear[2]], [0.0, 0.0, 1.0]]
    ) @ np.diag(scale)
    c_t = np.asarray(template.centre)
    c_p = np.array([rng.uniform(-8, 8), rng.uniform(-15, 15), rng.uniform(-25, 25)])
    fwd = np.eye(4)
    fwd[:3, :3] = lin
    fwd[:3, 3] = c_p - lin @ c_t
    inv = np.linalg.inv(fwd)

    n = int(2 * _FIELD_HALF_MM / _FIELD_SPACING_MM) + 1
    amp = rng.uniform(2.0, 4.0)
    sigma = 30.0 / _FIELD_SPACING_MM
    e = np.stack([ndi.gaussian_filter(rng.standard_normal((n, n, n)), sigma, mode="reflect") for _ in range(3)], -1)
    e *= amp / (np.abs(e).max() + 1e-9)
    ax = (np.arange(n) * _FIELD_SPACING_MM - _FIELD_HALF_MM)
    zz, yy, xx = np.meshgrid(ax + c_p[2], ax + c_p[1], ax + c_p[0], indexing="ij")
    pts = np.stack([xx, yy, zz], -1) + e  # patient point + elastic displacement, (z, y, x, 3) as (x, y, z)
    mapped = pts @ inv[:3, :3].T + inv[:3, 3]
    disp = mapped - np.stack([xx, yy, zz], -1)
    field = sitk.GetImageFromArray(disp.astype(np.float64), isVector=True)
    field.SetOrigin(tuple(float(v) for v in (c_p - _FIELD_HALF_MM)))
    field.SetSpacing((_FIELD_SPACING_MM,) * 3)
    tx = sitk.DisplacementFieldTransform(field)
    return PatientDeformation(
        transform=tx,
        forward=fwd,
        field_origin=tuple(float(v) for v in (c_p - _FIELD_HALF_MM)),
        field_size=n,
        field_spacing=_FIELD_SPACING_MM,
        head_centre=tuple(float(v) for v in c_p),
        pitch_deg=float(pitch),
    )
