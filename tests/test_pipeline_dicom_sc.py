"""pipeline.dicom_out.sc: the Secondary Capture key images (outlines burned in) from a phantom's truth, on classic
and enhanced MR sources; dciodvfy clean (issue #18 part 4)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage
from test_pipeline_dicom_out import ALGORITHM, DCIODVFY, _dciodvfy_errors

# pytest fixtures shared with the SEG/SR tests (the "as" re-export keeps them in this module's namespace)
from test_pipeline_dicom_out import result as result
from test_pipeline_dicom_out import sources as sources
from test_pipeline_dicom_out import study as study

from pipeline.dicom_out import common, write_sc
from pipeline.dicom_out.sc import KEY_COLOUR, MAX_KEY_IMAGES, SC_SERIES_DESCRIPTION, key_image_pixels
from pipeline.lesions import find_lesions

SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
SUMMARY = np.full((120, 160, 3), 40, dtype=np.uint8)


@pytest.fixture(scope="module")
def reference(study):
    return study.series_of(study.reference_kind).image


@pytest.fixture(scope="module")
def sc(sources, reference, result):
    return write_sc(sources, reference, result, ALGORITHM, summary=SUMMARY)


def _frame_of(result, sources, lesion) -> int:
    """0-based source frame of the lesion's key slice."""
    slices = common.source_frame_slices(result.labels, sources)
    return int(np.flatnonzero(slices == lesion.in_plane.slice_index)[0])


def test_one_series_summary_then_one_key_image_per_lesion(sc, sources, result):
    src = sources[0]
    assert len(sc) == 1 + result.count_all <= 1 + MAX_KEY_IMAGES
    assert [int(ds.InstanceNumber) for ds in sc] == list(range(1, len(sc) + 1))
    assert len({ds.SeriesInstanceUID for ds in sc}) == 1 and sc[0].SeriesInstanceUID != src.SeriesInstanceUID
    assert len({ds.SOPInstanceUID for ds in sc}) == len(sc)
    for ds in sc:
        assert ds.SOPClassUID == SC_STORAGE
        for kw in ("StudyInstanceUID", "PatientID", "PatientName", "AccessionNumber"):
            assert ds[kw].value == src[kw].value, kw
        assert ds.SeriesDescription == SC_SERIES_DESCRIPTION
        assert "RESEARCH USE ONLY" in ds.SeriesDescription and "NOT FOR DIAGNOSIS" in ds.SeriesDescription
        assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert ds.BurnedInAnnotation == "YES" and ds.ConversionType == "WSD"
        assert ds.PhotometricInterpretation == "RGB" and ds.SamplesPerPixel == 3 and ds.BitsAllocated == 8
        assert ds.DerivationCodeSequence[0].CodeValue == "113076"
        assert "NOT FOR DIAGNOSIS" in ds.ImageComments
        (equip,) = [e for e in ds.ContributingEquipmentSequence if e.Manufacturer == ALGORITHM.manufacturer]
        assert "RESEARCH USE ONLY" in equip.ContributionDescription
    np.testing.assert_array_equal(sc[0].pixel_array, SUMMARY)
    assert f"{result.count_all} lesion(s)" in sc[0].ImageComments


def test_key_images_outline_the_lesion_on_its_reference_frame(sc, sources, result):
    labels = sitk.GetArrayFromImage(result.labels)
    rows, cols = int(sources[0].Rows), int(sources[0].Columns)
    for ds, lesion in zip(sc[1:], result.lesions):
        assert (int(ds.Rows), int(ds.Columns)) == (rows, cols)
        pixels = ds.pixel_array
        assert pixels.shape == (rows, cols, 3)
        mine = labels[lesion.in_plane.slice_index] == lesion.number
        edge = mine & ~ndimage.binary_erosion(mine, border_value=0)
        yellow = np.all(pixels == KEY_COLOUR, axis=2)
        assert yellow[edge].mean() >= 0.9, f"lesion {lesion.number}: outline not yellow"
        inside = ndimage.binary_erosion(mine, border_value=0)
        assert not yellow[inside].any()  # the outline only, the lesion itself stays visible
        assert f"Met {lesion.number} - {lesion.volume_mm3 / 1000:.2f} mL" in ds.ImageComments
        frame = _frame_of(result, sources, lesion)
        (ref,) = ds.SourceImageSequence
        assert ref.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
        if len(sources) == 1:  # enhanced: one instance, the frame named
            assert ref.ReferencedSOPInstanceUID == sources[0].SOPInstanceUID
            assert int(ref.ReferencedFrameNumber) == frame + 1
        else:
            assert ref.ReferencedSOPInstanceUID == sources[frame].SOPInstanceUID
            assert ref.ReferencedSOPClassUID == sources[frame].SOPClassUID
        spacing = result.labels.GetSpacing()
        assert [float(v) for v in ds.PixelSpacing] == pytest.approx([spacing[1], spacing[0]])


def test_key_image_pixels_grey_outside_outlines():
    grey = np.tile(np.linspace(0, 100, 32), (32, 1))
    labels = np.zeros((32, 32), dtype=np.uint16)
    labels[5:12, 5:12] = 1
    labels[20:26, 20:26] = 2
    rgb = key_image_pixels(grey, labels, 2, (0.0, 100.0))
    assert rgb.dtype == np.uint8 and rgb.shape == (32, 32, 3)
    assert tuple(rgb[20, 22]) == KEY_COLOUR and tuple(rgb[5, 8]) == (255, 0, 0)
    assert rgb[0, 31, 0] == rgb[0, 31, 1] == rgb[0, 31, 2] == 255 and tuple(rgb[0, 0]) == (0, 0, 0)
    assert rgb[8, 8, 0] == rgb[8, 8, 1] == rgb[8, 8, 2]  # inside lesion 1: grey


def test_new_uids_each_run_and_bad_summary(sc, sources, reference, result):
    again = write_sc(sources, reference, result, ALGORITHM, summary=SUMMARY)
    assert again[0].SeriesInstanceUID != sc[0].SeriesInstanceUID
    with pytest.raises(ValueError, match="uint8 RGB"):
        write_sc(sources, reference, result, ALGORITHM, summary=SUMMARY[..., 0])


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (dicom3tools) is not installed")
def test_sc_dciodvfy_clean(sc, tmp_path):
    for ds in sc:
        errors = _dciodvfy_errors(ds, tmp_path, f"sc-{int(ds.InstanceNumber)}.dcm")
        assert errors == [], f"instance {ds.InstanceNumber}: {errors}"


def test_no_lesion_gives_the_summary_only(sources, reference, result, tmp_path):
    none = find_lesions(sitk.Cast(result.labels, sitk.sitkFloat32) * 0, 0.5)
    (only,) = write_sc(sources, reference, none, ALGORITHM, summary=SUMMARY)
    assert int(only.InstanceNumber) == 1 and "0 lesion(s)" in only.ImageComments
    if DCIODVFY is not None:
        assert _dciodvfy_errors(only, tmp_path, "summary.dcm") == []


def test_key_images_capped_largest_first(sources, reference, result, monkeypatch):
    monkeypatch.setattr("pipeline.dicom_out.sc.MAX_KEY_IMAGES", 1)
    out = write_sc(sources, reference, result, ALGORITHM, summary=SUMMARY)
    assert len(out) == 2 and "Met 1 -" in out[1].ImageComments
    assert "key images of the 1 largest only" in out[0].ImageComments
