"""TID 1500 Measurement Report (Comprehensive 3D SR) of the lesions, with highdicom.

Content tree (codes in :mod:`pipeline.dicom_out.common`):

* title DCM 126000 "Imaging Measurement Report"; procedure SCT 241601008 "MR of head"; observer = the algorithm
  as a device (its Device UID, name, manufacturer, model); Image Library = the reference series' instances.
* Imaging Measurements (DCM 126010), two groups per lesion, in SEG segment order, both with the Tracking UID
  of the lesion's SEG segment (so a viewer, OHIF among them, merges them into one finding):

  - TID 1501 group with what a viewer draws: Long axis (SCT 103339001, UCUM ``mm``), RANO-BM's longest in-plane
    diameter, and the perpendicular Short axis (SCT 103340004) when the lesion is wider than one pixel across
    it, each with a SCOORD POLYLINE of its two end points on the reference image (frame) where the long axis
    is longest. Its Tracking Identifier is the segment's behind :data:`VIEWER_LENGTH_TRACKING_PREFIX`, and it
    comes first: OHIF (3.13) loads an SR's measurements into its measurement panel only when the first group
    of a Tracking UID has a Tracking Identifier its tools know, and then draws this one as a length;
  - TID 1411 volumetric group, Tracking Identifier = the segment's (``ILD-MET-<n>``): ``ReferencedSegment`` to
    the segment, finding SCT 14799000, finding site SCT 12738006, Volume (SCT 118565006, UCUM ``mm3``, method
    DCM 126030) with the algorithm identification (TID 4019).
* Derived Imaging Measurements (DCM 126011), the study's figures: Number of lesions (99ILD ILD001, UCUM ``1``),
  Number of lesions >= 10 mm3 (ILD002), Total lesion volume (ILD003, ``mm3``), Threshold Value (DCM 122411,
  UCUM ``{probability}``).
* Qualitative Evaluations (UMLS C0034375): one "Input sequence role present" (ILD004) per role the model
  received (value ILD101..ILD104).

The study's figures are not a measurement group: viewers take every group for a finding to draw, and one
without image coordinates broke OHIF 3.13 (issue #18). No lesions: pass ``seg=None``; the report then has no
Imaging Measurements container (TID 1500 needs one of rows 6, 8 and 10), only the study's figures (0, 0 mm3).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from datetime import datetime

import highdicom as hd
import numpy as np
from highdicom.sr.templates import DEFAULT_LANGUAGE, Template
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from pipeline.dicom_out import common
from pipeline.lesions import LesionResult

__all__ = ["DEFAULT_SR_SERIES_NUMBER", "write_sr"]

DEFAULT_SR_SERIES_NUMBER = 9902
COUNT_LIMIT_MM3 = 10.0  # the limit named by the ILD002 code's meaning
# Cornerstone3D's (OHIF's) Length tool accepts a Tracking Identifier that starts with this (@cornerstonejs/adapters
# BaseAdapter3D.isValidCornerstoneTrackingIdentifier); it reads the group's first NUM and that NUM's SCOORD.
VIEWER_LENGTH_TRACKING_PREFIX = "Cornerstone3DTools@^0.1.0:Length:"


def _segments(seg: Dataset) -> dict[int, Dataset]:
    return {int(item.SegmentNumber): item for item in seg.SegmentSequence}


def _per_frame_segment_view(seg: Dataset) -> Dataset:
    """``seg`` as highdicom's ``ReferencedSegment.from_segmentation`` reads it: that reads the Segment
    Identification of every frame from the PER-FRAME groups, but a one-segment SEG carries it in the SHARED
    group. Then a copy with the item moved per frame is returned (for the reference only; ``seg`` unchanged)."""
    shared = seg.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in seg else Dataset()
    if "SegmentIdentificationSequence" not in shared:
        return seg
    view = copy.deepcopy(seg)
    item = view.SharedFunctionalGroupsSequence[0].SegmentIdentificationSequence
    for frame in view.PerFrameFunctionalGroupsSequence:
        if "SegmentIdentificationSequence" not in frame:
            frame.SegmentIdentificationSequence = copy.deepcopy(item)
    del view.SharedFunctionalGroupsSequence[0].SegmentIdentificationSequence
    return view


_FUNCTIONAL_GROUP_KEYWORDS = ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence", "PixelData")


def _library_view(ds: Dataset) -> Dataset:
    """The header the Image Library entry (TID 1601/1604) is built from.

    Classic images are used as they are. For an enhanced multi-frame image highdicom needs top-level
    PixelSpacing, SliceThickness, ImageOrientationPatient and ImagePositionPatient: they are taken from the
    shared Pixel Measures / Plane Orientation groups and the FIRST frame's Plane Position (the entry describes
    the instance; per-frame positions stay in the image itself).
    """
    if "PerFrameFunctionalGroupsSequence" not in ds:
        return ds
    view = Dataset()
    for element in ds:
        if element.keyword not in _FUNCTIONAL_GROUP_KEYWORDS:
            view.add(element)
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else Dataset()
    first = ds.PerFrameFunctionalGroupsSequence[0]

    def group(keyword: str) -> Dataset:
        return (first if keyword in first else shared)[keyword][0]

    measures = group("PixelMeasuresSequence")
    view.PixelSpacing = measures.PixelSpacing
    view.SliceThickness = measures.get("SliceThickness", measures.get("SpacingBetweenSlices", 0))
    view.ImageOrientationPatient = group("PlaneOrientationSequence").ImageOrientationPatient
    view.ImagePositionPatient = group("PlanePositionSequence").ImagePositionPatient
    return view


def _source_image(source_datasets: Sequence[Dataset], frame: int) -> hd.sr.SourceImageForRegion:
    """The image of source frame ``frame`` (0-based, in source order): a classic instance, or a frame number of
    the one enhanced instance."""
    if len(source_datasets) == 1 and int(source_datasets[0].get("NumberOfFrames", 1) or 1) > 1:
        ds = source_datasets[0]
        return hd.sr.SourceImageForRegion(ds.SOPClassUID, ds.SOPInstanceUID, referenced_frame_numbers=[frame + 1])
    ds = source_datasets[frame]
    return hd.sr.SourceImageForRegion(ds.SOPClassUID, ds.SOPInstanceUID)


def _scoord(ends: tuple[tuple[float, float], tuple[float, float]]) -> np.ndarray:
    """(row, col) pixel-centre indices -> SCOORD image coordinates (column, row), whose origin is the top left
    CORNER of the top left pixel (PS3.3 C.18.6.1.1): the centre of pixel (r, c) is (c + 0.5, r + 0.5)."""
    return np.array([[col + 0.5, row + 0.5] for row, col in ends], dtype=float)


def _study_level(result: LesionResult, roles_present: Sequence[str]) -> list[hd.sr.ContainerContentItem]:
    """The study's figures, outside the measurement groups: a viewer (OHIF) takes every measurement group for a
    finding to draw, so a group without image coordinates breaks it. Derived Imaging Measurements (DCM 126011):
    counts, total volume and threshold; Qualitative Evaluations (UMLS C0034375): the roles the model received."""
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    derived = hd.sr.ContainerContentItem(name=common.DERIVED_MEASUREMENTS, relationship_type=contains)
    derived.ContentSequence = hd.sr.ContentSequence([
        hd.sr.NumContentItem(name=name, value=value, unit=common.UNITS[unit], relationship_type=contains)
        for name, value, unit in (
            (common.LESION_COUNT, result.count_all, "count"),
            (common.LESION_COUNT_GE_LIMIT, result.count_ge_10mm3, "count"),
            (common.TOTAL_VOLUME, result.total_volume_mm3, "mm3"),
            (common.THRESHOLD_VALUE, result.threshold, "probability"))])
    qualitative = hd.sr.ContainerContentItem(name=common.QUALITATIVE_EVALUATIONS, relationship_type=contains)
    qualitative.ContentSequence = hd.sr.ContentSequence([
        hd.sr.CodeContentItem(name=common.ROLE_PRESENT, value=common.ROLE_CODES[r], relationship_type=contains)
        for r in common.ROLE_CODES if r in roles_present])
    return [derived, qualitative]


def _report(observer: hd.sr.ObservationContext, library: Sequence[Dataset], groups: Sequence[Template],
            study_level: Sequence[hd.sr.ContainerContentItem]) -> hd.sr.ContainerContentItem:
    """The TID 1500 root container, as ``hd.sr.MeasurementReport`` builds it, but without its demand for at least
    one measurement group: a study with no lesions has none, and TID 1500 is complete with its Derived Imaging
    Measurements (row 8)."""
    root = hd.sr.ContainerContentItem(name=common.REPORT_TITLE, template_id="1500")
    content = hd.sr.ContentSequence([*hd.sr.LanguageOfContentItemAndDescendants(DEFAULT_LANGUAGE), *observer,
                                     hd.sr.CodeContentItem(name=codes.DCM.ProcedureReported,
                                                           value=common.PROCEDURE_MR_BRAIN,
                                                           relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD),
                                     *hd.sr.ImageLibrary(library)])
    if groups:
        measurements = hd.sr.ContainerContentItem(name=common.IMAGING_MEASUREMENTS,
                                                  relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
        measurements.ContentSequence = hd.sr.ContentSequence([item for group in groups for item in group])
        content.append(measurements)
    content.extend(study_level)
    root.ContentSequence = content
    return root


def write_sr(
    source_datasets: Sequence[Dataset],
    result: LesionResult,
    algorithm: common.AlgorithmInfo,
    *,
    seg: Dataset | None,
    roles_present: Sequence[str],
    series_number: int = DEFAULT_SR_SERIES_NUMBER,
    instance_number: int = 1,
    series_description: str | None = None,
) -> Dataset:
    """Comprehensive 3D SR (TID 1500) for ``result``; ``seg`` is the SEG :func:`write_seg` made of it.

    ``source_datasets``: the reference series (classic instances or one enhanced instance), for the image library
    and the evidence. ``roles_present``: role names (``t1_bravo_post``, ``t1_cube_pre``, ``t1_cube_post``,
    ``flair``) the model was given. Raises ``ValueError`` when the SEG does not hold exactly the lesions of
    ``result`` (segment n = lesion n), when lesions exist without a SEG, for an unknown role, or when
    ``result`` counts with a volume limit other than 10 mm^3 (the limit in the ILD002 code's meaning).
    Returns a new dataset (new Series/SOP Instance UIDs on every call).
    """
    if not source_datasets:
        raise ValueError("no source datasets")
    unknown = [r for r in roles_present if r not in common.ROLE_CODES]
    if unknown:
        raise ValueError(f"unknown roles {unknown}; expected some of {list(common.ROLE_CODES)}")
    if result.min_volume_mm3_for_count != COUNT_LIMIT_MM3:
        raise ValueError(f"the SR reports lesions >= {COUNT_LIMIT_MM3:g} mm3, result counts >= "
                         f"{result.min_volume_mm3_for_count:g} mm3")
    if result.lesions and seg is None:
        raise ValueError(f"{len(result.lesions)} lesions but no SEG to reference")
    segments = _segments(seg) if seg is not None else {}
    if sorted(segments) != [les.number for les in result.lesions]:
        raise ValueError(f"SEG segments {sorted(segments)} do not match lesions 1..{len(result.lesions)}")

    algorithm_id = common.sr_algorithm_identification(algorithm)
    seg_view = _per_frame_segment_view(seg) if seg is not None else None
    brain = hd.sr.FindingSite(anatomic_location=common.REGION_BRAIN)
    frame_of_slice = {int(k): f for f, k in enumerate(common.source_frame_slices(result.labels, source_datasets))}
    groups: list = []
    for les in result.lesions:
        assert seg_view is not None  # lesions come with their SEG (checked above)
        segment = segments[les.number]
        image = _source_image(source_datasets, frame_of_slice[les.in_plane.slice_index])
        axes = [(common.LONG_AXIS, les.in_plane.long_axis_mm, les.in_plane.long_axis)]
        if les.in_plane.short_axis is not None:
            axes.append((common.SHORT_AXIS, les.in_plane.short_axis_mm, les.in_plane.short_axis))
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=segment.TrackingUID, identifier=VIEWER_LENGTH_TRACKING_PREFIX + segment.TrackingID),
            finding_type=common.TYPE_METASTASIS,
            finding_sites=[brain],
            algorithm_id=algorithm_id,
            measurements=[hd.sr.Measurement(
                name=name, value=length, unit=common.UNITS["mm"], algorithm_id=algorithm_id,
                referenced_coordinates=[hd.sr.CoordinatesForMeasurement(
                    graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=_scoord(ends), source_image=image)])
                for name, length, ends in axes],
        ))
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=segment.TrackingUID, identifier=segment.TrackingID),
            referenced_segment=hd.sr.ReferencedSegment.from_segmentation(seg_view, segment_number=les.number),
            finding_type=common.TYPE_METASTASIS,
            finding_sites=[brain],
            algorithm_id=algorithm_id,
            measurements=[hd.sr.Measurement(
                name=common.VOLUME, value=les.volume_mm3, unit=common.UNITS["mm3"],
                method=common.METHOD_VOXEL_SUM, algorithm_id=algorithm_id)],
        ))

    observer = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=algorithm.device_uid, name=algorithm.name, manufacturer_name=algorithm.manufacturer,
            model_name=algorithm.model, serial_number=algorithm.serial_number)))
    report = _report(observer, [_library_view(ds) for ds in source_datasets], groups,
                     _study_level(result, roles_present))
    evidence = list(source_datasets) + ([seg] if seg is not None else [])
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=generate_uid(),
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        instance_number=instance_number,
        manufacturer=algorithm.manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        institution_name=algorithm.institution_name,
        contributing_equipment=common.contributing_equipment(algorithm, datetime.now()),
    )
    sr.SeriesDescription = series_description or common.research_description("SR")
    sr.ManufacturerModelName = algorithm.model
    sr.SoftwareVersions = algorithm.software_versions  # type: ignore[assignment]  # see seg.py
    sr.DeviceSerialNumber = algorithm.serial_number
    sr.CodingSchemeIdentificationSequence = [common.coding_scheme_identification()]
    return sr
