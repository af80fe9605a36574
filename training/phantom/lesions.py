"""Brain metastases and their vasogenic oedema, drawn in template space (LPS mm, arrays in (z, y, x) order).

Metastases seed haematogenously where the calibre of arterioles drops, at the grey-white junction: centres are
drawn where both grey- and white-matter fractions are intermediate. Many are small (2-5 mm), a few large (up to
30 mm); kinds are ``solid``, ``ring`` (enhancing rim around a necrotic core) and ``irregular`` (lobulated union of
blobs). Oedema spreads from the lesion along white matter (finger-like), sparing the cortex.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage as ndi

from training.phantom.anatomy import Grid, Template, TissueStack, load_template, sample

F32 = NDArray[np.float32]

KINDS = ("solid", "ring", "irregular")
MAX_LESIONS = 30


@dataclass(frozen=True)
class LesionSpec:
    """One metastasis as drawn by the generator (template space)."""

    kind: str  # "solid" | "ring" | "irregular"
    centre: tuple[float, float, float]  # LPS mm, template space
    diameter_mm: float  # nominal diameter
    edema: bool
    edema_extent_mm: float  # how far oedema spreads beyond the lesion's surface (0 without oedema)
    enhancement: float  # 0..1: mean share of strongly enhancing tumour in the enhancing part


def sample_count(rng: np.random.Generator) -> int:
    """Number of metastases: 1-3 in about half of patients, 4-10 in a third, 11-30 in the rest."""
    u = rng.random()
    if u < 0.45:
        return int(rng.integers(1, 4))
    if u < 0.80:
        return int(rng.integers(4, 11))
    return int(np.clip(np.round(11 + rng.exponential(7.0)), 11, MAX_LESIONS))


def sample_diameter(rng: np.random.Generator, many: bool) -> float:
    """Nominal diameter in mm: many small (2-5), some medium (5-12), a few large (12-30, log-uniform)."""
    w_small, w_medium = (0.6, 0.3) if many else (0.4, 0.35)
    u = rng.random()
    if u < w_small:
        return float(rng.uniform(2.0, 5.0))
    if u < w_small + w_medium:
        return float(rng.uniform(5.0, 12.0))
    return float(np.exp(rng.uniform(np.log(12.0), np.log(30.0))))


def sample_kind(rng: np.random.Generator, diameter: float) -> str:
    """Small lesions are solid nodules; necrotic rings appear as lesions outgrow their blood supply."""
    if diameter < 6.0:
        p = (0.85, 0.0, 0.15)
    elif diameter < 12.0:
        p = (0.5, 0.3, 0.2)
    else:
        p = (0.2, 0.55, 0.25)
    return str(rng.choice(KINDS, p=p))


def sample_edema(rng: np.random.Generator, diameter: float) -> float:
    """Oedema extent beyond the lesion surface (mm), 0 for none; it grows with the lesion's size."""
    p = 0.3 if diameter < 5.0 else (0.7 if diameter < 10.0 else 0.92)
    if rng.random() >= p:
        return 0.0
    return float(rng.uniform(2.0, 5.0) + diameter * rng.uniform(0.3, 1.3))


@functools.lru_cache(maxsize=2)
def _candidates(spacing_mm: float) -> tuple[NDArray[np.intp], NDArray[np.intp]]:
    """Flat template indices of grey-white junction voxels and of any parenchyma voxel (cached)."""
    t = load_template(spacing_mm)
    parenchyma = t.brain & (t.csf < 0.15)
    gwj = parenchyma & (t.gm > 0.25) & (t.gm < 0.75) & (t.wm > 0.2) & (t.wm < 0.75)
    parenchyma &= (t.gm + t.wm) > 0.85
    return np.flatnonzero(gwj), np.flatnonzero(parenchyma)


def place_lesions(template: Template, rng: np.random.Generator, voxel_mm: float | None = None) -> list[LesionSpec]:
    """Draw the lesions of one patient: count, sizes, kinds, oedema, and non-overlapping centres at the
    grey-white junction (80 %) or anywhere in the parenchyma, away from the ventricles.

    The largest lesion is at least 5 mm (and two voxels of a forced ``voxel_mm``) so that every patient keeps
    at least one lesion after resampling; with coarse forced voxels no lesion is smaller than ~1.5 voxels."""
    n = sample_count(rng)
    many = n > 10
    floor = 2.0 if voxel_mm is None else max(2.0, 1.5 * voxel_mm)
    diameters = sorted((max(floor, sample_diameter(rng, many)) for _ in range(n)), reverse=True)
    diameters[0] = max(diameters[0], 5.0, 2.0 * (voxel_mm or 0.0))  # big ones first: harder to fit
    gwj, parenchyma = _candidates(template.grid.spacing)
    placed: list[LesionSpec] = []
    centres: list[NDArray[np.float64]] = []
    radii: list[float] = []
    for d in diameters:
        kind = sample_kind(rng, d)
        for attempt in range(300):
            dd = d if attempt < 200 else d * 0.7  # a big lesion that does not fit anywhere shrinks
            r = dd / 2.0
            pool = gwj if rng.random() < 0.8 else parenchyma
            zyx = np.unravel_index(pool[rng.integers(pool.size)], template.grid.shape)
            c = template.grid.to_lps(np.asarray(zyx, dtype=np.float64) + rng.uniform(-0.5, 0.5, 3))
            if not _fits(template, c, r, kind, centres, radii):
                continue
            edema = sample_edema(rng, dd)
            placed.append(
                LesionSpec(
                    kind=kind,
                    centre=tuple(float(v) for v in c),
                    diameter_mm=float(dd),
                    edema=edema > 0.0,
                    edema_extent_mm=edema,
                    enhancement=float(rng.uniform(0.35, 1.0)),
                )
            )
            centres.append(c)
            radii.append(r * (1.35 if kind == "irregular" else 1.15))
            break
    if not placed:
        raise RuntimeError("could not place any metastasis")  # cannot happen with the MNI template
    return placed


def _fits(
    template: Template, c: NDArray[np.float64], r: float, kind: str, centres: list[NDArray[np.float64]],
    radii: list[float],
) -> bool:
    """Whether a lesion of radius ``r`` (mm) at ``c`` lies deep enough in the parenchyma, clear of the
    ventricles and of the lesions already placed."""
    depth = float(sample(template.coarse, template.brain_depth, c))
    ventricle = float(sample(template.coarse, template.ventricle_dist, c))
    if depth < max(2.0, 0.75 * r) or ventricle < 0.9 * r + 2.0:
        return False
    reach = r * (1.35 if kind == "irregular" else 1.15)
    return all(np.linalg.norm(c - o) >= reach + ro + 2.0 for o, ro in zip(centres, radii))


def _waves(rng: np.random.Generator, rel: tuple[F32, F32, F32], n: int, freq: tuple[float, float]) -> F32:
    """A smooth random field of ~unit amplitude: sum of ``n`` plane waves; ``rel`` are coordinates (z, y, x)
    in units of the lesion radius, ``freq`` the range of spatial frequencies (radians per radius)."""
    dz, dy, dx = rel
    out = np.zeros(np.broadcast_shapes(dz.shape, dy.shape, dx.shape), dtype=np.float32)
    for _ in range(n):
        v = rng.normal(size=3)
        v *= rng.uniform(*freq) / np.linalg.norm(v)
        out += np.cos(v[0] * dz + v[1] * dy + v[2] * dx + rng.uniform(0, 2 * np.pi)).astype(np.float32)
    return out * np.float32(1.0 / np.sqrt(n / 2.0))


def _ellipsoid_radius(rng: np.random.Generator, rel: tuple[F32, F32, F32], elong: float) -> F32:
    """Normalised radius |A x| of a randomly oriented ellipsoid of unit volume-equivalent radius."""
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    axes = np.exp(rng.uniform(-elong, elong, 3))
    axes /= np.prod(axes) ** (1.0 / 3.0)
    m = (q / axes[None, :]).T  # rotate then scale
    dz, dy, dx = rel
    u = [m[i, 0] * dx + m[i, 1] * dy + m[i, 2] * dz for i in range(3)]
    return np.sqrt(u[0] ** 2 + u[1] ** 2 + u[2] ** 2).astype(np.float32)


def lesion_shape(rng: np.random.Generator, spec: LesionSpec, rel_mm: tuple[F32, F32, F32], h: float) -> tuple[F32, F32]:
    """Partial-volume fractions (whole lesion, necrotic core) on a box; ``rel_mm`` are the box's (z, y, x)
    offsets in mm from the centre, broadcastable; ``h`` the voxel size (mm) for the edge ramp."""
    r = spec.diameter_mm / 2.0
    rel = tuple(a / np.float32(r) for a in rel_mm)
    if spec.kind == "irregular":
        whole = np.zeros(np.broadcast_shapes(*(a.shape for a in rel)), dtype=np.float32)
        for _ in range(int(rng.integers(2, 5))):
            off = rng.normal(size=3)
            off *= rng.uniform(0.25, 0.6) / np.linalg.norm(off)
            rb = rng.uniform(0.45, 0.8)
            sub = (rel[0] - off[0], rel[1] - off[1], rel[2] - off[2])
            rho = _ellipsoid_radius(rng, sub, 0.25) * (1.0 + 0.18 * _waves(rng, sub, 5, (1.5, 4.0)))
            whole = np.maximum(whole, np.clip(0.5 - (rho - rb) * (r / h), 0.0, 1.0))
        return whole, np.zeros_like(whole)
    amp = 0.06 if spec.kind == "solid" else 0.1
    rho = _ellipsoid_radius(rng, rel, 0.18) * (1.0 + amp * _waves(rng, rel, 4, (1.0, 3.0)))
    whole = np.clip(0.5 - (rho - 1.0) * (r / h), 0.0, 1.0).astype(np.float32)
    if spec.kind != "ring":
        return whole, np.zeros_like(whole)
    rim_mm = max(1.5, rng.uniform(0.15, 0.35) * r)
    q = max(0.3, 1.0 - rim_mm / r)
    # the core follows the outer surface (a complete rim of varying thickness) with its own irregular margin
    rho_in = rho * (1.0 + 0.12 * _waves(rng, rel, 5, (1.5, 4.0)))
    core = np.clip(0.5 - (rho_in - q) * (r / h), 0.0, 1.0) * whole
    return whole, core.astype(np.float32)


_FOOTPRINT_18 = ndi.generate_binary_structure(3, 2)  # face and edge neighbours: rounder fronts than 26


def _spread_edema(
    rng: np.random.Generator, seed: F32, wm: F32, gm: F32, extent_mm: float, h: float
) -> F32:
    """Oedema 0..1 on a box: a front spreads from the lesion ``seed`` one voxel per step, losing strength with
    distance (faster where a smooth random field says so) and passing only through white matter (grey matter
    all but stops it), which gives finger-like fronds along the gyral white matter that reach ~``extent_mm``."""
    f = 2 if h < 1.5 and seed.size > 150_000 else 1  # large boxes spread on a 2 mm sub-grid
    shape = [n // f * f for n in seed.shape]
    crop = tuple(slice(0, n) for n in shape)

    def down(a: F32) -> F32:
        if f == 1:
            return a
        return a[crop].reshape(shape[0] // f, f, shape[1] // f, f, shape[2] // f, f).mean(axis=(1, 3, 5))

    s, w, g = down(seed), down(wm), down(gm)
    conduct = np.clip((w + 0.1 * g - 0.25) / 0.5, 0.0, 1.0).astype(np.float32)
    step = h * f
    axes = [(np.arange(n, dtype=np.float32) - n / 2.0) * step / 12.0 for n in s.shape]
    rel = (axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :])
    decay = (step / extent_mm) * np.clip(1.0 + 0.6 * _waves(rng, rel, 5, (1.0, 3.0)), 0.3, None)
    u = s.astype(np.float32)
    for _ in range(int(np.ceil(extent_mm / step))):
        v = ndi.maximum_filter(u, footprint=_FOOTPRINT_18, mode="constant")
        v -= decay
        v *= conduct
        np.maximum(u, v, out=u)
    if f > 1:
        full = np.zeros(seed.shape, dtype=np.float32)
        full[crop] = ndi.zoom(u, f, order=1, mode="nearest", grid_mode=True)[: shape[0], : shape[1], : shape[2]]
        u = full
    return np.clip(u / 0.35, 0.0, 1.0).astype(np.float32)


def render_lesions(stack: TissueStack, specs: list[LesionSpec], rng: np.random.Generator) -> NDArray[np.uint16]:
    """Write oedema and tumour fractions into ``stack`` and return the template-space label map
    (uint16, lesion i+1 where its fraction >= 0.5)."""
    g: Grid = stack.grid
    h = g.spacing
    label = np.zeros(g.shape, dtype=np.uint16)
    shapes = []
    for spec in specs:  # oedema of every lesion first: a lesion must not be overwritten by a neighbour's oedema
        r = spec.diameter_mm / 2.0
        reach = r * 1.45 + 2.0 * h
        box = g.box(spec.centre, reach + spec.edema_extent_mm + 2.0 * h)
        z, y, x = g.axes_mm(box)
        rel = (
            (z - spec.centre[2])[:, None, None],
            (y - spec.centre[1])[None, :, None],
            (x - spec.centre[0])[None, None, :],
        )
        whole, core = lesion_shape(rng, spec, rel, h)
        intracranial = np.clip(
            stack["gm"][box] + stack["wm"][box] + stack["csf"][box] + stack["edema"][box], 0.0, 1.0
        )
        whole *= intracranial
        core *= intracranial
        shapes.append((box, whole, core))
        if spec.edema:
            wm, gm = stack["wm"][box], stack["gm"][box]
            e = _spread_edema(rng, whole, wm, gm, spec.edema_extent_mm, h) * (1.0 - whole)
            grey = 0.25 * e * gm
            stack.put(box, {"edema": stack["edema"][box] + e * wm + grey, "wm": wm * (1.0 - e), "gm": gm - grey})
    for i, (spec, (box, whole, core)) in enumerate(zip(specs, shapes)):
        z, y, x = g.axes_mm(box)
        rel = (
            ((z - spec.centre[2]) / 2.0)[:, None, None],
            ((y - spec.centre[1]) / 2.0)[None, :, None],
            ((x - spec.centre[0]) / 2.0)[None, None, :],
        )
        # heterogeneous enhancement: a per-voxel mix of strongly and weakly enhancing tumour
        texture = np.clip(spec.enhancement + 0.2 * _waves(rng, rel, 6, (0.6, 2.0)), 0.05, 1.0)
        rim = whole - core
        # added to what is there: a neighbour's box may overlap this one (never its lesion)
        stack.put(box, {
            "tumor_hi": stack["tumor_hi"][box] + rim * texture,
            "tumor_lo": stack["tumor_lo"][box] + rim * (1.0 - texture),
            "necrosis": stack["necrosis"][box] + core,
        })
        lab = label[box]
        lab[(whole >= 0.5) & (lab == 0)] = i + 1
    return label
