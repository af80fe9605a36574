"""The phantom's DICOM and NIfTI writers: IOD validity (dciodvfy), geometry and pixel round trips, vendor style.

Most tests use small hand-built studies (every series kind, oblique grids) so that they isolate the writers;
the end-to-end tests at the bottom run the real generator at 3 mm.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from training.phantom.dicom_writer import SliceGeometry, plan_study, reference_series_uid, write_dicom_study
from training.phantom.nifti_writer import SIZE_BINS_MM, write_nifti_study, write_truth
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
from training.phantom.vendors import series_styles, study_style

GEOMETRY_TOLERANCE_MM = 1e-4
DCIODVFY = shutil.which("dciodvfy")

# Direction matrices (columns = LPS directions of column, row and slice axes) of the three planes, right-handed.
_PLANE_AXES = {
    Plane.AXIAL: np.eye(3),
    Plane.SAGITTAL: np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]),
    Plane.CORONAL: np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]]),
}

# kind, plane, 3D, post-contrast, derived from, obliquity (rad)
_SERIES_SPECS: tuple[tuple[SeriesKind, Plane, bool, bool, SeriesKind | None, float], ...] = (
    (SeriesKind.LOCALIZER, Plane.SAGITTAL, False, False, None, 0.0),
    (SeriesKind.T1_CUBE_PRE, Plane.SAGITTAL, True, False, None, 0.05),
    (SeriesKind.FLAIR, Plane.SAGITTAL, True, False, None, 0.0),
    (SeriesKind.DWI, Plane.AXIAL, False, False, None, 0.12),
    (SeriesKind.ADC, Plane.AXIAL, False, False, SeriesKind.DWI, 0.12),
    (SeriesKind.T1_BRAVO_POST, Plane.AXIAL, True, True, None, 0.23),
    (SeriesKind.T1_CUBE_POST, Plane.SAGITTAL, True, True, None, 0.0),
    (SeriesKind.MPR, Plane.CORONAL, False, True, SeriesKind.T1_BRAVO_POST, 0.0),
)


def _rotation(angle: float) -> np.ndarray:
    """A rotation about an oblique axis (what a tilted, rotated prescription looks like)."""
    axis = np.array([1.0, 0.5, 0.2]) / np.linalg.norm([1.0, 0.5, 0.2])
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def _image(plane: Plane, tilt: float, seed: int, size: tuple[int, int, int], signed: bool) -> sitk.Image:
    rng = np.random.default_rng(seed)
    dtype = np.int16 if signed else np.uint16
    low = -500 if signed else 0
    image = sitk.GetImageFromArray(rng.integers(low, 3000, size=size[::-1]).astype(dtype))
    image.SetSpacing((1.1, 0.9, 1.3))
    image.SetDirection((_rotation(tilt) @ _PLANE_AXES[plane]).flatten().tolist())
    image.SetOrigin((-40.5, -60.25, 20.125))
    return image


def make_study(seed: int = 3, vendor: Vendor = Vendor.GE, size: tuple[int, int, int] = (20, 16, 6),
               signed: bool = False, kinds: tuple[SeriesKind, ...] | None = None) -> SyntheticStudy:
    """A small hand-built study with every series kind (or ``kinds``), random pixels and two lesions."""
    series = [
        SyntheticSeries(kind, _image(plane, tilt, seed * 31 + i, size, signed), plane, is_3d, contrast, i, derived)
        for i, (kind, plane, is_3d, contrast, derived, tilt) in enumerate(_SERIES_SPECS)
        if kinds is None or kind in kinds
    ]
    ref = next(s.image for s in series if s.kind is SeriesKind.T1_BRAVO_POST)
    label_array = np.zeros(ref.GetSize()[::-1], np.uint16)
    label_array[0, :2, :2] = 1
    label_array[-1, -1, -1] = 2
    label = sitk.GetImageFromArray(label_array)
    label.CopyInformation(ref)
    mask = sitk.GetImageFromArray((label_array > 0).astype(np.uint8) | 1)
    mask.CopyInformation(ref)
    lesions = [LesionTruth(1, "ring", (1.0, 2.0, 3.0), 4 * 1.287, 6.5, True),
               LesionTruth(2, "solid", (-4.0, 5.5, 6.25), 1.287, 2.5, False)]
    coregistered = {s.kind.value: s.image for s in series if s.kind.is_role}
    return SyntheticStudy(seed, vendor, PatientInfo("PHANTOM^ALPHA", "PH0003", "19600101", "F", 64), series,
                          SeriesKind.T1_BRAVO_POST, label, mask, lesions, coregistered)


def _series_folders(paths: list[Path]) -> list[Path]:
    return sorted({p.parent for p in paths})


def _dciodvfy_problems(path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) dciodvfy reports for one file."""
    assert DCIODVFY is not None
    result = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    lines = (result.stdout + result.stderr).splitlines()
    return ([line for line in lines if line.startswith("Error")],
            [line for line in lines if line.startswith("Warning")])


def _read_series(folder: Path) -> list[pydicom.Dataset]:
    return sorted((pydicom.dcmread(p) for p in folder.iterdir()), key=lambda ds: int(ds.InstanceNumber))


def _geometry_from_classic(datasets: list[pydicom.Dataset]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(origin, direction 3x3 with axis columns, spacing xyz) rebuilt from IPP/IOP/PixelSpacing."""
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    return _geometry(positions, datasets[0].ImageOrientationPatient, datasets[0].PixelSpacing)


def _geometry(positions: np.ndarray, iop: object, pixel_spacing: object) -> tuple[np.ndarray, ...]:
    iop_values = np.array([float(v) for v in iop])  # type: ignore[attr-defined]
    step = positions[1] - positions[0] if len(positions) > 1 else np.cross(iop_values[:3], iop_values[3:])
    # Every slice must sit on the line origin + k * step (a clean, evenly spaced stack).
    expected = positions[0] + np.arange(len(positions))[:, None] * step
    np.testing.assert_allclose(positions, expected, atol=GEOMETRY_TOLERANCE_MM)
    spacing_z = float(np.linalg.norm(step))
    direction = np.column_stack([iop_values[:3], iop_values[3:], step / spacing_z])
    row_spacing, col_spacing = (float(v) for v in pixel_spacing)  # type: ignore[attr-defined]
    return positions[0], direction, np.array([col_spacing, row_spacing, spacing_z])


def _assert_same_geometry(image: sitk.Image, origin: np.ndarray, direction: np.ndarray,
                          spacing: np.ndarray) -> None:
    np.testing.assert_allclose(origin, image.GetOrigin(), atol=GEOMETRY_TOLERANCE_MM)
    np.testing.assert_allclose(direction, np.reshape(image.GetDirection(), (3, 3)), atol=1e-6)
    np.testing.assert_allclose(spacing, image.GetSpacing(), atol=GEOMETRY_TOLERANCE_MM)


# ------------------------------------------------------------------------------------------------ IOD validity


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (dicom3tools) is not installed")
@pytest.mark.parametrize("enhanced", [False, True], ids=["classic", "enhanced"])
@pytest.mark.parametrize("vendor", list(Vendor), ids=lambda v: v.value)
def test_every_series_kind_passes_dciodvfy(tmp_path: Path, vendor: Vendor, enhanced: bool) -> None:
    study = make_study(vendor=vendor)
    folders = _series_folders(write_dicom_study(study, tmp_path, enhanced=enhanced))
    assert len(folders) == len(_SERIES_SPECS)
    for folder in folders:
        first = sorted(folder.iterdir())[0]
        errors, _ = _dciodvfy_problems(first)
        assert errors == [], f"{folder.name}: {errors}"
        ds = pydicom.dcmread(first, stop_before_pixels=True)
        derived = ds.ImageType[0] == "DERIVED"  # ADC and MPR stay classic also in enhanced studies
        expected = pydicom.uid.EnhancedMRImageStorage if enhanced and not derived else pydicom.uid.MRImageStorage
        assert ds.SOPClassUID == expected, folder.name


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (dicom3tools) is not installed")
def test_signed_pixels_pass_dciodvfy(tmp_path: Path) -> None:
    study = make_study(signed=True, kinds=(SeriesKind.T1_BRAVO_POST, SeriesKind.ADC))
    for enhanced in (False, True):
        for folder in _series_folders(write_dicom_study(study, tmp_path / str(enhanced), enhanced=enhanced)):
            first = sorted(folder.iterdir())[0]
            assert _dciodvfy_problems(first)[0] == []
            assert pydicom.dcmread(first).PixelRepresentation == 1


# ---------------------------------------------------------------------------------------- geometry and pixels


@pytest.mark.parametrize("vendor", list(Vendor), ids=lambda v: v.value)
def test_classic_round_trip_reproduces_geometry_and_pixels(tmp_path: Path, vendor: Vendor) -> None:
    study = make_study(vendor=vendor, signed=vendor is Vendor.PHILIPS)
    paths = write_dicom_study(study, tmp_path)
    plan = plan_study(study)
    for sp in plan.series:
        image = study.series[sp.index].image
        datasets = _read_series(tmp_path / sp.folder)
        assert len(datasets) == image.GetSize()[2]
        _assert_same_geometry(image, *_geometry_from_classic(datasets))
        pixels = np.stack([ds.pixel_array for ds in datasets])
        np.testing.assert_array_equal(pixels, sitk.GetArrayFromImage(image))
        assert {ds.SeriesInstanceUID for ds in datasets} == {sp.series_uid}
        geo = SliceGeometry.of(image)
        for k, ds in enumerate(datasets):
            assert float(ds.SliceLocation) == pytest.approx(geo.slice_location(k), abs=GEOMETRY_TOLERANCE_MM)
            assert float(ds.SliceThickness) == pytest.approx(image.GetSpacing()[2])
            assert float(ds.SpacingBetweenSlices) == pytest.approx(image.GetSpacing()[2])
    assert len(paths) == sum(s.image.GetSize()[2] for s in study.series)


@pytest.mark.parametrize("vendor", list(Vendor), ids=lambda v: v.value)
def test_enhanced_round_trip_reproduces_geometry_and_pixels(tmp_path: Path, vendor: Vendor) -> None:
    study = make_study(vendor=vendor)
    write_dicom_study(study, tmp_path, enhanced=True)
    plan = plan_study(study, enhanced=True)
    for sp in plan.series:
        if not sp.enhanced:
            continue
        image = study.series[sp.index].image
        (path,) = (tmp_path / sp.folder).iterdir()
        ds = pydicom.dcmread(path)
        assert int(ds.NumberOfFrames) == image.GetSize()[2]
        shared = ds.SharedFunctionalGroupsSequence[0]
        frames = ds.PerFrameFunctionalGroupsSequence
        order = [int(f.FrameContentSequence[0].InStackPositionNumber) for f in frames]
        assert order == list(range(1, len(frames) + 1))
        assert [list(map(int, f.FrameContentSequence[0].DimensionIndexValues)) for f in frames] == [
            [1, k] for k in order]
        positions = np.array([[float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient] for f in frames])
        measures = shared.PixelMeasuresSequence[0]
        _assert_same_geometry(image, *_geometry(positions, shared.PlaneOrientationSequence[0].ImageOrientationPatient,
                                                measures.PixelSpacing))
        np.testing.assert_array_equal(ds.pixel_array.reshape(image.GetSize()[::-1]), sitk.GetArrayFromImage(image))


def test_simpleitk_series_reader_gives_the_same_geometry(tmp_path: Path) -> None:
    study = make_study(vendor=Vendor.SIEMENS)
    write_dicom_study(study, tmp_path)
    reader = sitk.ImageSeriesReader()
    for sp in plan_study(study).series:
        image = study.series[sp.index].image
        files = reader.GetGDCMSeriesFileNames(str(tmp_path / sp.folder))
        reread = sitk.ReadImage(files)
        np.testing.assert_allclose(reread.GetOrigin(), image.GetOrigin(), atol=GEOMETRY_TOLERANCE_MM)
        np.testing.assert_allclose(reread.GetDirection(), image.GetDirection(), atol=1e-6)
        np.testing.assert_allclose(reread.GetSpacing(), image.GetSpacing(), atol=GEOMETRY_TOLERANCE_MM)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(reread), sitk.GetArrayFromImage(image))


# ------------------------------------------------------------------------------------------ identity and style


def _uids(folder: Path) -> set[tuple[str, str, str, str]]:
    out = set()
    for path in folder.rglob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        out.add((ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.FrameOfReferenceUID))
    return out


def test_uids_are_deterministic_and_distinct(tmp_path: Path) -> None:
    study = make_study(seed=5)
    write_dicom_study(study, tmp_path / "a")
    write_dicom_study(make_study(seed=5), tmp_path / "b")
    write_dicom_study(study, tmp_path / "enhanced", enhanced=True)
    write_dicom_study(make_study(seed=6), tmp_path / "other")
    a, b = _uids(tmp_path / "a"), _uids(tmp_path / "b")
    assert a == b
    assert len({u[2] for u in a}) == len(a)  # SOP instances unique
    assert len({u[0] for u in a}) == 1 and len({u[3] for u in a}) == 1  # one study, one frame of reference
    enhanced = _uids(tmp_path / "enhanced")
    assert {u[0] for u in enhanced} == {u[0] for u in a}
    # Acquired series are other objects when enhanced; derived ones (written classic both times) are the same.
    assert len({u[1] for u in enhanced} & {u[1] for u in a}) == 2
    other = _uids(tmp_path / "other")
    assert not {u[0] for u in other} & {u[0] for u in a}
    assert reference_series_uid(study) in {u[1] for u in a}


def test_headers_carry_the_vendor_conventions(tmp_path: Path) -> None:
    for vendor, manufacturer in ((Vendor.GE, "GE MEDICAL SYSTEMS"), (Vendor.SIEMENS, "SIEMENS"),
                                 (Vendor.PHILIPS, "Philips")):
        study = make_study(seed=1, vendor=vendor)
        out = tmp_path / vendor.value
        write_dicom_study(study, out)
        headers = {}
        for sp in plan_study(study).series:
            first = sorted((out / sp.folder).iterdir())[0]
            headers[study.series[sp.index].kind] = pydicom.dcmread(first, stop_before_pixels=True)
        for ds in headers.values():
            assert ds.Manufacturer.upper().startswith(manufacturer.upper())
            assert ds.Modality == "MR" and ds.BodyPartExamined == "HEAD"
            assert ds.SpecificCharacterSet == "ISO_IR 100" and ds.PatientName == "PHANTOM^ALPHA"
        bravo, dwi, adc, loc = (headers[k] for k in (SeriesKind.T1_BRAVO_POST, SeriesKind.DWI, SeriesKind.ADC,
                                                     SeriesKind.LOCALIZER))
        assert list(adc.ImageType)[:4] == ["DERIVED", "PRIMARY", "DIFFUSION", "ADC"]
        assert headers[SeriesKind.MPR].ImageType[0] == "DERIVED"
        assert "MPR" in list(headers[SeriesKind.MPR].ImageType)
        if vendor is Vendor.GE:
            assert bravo[0x0019, 0x0010].value == "GEMS_ACQU_01" and bravo[0x0019, 0x109C].value == "efgre3d"
            assert headers[SeriesKind.T1_CUBE_PRE][0x0019, 0x109C].value == "cube"
            assert list(loc.ImageType) == ["ORIGINAL", "PRIMARY", "LOCALIZER"]
            assert int(adc.SeriesNumber) == 100 * int(dwi.SeriesNumber)
            assert "SequenceName" not in bravo
        elif vendor is Vendor.SIEMENS:
            assert bravo.SequenceName == "*tfl3d1_16ns" and dwi.SequenceName == "*ep_b1000t"
            assert headers[SeriesKind.FLAIR].SequenceName.startswith("*spcir3d1")
            assert headers[SeriesKind.T1_CUBE_PRE].SequenceName.startswith(("*spc3d1", "*spcR3d1"))
            assert list(dwi.ImageType)[2:4] == ["DIFFUSION", "TRACEW"]
            assert adc.SeriesDescription.endswith("_ADC")
        else:
            assert bravo.SequenceName == "T1TFE" and bravo[0x2001, 0x1020].value == "T1TFE"
            assert headers[SeriesKind.T1_CUBE_PRE].SequenceName == "VISTA"
            assert int(headers[SeriesKind.LOCALIZER].SeriesNumber) == 101
            assert int(adc.SeriesNumber) == int(dwi.SeriesNumber) + 1
        for kind in (SeriesKind.T1_CUBE_PRE, SeriesKind.FLAIR, SeriesKind.LOCALIZER, SeriesKind.DWI):
            assert "ContrastBolusAgent" not in headers[kind]
        assert headers[SeriesKind.T1_CUBE_PRE].MRAcquisitionType == "3D"
        assert headers[SeriesKind.DWI].MRAcquisitionType == "2D"


def test_post_contrast_series_usually_carry_the_agent_but_not_always() -> None:
    post_marks = ("+C", "KM", "GD", "POST", "GAD")
    with_agent = without_agent = 0
    for seed in range(60):
        for vendor in Vendor:
            study = make_study(seed=seed, vendor=vendor, size=(4, 4, 2))
            for series, style in zip(study.series, series_styles(study)):
                if not series.contrast or series.kind is SeriesKind.MPR:
                    continue
                assert any(m in style.series_description.upper() for m in post_marks), style.series_description
                if style.contrast_agent is None:
                    without_agent += 1
                else:
                    with_agent += 1
    assert without_agent > 0
    assert with_agent > 4 * without_agent


def test_derived_series_repeat_their_source() -> None:
    for seed in range(30):
        for vendor in Vendor:
            study = make_study(seed=seed, vendor=vendor, size=(4, 4, 2))
            by_kind = {s.kind: style for s, style in zip(study.series, series_styles(study))}
            for derived, source in ((SeriesKind.ADC, SeriesKind.DWI), (SeriesKind.MPR, SeriesKind.T1_BRAVO_POST)):
                d, src = by_kind[derived], by_kind[source]
                assert d.derived and not src.derived
                assert (d.repetition_time_ms, d.echo_time_ms, d.inversion_time_ms) == (
                    src.repetition_time_ms, src.echo_time_ms, src.inversion_time_ms)
            # A reformat of a post-contrast series records the agent exactly when its source does.
            assert by_kind[SeriesKind.MPR].contrast_agent == by_kind[SeriesKind.T1_BRAVO_POST].contrast_agent


def test_styles_vary_with_the_seed_and_repeat_for_the_same_seed() -> None:
    descriptions: dict[Vendor, set[str]] = {v: set() for v in Vendor}
    for seed in range(12):
        for vendor in Vendor:
            study = make_study(seed=seed, vendor=vendor, size=(4, 4, 2))
            styles = series_styles(study)
            assert styles == series_styles(make_study(seed=seed, vendor=vendor, size=(4, 4, 2)))
            descriptions[vendor].add(styles[5].series_description)  # the BRAVO-type post series
            assert study_style(study).scanner.manufacturer
    assert all(len(d) >= 3 for d in descriptions.values()), descriptions


def test_enhanced_post_contrast_carries_contrast_usage(tmp_path: Path) -> None:
    seed = next(s for s in range(40) if study_style(make_study(seed=s, size=(4, 4, 2))).agent_omitted == frozenset())
    study = make_study(seed=seed, vendor=Vendor.SIEMENS)
    write_dicom_study(study, tmp_path, enhanced=True)
    plan = plan_study(study, enhanced=True)
    sp = next(p for p in plan.series if study.series[p.index].kind is SeriesKind.T1_BRAVO_POST)
    ds = pydicom.dcmread(next((tmp_path / sp.folder).iterdir()), stop_before_pixels=True)
    shared = ds.SharedFunctionalGroupsSequence[0]
    assert shared.ContrastBolusUsageSequence[0].ContrastBolusAgentAdministered == "YES"
    assert ds.ContrastBolusAgentSequence[0].CodingSchemeDesignator == "SCT"
    assert ds.EchoPulseSequence == "GRADIENT"
    assert shared.MRModifierSequence[0].InversionRecovery == "YES"
    cube = next(p for p in plan.series if study.series[p.index].kind is SeriesKind.T1_CUBE_PRE)
    cube_ds = pydicom.dcmread(next((tmp_path / cube.folder).iterdir()), stop_before_pixels=True)
    assert cube_ds.EchoPulseSequence == "SPIN"
    assert "ContrastBolusUsageSequence" not in cube_ds.SharedFunctionalGroupsSequence[0]


# ------------------------------------------------------------------------------------------------------- truth


def test_truth_files_keep_the_reference_geometry(tmp_path: Path) -> None:
    study = make_study()
    paths = write_truth(study, tmp_path, reference_series_uid="1.2.3")
    for key, original in (("label", study.label), ("brain_mask", study.brain_mask)):
        reread = sitk.ReadImage(str(paths[key]))
        np.testing.assert_allclose(reread.GetOrigin(), original.GetOrigin(), atol=GEOMETRY_TOLERANCE_MM)
        np.testing.assert_allclose(reread.GetDirection(), original.GetDirection(), atol=1e-6)
        np.testing.assert_allclose(reread.GetSpacing(), original.GetSpacing(), atol=GEOMETRY_TOLERANCE_MM)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(reread), sitk.GetArrayFromImage(original))
    doc = json.loads(paths["lesions"].read_text())
    assert doc["seed"] == 3 and doc["vendor"] == "ge" and doc["reference_kind"] == "t1_bravo_post"
    assert doc["reference_series_instance_uid"] == "1.2.3"
    assert doc["lesion_count"] == 2
    assert doc["counts_by_size"] == {"lt_5mm": 1, "5_to_10mm": 1, "10_to_20mm": 0, "ge_20mm": 0}
    assert set(doc["counts_by_size"]) == {name for name, _, _ in SIZE_BINS_MM}
    first = doc["lesions"][0]
    assert first == {"label": 1, "kind": "ring", "centroid_lps_mm": [1.0, 2.0, 3.0], "volume_mm3": 5.148,
                     "diameter_mm": 6.5, "edema": True, "size_bin": "5_to_10mm"}


def test_nifti_study_has_every_present_role(tmp_path: Path) -> None:
    study = make_study(kinds=(SeriesKind.T1_BRAVO_POST, SeriesKind.FLAIR, SeriesKind.DWI))
    paths = write_nifti_study(study, tmp_path / "nifti", truth_dir=tmp_path / "truth")
    assert {k for k in paths if k in ROLES} == {"t1_bravo_post", "flair"}
    assert sorted(p.name for p in (tmp_path / "nifti").iterdir()) == ["flair.nii.gz", "t1_bravo_post.nii.gz"]
    flair = sitk.ReadImage(str(paths["flair"]))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(flair), sitk.GetArrayFromImage(study.coregistered["flair"]))
    # NIfTI stores RAS: the LPS origin comes back through SimpleITK, but the raw affine is flipped in x and y.
    affine = nibabel.load(str(paths["flair"])).affine
    np.testing.assert_allclose(affine[:3, 3], np.array(flair.GetOrigin()) * [-1, -1, 1], atol=GEOMETRY_TOLERANCE_MM)
    assert json.loads(paths["lesions"].read_text())["reference_series_instance_uid"] is None


def test_fixture_covers_every_series_kind() -> None:
    # The dciodvfy test above is only complete if the hand-built study has one series of every kind.
    counts = Counter(s.kind for s in make_study().series)
    assert set(counts) == set(SeriesKind) and set(counts.values()) == {1}


# ---------------------------------------------------------------------------------------- real generated data

# One study per vendor at 3 mm (seed, distractor kinds the generator draws for it); together they hold every
# series kind, so every kind is validated on real generated pixels too.
GENERATED = {
    Vendor.GE: (1, {SeriesKind.LOCALIZER, SeriesKind.DWI, SeriesKind.ADC}),
    Vendor.SIEMENS: (14, {SeriesKind.LOCALIZER, SeriesKind.MPR}),
    Vendor.PHILIPS: (17, {SeriesKind.DWI, SeriesKind.ADC, SeriesKind.MPR}),
}


def test_generated_seeds_cover_every_series_kind() -> None:
    distractors = set().union(*(kinds for _, kinds in GENERATED.values()))
    assert distractors | {SeriesKind(role) for role in ROLES} == set(SeriesKind)


@pytest.mark.parametrize("vendor", list(Vendor), ids=lambda v: v.value)
def test_generated_study_round_trips_and_passes_dciodvfy(tmp_path: Path, vendor: Vendor) -> None:
    # One test per vendor (not a shared fixture) so that pytest-xdist never generates a study twice.
    from training.phantom.generate import generate_study

    seed, distractors = GENERATED[vendor]
    study = generate_study(seed, vendor=vendor, voxel_mm=3.0)
    assert {s.kind for s in study.series if not s.kind.is_role} == distractors, "pick other GENERATED seeds"
    write_dicom_study(study, tmp_path / "classic")
    write_dicom_study(study, tmp_path / "enhanced", enhanced=True)
    reader = sitk.ImageSeriesReader()
    for sp in plan_study(study).series:
        image = study.series[sp.index].image
        classic = tmp_path / "classic" / sp.folder
        datasets = _read_series(classic)
        _assert_same_geometry(image, *_geometry_from_classic(datasets))
        np.testing.assert_array_equal(np.stack([ds.pixel_array for ds in datasets]), sitk.GetArrayFromImage(image))
        reread = sitk.ReadImage(reader.GetGDCMSeriesFileNames(str(classic)))
        _assert_same_geometry(reread, np.asarray(image.GetOrigin()), np.reshape(image.GetDirection(), (3, 3)),
                              np.asarray(image.GetSpacing()))
    for sp in plan_study(study, enhanced=True).series:
        if not sp.enhanced:
            continue
        image = study.series[sp.index].image
        (path,) = (tmp_path / "enhanced" / sp.folder).iterdir()
        ds = pydicom.dcmread(path)
        shared = ds.SharedFunctionalGroupsSequence[0]
        positions = np.array([[float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient]
                              for f in ds.PerFrameFunctionalGroupsSequence])
        _assert_same_geometry(image, *_geometry(positions, shared.PlaneOrientationSequence[0].ImageOrientationPatient,
                                                shared.PixelMeasuresSequence[0].PixelSpacing))
        np.testing.assert_array_equal(ds.pixel_array.reshape(image.GetSize()[::-1]), sitk.GetArrayFromImage(image))

    paths = write_truth(study, tmp_path / "truth", reference_series_uid=reference_series_uid(study))
    doc = json.loads(paths["lesions"].read_text())
    ref_plan = next(p for p in plan_study(study).series if study.series[p.index].kind == study.reference_kind)
    first = pydicom.dcmread(sorted((tmp_path / "classic" / ref_plan.folder).iterdir())[0], stop_before_pixels=True)
    assert doc["reference_series_instance_uid"] == first.SeriesInstanceUID
    assert doc["lesion_count"] == len(study.lesions) == sum(doc["counts_by_size"].values())
    label = sitk.ReadImage(str(paths["label"]))
    _assert_same_geometry(label, np.asarray(first.ImagePositionPatient, dtype=float),
                          np.reshape(study.label.GetDirection(), (3, 3)), np.asarray(study.label.GetSpacing()))
    assert set(np.unique(sitk.GetArrayFromImage(label))) <= {0} | {les.label for les in study.lesions}

    if DCIODVFY is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed: round trip checked, IOD validity not")
    for fmt in ("classic", "enhanced"):
        series_folders = sorted((tmp_path / fmt).iterdir())
        assert len(series_folders) == len(study.series)
        for series_folder in series_folders:
            errors, _ = _dciodvfy_problems(sorted(series_folder.iterdir())[0])
            assert errors == [], f"{fmt} {series_folder.name}: {errors}"
