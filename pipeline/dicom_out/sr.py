"""TID 1500 Measurement Report (Comprehensive 3D SR) of the lesions, with highdicom.

Content tree (codes in :mod:`pipeline.dicom_out.common`):

* title DCM 126000 "Imaging Measurement Report"; procedure SCT 241601008 "MR of head"; observer = the algorithm
  as a device (its Device UID, name, manufacturer, model); Image Library = the reference series' instances.
* one TID 1411 volumetric group per lesion, in SEG segment order: Tracking ID/UID copied from the SEG segment,
  ``ReferencedSegment`` to it, finding SCT 14799000, finding site SCT 12738006, Volume (SCT 118565006, UCUM
  ``mm3``, method DCM 126030) with the algorithm identification (TID 4019).
* one TID 1501 study-level group (finding 99ILD ILD005 "lesion burden", Tracking ID ``ILD-BURDEN``):
  Number of lesions (99ILD ILD001, UCUM ``1``), Number of lesions >= 10 mm3 (ILD002), Total lesion volume
  (ILD003, ``mm3``), Threshold Value (DCM 122411, UCUM ``{probability}``), and one qualitative evaluation
  "Input sequence role present" (ILD004) per role the model received (value ILD101..ILD104).

No lesions: pass ``seg=None``; the report then has only the study-level group (counts 0, volume 0).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from datetime import datetime

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from pipeline.dicom_out import common
from pipeline.lesions import LesionResult

__all__ = ["BURDEN_TRACKING_ID", "DEFAULT_SR_SERIES_NUMBER", "write_sr"]

DEFAULT_SR_SERIES_NUMBER = 9902
BURDEN_TRACKING_ID = "ILD-BURDEN"
COUNT_LIMIT_MM3 = 10.0  # the limit named by the ILD002 code's meaning


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
    groups: list = []
    for les in result.lesions:
        segment = segments[les.number]
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
    groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=BURDEN_TRACKING_ID),
        finding_type=common.LESION_BURDEN,
        finding_sites=[brain],
        algorithm_id=algorithm_id,
        measurements=[
            hd.sr.Measurement(name=common.LESION_COUNT, value=result.count_all, unit=common.UNITS["count"]),
            hd.sr.Measurement(name=common.LESION_COUNT_GE_LIMIT, value=result.count_ge_10mm3,
                              unit=common.UNITS["count"]),
            hd.sr.Measurement(name=common.TOTAL_VOLUME, value=result.total_volume_mm3, unit=common.UNITS["mm3"],
                              method=common.METHOD_VOXEL_SUM),
            hd.sr.Measurement(name=common.THRESHOLD_VALUE, value=result.threshold,
                              unit=common.UNITS["probability"]),
        ],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=common.ROLE_PRESENT, value=common.ROLE_CODES[r])
                                 for r in common.ROLE_CODES if r in roles_present],
    ))

    observer = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=algorithm.device_uid, name=algorithm.name, manufacturer_name=algorithm.manufacturer,
            model_name=algorithm.model, serial_number=algorithm.serial_number)))
    report = hd.sr.MeasurementReport(
        observation_context=observer,
        procedure_reported=common.PROCEDURE_MR_BRAIN,
        imaging_measurements=groups,
        title=common.REPORT_TITLE,
        referenced_images=[_library_view(ds) for ds in source_datasets],
    )
    evidence = list(source_datasets) + ([seg] if seg is not None else [])
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report[0],
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
    sr.SoftwareVersions = algorithm.software_versions
    sr.DeviceSerialNumber = algorithm.serial_number
    sr.CodingSchemeIdentificationSequence = DicomSequence([common.coding_scheme_identification()])
    return sr
