"""Synthetic study generator: determinism, missing roles, ground truth, MR contrast, series and geometry.

Studies use ``voxel_mm=3`` (2 mm anatomy grid) so that each takes ~1-2 s; the realistic geometry is tested on
the prescription planner directly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from training.phantom import (
    ROLES,
    Plane,
    SeriesKind,
    SyntheticStudy,
    Vendor,
    generate_study,
    generate_study_with_tissues,
    render_preview,
)
from training.phantom import contrast as mr
from training.phantom.acquisition import HeadBox, plan_geometry
from training.phantom.anatomy import TISSUES, load_template
from training.phantom.lesions import MAX_LESIONS, place_lesions

VOXEL = 3.0
SEED = 11  # GE; all four roles; has oedema and a large ring lesion (checked in the tests that need them)


@pytest.fixture(scope="module")
def study() -> SyntheticStudy:
    return generate_study(SEED, voxel_mm=VOXEL)


@pytest.fixture(scope="module")
def with_tissues() -> tuple[SyntheticStudy, np.ndarray]:
    s, tissues = generate_study_with_tissues(SEED, voxel_mm=VOXEL)
    return s, sitk.GetArrayFromImage(tissues)


def _arr(img: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(img)


def test_same_seed_gives_identical_arrays(study: SyntheticStudy) -> None:
    again = generate_study(SEED, voxel_mm=VOXEL)
    assert [s.kind for s in again.series] == [s.kind for s in study.series]
    for a, b in zip(study.series, again.series):
        assert np.array_equal(_arr(a.image), _arr(b.image)), a.kind
        assert a.image.GetOrigin() == b.image.GetOrigin() and a.image.GetDirection() == b.image.GetDirection()
    assert np.array_equal(_arr(study.label), _arr(again.label))
    assert np.array_equal(_arr(study.brain_mask), _arr(again.brain_mask))
    for role, img in study.coregistered.items():
        assert np.array_equal(_arr(img), _arr(again.coregistered[role]))
    assert study.patient == again.patient and study.vendor == again.vendor and study.lesions == again.lesions


def test_different_seed_gives_a_different_patient(study: SyntheticStudy) -> None:
    other = generate_study(SEED + 1, voxel_mm=VOXEL)
    assert other.patient != study.patient
    a, b = _arr(study.coregistered["t1_bravo_post"]), _arr(other.coregistered.get("t1_bravo_post", study.label))
    assert a.shape != b.shape or not np.array_equal(a, b)
    assert [(t.kind, t.diameter_mm) for t in other.lesions] != [(t.kind, t.diameter_mm) for t in study.lesions]


def test_missing_bravo_moves_the_reference_to_cube_post(study: SyntheticStudy) -> None:
    s = generate_study(SEED, voxel_mm=VOXEL, missing=["t1_bravo_post"], distractors=False)
    assert s.reference_kind is SeriesKind.T1_CUBE_POST
    assert s.series_of(SeriesKind.T1_BRAVO_POST) is None
    assert set(s.coregistered) == {"t1_cube_pre", "t1_cube_post", "flair"}
    assert [x.kind for x in s.series if not x.kind.is_role] == []
    ref = s.series_of(SeriesKind.T1_CUBE_POST)
    assert ref is not None and s.label.GetSize() == ref.image.GetSize()
    assert s.label.GetDirection() == ref.image.GetDirection()
    # the patient does not depend on which series are omitted
    assert s.vendor == study.vendor and s.patient == study.patient
    big = lambda st: {(t.kind, t.diameter_mm) for t in st.lesions if t.diameter_mm > 8.0}  # noqa: E731
    assert big(s) == big(study) and len(big(s)) > 0  # small ones may vanish on one grid and not the other


@pytest.mark.parametrize(
    ("missing", "reference"),
    [
        (["t1_bravo_post", "t1_cube_post"], SeriesKind.T1_CUBE_PRE),
        ([SeriesKind.T1_BRAVO_POST, SeriesKind.T1_CUBE_POST, SeriesKind.T1_CUBE_PRE], SeriesKind.FLAIR),
    ],
)
def test_reference_falls_back_in_order(missing: list, reference: SeriesKind) -> None:
    s = generate_study(SEED, voxel_mm=VOXEL, missing=missing, distractors=False)
    assert s.reference_kind is reference
    assert set(s.coregistered) == {r for r in ROLES if SeriesKind(r) not in {SeriesKind(m) for m in missing}}


def test_all_four_missing_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one"):
        generate_study(SEED, voxel_mm=VOXEL, missing=list(ROLES))
    with pytest.raises(ValueError, match="roles"):
        generate_study(SEED, voxel_mm=VOXEL, missing=["dwi"])


def test_labels_volumes_and_centroids_agree(study: SyntheticStudy) -> None:
    label = _arr(study.label)
    n = len(study.lesions)
    assert 1 <= n <= MAX_LESIONS
    assert study.label.GetPixelID() == sitk.sitkUInt16 and study.brain_mask.GetPixelID() == sitk.sitkUInt8
    assert sorted(np.unique(label[label > 0]).tolist()) == list(range(1, n + 1))
    assert [t.label for t in study.lesions] == list(range(1, n + 1))
    voxel = float(np.prod(study.label.GetSpacing()))
    counts = np.bincount(label.ravel(), minlength=n + 1)
    brain = _arr(study.brain_mask)
    for t in study.lesions:
        assert t.volume_mm3 == pytest.approx(counts[t.label] * voxel)
        assert t.kind in ("solid", "ring", "irregular") and t.diameter_mm >= 2.0
        idx = study.brain_mask.TransformPhysicalPointToIndex(t.centroid_lps_mm)
        assert brain[idx[2], idx[1], idx[0]] == 1, f"lesion {t.label} centroid outside the brain"
        # the centroid is the mean position of the label's voxels
        zyx = np.argwhere(label == t.label).mean(axis=0)
        expect = study.label.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in zyx[::-1]))
        assert np.allclose(expect, t.centroid_lps_mm, atol=1e-6)
    assert set(np.unique(brain)) <= {0, 1} and brain.sum() > 1000


def test_template_is_read_in_lps() -> None:
    """A grey-matter value at an LPS point equals the RAS file's value at the mirrored voxel."""
    import nibabel as nib

    from training.phantom.anatomy import nilearn_data_dir

    template = load_template(1.0)
    ras = np.asarray(nib.load(nilearn_data_dir() / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz").dataobj)
    for lps in [(30.0, -20.0, 10.0), (-45.0, 40.0, -5.0), (12.0, 60.0, 40.0)]:
        i, j, k = int(-lps[0] + 98), int(-lps[1] + 134), int(lps[2] + 72)  # RAS voxel: x and y change sign
        z, y, x = np.round(template.grid.to_index(lps)).astype(int)
        assert template.gm[z, y, x] == pytest.approx(ras[i, j, k] / 255.0 * template.brain[z, y, x], abs=1e-6)
    # the symmetric template mirrors exactly about LPS x = 0, so the midline must sit at x = 0
    mid = int(round(template.grid.to_index((0.0, 0.0, 0.0))[2]))
    assert np.array_equal(template.gm[:, :, mid + 1 : mid + 70], template.gm[:, :, mid - 1 : mid - 70 : -1])


def test_lesion_statistics_over_many_patients() -> None:
    template = load_template(2.0)
    counts, diameters, kinds, edema = [], [], set(), []
    for seed in range(40):
        specs = place_lesions(template, np.random.default_rng(seed))
        counts.append(len(specs))
        diameters += [s.diameter_mm for s in specs]
        kinds |= {s.kind for s in specs}
        edema += [s.edema for s in specs]
        centres = np.array([s.centre for s in specs])
        radii = np.array([s.diameter_mm / 2.0 for s in specs])
        gaps = np.linalg.norm(centres[:, None] - centres[None], axis=2) - radii[:, None] - radii[None]
        assert np.all(gaps[~np.eye(len(specs), dtype=bool)] > 0), "lesions overlap"
    assert min(counts) >= 1 and max(counts) <= MAX_LESIONS and max(counts) > 10
    d = np.array(diameters)
    assert np.mean(d < 5.0) > 0.3 and d.max() > 15.0 and d.min() >= 2.0 and d.max() <= 30.0
    assert kinds == {"solid", "ring", "irregular"}
    assert 0.3 < np.mean(edema) < 0.95


def _mean(img: np.ndarray, mask: np.ndarray) -> float:
    assert mask.sum() >= 5, "too few voxels for a meaningful mean"
    return float(img[mask].mean())


def test_contrast_follows_mr_physics(with_tissues: tuple[SyntheticStudy, np.ndarray]) -> None:
    s, tissues = with_tissues
    brain = _arr(s.brain_mask) > 0
    t = {name: tissues == i for i, name in enumerate(TISSUES)}
    wm = t["wm"] & brain
    tumor = t["tumor_hi"] | t["tumor_lo"]
    img = {r: _arr(im).astype(np.float64) for r, im in s.coregistered.items()}

    def rel(role: str, mask: np.ndarray) -> float:
        return _mean(img[role], mask) / _mean(img[role], wm)

    # enhancing tumour: brighter relative to WM after gadolinium than before
    assert rel("t1_cube_post", tumor) > 1.3 * rel("t1_cube_pre", tumor)
    assert rel("t1_bravo_post", tumor) > 1.2
    assert rel("t1_cube_pre", tumor) < 1.1  # iso- or hypointense before contrast
    # FLAIR: CSF nulled, oedema bright; T1: CSF dark
    csf = t["csf"] & brain
    assert rel("flair", csf) < 0.6
    assert rel("flair", t["edema"]) > 1.3
    assert rel("t1_cube_pre", csf) < 0.7 and rel("t1_bravo_post", csf) < 0.7
    # vessels: enhancing on the gradient echo, black blood on the fast spin echo
    assert rel("t1_bravo_post", t["vessel"]) > 1.2
    assert rel("t1_cube_post", t["vessel"]) < 0.8
    # grey matter darker than white matter on T1 (on FLAIR 3 mm partial volume with CSF evens them out; the
    # signal model test covers it)
    gm = t["gm"] & brain
    assert rel("t1_cube_pre", gm) < 0.95 and rel("t1_bravo_post", gm) < 0.95


def test_tissue_signal_model() -> None:
    """The per-tissue signal equations give the textbook appearance for every vendor's parameters."""
    rng = np.random.default_rng(0)
    i = {n: k for k, n in enumerate(TISSUES)}
    for vendor in Vendor:
        bravo = mr.tissue_signals(mr.sample_sequence(rng, SeriesKind.T1_BRAVO_POST, vendor, True), True, TISSUES)
        pre = mr.tissue_signals(mr.sample_sequence(rng, SeriesKind.T1_CUBE_PRE, vendor, True), False, TISSUES)
        flair = mr.tissue_signals(mr.sample_sequence(rng, SeriesKind.FLAIR, vendor, False), False, TISSUES)
        assert bravo[i["csf"]] < bravo[i["gm"]] < bravo[i["wm"]] < bravo[i["tumor_hi"]]
        assert bravo[i["vessel"]] > 2.0 * bravo[i["wm"]] and bravo[i["necrosis"]] < bravo[i["gm"]]
        assert pre[i["vessel"]] < 0.2 * pre[i["wm"]] and pre[i["fat"]] > pre[i["wm"]]
        assert pre[i["edema"]] < pre[i["wm"]]
        assert flair[i["csf"]] < 0.1 * flair[i["wm"]] < flair[i["gm"]] and flair[i["edema"]] > 1.5 * flair[i["wm"]]


def test_stored_values_look_like_a_scanner(study: SyntheticStudy) -> None:
    for s in study.series:
        a = _arr(s.image)
        assert s.image.GetPixelID() == sitk.sitkUInt16
        assert 300 < np.percentile(a, 99.5) < 8000, s.kind
        if s.kind is not SeriesKind.ADC:  # scanners mask the ADC's background; magnitude images keep a noise floor
            assert (a > 0).mean() > 0.3, f"{s.kind}: no noise floor"


def test_distractors_and_exam_order() -> None:
    seen: set[SeriesKind] = set()
    for seed in (0, 1):  # together they hold a localizer, a DWI with its ADC and a reformat
        s = generate_study(seed, voxel_mm=VOXEL)
        extras = [x for x in s.series if not x.kind.is_role]
        kinds = {x.kind for x in extras}
        assert 1 <= len(kinds - {SeriesKind.ADC}) <= 2
        seen |= kinds
        assert [x.acquisition_index for x in s.series] == list(range(len(s.series)))
        first_post = min(x.acquisition_index for x in s.series if x.contrast)
        for x in s.series:
            if x.kind in (SeriesKind.T1_CUBE_PRE, SeriesKind.FLAIR, SeriesKind.DWI, SeriesKind.LOCALIZER):
                assert not x.contrast and x.acquisition_index < first_post
            if x.kind in (SeriesKind.T1_BRAVO_POST, SeriesKind.T1_CUBE_POST):
                assert x.contrast
            assert x.sequence is not None and x.sequence["RepetitionTime"] > 0 and x.slice_thickness_mm == VOXEL
            if x.kind is SeriesKind.FLAIR:
                assert x.sequence["InversionTime"] > 1500 and x.sequence["RepetitionTime"] > 5000
            if x.kind is SeriesKind.LOCALIZER:
                assert x.acquisition_index == 0 and not x.is_3d and x.image.GetSize()[2] <= 5
            if x.kind is SeriesKind.DWI:
                assert x.plane is Plane.AXIAL and not x.is_3d and x.derived_from is None
            if x.kind is SeriesKind.ADC:
                dwi = s.series_of(SeriesKind.DWI)
                assert dwi is not None and x.derived_from is SeriesKind.DWI
                assert x.image.GetSize() == dwi.image.GetSize() and x.acquisition_index == dwi.acquisition_index + 1
                csf_bright = np.percentile(_arr(x.image), 99) > 2000  # 1e-6 mm^2/s: CSF ~3000
                assert csf_bright
            if x.kind is SeriesKind.MPR:
                src = s.series_of(x.derived_from)  # type: ignore[arg-type]
                assert x.plane is Plane.CORONAL and src is not None and src.kind.is_role
                assert x.contrast == src.contrast and x.acquisition_index > src.acquisition_index
    assert {SeriesKind.LOCALIZER, SeriesKind.DWI, SeriesKind.ADC, SeriesKind.MPR} <= seen
    plain = generate_study(1, voxel_mm=VOXEL, distractors=False)
    assert all(x.kind.is_role for x in plain.series)


def test_geometry_is_scanner_like(study: SyntheticStudy) -> None:
    for s in study.series:
        d = np.array(s.image.GetDirection()).reshape(3, 3)
        assert np.allclose(d.T @ d, np.eye(3), atol=1e-9) and np.linalg.det(d) == pytest.approx(1.0)
        assert np.allclose(s.image.GetSpacing()[:2], VOXEL)
    bravo = study.series_of(SeriesKind.T1_BRAVO_POST)
    assert bravo is not None and bravo.plane is Plane.AXIAL and bravo.is_3d and bravo.contrast
    normal = np.array(bravo.image.GetDirection()).reshape(3, 3)[:, 2]
    assert abs(normal[2]) > 0.95  # axial, at most a small oblique tilt
    assert study.reference_kind is SeriesKind.T1_BRAVO_POST
    assert study.label.GetSize() == bravo.image.GetSize() and study.label.GetOrigin() == bravo.image.GetOrigin()
    for role, img in study.coregistered.items():
        assert img.GetSize() == bravo.image.GetSize() and img.GetDirection() == bravo.image.GetDirection(), role


def test_realistic_prescriptions_cover_the_head() -> None:
    head = HeadBox(centre=np.array([2.0, 15.0, 5.0]), half=np.array([85.0, 112.0, 100.0]), top=105.0, pitch_deg=6.0)
    for seed in range(30):
        rng = np.random.default_rng(seed)
        g3 = plan_geometry(rng, SeriesKind.T1_CUBE_PRE, head, None, Plane.SAGITTAL, True, recon_512=seed % 3 == 0)
        assert g3.acquired.size[:2] == (256, 256) and 0.9 <= g3.acquired.spacing[0] <= 1.05
        assert 1.0 <= g3.acquired.thickness <= 1.2 and g3.stored.size[0] in (256, 512)
        extent = np.array(g3.acquired.size) * np.array(g3.acquired.spacing)
        assert extent[2] >= 2 * head.half[0] - 6.0  # sagittal slices span the head's width
        g2 = plan_geometry(rng, SeriesKind.FLAIR, head, None, Plane.AXIAL, False)
        assert not g2.is_3d and 3.0 <= g2.acquired.thickness <= 5.0 and g2.acquired.spacing[2] >= g2.acquired.thickness
        ax = plan_geometry(rng, SeriesKind.T1_BRAVO_POST, head, None, Plane.AXIAL, True)
        top = ax.acquired.centre()[2] + ax.acquired.size[2] * ax.acquired.spacing[2] / 2.0
        assert top >= head.top - 5.0  # the vertex is in the slab
        dwi = plan_geometry(rng, SeriesKind.DWI, head, None, Plane.AXIAL, False)
        assert dwi.acquired.size[:2] == (128, 128) and 4.0 <= dwi.acquired.thickness <= 5.0


def test_patient_is_fake_and_deterministic(study: SyntheticStudy) -> None:
    assert study.patient.name.startswith("PHANTOM^")
    assert study.patient.sex in ("M", "F") and 18 <= study.patient.age_years <= 100
    assert len(study.patient.birth_date) == 8 and study.patient.birth_date.isdigit()


def test_preview_png(study: SyntheticStudy, tmp_path: Path) -> None:
    out = render_preview(study, tmp_path / "sub" / "preview.png")
    assert out.exists() and out.stat().st_size > 20_000
    img = np.asarray(Image.open(out).convert("L"), dtype=np.float64)
    assert img.shape[0] > 300 and img.shape[1] > 600
    assert img.std() > 20  # real content, not a blank canvas
