"""Vessels in template space (LPS mm): dural venous sinuses, deep veins, basal arteries, cortical and sulcal
vessels, and the choroid plexus.

Blood carries gadolinium: on the post-contrast gradient-echo T1 (BRAVO) vessels are bright, small cortical
vessels cut across look like small metastases (the method's main source of false positives), while the fast
spin-echo T1s suppress flowing blood (dark) and FLAIR shows a flow void. The contrast is decided in
``contrast``; here we only draw where the blood is.

Sinus paths are found from the brain itself: rays from a point inside the brain find the brain's outer surface,
and the sinus runs a few millimetres beyond it, between brain and skull.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage as ndi

from training.phantom.anatomy import Grid, Template, TissueStack, sample

F32 = NDArray[np.float32]
P3 = NDArray[np.float64]


@dataclass(frozen=True)
class Tube:
    """A vessel: centreline points (N, 3) LPS mm about 0.5 mm apart, and the radius (mm) at each."""

    points: P3
    radii: NDArray[np.float64]
    name: str


def _resample_path(points: P3, step: float = 0.5, smooth: float = 0.0) -> P3:
    """Points evenly spaced by ``step`` mm along a polyline, optionally Gaussian-smoothed (sigma in mm)."""
    seg = np.linalg.norm(np.diff(points, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    t = np.arange(0.0, s[-1] + 1e-9, step)
    out = np.stack([np.interp(t, s, points[:, k]) for k in range(3)], axis=1)
    if smooth > 0 and len(out) > 3:
        out = ndi.gaussian_filter1d(out, smooth / step, axis=0, mode="nearest")
    return out


def _surface(
    template: Template, inner: ArrayLike, directions: P3, offset: NDArray[np.float64] | float, first_exit: bool = False
) -> P3:
    """For each ray from ``inner`` along ``directions`` (N, 3): the outermost brain point (or, with
    ``first_exit``, where the ray first leaves the brain) moved ``offset`` mm further along the ray."""
    steps = np.arange(0.0, 130.0, 1.0)
    start = np.broadcast_to(np.asarray(inner, dtype=np.float64), directions.shape)
    pts = start[:, None, :] + steps[None, :, None] * directions[:, None, :]
    inside = sample(template.coarse, template.brain_dist, pts) <= 0.5
    if first_exit:
        last = np.maximum(np.argmax(~inside, axis=1) - 1, 0)
    else:
        last = np.where(inside.any(axis=1), steps.size - 1 - np.argmax(inside[:, ::-1], axis=1), 0)
    return inner + (steps[last] + np.asarray(offset))[:, None] * directions


def dural_sinuses(template: Template, rng: np.random.Generator) -> list[Tube]:
    """Superior sagittal, straight, transverse and sigmoid sinuses, the vein of Galen and internal cerebral
    veins (template LPS mm). Radii vary per patient; one transverse sinus is often dominant."""
    tubes = []
    # superior sagittal sinus: along the midline over the convexity, widening toward the torcular
    theta = np.deg2rad(np.linspace(-105.0, 118.0, 120))  # from superior (0) toward posterior (+)
    dirs = np.stack([np.zeros_like(theta), np.sin(theta), np.cos(theta)], axis=1)
    frac = np.linspace(0.0, 1.0, theta.size)
    r_sss = rng.uniform(1.2, 1.8) + frac * rng.uniform(2.5, 3.5)
    sss = _surface(template, (0.0, 15.0, 5.0), dirs, r_sss * 0.8 + 1.0)
    sss = sss[np.concatenate([[True], np.linalg.norm(np.diff(sss, axis=0), axis=1) > 1e-3])]
    pts = _resample_path(sss, smooth=3.0)
    tubes.append(Tube(pts, np.interp(np.linspace(0, 1, len(pts)), frac, r_sss), "superior_sagittal"))
    torcular = pts[-1]

    # straight sinus from the vein of Galen to the torcular; internal cerebral veins feeding Galen
    galen = np.array([0.0, 45.0, 4.0]) + rng.normal(0.0, 1.0, 3)
    tubes.append(Tube(_resample_path(np.array([galen, torcular])), np.full(1, rng.uniform(1.8, 2.5)), "straight"))
    for side in (-1.0, 1.0):
        icv = np.array([[side * 2.5, -2.0, 14.0], [side * 2.5, 20.0, 15.0], [side * 1.5, 38.0, 10.0], galen])
        tubes.append(Tube(_resample_path(icv, smooth=2.0), np.full(1, rng.uniform(0.8, 1.1)), "internal_cerebral"))

    # transverse then sigmoid sinuses, around the posterior fossa at the tentorium's attachment
    dominant = rng.choice([-1.0, 1.0], p=[0.7, 0.3])  # the right (x < 0 in LPS) is usually larger
    for side in (-1.0, 1.0):
        big = side == dominant or rng.random() < 0.5
        r_ts = rng.uniform(3.0, 4.5) if big else rng.uniform(1.8, 3.0)
        psi = np.deg2rad(np.linspace(0.0, 105.0, 50))
        z = torcular[2] - np.linspace(0.0, 1.0, psi.size) * rng.uniform(10.0, 16.0)
        dirs = np.stack([side * np.sin(psi), np.cos(psi), np.zeros_like(psi)], axis=1)
        inner = np.stack([np.zeros_like(z), np.full_like(z, 55.0), z], axis=1)
        ts = np.array([_surface(template, inner[i], dirs[i : i + 1], r_ts + 1.0)[0] for i in range(psi.size)])
        zs = np.linspace(ts[-1, 2], ts[-1, 2] - rng.uniform(25.0, 35.0), 25)
        a = np.deg2rad(np.linspace(110.0, 125.0, zs.size))
        dirs_s = np.stack([side * np.sin(a), np.cos(a), np.zeros_like(a)], axis=1)
        sig = np.array(
            [_surface(template, (0.0, 50.0, zz), dirs_s[i : i + 1], r_ts * 0.9 + 1.0)[0] for i, zz in enumerate(zs)]
        )
        path = _resample_path(np.concatenate([[torcular], ts, sig]), smooth=3.0)
        tubes.append(Tube(path, np.full(1, r_ts), "transverse_sigmoid"))
    return tubes


def basal_arteries(template: Template, rng: np.random.Generator) -> list[Tube]:
    """Basilar artery in front of the pons, internal carotid termini and the first middle-cerebral segments."""
    zs = np.linspace(-48.0, -12.0, 30)
    dirs = np.tile([0.0, -1.0, 0.0], (zs.size, 1))
    basilar = np.array([_surface(template, (0.0, 30.0, z), dirs[:1], 2.0, first_exit=True)[0] for z in zs])
    tubes = [Tube(_resample_path(basilar, smooth=3.0), np.full(1, rng.uniform(1.3, 1.8)), "basilar")]
    for side in (-1.0, 1.0):
        ica = np.array([[side * 15.0, 2.0, -30.0], [side * 15.0, 0.0, -14.0], [side * 24.0, -2.0, -9.0],
                        [side * 36.0, 2.0, -4.0]]) + rng.normal(0.0, 1.0, (4, 3))
        tubes.append(Tube(_resample_path(ica, smooth=2.0), np.full(1, rng.uniform(1.3, 1.8)), "carotid_mca"))
    return tubes


def _walk(
    template: Template, rng: np.random.Generator, starts: P3, headings: P3, lengths: NDArray[np.float64],
    level: NDArray[np.float64] | None,
) -> list[P3]:
    """Smooth random walks (1 mm steps), all in lockstep. With ``level`` the walker stays at that distance
    (mm) outside the closed brain envelope (cortical veins on the surface); without, it follows CSF inside
    the brain (vessels in sulci and fissures) and stops when it leaves it."""
    n = len(starts)
    p = starts.copy()
    d = headings / np.linalg.norm(headings, axis=1, keepdims=True)
    alive = np.ones(n, dtype=bool)
    paths = [[q.copy()] for q in p]
    eps = 1.0
    offs = np.array([[eps, 0, 0], [-eps, 0, 0], [0, eps, 0], [0, -eps, 0], [0, 0, eps], [0, 0, -eps]])
    field = template.envelope_coarse if level is not None else template.csf_coarse
    for step in range(int(lengths.max())):
        probe = p[:, None, :] + offs[None]
        v = sample(template.coarse, field, np.concatenate([p[:, None, :], probe], axis=1))
        grad = np.stack([(v[:, 1] - v[:, 2]), (v[:, 3] - v[:, 4]), (v[:, 5] - v[:, 6])], axis=1) / (2 * eps)
        gn = np.linalg.norm(grad, axis=1, keepdims=True) + 1e-6
        normal = grad / gn
        d = d + rng.normal(0.0, 0.22, d.shape)
        if level is not None:
            d -= np.sum(d * normal, axis=1, keepdims=True) * normal  # keep tangent to the surface
            correction = -(v[:, :1] - level[:, None]) * normal * 0.7  # and at the target level
        else:
            d += 0.6 * normal * np.clip(0.8 - v[:, :1], 0.0, None)  # drift up the CSF gradient
            correction = 0.0
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        p = p + d + correction
        if level is None:
            alive &= v[:, 0] > 0.25
        alive &= step < lengths
        for i in np.nonzero(alive)[0]:
            paths[i].append(p[i].copy())
        if not alive.any():
            break
    return [np.asarray(q) for q in paths if len(q) >= 4]


def cortical_vessels(template: Template, rng: np.random.Generator) -> list[Tube]:
    """Cortical veins running over the convexity (mostly toward the vertex, where they drain into the
    superior sagittal sinus) and small vessels inside sulci and the Sylvian fissures."""
    g = template.coarse
    tubes = []
    # surface veins: seeds on the envelope, above the skull base
    shell = np.flatnonzero((template.envelope_coarse > 0.0) & (template.envelope_coarse < 2.5))
    seeds = g.to_lps(np.stack(np.unravel_index(rng.choice(shell, 400), g.shape), axis=1).astype(np.float64))
    seeds = seeds[seeds[:, 2] > -20.0]
    n = min(len(seeds), int(rng.integers(30, 60)))
    seeds = seeds[:n]
    up = np.tile([0.0, 0.0, 1.0], (n, 1))
    headings = np.where(rng.random((n, 1)) < 0.6, up, 0.0) + rng.normal(0.0, 0.7, (n, 3))
    lengths = rng.uniform(25.0, 110.0, n)
    levels = rng.uniform(0.3, 1.8, n)
    for path in _walk(template, rng, seeds, headings, lengths, levels):
        tubes.append(Tube(_resample_path(path, smooth=1.5), np.full(1, _vessel_radius(rng)), "cortical_vein"))

    # sulcal and fissural vessels: seeds in CSF inside the brain, away from the ventricles
    sulcal = np.flatnonzero(
        (template.csf_coarse > 0.6) & (template.brain_depth > 3.0) & (template.brain_depth < 20.0)
        & (template.ventricle_dist > 8.0)
    )
    m = int(rng.integers(16, 36))
    seeds = g.to_lps(np.stack(np.unravel_index(rng.choice(sulcal, m), g.shape), axis=1).astype(np.float64))
    for path in _walk(template, rng, seeds, rng.normal(size=(m, 3)), rng.uniform(15.0, 50.0, m), None):
        tubes.append(Tube(_resample_path(path, smooth=1.0), np.full(1, 0.75 * _vessel_radius(rng)), "sulcal"))
    return tubes


def _vessel_radius(rng: np.random.Generator) -> float:
    """Radius (mm) of a cortical vessel: mostly 0.6-1.0, a few up to 1.6."""
    return float(np.clip(rng.lognormal(np.log(0.85), 0.3), 0.5, 1.6))


def choroid_plexus(template: Template, rng: np.random.Generator) -> list[tuple[P3, float]]:
    """Glomus of the choroid plexus in each lateral ventricle's atrium: (centre LPS mm, radius mm)."""
    g = template.coarse
    vent = np.flatnonzero((template.ventricle_dist < 1.0) & (template.csf_coarse > 0.7))
    pts = g.to_lps(np.stack(np.unravel_index(vent, g.shape), axis=1).astype(np.float64))
    out = []
    for side in (-1.0, 1.0):
        target = np.array([side * 27.0, 38.0, 14.0])
        c = pts[np.argmin(np.linalg.norm(pts - target, axis=1))]
        out.append((c + rng.normal(0.0, 1.0, 3), float(rng.uniform(4.0, 6.5))))
    return out


def _tube_fraction(grid: Grid, tube: Tube, buffer: F32) -> None:
    """Rasterise a tube into ``buffer`` (max of partial-volume fractions), chunk by chunk along its path."""
    h = grid.spacing
    pts = tube.points
    radii = np.broadcast_to(tube.radii, (len(pts),)) if tube.radii.size == 1 else tube.radii
    chunk = 16
    for s in range(0, len(pts), chunk):
        seg = pts[s : s + chunk + 1]
        rr = radii[s : s + chunk + 1]
        reach = float(rr.max()) + 1.5 * h
        lo = seg.min(axis=0) - reach
        hi = seg.max(axis=0) + reach
        box = grid.box((lo + hi) / 2.0, float(np.max(hi - lo)) / 2.0)
        if any(b.stop <= b.start for b in box):
            continue
        z, y, x = grid.axes_mm(box)
        zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
        vox = np.stack([xx, yy, zz], axis=-1).reshape(-1, 3)  # voxels in (z, y, x) order, points as (x, y, z)
        d2 = ((vox[:, None, :] - seg[None, :, :].astype(np.float32)) ** 2).sum(axis=2)
        k = np.argmin(d2, axis=1)
        dist = np.sqrt(d2[np.arange(len(k)), k])
        frac = np.clip(0.5 + (rr[k] - dist) / h, 0.0, 1.0).astype(np.float32)
        region = buffer[box]
        np.maximum(region, frac.reshape(region.shape), out=region)


def render_vessels(stack: TissueStack, template: Template, rng: np.random.Generator) -> list[Tube]:
    """Draw every vessel and the choroid plexus into ``stack``; returns the tubes drawn."""
    g = stack.grid
    tubes = dural_sinuses(template, rng) + basal_arteries(template, rng) + cortical_vessels(template, rng)
    buffer = np.zeros(g.shape, dtype=np.float32)
    for t in tubes:
        _tube_fraction(g, t, buffer)
    # blood stays inside the body: sinuses may graze the inner table, never the air
    idx = np.flatnonzero(buffer)
    body = stack.data.reshape(stack.data.shape[0], -1)[:, idx].sum(axis=0)
    v = np.minimum(buffer.ravel()[idx], body)
    stack.put(idx, {"vessel": v})

    for centre, radius in choroid_plexus(template, rng):
        box = g.box(centre, radius * 1.6 + 2.0)
        z, y, x = g.axes_mm(box)
        rel = ((z - centre[2])[:, None, None], (y - centre[1])[None, :, None], (x - centre[0])[None, None, :])
        r = np.sqrt(rel[0] ** 2 + rel[1] ** 2 + rel[2] ** 2)
        lobes = 1.0 + 0.25 * np.cos(0.9 * rel[0] + rng.uniform(0, 6)) * np.cos(0.8 * rel[2] + rng.uniform(0, 6))
        blob = np.clip(0.5 + (radius * lobes - r) / g.spacing, 0.0, 1.0) * stack["csf"][box]
        stack.put(box, {"choroid": stack["choroid"][box] + blob.astype(np.float32), "csf": stack["csf"][box] - blob})
    return tubes
