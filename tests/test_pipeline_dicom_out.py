"""pipeline.dicom_out: SEG and TID 1500 SR from a phantom's truth, on classic and enhanced MR sources."""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from pipeline.dicom_out import (
    AlgorithmInfo,
    common,
    ordered_sources,
    write_seg,
    write_sr,
)
from pipeline.lesions import find_lesions
from training.phantom import generate_study
from training.phantom.dicom_writer import plan_study, write_dicom_study

DCIODVFY = shutil.which("dciodvfy")
ALGORITHM = AlgorithmInfo(name="ILD DeepLabV3", version="1.4.0", manufacturer="ILD node project",
                          device_uid="1.2.826.0.1.3680043.8.498.424242", model_name="ILD-DLV3",
                          parameters={"threshold": "0.76"})
ROLES = ("t1_bravo_post", "t1_cube_pre", "flair")


@pytest.fixture(scope="module")
def study():
    # only the reference (BRAVO) series: fast to generate and to write
    return generate_study(1, vendor="ge", voxel_mm=3.0, distractors=False,
                          missing=("t1_cube_pre", "t1_cube_post", "flair"))


@pytest.fixture(scope="module")
def result(study):
    res = find_lesions(sitk.Cast(study.label > 0, sitk.sitkFloat32), 0.76)
    assert res.count_all >= 2  # the tests below need several segments
    return res


@pytest.fixture(scope="module", params=[False, True], ids=["classic", "enhanced"])
def sources(request, study, tmp_path_factory):
    enhanced = request.param
    out = tmp_path_factory.mktemp("enhanced" if enhanced else "classic")
    write_dicom_study(study, out, enhanced=enhanced)
    plan = next(p for p in plan_study(study, enhanced).series if study.series[p.index].kind == study.reference_kind)
    datasets = [pydicom.dcmread(f) for f in sorted((out / plan.folder).glob("*.dcm"))]
    assert all(ds.SeriesInstanceUID == plan.series_uid for ds in datasets)
    assert (len(datasets) == 1) == enhanced
    return ordered_sources(datasets)


@pytest.fixture(scope="module")
def seg(sources, result):
    return write_seg(sources, result.labels, result.lesions, ALGORITHM)


@pytest.fixture(scope="module")
def sr(sources, result, seg):
    return write_sr(sources, result, ALGORITHM, seg=seg, roles_present=ROLES)


def _code(item) -> tuple[str, str, str]:
    return item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning


def _dciodvfy_errors(ds, tmp_path: Path, name: str) -> list[str]:
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    run = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, check=False)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


# ---------------------------------------------------------------------------------------------------- SEG


def test_seg_segments_codes_tracking(seg, result, sources):
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
    assert seg.SegmentationType == "BINARY"
    assert seg.SeriesDescription == "ILD brain mets SEG - RESEARCH USE ONLY"
    segments = list(seg.SegmentSequence)
    assert [int(s.SegmentNumber) for s in segments] == [les.number for les in result.lesions]
    for s, les in zip(segments, result.lesions):
        assert s.SegmentLabel == f"Met {les.number} - {les.volume_mm3 / 1000:.2f} mL"
        assert _code(s.SegmentedPropertyCategoryCodeSequence[0]) == ("49755003", "SCT",
                                                                   "Morphologically abnormal structure")
        assert _code(s.SegmentedPropertyTypeCodeSequence[0]) == ("14799000", "SCT", "Neoplasm, secondary")
        assert _code(s.AnatomicRegionSequence[0]) == ("12738006", "SCT", "Brain")
        assert s.SegmentAlgorithmType == "AUTOMATIC"
        alg = s.SegmentationAlgorithmIdentificationSequence[0]
        assert alg.AlgorithmName == "ILD DeepLabV3" and alg.AlgorithmVersion == "1.4.0"
        assert _code(alg.AlgorithmFamilyCodeSequence[0]) == ("123110", "DCM", "Artificial Intelligence")
        assert "device_uid=1.2.826.0.1.3680043.8.498.424242" in alg.AlgorithmParameters
        assert s.TrackingID == f"ILD-MET-{les.number}"
    assert len({s.TrackingUID for s in segments}) == len(segments)
    # patient / study copied from the source; equipment = the algorithm
    src = sources[0]
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
               "AccessionNumber", "StudyID", "FrameOfReferenceUID"):
        assert seg[kw].value == src[kw].value, kw
    assert seg.SeriesInstanceUID != src.SeriesInstanceUID
    assert seg.Manufacturer == "ILD node project" and seg.ManufacturerModelName == "ILD-DLV3"
    assert seg.SoftwareVersions == "1.4.0"
    (equip,) = [e for e in seg.ContributingEquipmentSequence if e.Manufacturer == "ILD node project"]
    assert equip.ManufacturerModelName == "ILD-DLV3"
    assert equip.SoftwareVersions == "1.4.0"
    assert _code(equip.PurposeOfReferenceCodeSequence[0])[:2] == ("109102", "DCM")
    assert "RESEARCH USE ONLY" in equip.ContributionDescription


def test_seg_new_uids_each_run(seg, sources, result):
    again = write_seg(sources, result.labels, result.lesions, ALGORITHM)
    assert again.SOPInstanceUID != seg.SOPInstanceUID and again.SeriesInstanceUID != seg.SeriesInstanceUID
    assert {s.TrackingUID for s in again.SegmentSequence}.isdisjoint({s.TrackingUID for s in seg.SegmentSequence})


def _read_back(seg_ds, sources, tmp_path) -> hd.seg.Segmentation:
    path = tmp_path / "seg.dcm"
    seg_ds.save_as(path, enforce_file_format=True)
    return hd.seg.segread(path)


def _mask_by_source(seg, sources, **kw) -> np.ndarray:
    if len(sources) == 1:
        n = int(sources[0].NumberOfFrames)
        return seg.get_pixels_by_source_frame(sources[0].SOPInstanceUID, source_frame_numbers=list(range(1, n + 1)),
                                              assert_missing_frames_are_empty=True, **kw)
    return seg.get_pixels_by_source_instance([ds.SOPInstanceUID for ds in sources],
                                             assert_missing_frames_are_empty=True, **kw)


def test_seg_read_back_equals_labels(seg, sources, result, tmp_path):
    back = _read_back(seg, sources, tmp_path)
    labels = sitk.GetArrayFromImage(result.labels)
    np.testing.assert_array_equal(_mask_by_source(back, sources, combine_segments=True), labels)
    for les in result.lesions:
        mask = _mask_by_source(back, sources, segment_numbers=[les.number])[..., 0]
        np.testing.assert_array_equal(mask.astype(bool), labels == les.number)
    # geometry-aware read: the volume lies on the label image's grid
    volume = back.get_volume(combine_segments=True)
    spacing = result.labels.GetSpacing()
    assert volume.spacing == pytest.approx(spacing[::-1], abs=1e-4)
    for les in result.lesions:
        assert int((volume.array == les.number).sum()) == les.voxel_count
    # per-frame source references point at the source instance / frame at the same position
    positions = common.source_frame_positions(sources)
    for frame in back.PerFrameFunctionalGroupsSequence:
        src = frame.DerivationImageSequence[0].SourceImageSequence[0]
        ipp = np.array([float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient])
        if len(sources) == 1:
            assert src.ReferencedSOPInstanceUID == sources[0].SOPInstanceUID
            k = int(src.ReferencedFrameNumber) - 1
        else:
            k = [ds.SOPInstanceUID for ds in sources].index(src.ReferencedSOPInstanceUID)
        np.testing.assert_allclose(ipp, positions[k], atol=1e-3)


def test_seg_numpy_labels_and_shuffled_sources(sources, result, tmp_path):
    labels = sitk.GetArrayFromImage(result.labels)
    from_array = write_seg(sources, labels, result.lesions, ALGORITHM)
    np.testing.assert_array_equal(
        _mask_by_source(_read_back(from_array, sources, tmp_path), sources, combine_segments=True), labels)
    if len(sources) > 1:  # classic instances in any order are matched to label slices by position
        shuffled = list(sources)
        random.Random(0).shuffle(shuffled)
        from_image = write_seg(shuffled, result.labels, result.lesions, ALGORITHM)
        np.testing.assert_array_equal(
            _mask_by_source(_read_back(from_image, sources, tmp_path), sources, combine_segments=True), labels)


def test_seg_rejects_bad_input(sources, result):
    with pytest.raises(ValueError, match="no lesions"):
        write_seg(sources, result.labels, (), ALGORITHM)
    shifted = sitk.Image(result.labels)
    shifted.SetOrigin(tuple(np.asarray(result.labels.GetOrigin()) + np.array([0.0, 0.0, 1.5])))
    with pytest.raises(ValueError, match="do not lie on the slices"):
        write_seg(sources, shifted, result.lesions, ALGORITHM)
    labels = sitk.GetArrayFromImage(result.labels)
    with pytest.raises(ValueError, match="do not match"):
        write_seg(sources, labels[1:], result.lesions, ALGORITHM)
    with pytest.raises(ValueError, match="no voxel"):
        write_seg(sources, np.where(labels == 1, 0, labels), result.lesions, ALGORITHM)


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy not installed")
def test_dciodvfy_seg_and_sr(seg, sr, tmp_path):
    assert _dciodvfy_errors(seg, tmp_path, "seg.dcm") == []
    assert _dciodvfy_errors(sr, tmp_path, "sr.dcm") == []


# ---------------------------------------------------------------------------------------------------- SR


def _items(container, code_value: str) -> list:
    return [i for i in container.get("ContentSequence", [])
            if "ConceptNameCodeSequence" in i and i.ConceptNameCodeSequence[0].CodeValue == code_value]


def _num(group, code_value: str) -> tuple[float, str]:
    (item,) = _items(group, code_value)
    mv = item.MeasuredValueSequence[0]
    return float(mv.NumericValue), mv.MeasurementUnitsCodeSequence[0].CodeValue


def _groups(sr) -> list:
    (measurements,) = _items(sr, "126010")  # Imaging Measurements
    return _items(measurements, "125007")  # Measurement Group


def _study_figures(sr):
    (derived,) = _items(sr, "126011")  # Derived Imaging Measurements
    return derived


def _roles(sr) -> list[str]:
    (qualitative,) = _items(sr, "C0034375")  # Qualitative Evaluations
    return [i.ConceptCodeSequence[0].CodeValue for i in _items(qualitative, "ILD004")]


def test_sr_header_and_library(sr, sources, seg):
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert _code(sr.ConceptNameCodeSequence[0]) == ("126000", "DCM", "Imaging Measurement Report")
    assert sr.SeriesDescription == "ILD brain mets SR - RESEARCH USE ONLY"
    assert sr.PatientID == sources[0].PatientID and sr.StudyInstanceUID == sources[0].StudyInstanceUID
    assert sr.SeriesInstanceUID not in (seg.SeriesInstanceUID, sources[0].SeriesInstanceUID)
    assert "ILD-DLV3" in [e.get("ManufacturerModelName") for e in sr.ContributingEquipmentSequence]
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99ILD"
    (library,) = _items(sr, "111028")  # Image Library
    (library_group,) = _items(library, "126200")
    refs = [i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in library_group.ContentSequence]
    assert refs == [ds.SOPInstanceUID for ds in sources]
    # device observer = the algorithm, with its device UID
    (device_uid,) = _items(sr, "121012")
    assert device_uid.UID == "1.2.826.0.1.3680043.8.498.424242"
    evidence = {r.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
                for series in s.ReferencedSeriesSequence for r in series.ReferencedSOPSequence}
    assert seg.SOPInstanceUID in evidence and sources[0].SOPInstanceUID in evidence


def test_sr_lesion_groups_match_seg(sr, seg, result):
    segments = {int(s.SegmentNumber): s for s in seg.SegmentSequence}
    lesion_groups = [g for g in _groups(sr) if _items(g, "121191")]  # with a Referenced Segment
    assert len(lesion_groups) == result.count_all
    for group, les in zip(lesion_groups, result.lesions):
        ref = _items(group, "121191")[0].ReferencedSOPSequence[0]
        assert ref.ReferencedSOPInstanceUID == seg.SOPInstanceUID
        assert int(ref.ReferencedSegmentNumber) == les.number
        segment = segments[les.number]
        assert _items(group, "112039")[0].TextValue == segment.TrackingID
        assert _items(group, "112040")[0].UID == segment.TrackingUID
        assert _code(_items(group, "121071")[0].ConceptCodeSequence[0])[:2] == ("14799000", "SCT")  # Finding
        assert _code(_items(group, "363698007")[0].ConceptCodeSequence[0])[:2] == ("12738006", "SCT")  # site
        value, unit = _num(group, "118565006")
        assert unit == "mm3" and value == pytest.approx(les.volume_mm3)


def test_sr_study_level_measurements(sr, result, study):
    figures = _study_figures(sr)
    assert _num(figures, "ILD001") == (result.count_all, "1")
    assert _num(figures, "ILD002") == (result.count_ge_10mm3, "1")
    total, unit = _num(figures, "ILD003")
    assert unit == "mm3" and total == pytest.approx(sum(t.volume_mm3 for t in study.lesions))
    assert _num(figures, "122411") == (pytest.approx(0.76), "{probability}")
    assert _roles(sr) == ["ILD101", "ILD102", "ILD104"]
    # every measurement group is a lesion's, with image coordinates or a segment a viewer can draw (OHIF 3.13
    # broke on a study-level group that had neither)
    assert all(_items(g, "121191") or _items(g, "103339001") for g in _groups(sr))


def _scoord(num_item):
    (scoord,) = [i for i in num_item.ContentSequence if i.ValueType == "SCOORD"]
    return scoord


def test_sr_length_groups_draw_each_lesions_longest_in_plane_diameter(sr, seg, result, sources):
    """Per lesion, a TID 1501 group with the volume group's tracking identifiers: Long axis (and Short axis) in mm
    with a 2-point POLYLINE on the source image (frame) of the slice where the long axis is longest."""
    labels = sitk.GetArrayFromImage(result.labels)
    col_mm, row_mm = result.labels.GetSpacing()[:2]
    normal = np.reshape(result.labels.GetDirection(), (3, 3))[:, 2]
    volume_groups = [g for g in _groups(sr) if _items(g, "121191")]
    length_groups = [g for g in _groups(sr) if _items(g, "103339001")]
    assert len(length_groups) == len(volume_groups) == result.count_all
    positions = common.source_frame_positions(sources)
    for group, volume_group, les in zip(length_groups, volume_groups, result.lesions):
        assert _items(group, "112040")[0].UID == _items(volume_group, "112040")[0].UID  # Tracking UID shared
        # the lesion's Tracking ID behind the prefix OHIF's Length tool knows, in the group that comes first: OHIF
        # 3.13 loads the measurements only when the first group of a Tracking UID has such an identifier (#18)
        assert _items(group, "112039")[0].TextValue == \
            "Cornerstone3DTools@^0.1.0:Length:" + _items(volume_group, "112039")[0].TextValue
        groups = _groups(sr)
        assert groups.index(group) + 1 == groups.index(volume_group)
        (long_axis,) = _items(group, "103339001")
        value, unit = _num(group, "103339001")
        assert unit == "mm" and value == pytest.approx(les.in_plane.long_axis_mm)
        scoord = _scoord(long_axis)
        assert scoord.GraphicType == "POLYLINE" and len(scoord.GraphicData) == 4
        (c0, r0), (c1, r1) = np.reshape(np.asarray(scoord.GraphicData, dtype=float), (2, 2)) - 0.5
        # the end points are centres of lesion pixels of that slice, as far apart as the stated length
        assert labels[les.in_plane.slice_index, round(r0), round(c0)] == les.number
        assert labels[les.in_plane.slice_index, round(r1), round(c1)] == les.number
        assert np.hypot((r1 - r0) * row_mm, (c1 - c0) * col_mm) == pytest.approx(value, abs=1e-3)
        # on the source image of that slice
        ref = scoord.ContentSequence[0].ReferencedSOPSequence[0]
        slice_position = np.asarray(result.labels.TransformIndexToPhysicalPoint((0, 0, les.in_plane.slice_index)))
        frame = int(np.argmin(np.abs((positions - slice_position) @ normal)))
        if len(sources) == 1:
            assert ref.ReferencedSOPInstanceUID == sources[0].SOPInstanceUID
            assert int(ref.ReferencedFrameNumber) == frame + 1
        else:
            assert ref.ReferencedSOPInstanceUID == sources[frame].SOPInstanceUID
        short = _items(group, "103340004")
        assert len(short) == (les.in_plane.short_axis is not None)
        if short:
            length, _ = _num(group, "103340004")
            assert 0 < length <= value + 1e-6
            (sc0, sr0), (sc1, sr1) = np.reshape(np.asarray(_scoord(short[0]).GraphicData, dtype=float), (2, 2))
            # perpendicular to the long axis (in mm)
            assert abs((c1 - c0) * col_mm * (sc1 - sc0) * col_mm + (r1 - r0) * row_mm * (sr1 - sr0) * row_mm) \
                <= 1e-6 * max(value * length, 1.0)


def test_sr_round_trips_through_highdicom(sr, result, seg):
    """highdicom reads back every lesion's volume and long axis, with the shared tracking UIDs."""
    report = hd.sr.Comprehensive3DSR.from_dataset(sr, copy=True).content
    volume_groups = report.get_volumetric_roi_measurement_groups()
    image_groups = report.get_image_measurement_groups()
    assert len(volume_groups) == len(image_groups) == result.count_all
    for volume_group, image_group, les in zip(volume_groups, image_groups, result.lesions):
        assert volume_group.tracking_uid == image_group.tracking_uid
        assert volume_group.get_measurements(name=common.VOLUME)[0].value == pytest.approx(les.volume_mm3)
        (long_axis,) = image_group.get_measurements(name=common.LONG_AXIS)
        assert long_axis.value == pytest.approx(les.in_plane.long_axis_mm)
        assert long_axis.unit.value == "mm"


def test_sr_no_lesions(sources, result, tmp_path):
    nothing = sitk.Image(result.labels.GetSize(), sitk.sitkFloat32)
    nothing.CopyInformation(result.labels)
    empty = find_lesions(nothing, 0.5)
    with pytest.raises(ValueError, match="no lesions"):
        write_seg(sources, empty.labels, empty.lesions, ALGORITHM)
    sr = write_sr(sources, empty, ALGORITHM, seg=None, roles_present=["flair"])
    assert _items(sr, "126010") == []  # no measurement group at all: nothing for a viewer to draw
    figures = _study_figures(sr)
    assert _num(figures, "ILD001") == (0, "1") and _num(figures, "ILD002") == (0, "1")
    assert _num(figures, "ILD003") == (0, "mm3")
    assert _roles(sr) == ["ILD104"]
    if DCIODVFY:
        assert _dciodvfy_errors(sr, tmp_path, "sr0.dcm") == []


def test_sr_rejects_inconsistent_input(sources, result, seg):
    with pytest.raises(ValueError, match="no SEG"):
        write_sr(sources, result, ALGORITHM, seg=None, roles_present=ROLES)
    with pytest.raises(ValueError, match="unknown roles"):
        write_sr(sources, result, ALGORITHM, seg=seg, roles_present=["t2"])
    fewer = type(result)(result.labels, result.lesions[:-1], result.count_all - 1, result.count_ge_10mm3,
                         result.total_volume_mm3, result.threshold)
    with pytest.raises(ValueError, match="do not match"):
        write_sr(sources, fewer, ALGORITHM, seg=seg, roles_present=ROLES)
