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
# The template grid (197 x 233 x 189 at 1 mm) after RAS -> LPS flipping has voxel (0, 0, 0) at LPS
# (-98, -98, -72). The head grid extends it by these many mm on each side: the skull and scalp need
# ~25 mm around the brain and the neck continues 60 mm below the template's last slice.
_TEMPLATE_ORIGIN_LPS = (-98.0, -98.0, -72.0)
_PAD_MM = {"x": (4, 8), "y": (5, 8), "z": (60, 6)}  # (low, high) extra voxels around the 197x233x189 template
_BRAIN_T1_THRESHOLD = 0.02  # of the template's 0..1 range; the template is skull-stripped with zeros outside
_ENVELOPE_CLOSING_MM = 6.0  # closes sulcal openings so the skull follows the brain's envelope, not its gyri
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
    shell_envelope_dist: F32  # at shell_index: signed mm outside the closed intracranial envelope
    shell_neck_depth: F32  # at shell_index: mm below the neck cylinder's surface (< 0 outside it)
    shell_temporal: F32  # at shell_index: 0..1 weight of the temporalis muscle
    shell_coarse_index: NDArray[np.intp]  # at shell_index: flat index of the enclosing ``coarse`` voxel
    cord_xy: tuple[float, float]  # LPS (x, y) mm of the spinal cord's axis
    centre: tuple[float, float, float]  # LPS mm: centre of the brain's bounding box (cerebrum and cerebellum)
    extent: tuple[tuple[float, float], ...]  # (min, max) LPS mm of the brain along x, y, z (cord excluded)
    body_surface: NDArray[np.float64]  # (N, 3) LPS mm: outer voxels (2 mm grid) of where tissue may be


def nilearn_data_dir() -> Path:
    """Folder of nilearn's bundled data files, found without importing nilearn (which is slow)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the nilearn package (its MNI template data files) is not installed")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data"


def _read_lps(name: str) -> F32:
    """One template map as float32 0..1 in LPS (z, y, x) order; the file is RAS with a diagonal affine."""
    img = nib.load(nilearn_data_dir() / _TEMPLATE_FILE.format(name))
    if not np.allclose(np.abs(np.diag(img.affine)[:3]), 1.0) or not np.allclose(img.affine[:3, :3], np.diag(np.diag(img.affine)[:3])):
        raise RuntimeError(f"unexpected affine in the {name} template: {img.affine}")
    a = np.asarray(img.dataobj, dtype=np.float32) / 255.0
    # RAS (x grows toward the patient's Right, y toward Anterior) -> LPS: flip the first two axes
    a = a[::-1, ::-1, :]
    return np.ascontiguousarray(a.transpose(2, 1, 0))


def _pad(a: F32, value: float = 0.0) -> F32:
    (zl, zh), (yl, yh), (xl, xh) = _PAD_MM["z"], _PAD_MM["y"], _PAD_MM["x"]
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
    t1, gm, wm = (_pad(_read_lps(n)) for n in ("t1", "gm", "wm"))
    zl = _PAD_MM["z"][0]
    brain = _fill_holes(t1 > _BRAIN_T1_THRESHOLD)
    cerebrum_z = np.nonzero(brain.any(axis=(1, 2)))[0]
    brain[:zl] = brain[zl]  # the medulla's cross-section in the template's last slice continues as the cord
    for a in (gm, wm):
        a[:zl] = a[zl]

    f = int(round(spacing_mm))
    origin = tuple(
        _TEMPLATE_ORIGIN_LPS[i] - _PAD_MM[a][0] + (f - 1) / 2.0 for i, a in enumerate(("x", "y", "z"))
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
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0) * brain
    grid = Grid(origin=origin, spacing=float(f), shape=gm.shape)  # type: ignore[arg-type]

    # distances on a 2 mm grid, interpolated: skull shells and lesion constraints tolerate ~0.3 mm error
    c = int(round(_DIST_SPACING_MM / f))
    coarse = _block_mean(brain, c) >= 0.5
    outside = _edt(~coarse, _DIST_SPACING_MM)
    inside = _edt(coarse, _DIST_SPACING_MM)
    closed = _edt(outside <= _ENVELOPE_CLOSING_MM, _DIST_SPACING_MM) > _ENVELOPE_CLOSING_MM
    # signed distance to the surface between voxel centres (hence the half voxel): < 0 inside
    half = _DIST_SPACING_MM / 2.0
    envelope = np.where(closed, half - _edt(closed, _DIST_SPACING_MM), _edt(~closed, _DIST_SPACING_MM) - half)
    csf_coarse = _block_mean(csf, c)
    ventricles = (csf_coarse > 0.6) & (inside > 8.0)
    lab, n = ndi.label(ventricles)
    if n:
        sizes = ndi.sum_labels(ventricles, lab, index=np.arange(1, n + 1))
        keep = np.concatenate([[False], sizes >= 0.2 * sizes.max()])  # lateral, third and fourth ventricles
        ventricles = keep[lab]
    vdist = _edt(~ventricles, _DIST_SPACING_MM)
    envelope_dist = _upsample_to(envelope, grid.shape, c)
    coarse_grid = Grid(
        origin=tuple(o + (c - 1) * f / 2.0 for o in origin), spacing=_DIST_SPACING_MM, shape=coarse.shape  # type: ignore[arg-type]
    )

    lo_z = (cerebrum_z[0] - 0.5) / f - 0.5  # first template slice, in this grid's index units
    b_lo, b_hi = _bounds(brain[int(np.ceil(lo_z)) :])
    lo = grid.to_lps(b_lo + [int(np.ceil(lo_z)), 0, 0])
    hi = grid.to_lps(b_hi + [int(np.ceil(lo_z)), 0, 0])
    centre = tuple(float(v) for v in (lo + hi) / 2.0)
    extent = tuple((float(lo[i]), float(hi[i])) for i in range(3))
    cz = int(np.ceil(lo_z))
    cy, cx = ndi.center_of_mass(brain[cz])
    cord_xy = tuple(float(v) for v in grid.to_lps([cz, cy, cx])[:2])

    neck_depth = _neck_depth(grid, cord_xy)
    shell = ~brain & ((envelope_dist < _SHELL_MAX_MM) | (neck_depth > -2.0 * f))
    iz, iy, ix = np.nonzero(shell)
    shell_index = (iz * grid.shape[1] + iy) * grid.shape[2] + ix
    z, y, x = grid.axes_mm(tuple(slice(0, n) for n in grid.shape))  # type: ignore[arg-type]
    wz, wy, wx = _temporal_weight(centre, x, y, z)
    cs = coarse.shape
    body = _block_mean(shell | brain, c) > 0
    surface = body & ~ndi.binary_erosion(body)
    body_surface = coarse_grid.to_lps(np.argwhere(surface).astype(np.float64))
    arrays = dict(
        gm=gm,
        wm=wm,
        csf=csf,
        brain=brain,
        brain_depth=inside,
        brain_dist=outside,
        ventricle_dist=vdist,
        envelope_coarse=envelope,
        csf_coarse=csf_coarse,
        shell_index=shell_index,
        shell_envelope_dist=envelope_dist.ravel()[shell_index],
        shell_neck_depth=neck_depth.ravel()[shell_index],
        shell_temporal=wz[iz] * wy[iy] * wx[ix],
        shell_coarse_index=(
            (np.minimum(iz // c, cs[0] - 1) * cs[1] + np.minimum(iy // c, cs[1] - 1)) * cs[2] + np.minimum(ix // c, cs[2] - 1)
        ),
    )
    for a in arrays.values():
        a.setflags(write=False)
    return Template(
        grid=grid, coarse=coarse_grid, cord_xy=cord_xy, centre=centre, extent=extent, body_surface=body_surface,
        **arrays,  # type: ignore[arg-type]
    )  # type: ignore[arg-type]


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


_SHELL_MAX_MM = 40.0  # the thickest skull + scalp + temporalis stays well inside this distance
# The neck: an elliptic cylinder below the posterior fossa, centred a little in front of the cord.
_NECK_TOP_Z = -45.0  # LPS z (mm) where the neck cylinder starts fading into the head shells
_NECK_SEMI_AXES = (52.0, 56.0)  # mm, left-right and antero-posterior
_NECK_ANTERIOR_SHIFT = 14.0  # mm in front of the cord


def _neck_depth(grid: Grid, cord_xy: tuple[float, float]) -> F32:
    """Depth (mm, > 0 inside) below the neck's skin surface; it shrinks to nothing above the skull base."""
    z, y, x = grid.axes_mm(tuple(slice(0, n) for n in grid.shape))  # type: ignore[arg-type]
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

    def replace(self, name: str, box: tuple[slice, slice, slice], frac: F32) -> None:
        """Raise tissue ``name`` to at least ``frac`` in ``box`` (see ``put``)."""
        self.put(box, {name: np.maximum(self[name][box], frac)})


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


def _band(d: F32, lo: F32 | float, hi: F32 | float, h: float) -> F32:
    """Partial-volume fraction of the layer lo <= d < hi for voxels of size h (linear edge ramps)."""
    a = np.clip((d - lo) * (1.0 / h) + 0.5, 0.0, 1.0)
    a -= np.clip((d - hi) * (1.0 / h) + 0.5, 0.0, 1.0)
    return a


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int, int], spacing: float, scale_mm: float) -> F32:
    """Smooth random field (z, y, x) of about unit standard deviation, correlation length ~scale_mm."""
    step = max(1, int(round(scale_mm / 2.0 / spacing)))
    coarse_shape = tuple(-(-n // step) + 1 for n in shape)
    c = ndi.gaussian_filter(rng.standard_normal(coarse_shape).astype(np.float32), 1.0, mode="wrap")
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
    depth = np.maximum(b5 - e, template.shell_neck_depth)
    free = 1.0 - skull
    skin = _band(depth, 0.0, t.skin, h) * free
    fat = _band(depth, t.skin, (t.skin + t.fat) * np.clip(1.0 + 0.3 * noise, 0.3, None), h) * free
    body = np.clip(depth * (1.0 / h) + 0.5, 0.0, 1.0) * free
    layers["skin"] = skin
    layers["fat"] = fat
    layers["muscle"] = np.clip(body - skin - fat, 0.0, None)
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
    z, y, x = g.axes_mm(box)
    sheet = np.clip(0.5 + (0.5 * _FALX_THICKNESS_MM - np.abs(x)) / h, 0.0, 1.0)[None, None, :]
    fissure = np.clip((stack["csf"][box] - 0.3) / 0.4, 0.0, 1.0) * template.brain[box]
    falx = (sheet * fissure * stack["csf"][box]).astype(np.float32)
    stack.put(box, {"dura": stack["dura"][box] + falx, "csf": stack["csf"][box] - falx})


_FALX_BOTTOM_Z = 15.0  # LPS z (mm): the falx's free edge lies above the corpus callosum
_FALX_THICKNESS_MM = 1.0


def _add_spine(stack: TissueStack, template: Template, rng: np.random.Generator) -> None:
    """Upper cervical vertebral bodies (marrow in a cortical rim) in front of the cord, and the pharyngeal
    airway in front of them; both only below the skull base."""
    g = stack.grid
    h = g.spacing
    cx, cy = template.cord_xy
    box = g.box((cx, cy - 30.0, _SPINE_TOP_Z - 50.0), 45.0)
    box = (slice(box[0].start, int(g.to_index((0, 0, _SPINE_TOP_Z + 8.0))[0]) + 1), box[1], box[2])
    z, y, x = g.axes_mm(box)
    canal = sample(template.coarse, template.brain_dist, box_points(g, box))
    outside_canal = canal > 2.5
    below_base = (z < _SPINE_TOP_Z)[:, None, None]
    r_body = rng.uniform(7.5, 9.5)
    by = cy - rng.uniform(16.0, 19.0)  # anterior is -y in LPS
    rb = np.sqrt((x[None, :] - cx) ** 2 + ((y[:, None] - by) * 1.2) ** 2)[None]
    body = np.clip((r_body - rb) / h + 0.5, 0.0, 1.0) * below_base * outside_canal
    core = np.clip((r_body - 1.5 - rb) / h + 0.5, 0.0, 1.0) * below_base * outside_canal
    ay = by - r_body - rng.uniform(8.0, 12.0)
    ra = np.sqrt(
        ((x[None, :] - cx) / rng.uniform(9.0, 13.0)) ** 2 + ((y[:, None] - ay) / rng.uniform(5.0, 8.0)) ** 2
    )[None]
    airway = np.clip((1.0 - ra) * 6.0 / h + 0.5, 0.0, 1.0) * (canal > 10.0)
    stack.replace("bone", box, (body - core).astype(np.float32))
    stack.replace("marrow", box, core.astype(np.float32))
    stack.data[(slice(None),) + box] *= (1.0 - airway).astype(np.float32)[None]


_SPINE_TOP_Z = -62.0  # LPS z (mm) of the top of the dens, just below the foramen magnum


@dataclass(frozen=True)
class PatientDeformation:
    """Maps patient space to template space (LPS mm); ``forward`` is the affine part template -> patient."""

    transform: sitk.Transform  # patient point -> template point (affine + elastic), for resampling
    forward: NDArray[np.float64]  # 4x4 affine template -> patient (without the elastic part)
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
        head_centre=tuple(float(v) for v in c_p),  # type: ignore[arg-type]
        pitch_deg=float(pitch),
    )
