"""One synthetic MR brain-metastasis study: anatomy, lesions, vessels, the exam's series and the ground truth.

Everything random comes from ``numpy.random.default_rng`` streams derived from the seed and a fixed purpose name,
so the same seed and arguments give identical arrays, and the patient (anatomy, lesions, vessels) does not
depend on which series are omitted.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from numpy.typing import NDArray
from scipy import ndimage as ndi

from pipeline import roles
from training.phantom import contrast as mr
from training.phantom.acquisition import (
    Geometry,
    HeadBox,
    acquire,
    epi_distortion,
    motion_poses,
    mpr_grid,
    plan_geometry,
    point_spread,
    reformat,
    resample_between,
    sample_windows,
    series_transform,
)
from training.phantom.anatomy import (
    TISSUES,
    PatientDeformation,
    Template,
    build_tissues,
    load_template,
    random_deformation,
)
from training.phantom.lesions import LesionSpec, place_lesions, render_lesions
from training.phantom.types import (
    ROLES,
    LesionTruth,
    PatientInfo,
    Plane,
    SeriesKind,
    SyntheticSeries,
    SyntheticStudy,
    Vendor,
)
from training.phantom.vessels import render_vessels

F32 = NDArray[np.float32]

REFERENCE_PREFERENCE = tuple(SeriesKind(role) for role in roles.REFERENCE_PREFERENCE)
_STUDY_YEAR = 2024  # fixed so that ages and birth dates never depend on the wall clock
_NAME_WORDS = (
    "ALPHA", "BRAVO", "CEDAR", "DELTA", "EMBER", "FJORD", "GARNET", "HARBOR", "INDIGO", "JUNIPER", "KESTREL",
    "LUMEN", "MAPLE", "NIMBUS", "OPAL", "PEBBLE", "QUARTZ", "RAVEN", "SIERRA", "TUNDRA", "UMBER", "VIOLET",
    "WILLOW", "XENON", "YARROW", "ZEPHYR", "ASPEN", "BIRCH", "COBALT", "DUNE", "ELM", "FLINT",
)
_SNR = {  # brain-tissue signal over per-channel noise sigma
    SeriesKind.T1_BRAVO_POST: (20.0, 35.0),
    SeriesKind.T1_CUBE_PRE: (16.0, 28.0),
    SeriesKind.T1_CUBE_POST: (16.0, 28.0),
    SeriesKind.FLAIR: (14.0, 25.0),
    SeriesKind.DWI: (7.0, 12.0),
    SeriesKind.LOCALIZER: (10.0, 18.0),
}


def rng_for(seed: int, purpose: str) -> np.random.Generator:
    """An independent, reproducible random stream for one purpose of one study."""
    return np.random.default_rng([seed % 2**64, zlib.crc32(purpose.encode())])


@dataclass(frozen=True)
class _Planned:
    kind: SeriesKind
    geometry: Geometry
    contrast: bool
    sequence: mr.Sequence | None  # None for derived series
    pose: NDArray[np.float64]  # 4x4 patient -> scanner during this series
    derived_from: SeriesKind | None = None


def _parse_missing(missing: Iterable[SeriesKind | str]) -> set[SeriesKind]:
    out = set()
    for m in missing:
        kind = SeriesKind(m)
        if not kind.is_role:
            raise ValueError(f"missing must name input roles {ROLES}, not {kind.value!r}")
        out.add(kind)
    if len(out) == len(ROLES):
        raise ValueError("at least one of the four input sequences must be present; `missing` names all four")
    return out


_SCALP_MARGIN_MM = 22.0  # brain surface to skin, typical (CSF, skull and scalp)


def _head_box(template: Template, deformation: PatientDeformation) -> HeadBox:
    """The head's bounding box (brain + scalp margin) mapped into patient space by the affine part."""
    ext = np.array(template.extent)
    corners = np.array([[x, y, z] for x in ext[0] for y in ext[1] for z in ext[2]])
    corners += np.sign(corners - np.asarray(template.centre)) * _SCALP_MARGIN_MM
    m = deformation.forward
    mapped = corners @ m[:3, :3].T + m[:3, 3]
    lo, hi = mapped.min(axis=0), mapped.max(axis=0)
    centre = m[:3, :3] @ np.asarray(template.centre) + m[:3, 3]
    return HeadBox(centre=centre, half=(hi - lo) / 2.0, top=float(hi[2]), pitch_deg=deformation.pitch_deg)


def _exam_order(rng: np.random.Generator, roles: list[SeriesKind], extras: list[SeriesKind]) -> list[SeriesKind]:
    """Localizer, then the pre-contrast series (CUBE pre, FLAIR, DWI + ADC) in a site-specific order, the
    injection, then the post-contrast series (BRAVO, CUBE post) and finally any reformat."""
    pre: list[SeriesKind] = [k for k in (SeriesKind.T1_CUBE_PRE, SeriesKind.FLAIR) if k in roles]
    if SeriesKind.DWI in extras:
        pre.append(SeriesKind.DWI)
    pre = [pre[i] for i in rng.permutation(len(pre))]
    if SeriesKind.DWI in pre:
        pre.insert(pre.index(SeriesKind.DWI) + 1, SeriesKind.ADC)
    post = [k for k in (SeriesKind.T1_BRAVO_POST, SeriesKind.T1_CUBE_POST) if k in roles]
    post = [post[i] for i in rng.permutation(len(post))]
    order = ([SeriesKind.LOCALIZER] if SeriesKind.LOCALIZER in extras else []) + pre + post
    if SeriesKind.MPR in extras:
        order.append(SeriesKind.MPR)
    return order


def _pick_distractors(rng: np.random.Generator, roles: list[SeriesKind], enabled: bool) -> list[SeriesKind]:
    """One or two distractors: a localizer, a DWI (with its ADC), or a coronal reformat of a T1."""
    if not enabled:
        return []
    options = [SeriesKind.LOCALIZER, SeriesKind.DWI]
    if _mpr_source(roles) is not None:
        options.append(SeriesKind.MPR)
    n = int(rng.integers(1, 3))
    return [options[i] for i in sorted(rng.choice(len(options), size=n, replace=False))]


def _mpr_source(roles: list[SeriesKind]) -> SeriesKind | None:
    for k in (SeriesKind.T1_BRAVO_POST, SeriesKind.T1_CUBE_POST, SeriesKind.T1_CUBE_PRE):
        if k in roles:
            return k
    return None


def _plan(
    seed: int, vendor: Vendor, order: list[SeriesKind], head: HeadBox, voxel_mm: float | None
) -> list[_Planned]:
    """Geometry, sequence parameters and head pose of every series of the exam, in acquisition order."""
    rng = rng_for(seed, "protocol")
    zip512 = voxel_mm is None and rng.random() < 0.2
    cube_plane = Plane.SAGITTAL if rng.random() < 0.7 else Plane.AXIAL
    shared_cube = rng.random() < 0.8  # the post-contrast CUBE usually copies the pre-contrast prescription
    flair_plane, flair_3d = [(Plane.SAGITTAL, True), (Plane.AXIAL, True), (Plane.AXIAL, False)][
        int(rng.choice(3, p=[0.55, 0.15, 0.3]))
    ]
    loc_plane = [Plane.SAGITTAL, Plane.AXIAL, Plane.CORONAL][int(rng.choice(3, p=[0.5, 0.25, 0.25]))]
    acquired = [k for k in order if k not in (SeriesKind.ADC, SeriesKind.MPR)]
    poses = dict(zip(acquired, motion_poses(rng_for(seed, "motion"), len(acquired), head.centre)))
    planned: list[_Planned] = []
    cube_geometry: Geometry | None = None
    for kind in order:
        g_rng = rng_for(seed, f"geometry:{kind.value}")
        post = kind in (SeriesKind.T1_BRAVO_POST, SeriesKind.T1_CUBE_POST)
        if kind is SeriesKind.ADC:
            dwi = next(p for p in planned if p.kind is SeriesKind.DWI)
            planned.append(_Planned(kind, dwi.geometry, False, None, dwi.pose, SeriesKind.DWI))
            continue
        if kind is SeriesKind.MPR:
            src_kind = _mpr_source(order)
            src = next(p for p in planned if p.kind is src_kind)
            grid = mpr_grid(g_rng, src.geometry.stored, head, voxel_mm)
            geo = Geometry(plane=Plane.CORONAL, is_3d=src.geometry.is_3d, acquired=grid, stored=grid)
            planned.append(_Planned(kind, geo, src.contrast, None, src.pose, src_kind))
            continue
        if kind is SeriesKind.T1_BRAVO_POST:
            geo = plan_geometry(g_rng, kind, head, voxel_mm, Plane.AXIAL, True, recon_512=zip512)
        elif kind in (SeriesKind.T1_CUBE_PRE, SeriesKind.T1_CUBE_POST):
            if cube_geometry is None or not shared_cube:
                cube_geometry = plan_geometry(g_rng, kind, head, voxel_mm, cube_plane, True)
            geo = cube_geometry
        elif kind is SeriesKind.FLAIR:
            geo = plan_geometry(g_rng, kind, head, voxel_mm, flair_plane, flair_3d, recon_512=zip512 and not flair_3d)
        elif kind is SeriesKind.DWI:
            geo = plan_geometry(g_rng, kind, head, voxel_mm, Plane.AXIAL, False)
        else:
            geo = plan_geometry(g_rng, kind, head, voxel_mm, loc_plane, False)
        seq = mr.sample_sequence(rng_for(seed, f"sequence:{kind.value}"), kind, vendor, geo.is_3d)
        planned.append(_Planned(kind, geo, post, seq, poses[kind]))
    return planned


def _scanner_output(
    signal: F32, plan: _Planned, scaling: mr.ScannerScaling, head: HeadBox, rng: np.random.Generator
) -> F32:
    """Bias field and Rician noise on the acquired grid, then the (optional) interpolated reconstruction."""
    acq = plan.geometry.acquired
    centre = acq.index_of(plan.pose[:3, :3] @ head.centre + plan.pose[:3, 3])
    mr.apply_bias_field(signal, rng, acq.spacing[::-1], centre, scaling.bias_amplitude)
    noisy = mr.add_rician_noise(signal, scaling.noise_sigma, rng)
    stored = plan.geometry.stored
    if stored is not acq:
        noisy = sitk.GetArrayFromImage(resample_between(acq.wrap(noisy), stored))
    return noisy


def _brain_signal(weights: F32) -> float:
    """Typical brain-tissue signal of a sequence (mean of WM and GM): the noise reference."""
    return float(0.5 * (weights[TISSUES.index("wm")] + weights[TISSUES.index("gm")]))


def _acquire_all(
    seed: int, vendor: Vendor, planned: list[_Planned], signals: dict[str, F32], template: Template,
    deformation: PatientDeformation, head: HeadBox,
) -> dict[SeriesKind, SyntheticSeries]:
    """Every series of the exam, in acquisition order: sampled, noisy, scaled and stored (uint16)."""
    out: dict[SeriesKind, SyntheticSeries] = {}
    dwi_pair: tuple[F32, F32] | None = None  # noisy (b=1000, b=0) floats, for the ADC
    h = template.grid.spacing
    for index, plan in enumerate(planned):
        rng = rng_for(seed, f"scanner:{plan.kind.value}")
        geo = plan.geometry
        if plan.kind is SeriesKind.MPR:
            src = out[plan.derived_from]  # type: ignore[index]
            arr = reformat(src.image, geo.stored, h)
            stored = np.rint(arr).clip(0, 65535).astype(np.uint16)
        elif plan.kind is SeriesKind.ADC:
            assert dwi_pair is not None
            stored = _adc(*dwi_pair)
        else:
            tx_distortion = epi_distortion(rng, head, geo.acquired.direction) if plan.kind is SeriesKind.DWI else None
            tx = series_transform(deformation, plan.pose, tx_distortion)
            weights = signals[f"w:{plan.kind.value}"]
            scaling = mr.sample_scaling(rng, weights, _brain_signal(weights), _SNR[plan.kind])
            body = _scanner_points(template.body_surface, deformation, plan.pose)
            sig = point_spread(
                acquire(template.grid.image(signals[plan.kind.value]), geo.acquired, tx, h, body), geo.acquired, h
            )
            noisy = _scanner_output(sig, plan, scaling, head, rng)
            if plan.kind is SeriesKind.DWI:
                b0 = point_spread(
                    acquire(template.grid.image(signals["dwi_b0"]), geo.acquired, tx, h, body), geo.acquired, h
                )
                dwi_pair = (noisy.copy(), _scanner_output(b0, plan, scaling, head, rng))
            stored = mr.to_stored(noisy, scaling)
        out[plan.kind] = SyntheticSeries(
            kind=plan.kind,
            image=geo.stored.wrap(stored),
            plane=geo.plane,
            is_3d=geo.is_3d,
            contrast=plan.contrast,
            acquisition_index=index,
            derived_from=plan.derived_from,
            slice_thickness_mm=geo.stored.thickness,
            sequence=(
                mr.header_values(plan.sequence, vendor) if plan.sequence is not None
                else out[plan.derived_from].sequence  # type: ignore[index]
            ),
        )
    return out


def _scanner_points(
    points: NDArray[np.float64], deformation: PatientDeformation, pose: NDArray[np.float64]
) -> NDArray[np.float64]:
    """Template points (N, 3) in scanner LPS mm as the head lies during a series (affine part only: the
    acquisition margin covers the elastic part)."""
    m = pose @ deformation.forward
    return points @ m[:3, :3].T + m[:3, 3]


def _adc(b1000: F32, b0: F32, b: float = 1000.0) -> NDArray[np.uint16]:
    """ADC map in 1e-6 mm^2/s from the noisy b=0 and b=1000 images; background (low b=0 signal) is zero,
    as scanners mask it."""
    smooth = ndi.gaussian_filter(b0, (0.0, 1.5, 1.5))  # the mask follows the head, not single noisy voxels
    ok = (smooth > 0.2 * float(np.percentile(smooth, 99.0))) & (b1000 > 0)
    adc = np.zeros(b0.shape, dtype=np.float32)
    adc[ok] = np.log(b0[ok] / b1000[ok]) / b * 1e6
    return np.clip(adc, 0.0, 4000.0).astype(np.uint16)


def _signals(planned: list[_Planned], stack_data: F32) -> dict[str, F32]:
    """Template-space signal of every acquired series (one weighted sum of tissue fractions each)."""
    rows: dict[str, F32] = {}
    for p in planned:
        if p.sequence is None:
            continue
        rows[p.kind.value] = mr.tissue_signals(p.sequence, p.contrast, TISSUES)
        if isinstance(p.sequence, mr.Diffusion):
            rows["dwi_b0"] = mr.tissue_signals(mr.b0_of(p.sequence), p.contrast, TISSUES)
    names = list(rows)
    w = np.stack([rows[n] for n in names])
    maps = np.tensordot(w, stack_data, axes=(1, 0))
    out: dict[str, F32] = {n: maps[i] for i, n in enumerate(names)}
    out.update({f"w:{n}": rows[n] for n in names})
    return out


def _ground_truth(
    label_t: NDArray[np.uint16], specs: list[LesionSpec], template: Template, deformation: PatientDeformation,
    ref: _Planned,
) -> tuple[sitk.Image, sitk.Image, list[LesionTruth]]:
    """Label and brain mask on the reference grid (nearest neighbour through the reference pose), lesions
    that vanished dropped and the rest relabelled 1..N, with centroids and volumes measured there."""
    grid = ref.geometry.stored
    # one nearest-neighbour pass carries both: lesion labels in the low bits, the brain mask in the top bit
    packed = label_t | (template.brain.astype(np.uint16) << _BRAIN_BIT)
    src = template.grid.image(packed)
    tx = series_transform(deformation, ref.pose)
    acquired = ref.geometry.acquired
    arr = sample_windows(
        acquired, _scanner_points(template.brain_surface, deformation, ref.pose),  # labels only exist in the brain
        lambda sub: sitk.GetArrayFromImage(sub.resample(src, tx, sitk.sitkNearestNeighbor, sitk.sitkUInt16)),
        np.uint16,
    )
    out = acquired.wrap(arr)
    if grid is not acquired:
        # an interpolated (512) reconstruction carries no detail beyond the acquired matrix: sample the truth
        # there and carry it over by nearest neighbour, 4x cheaper than through the deformation
        out = grid.resample(out, sitk.Transform(), sitk.sitkNearestNeighbor, sitk.sitkUInt16)
    both = sitk.GetArrayViewFromImage(out)
    brain = (both >> _BRAIN_BIT).astype(np.uint8)
    lab = both & np.uint16((1 << _BRAIN_BIT) - 1)
    counts = np.bincount(lab.ravel(), minlength=len(specs) + 1)
    present = [i for i in range(1, len(specs) + 1) if counts[i] > 0]
    lut = np.zeros(len(specs) + 1, dtype=np.uint16)
    lut[present] = np.arange(1, len(present) + 1, dtype=np.uint16)
    new = lut[lab]
    centroids = _centroids(new, len(present))
    voxel = float(np.prod(grid.spacing))
    truths = []
    out_img = grid.wrap(new)
    brain_img = grid.wrap(brain)
    for n, (old, c) in enumerate(zip(present, centroids), start=1):
        spec = specs[old - 1]
        lps = out_img.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in c[::-1]))
        truths.append(
            LesionTruth(
                label=n,
                kind=spec.kind,
                centroid_lps_mm=tuple(float(v) for v in lps),  # type: ignore[arg-type]
                volume_mm3=float(counts[old]) * voxel,
                diameter_mm=spec.diameter_mm,
                edema=spec.edema,
            )
        )
    return out_img, brain_img, truths


_BRAIN_BIT = 15


def _centroids(label: NDArray[np.uint16], n: int) -> NDArray[np.float64]:
    """Mean (slice, row, column) index of the voxels of labels 1..n, shape (n, 3)."""
    nz = np.nonzero(label)
    lab = label[nz]
    counts = np.bincount(lab, minlength=n + 1)[1:].astype(np.float64)
    sums = [np.bincount(lab, weights=a, minlength=n + 1)[1:] for a in nz]
    return np.stack(sums, axis=1) / np.maximum(counts, 1.0)[:, None]


def _coregister(
    series: dict[SeriesKind, SyntheticSeries], planned: list[_Planned], ref: _Planned
) -> dict[str, sitk.Image]:
    """Every present role on the reference grid with the true alignment (what a perfect rigid registration
    gives), stored as uint16 like the series."""
    poses = {p.kind: p.pose for p in planned}
    ref_inv = np.linalg.inv(ref.pose)
    out: dict[str, sitk.Image] = {}
    for kind in (SeriesKind(r) for r in ROLES):
        if kind not in series:
            continue
        if kind is ref.kind:
            out[kind.value] = series[kind].image
            continue
        # straight to uint16 (truncating, < 1 stored unit) as the series are stored
        out[kind.value] = resample_between(
            series[kind].image, ref.geometry.stored, poses[kind] @ ref_inv, pixel=sitk.sitkUInt16
        )
    return out


def _patient(seed: int) -> PatientInfo:
    rng = rng_for(seed, "patient")
    word = _NAME_WORDS[int(rng.integers(len(_NAME_WORDS)))]
    age = int(rng.integers(35, 86))
    return PatientInfo(
        name=f"PHANTOM^{word}{int(rng.integers(1, 100)):02d}",
        patient_id=f"PH{zlib.crc32(str(seed).encode()):010d}",
        birth_date=f"{_STUDY_YEAR - age}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}",
        sex=str(rng.choice(["F", "M"])),
        age_years=age,
    )


def generate_study(
    seed: int,
    vendor: Vendor | str | None = None,
    missing: Iterable[SeriesKind | str] = (),
    voxel_mm: float | None = None,
    distractors: bool = True,
) -> SyntheticStudy:
    """Generate one synthetic study: the present input roles (all but ``missing``), 1-2 distractor series when
    ``distractors``, and the ground truth on the reference series' grid.

    ``vendor`` None draws one from the seed. ``voxel_mm`` None gives realistic scanner geometry (0.9-1.2 mm 3D,
    3-5 mm 2D, 256/512 matrices); a number forces isotropic voxels of that size on every series (>= 2 mm also
    builds the anatomy on a 2 mm grid, for fast tests). Deterministic for the same arguments.
    """
    return _generate(seed, vendor, missing, voxel_mm, distractors, tissue_map=False)[0]


def generate_study_with_tissues(
    seed: int,
    vendor: Vendor | str | None = None,
    missing: Iterable[SeriesKind | str] = (),
    voxel_mm: float | None = None,
    distractors: bool = True,
) -> tuple[SyntheticStudy, sitk.Image]:
    """``generate_study`` plus the dominant tissue of every reference-grid voxel (sitkUInt8 index into
    ``anatomy.TISSUES``, 255 = air): for contrast checks and for attributing false positives (e.g. vessels)."""
    study, tissues = _generate(seed, vendor, missing, voxel_mm, distractors, tissue_map=True)
    assert tissues is not None
    return study, tissues


def _generate(
    seed: int, vendor: Vendor | str | None, missing: Iterable[SeriesKind | str], voxel_mm: float | None,
    distractors: bool, tissue_map: bool,
) -> tuple[SyntheticStudy, sitk.Image | None]:
    absent = _parse_missing(missing)
    if voxel_mm is not None and not voxel_mm > 0:
        raise ValueError(f"voxel_mm must be positive, got {voxel_mm}")
    if vendor is None:
        vendor = list(Vendor)[int(rng_for(seed, "vendor").integers(len(Vendor)))]
    vendor = Vendor(vendor.lower())  # a Vendor is a str too
    roles = [SeriesKind(r) for r in ROLES if SeriesKind(r) not in absent]

    template = load_template(2.0 if voxel_mm is not None and voxel_mm >= 2.0 else 1.0)
    stack = build_tissues(template, rng_for(seed, "anatomy"))
    render_vessels(stack, template, rng_for(seed, "vessels"))
    specs = place_lesions(template, rng_for(seed, "lesions"), voxel_mm=voxel_mm)
    label_t = render_lesions(stack, specs, rng_for(seed, "lesion-shapes"))
    deformation = random_deformation(template, rng_for(seed, "deformation"))
    head = _head_box(template, deformation)

    extras = _pick_distractors(rng_for(seed, "distractors"), roles, distractors)
    order = _exam_order(rng_for(seed, "order"), roles, extras)
    planned = _plan(seed, vendor, order, head, voxel_mm)
    signals = _signals(planned, stack.data)
    dominant = _dominant_tissue(stack.data) if tissue_map else None
    del stack
    series = _acquire_all(seed, vendor, planned, signals, template, deformation, head)
    del signals

    ref_kind = next(k for k in REFERENCE_PREFERENCE if k in series)
    ref = next(p for p in planned if p.kind is ref_kind)
    label, brain, truths = _ground_truth(label_t, specs, template, deformation, ref)
    study = SyntheticStudy(
        seed=seed,
        vendor=vendor,
        patient=_patient(seed),
        series=[series[p.kind] for p in planned],
        reference_kind=ref_kind,
        label=label,
        brain_mask=brain,
        lesions=truths,
        coregistered=_coregister(series, planned, ref),
    )
    tissues = None
    if dominant is not None:
        tissues = ref.geometry.stored.resample(
            template.grid.image(dominant), series_transform(deformation, ref.pose),
            sitk.sitkNearestNeighbor, sitk.sitkUInt8, 255,
        )
    return study, tissues


def _dominant_tissue(data: F32) -> NDArray[np.uint8]:
    """Index into TISSUES of each voxel's largest fraction; 255 where air dominates."""
    idx = np.argmax(data, axis=0).astype(np.uint8)
    top = np.take_along_axis(data, idx[None].astype(np.intp), axis=0)[0]
    idx[top < 1.0 - data.sum(axis=0)] = 255
    idx[top <= 0.0] = 255
    return idx
