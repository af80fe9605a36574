"""DICOM Segmentation (BINARY) of the lesions, on the reference series' grid, with highdicom.

One segment per lesion, numbered 1..N like :class:`pipeline.lesions.Lesion` (decreasing volume), labelled
``"Met <n> - <volume> mL"``, category SCT 49755003, type SCT 14799000, anatomic region SCT 12738006, algorithm
family DCM 123110, and a Tracking ID (``"ILD-MET-<n>"``) plus a new Tracking UID per segment. The SR written by
:func:`pipeline.dicom_out.sr.write_sr` reads these back from the SEG, so both always agree.

Sources: classic single-frame instances (one per label slice) or ONE enhanced multi-frame instance (one frame per
label slice). highdicom copies patient/study attributes from them and writes per-frame Derivation Image /
Source Image references and Plane Position from their geometry.

No lesions means no SEG: :func:`write_seg` raises ``ValueError`` (the SR alone reports a count of 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import highdicom as hd
import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from pipeline.dicom_out import common
from pipeline.lesions import Lesion

__all__ = ["DEFAULT_SEG_SERIES_NUMBER", "segment_label", "tracking_id", "write_seg"]

DEFAULT_SEG_SERIES_NUMBER = 9901


def segment_label(lesion: Lesion) -> str:
    """``"Met 3 - 0.42 mL"`` (volume in millilitres, 2 decimals)."""
    return f"Met {lesion.number} - {lesion.volume_mm3 / 1000.0:.2f} mL"


def tracking_id(number: int) -> str:
    """Tracking Identifier of lesion ``number`` (unique within the SEG/SR pair)."""
    return f"ILD-MET-{number}"


def _label_array(labels: np.ndarray | sitk.Image, source_datasets: Sequence[Dataset]) -> np.ndarray:
    """Labels as a (frame, row, col) array in the frame order of the sources.

    With a SimpleITK image the geometry is checked: every source frame must lie on one slice of the image (and
    frames are matched to slices by position, so any source order works). A numpy array must already be in the
    source frame order.
    """
    positions = common.source_frame_positions(source_datasets)
    if isinstance(labels, sitk.Image):
        return sitk.GetArrayFromImage(labels)[common.source_frame_slices(labels, source_datasets)]
    array = np.asarray(labels)
    if array.ndim != 3 or array.shape[0] != len(positions):
        raise ValueError(f"labels of shape {array.shape} do not match {len(positions)} source frames")
    if len(positions) > 1 and np.min(np.linalg.norm(np.diff(positions, axis=0), axis=1)) < common.POSITION_TOLERANCE_MM:
        raise ValueError("two source frames share one position")
    return array


def write_seg(
    source_datasets: Sequence[Dataset],
    labels: np.ndarray | sitk.Image,
    lesions: Sequence[Lesion],
    algorithm: common.AlgorithmInfo,
    *,
    series_number: int = DEFAULT_SEG_SERIES_NUMBER,
    instance_number: int = 1,
    series_description: str | None = None,
) -> Dataset:
    """BINARY DICOM SEG of ``lesions`` (``labels`` value n = segment n) referencing ``source_datasets``.

    ``source_datasets``: the reference series, either its classic instances in the order of the label slices
    (see :func:`pipeline.dicom_out.common.ordered_sources`) or its single enhanced multi-frame instance.
    ``labels``: uint16 (slice, row, col) array aligned with the source frames, or the ``LesionResult.labels``
    image (then frames are matched to slices by position and the geometry is checked).
    Raises ``ValueError`` for zero lesions, labels that do not match the lesions, or mismatched geometry.
    Returns a new dataset (new Series/SOP Instance UIDs and Tracking UIDs on every call).
    """
    lesions = sorted(lesions, key=lambda les: les.number)
    if not lesions:
        raise ValueError("no lesions: a SEG needs at least one segment (write only the SR, with count 0)")
    numbers = [les.number for les in lesions]
    if numbers != list(range(1, len(lesions) + 1)):
        raise ValueError(f"lesion numbers must be 1..N, got {numbers}")
    if not source_datasets:
        raise ValueError("no source datasets")
    array = _label_array(labels, source_datasets)
    if array.min() < 0 or array.max() > len(lesions):
        raise ValueError(f"label values {int(array.min())}..{int(array.max())} outside 0..{len(lesions)}")
    array = array.astype(np.uint16, copy=False)
    present = set(np.unique(array).tolist()) - {0}
    if present != set(numbers):
        raise ValueError(f"lesions {sorted(set(numbers) - present)} have no voxel in the labels")
    rows, cols = int(source_datasets[0].Rows), int(source_datasets[0].Columns)
    if array.shape[1:] != (rows, cols):
        raise ValueError(f"label slices {array.shape[1:]} do not match the sources' {rows} x {cols}")

    algorithm_id = common.algorithm_identification_sequence(algorithm)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=les.number,
            segment_label=segment_label(les),
            segmented_property_category=common.CATEGORY_ABNORMAL,
            segmented_property_type=common.TYPE_METASTASIS,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm_id,
            tracking_uid=generate_uid(),
            tracking_id=tracking_id(les.number),
            anatomic_regions=[common.REGION_BRAIN],
        )
        for les in lesions
    ]
    now = datetime.now()
    seg = hd.seg.Segmentation(
        source_images=list(source_datasets),
        pixel_array=array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(),
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        instance_number=instance_number,
        manufacturer=algorithm.manufacturer,
        manufacturer_model_name=algorithm.model,
        # highdicom annotates tuple[str] (one item) where it takes any multi-value
        software_versions=algorithm.software_versions,  # type: ignore[arg-type]
        device_serial_number=algorithm.serial_number,
        content_label="METS",
        content_description=f"Brain metastases by {algorithm.name} ({common.RESEARCH_USE})"[:64],
        content_creator_name=None,
        contributing_equipment=common.contributing_equipment(algorithm, now),
    )
    seg.SeriesDescription = series_description or common.research_description("SEG")
    return seg
