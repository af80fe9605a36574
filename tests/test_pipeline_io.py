"""Tests of pipeline.io: DICOM series -> SimpleITK volume (geometry, pixels, transfer syntaxes, errors)."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from pipeline.io import (
    DuplicatePositionError,
    LoadedSeries,
    MissingSliceError,
    MixedOrientationError,
    MixedSeriesError,
    MixedSizeError,
    NonOrthogonalStackError,
    NotAnImageError,
    SeriesLoadError,
    SingleSliceError,
    group_files,
    load_series,
    load_series_dir,
    read_pixels,
)
from training.phantom import SeriesKind, SyntheticStudy, generate_study
from training.phantom.dicom_writer import plan_study, write_dicom_study

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real-dicom"
needs_real = pytest.mark.skipif(not REAL.is_dir(), reason="real DICOM corpus not available")

DEIDENT = REAL / "dcm_qa_deident" / "10_Accelerated_SAG_IR-SPGR"
GE_MPRAGE = REAL / "dcm_qa_ge" / "05_3D_Ax_T1_MP_RAGE_R22"
GE_DWI = REAL / "dcm_qa_ge" / "01_Ax_DWI_TENSOR_R2"
XA30I_T1 = REAL / "dcm_qa_xa30i" / "6001_anat-T1w_acq-tfl"
XA30_T1_ENH = REAL / "dcm_qa_xa30" / "6_anat-T1w_acq-tfl"
SCOUT = REAL / "dcm_qa_xa30i" / "1001_AAHead_Scout"
MPR = REAL / "dcm_qa_xa30i" / "2001_AAHead_Scout"
SC = REAL / "dcm_qa_xa30i" / "19001_Perfusion_Weighted_SC"
TS = REAL / "dcm_qa_ts" / "ax_asc_35sl"


def _direction(image: sitk.Image) -> np.ndarray:
    return np.asarray(image.GetDirection()).reshape(3, 3)


def _assert_same_geometry(a: sitk.Image, b: sitk.Image, tol: float = 1e-4) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=tol)
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=tol)


# ------------------------------------------------------------------------------------------------------------
# Real corpus


@needs_real
def test_every_transfer_syntax_decodes_to_identical_pixels() -> None:
    files = sorted(TS.glob("*.dcm"), key=lambda p: int(p.stem))
    assert len(files) == 9
    decoded = {}
    syntaxes = set()
    for f in files:
        ds = pydicom.dcmread(f)
        syntaxes.add(str(ds.file_meta.TransferSyntaxUID))
        px = read_pixels(ds)
        assert px.dtype == np.float32 and px.dtype.isnative
        assert px.shape == (384, 384)
        decoded[f.name] = px
    assert syntaxes == {
        "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.5",
        "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90"}
    ref = decoded["1.dcm"]
    assert ref.max() > 100  # a real image, not zeros
    # Independent reference: the raw little-endian native pixel stream of 1.dcm.
    ds1 = pydicom.dcmread(files[0])
    raw = np.frombuffer(ds1.PixelData, dtype="<i2" if ds1.PixelRepresentation else "<u2").reshape(384, 384)
    np.testing.assert_array_equal(ref, raw.astype(np.float32))
    for name, px in decoded.items():
        np.testing.assert_array_equal(px, ref, err_msg=name)


@needs_real
def test_ts_folder_is_a_single_position_not_a_volume() -> None:
    with pytest.raises(SingleSliceError) as info:
        load_series_dir(TS)
    assert isinstance(info.value, SeriesLoadError) and isinstance(info.value, ValueError)
    assert "1.3.12.2.1107.5.2.32.35131.2014031012481958900586557.0.0.0" in str(info.value)
    assert "ax_asc_35sl" in str(info.value)


@needs_real
def test_classic_and_enhanced_twins_have_the_same_geometry() -> None:
    classic = load_series_dir(XA30I_T1)
    enhanced = load_series_dir(XA30_T1_ENH)
    assert classic.image.GetSize() == enhanced.image.GetSize() == (128, 128, 96)
    _assert_same_geometry(classic.image, enhanced.image, tol=1e-3)
    np.testing.assert_allclose(classic.image.GetSpacing(), (2.0, 2.0, 2.0), atol=1e-4)
    # Every slice position agrees: compare the IPP of each voxel plane k.
    for k in (0, 47, 95):
        a = classic.image.TransformIndexToPhysicalPoint((0, 0, k))
        b = enhanced.image.TransformIndexToPhysicalPoint((0, 0, k))
        assert np.max(np.abs(np.subtract(a, b))) < 1e-3
    # Slices sorted along n = row x col (= -x here): frames run +x, so the frame order is reversed.
    assert [r.frame_number for r in enhanced.source_instances] == list(range(96, 0, -1))
    assert {r.sop_class_uid for r in enhanced.source_instances} == {"1.2.840.10008.5.1.4.1.1.4.1"}
    assert enhanced.sop_class_uid == "1.2.840.10008.5.1.4.1.1.4.1"
    assert all(r.frame_number is None for r in classic.source_instances)
    assert len({r.sop_instance_uid for r in classic.source_instances}) == 96
    # Per-slice source reference matches the instance's own IPP.
    first = next(p for p in XA30I_T1.iterdir()
                 if pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
                 == classic.source_instances[0].sop_instance_uid)
    ipp = [float(v) for v in pydicom.dcmread(first, stop_before_pixels=True).ImagePositionPatient]
    np.testing.assert_allclose(classic.image.GetOrigin(), ipp, atol=1e-6)
    # Header: first slice, without pixel data, with the study identifiers.
    assert "PixelData" not in classic.header and "PixelData" not in enhanced.header
    assert classic.header.SOPInstanceUID == classic.source_instances[0].sop_instance_uid
    assert classic.study_instance_uid == str(classic.header.StudyInstanceUID)
    assert classic.frame_of_reference_uid and classic.frame_of_reference_uid != enhanced.frame_of_reference_uid
    assert classic.description == enhanced.description == "anat-T1w_acq-tfl"


@needs_real
def test_oblique_ge_mprage_direction_is_its_full_iop() -> None:
    loaded = load_series_dir(GE_MPRAGE)  # files without extension
    assert sitk.GetArrayViewFromImage(loaded.image).shape == (130, 256, 256)
    d = _direction(loaded.image)
    ds = pydicom.dcmread(next(GE_MPRAGE.iterdir()), stop_before_pixels=True)
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    np.testing.assert_allclose(d[:, 0], iop[:3], atol=1e-6)
    np.testing.assert_allclose(d[:, 1], iop[3:], atol=1e-6)
    np.testing.assert_allclose(d[:, 2], np.cross(iop[:3], iop[3:]), atol=1e-6)
    assert abs(d[2, 2]) < 0.98  # really oblique: ~13 deg off axial, not snapped
    np.testing.assert_allclose(loaded.image.GetSpacing(), (0.9375, 0.9375, 1.2), atol=1e-3)
    # Sorted along the normal: the slice positions increase along n.
    z = [np.dot(loaded.image.TransformIndexToPhysicalPoint((0, 0, k)), d[:, 2]) for k in (0, 1, 129)]
    assert z[0] < z[1] < z[2]


@needs_real
@pytest.mark.parametrize(
    ("folder", "shape", "spacing"),
    [
        (XA30I_T1, (96, 128, 128), (2.0, 2.0, 2.0)),
        (XA30_T1_ENH, (96, 128, 128), (2.0, 2.0, 2.0)),
        (SCOUT, (128, 160, 160), (1.625, 1.625, 1.6)),
    ],
    ids=["4-xa30i-classic", "5-xa30-enhanced", "6-scout"],
)
def test_real_series_shapes(folder: Path, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> None:
    loaded = load_series_dir(folder)
    assert isinstance(loaded, LoadedSeries)
    arr = sitk.GetArrayViewFromImage(loaded.image)
    assert arr.shape == shape
    assert loaded.image.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_allclose(loaded.image.GetSpacing(), spacing, atol=1e-3)
    assert np.linalg.det(_direction(loaded.image)) == pytest.approx(1.0, abs=1e-6)
    assert len(loaded.source_instances) == shape[0]
    assert float(np.max(arr)) > 0


@needs_real
def test_deident_signed_pixels_and_sagittal_order() -> None:
    loaded = load_series_dir(DEIDENT)  # manifest #1
    arr = sitk.GetArrayViewFromImage(loaded.image)
    assert arr.shape == (196, 256, 256)
    np.testing.assert_allclose(loaded.image.GetSpacing(), (1.0547, 1.0547, 1.2), atol=1e-3)
    assert len(loaded.source_instances) == 196 and loaded.description == "Accelerated SAG IR-SPGR"
    assert 7000 < float(arr.max()) <= 7480 and float(arr.min()) >= 0
    # Sagittal, IOP (0,1,0,0,0,-1): n = -x, so slice 0 is the patient-left-most (x = +121.4).
    assert loaded.image.GetOrigin()[0] == pytest.approx(121.394, abs=1e-2)
    np.testing.assert_allclose(_direction(loaded.image)[:, 2], (-1.0, 0.0, 0.0), atol=1e-6)
    # The pixels of slice 0 are those of the instance it references.
    path = next(p for p in DEIDENT.iterdir()
                if pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
                == loaded.source_instances[0].sop_instance_uid)
    np.testing.assert_array_equal(arr[0], read_pixels(pydicom.dcmread(path)))


@needs_real
def test_ge_dwi_raises_duplicate_positions_without_patient_data() -> None:
    with pytest.raises(DuplicatePositionError) as info:
        load_series_dir(GE_DWI)
    msg = str(info.value)
    ds = pydicom.dcmread(next(GE_DWI.iterdir()), stop_before_pixels=True)
    assert ds.SeriesInstanceUID in msg and "Ax DWI TENSOR R2" in msg
    assert info.value.series_instance_uid == ds.SeriesInstanceUID
    for attr in ("PatientName", "PatientID"):
        value = str(ds.get(attr, "") or "")
        if len(value) > 2:
            assert value not in msg


@needs_real
def test_mpr_raises_mixed_orientations() -> None:
    with pytest.raises(MixedOrientationError, match="AAHead_Scout_MPR_sag"):
        load_series_dir(MPR)


@needs_real
def test_secondary_capture_is_not_an_image_volume() -> None:
    with pytest.raises(NotAnImageError):
        load_series_dir(SC)


@needs_real
def test_deleted_middle_slice_raises_missing_slice(tmp_path: Path) -> None:
    files = sorted(XA30I_T1.iterdir())
    by_pos = sorted(files, key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[0]))
    middle = by_pos[len(by_pos) // 2]
    for f in files:
        if f != middle:
            shutil.copy(f, tmp_path / f.name)
    with pytest.raises(MissingSliceError, match="anat-T1w_acq-tfl") as info:
        load_series_dir(tmp_path)
    assert "4.000 mm" in str(info.value)  # the gap: 2 x the 2 mm step


@needs_real
def test_group_files_skips_non_dicom_and_load_series_rejects_several_series() -> None:
    groups = group_files(REAL / "dcm_qa_ge")  # holds a LICENSE text file next to two GE series
    assert sorted(len(v) for v in groups.values()) == [14, 130]
    assert all(p.name != "LICENSE" for v in groups.values() for p in v)
    uid = pydicom.dcmread(next(GE_MPRAGE.iterdir()), stop_before_pixels=True).SeriesInstanceUID
    assert set(groups[uid]) == set(GE_MPRAGE.iterdir())
    mixed = [*sorted(GE_MPRAGE.iterdir())[:3], *sorted(GE_DWI.iterdir())[:3]]
    with pytest.raises(MixedSeriesError, match="2 SeriesInstanceUIDs"):
        load_series(mixed)
    with pytest.raises(SeriesLoadError, match="not a DICOM file"):
        load_series([*sorted(GE_MPRAGE.iterdir())[:3], REAL / "dcm_qa_ge" / "LICENSE"])
    # load_series on one group (the DWI: 14 files at 2 positions) gives the same verdict as on its folder.
    dwi_uid = next(u for u in groups if u != uid)
    with pytest.raises(DuplicatePositionError):
        load_series(groups[dwi_uid])


# ------------------------------------------------------------------------------------------------------------
# Synthetic studies (training.phantom)

_STUDIES: dict[str, SyntheticStudy] = {}


def _study(vendor: str) -> SyntheticStudy:
    """One generated study per vendor and test process (generation takes ~1-2 s); never mutated."""
    if vendor not in _STUDIES:
        # Only the three geometries the generator draws (sagittal 3D cube, two obliques): no distractors, and
        # the post-contrast cube shares the pre-contrast grid.
        _STUDIES[vendor] = generate_study(7, vendor=vendor, voxel_mm=3.0, missing=("t1_cube_post",),
                                          distractors=False)
    return _STUDIES[vendor]



@pytest.mark.parametrize("vendor", ["ge", "siemens", "philips"])
def test_phantom_loads_to_generator_geometry_and_pixels(tmp_path: Path, vendor: str) -> None:
    """Classic and enhanced exports of a generated study load to exactly the generator's grid and pixels."""
    study = _study(vendor)
    assert {s.kind for s in study.series} == {SeriesKind.T1_CUBE_PRE, SeriesKind.FLAIR, SeriesKind.T1_BRAVO_POST}
    for enhanced in (False, True):
        root = tmp_path / ("enhanced" if enhanced else "classic")
        write_dicom_study(study, root, enhanced=enhanced)
        plan = plan_study(study, enhanced)
        groups = group_files(root)
        assert len(groups) == len(study.series)
        for sp in plan.series:
            truth = study.series[sp.index].image
            n = truth.GetSize()[2]
            loaded = load_series_dir(root / sp.folder)
            assert loaded.series_instance_uid == sp.series_uid == loaded.header.SeriesInstanceUID
            expected_class = "1.2.840.10008.5.1.4.1.1.4.1" if sp.enhanced else "1.2.840.10008.5.1.4.1.1.4"
            assert loaded.sop_class_uid == expected_class
            assert len(groups[sp.series_uid]) == (1 if sp.enhanced else n)
            _assert_same_geometry(loaded.image, truth, tol=1e-4)
            np.testing.assert_array_equal(sitk.GetArrayViewFromImage(loaded.image),
                                          sitk.GetArrayViewFromImage(truth).astype(np.float32))
            frames = [r.frame_number for r in loaded.source_instances]
            assert frames == (list(range(1, n + 1)) if sp.enhanced else [None] * n)


def _one_series_study(image: sitk.Image | None = None, kind: SeriesKind = SeriesKind.T1_BRAVO_POST):
    """A small phantom study holding one series (optionally with its image replaced)."""
    study = _study("siemens")
    series = copy.copy(study.series_of(kind))
    series.image = image if image is not None else _small(series.image)
    one = copy.copy(study)
    one.series = [series]
    return one


def _small(image: sitk.Image) -> sitk.Image:
    """The first 12 slices (same grid otherwise): enough for every stacking check, 5x faster to write."""
    return image[:, :, :12]


def _write_one(tmp_path: Path, image: sitk.Image | None = None, enhanced: bool = False) -> tuple[Path, sitk.Image]:
    study = _one_series_study(image)
    paths = write_dicom_study(study, tmp_path, enhanced=enhanced)
    return paths[0].parent, study.series[0].image


def _with_direction(image: sitk.Image, direction: np.ndarray) -> sitk.Image:
    out = sitk.Image(image)
    out.SetDirection(tuple(float(v) for v in direction.ravel()))
    return out


def _rotation(axis: np.ndarray, angle_deg: float) -> np.ndarray:
    axis = axis / np.linalg.norm(axis)
    a = np.radians(angle_deg)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * (k @ k)


@pytest.mark.parametrize(
    "direction",
    [
        np.column_stack([(1, 0, 0), (0, 0, -1), (0, 1, 0)]),  # coronal
        np.column_stack([(0, 1, 0), (0, 0, -1), (-1, 0, 0)]),  # sagittal
        _rotation(np.array([0.3, -0.5, 0.8]), 27.0),  # double oblique
    ],
    ids=["coronal", "sagittal", "oblique"],
)
def test_any_orientation_round_trips(tmp_path: Path, direction: np.ndarray) -> None:
    base = _small(_study("siemens").series_of(SeriesKind.T1_BRAVO_POST).image)
    folder, truth = _write_one(tmp_path, _with_direction(base, direction))
    loaded = load_series_dir(folder)
    _assert_same_geometry(loaded.image, truth, tol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(loaded.image),
                                  sitk.GetArrayViewFromImage(truth).astype(np.float32))


def test_left_handed_stack_is_sorted_along_the_normal(tmp_path: Path) -> None:
    """Slices written against n = row x col come back reversed, with a right-handed direction."""
    base = _small(_study("siemens").series_of(SeriesKind.T1_BRAVO_POST).image)
    direction = np.column_stack([(1, 0, 0), (0, 1, 0), (0, 0, -1)])
    folder, truth = _write_one(tmp_path, _with_direction(base, direction))
    loaded = load_series_dir(folder)
    n = truth.GetSize()[2]
    np.testing.assert_allclose(_direction(loaded.image), np.eye(3), atol=1e-9)
    np.testing.assert_allclose(loaded.image.GetOrigin(), truth.TransformIndexToPhysicalPoint((0, 0, n - 1)),
                               atol=1e-4)
    np.testing.assert_allclose(loaded.image.GetSpacing(), truth.GetSpacing(), atol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(loaded.image),
                                  sitk.GetArrayViewFromImage(truth)[::-1].astype(np.float32))


def test_spacing_comes_from_positions_not_slice_thickness(tmp_path: Path) -> None:
    folder, truth = _write_one(tmp_path)
    for f in folder.iterdir():
        ds = pydicom.dcmread(f)
        ds.SliceThickness = 9.0
        ds.SpacingBetweenSlices = 7.0
        ds.save_as(f)
    loaded = load_series_dir(folder)
    assert loaded.image.GetSpacing()[2] == pytest.approx(truth.GetSpacing()[2], abs=1e-6)


def test_classic_rescale_slope_intercept(tmp_path: Path) -> None:
    folder, truth = _write_one(tmp_path)
    for f in folder.iterdir():
        ds = pydicom.dcmread(f)
        ds.RescaleSlope = 2
        ds.RescaleIntercept = -10
        ds.save_as(f)
    loaded = load_series_dir(folder)
    expected = sitk.GetArrayViewFromImage(truth).astype(np.float32) * 2 - 10
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(loaded.image), expected)
    assert float(sitk.GetArrayViewFromImage(loaded.image).min()) == -10.0


def test_enhanced_rescale_shared_and_per_frame(tmp_path: Path) -> None:
    folder, truth = _write_one(tmp_path, enhanced=True)
    path = next(folder.iterdir())
    ds = pydicom.dcmread(path)
    pvt = ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
    pvt.RescaleSlope = 2
    pvt.RescaleIntercept = -10
    override = Dataset()
    override.RescaleSlope = 0.5
    override.RescaleIntercept = 3
    override.RescaleType = "US"
    ds.PerFrameFunctionalGroupsSequence[4].PixelValueTransformationSequence = DicomSequence([override])
    ds.save_as(path)
    expected = sitk.GetArrayViewFromImage(truth).astype(np.float32) * 2 - 10
    expected[4] = sitk.GetArrayViewFromImage(truth)[4].astype(np.float32) * 0.5 + 3
    np.testing.assert_array_equal(read_pixels(pydicom.dcmread(path)), expected)
    loaded = load_series_dir(folder)  # keep a reference: an array view does not keep its image alive
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(loaded.image), expected)


def test_mixed_sizes_raise(tmp_path: Path) -> None:
    folder, _ = _write_one(tmp_path)
    f = sorted(folder.iterdir())[5]
    ds = pydicom.dcmread(f)
    arr = ds.pixel_array[:-2, :]
    ds.Rows = arr.shape[0]
    ds.PixelData = np.ascontiguousarray(arr).tobytes()
    ds.save_as(f)
    with pytest.raises(MixedSizeError, match="different sizes"):
        load_series_dir(folder)


def test_mixed_pixel_spacing_raises(tmp_path: Path) -> None:
    folder, _ = _write_one(tmp_path)
    f = sorted(folder.iterdir())[3]
    ds = pydicom.dcmread(f)
    ds.PixelSpacing = [3.5, 3.5]
    ds.save_as(f)
    with pytest.raises(MixedSizeError, match="PixelSpacing"):
        load_series_dir(folder)


def test_duplicate_position_in_phantom_raises(tmp_path: Path) -> None:
    folder, _ = _write_one(tmp_path)
    files = sorted(folder.iterdir())
    ds = pydicom.dcmread(files[2])
    ds.ImagePositionPatient = pydicom.dcmread(files[1]).ImagePositionPatient
    ds.save_as(files[2])
    with pytest.raises(DuplicatePositionError):
        load_series_dir(folder)


def test_big_endian_copy_loads_like_the_original(tmp_path: Path) -> None:
    folder, truth = _write_one(tmp_path)
    for f in folder.iterdir():
        ds = pydicom.dcmread(f)
        arr = ds.pixel_array
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRBigEndian
        ds.PixelData = arr.astype(arr.dtype.newbyteorder(">")).tobytes()
        pydicom.dcmwrite(f, ds, little_endian=False, implicit_vr=False, force_encoding=True)
    assert pydicom.dcmread(next(folder.iterdir())).file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRBigEndian
    loaded = load_series_dir(folder)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(loaded.image),
                                  sitk.GetArrayViewFromImage(truth).astype(np.float32))


def test_non_dicom_files_are_skipped_by_the_directory_loader(tmp_path: Path) -> None:
    folder, truth = _write_one(tmp_path)
    (folder / "README.txt").write_text("not dicom\n")
    (folder / "empty").write_bytes(b"")
    loaded = load_series_dir(folder)
    assert loaded.image.GetSize() == truth.GetSize()
    assert list(group_files(folder)) == [loaded.series_instance_uid]


def test_in_plane_drift_of_positions_raises(tmp_path: Path) -> None:
    folder, truth = _write_one(tmp_path)
    row_dir = np.asarray(truth.GetDirection()).reshape(3, 3)[:, 0]
    f = sorted(folder.iterdir())[6]
    ds = pydicom.dcmread(f)
    ds.ImagePositionPatient = [float(v) + 2.0 * r for v, r in zip(ds.ImagePositionPatient, row_dir)]
    ds.save_as(f)
    with pytest.raises(NonOrthogonalStackError, match="drift"):
        load_series_dir(folder)


def test_source_instances_and_header_follow_slice_order(tmp_path: Path) -> None:
    folder, truth = _write_one(tmp_path)
    files = sorted(folder.iterdir())  # IM0001.. = slice 0.. along the normal
    loaded = load_series(list(reversed(files)))  # input order must not matter
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files]
    assert [r.sop_instance_uid for r in loaded.source_instances] == uids
    assert {r.sop_class_uid for r in loaded.source_instances} == {"1.2.840.10008.5.1.4.1.1.4"}
    assert loaded.header.SOPInstanceUID == uids[0] and "PixelData" not in loaded.header
    _assert_same_geometry(loaded.image, truth)
