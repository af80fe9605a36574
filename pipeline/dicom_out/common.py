"""What the SEG and SR writers share: the algorithm's identity, coded concepts, equipment and source handling.

Every coded concept the node writes is defined here, in ONE place. Standard codes (SCT, DCM, UCUM) are used where
they exist; the few concepts with no standard code use the private coding scheme ``99ILD`` (the "99" prefix marks a
local scheme, PS3.16 section 8), declared in each SR's Coding Scheme Identification Sequence:

========================  ==========  ==============================================================
code                      scheme      meaning
========================  ==========  ==============================================================
``ILD001``                99ILD       Number of lesions (all connected components at the threshold)
``ILD002``                99ILD       Number of lesions >= 10 mm3 (volume limit in the SR's text)
``ILD003``                99ILD       Total lesion volume
``ILD004``                99ILD       Input sequence role present (value: one of ILD1xx below)
``ILD101``..``ILD104``    99ILD       the four roles, model channel order: t1_bravo_post, t1_cube_pre,
                                      t1_cube_post, flair
========================  ==========  ==============================================================
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

import highdicom as hd
import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

__all__ = [
    "CODES",
    "PRIVATE_SCHEME",
    "ROLE_CODES",
    "UNITS",
    "AlgorithmInfo",
    "algorithm_identification_sequence",
    "algorithm_parameters",
    "coding_scheme_identification",
    "contributing_equipment",
    "ordered_sources",
    "research_description",
    "source_frame_positions",
    "source_frame_slices",
    "sr_algorithm_identification",
]

RESEARCH_USE = "RESEARCH USE ONLY"

PRIVATE_SCHEME = "99ILD"
PRIVATE_SCHEME_NAME = "ILD brain metastasis node local codes"

# Standard concepts
CATEGORY_ABNORMAL = Code("49755003", "SCT", "Morphologically abnormal structure")
TYPE_METASTASIS = Code("14799000", "SCT", "Neoplasm, secondary")
REGION_BRAIN = Code("12738006", "SCT", "Brain")
FAMILY_AI = Code("123110", "DCM", "Artificial Intelligence")
REPORT_TITLE = Code("126000", "DCM", "Imaging Measurement Report")
PROCEDURE_MR_BRAIN = Code("241601008", "SCT", "MR of head")
VOLUME = Code("118565006", "SCT", "Volume")
METHOD_VOXEL_SUM = Code("126030", "DCM", "Sum of segmented voxel method for volume")
THRESHOLD_VALUE = Code("122411", "DCM", "Threshold Value")
LONG_AXIS = Code("103339001", "SCT", "Long axis")
SHORT_AXIS = Code("103340004", "SCT", "Short axis")
IMAGING_MEASUREMENTS = Code("126010", "DCM", "Imaging Measurements")
DERIVED_MEASUREMENTS = Code("126011", "DCM", "Derived Imaging Measurements")
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
PROCESSING_EQUIPMENT = Code("109102", "DCM", "Processing Equipment")
DERIVATION_SEGMENTATION = Code("113076", "DCM", "Segmentation")  # CID 7203 Image Derivation (the SC's outlines)
SOURCE_FOR_PROCESSING = Code("121322", "DCM", "Source image for image processing operation")  # CID 7202

# Local concepts (no standard code exists)
LESION_COUNT = Code("ILD001", PRIVATE_SCHEME, "Number of lesions")
LESION_COUNT_GE_LIMIT = Code("ILD002", PRIVATE_SCHEME, "Number of lesions >= 10 mm3")
TOTAL_VOLUME = Code("ILD003", PRIVATE_SCHEME, "Total lesion volume")
ROLE_PRESENT = Code("ILD004", PRIVATE_SCHEME, "Input sequence role present")
ROLE_CODES: dict[str, Code] = {
    "t1_bravo_post": Code("ILD101", PRIVATE_SCHEME, "Post-contrast T1w 3D gradient echo (BRAVO/MPRAGE)"),
    "t1_cube_pre": Code("ILD102", PRIVATE_SCHEME, "Pre-contrast T1w 3D fast spin echo (CUBE/SPACE)"),
    "t1_cube_post": Code("ILD103", PRIVATE_SCHEME, "Post-contrast T1w 3D fast spin echo (CUBE/SPACE)"),
    "flair": Code("ILD104", PRIVATE_SCHEME, "T2w FLAIR"),
}

CODES = {
    "category": CATEGORY_ABNORMAL, "type": TYPE_METASTASIS, "region": REGION_BRAIN, "family": FAMILY_AI,
    "title": REPORT_TITLE, "procedure": PROCEDURE_MR_BRAIN, "volume": VOLUME, "volume_method": METHOD_VOXEL_SUM,
    "threshold": THRESHOLD_VALUE, "long_axis": LONG_AXIS, "short_axis": SHORT_AXIS,
    "measurements": IMAGING_MEASUREMENTS, "derived": DERIVED_MEASUREMENTS, "qualitative": QUALITATIVE_EVALUATIONS,
    "count": LESION_COUNT, "count_ge_limit": LESION_COUNT_GE_LIMIT, "total_volume": TOTAL_VOLUME,
    "role_present": ROLE_PRESENT, "derivation": DERIVATION_SEGMENTATION, "source_purpose": SOURCE_FOR_PROCESSING,
}

UNITS = {
    "mm": Code("mm", "UCUM", "millimeter"),
    "mm3": Code("mm3", "UCUM", "cubic millimeter"),
    "count": Code("1", "UCUM", "no units"),
    "probability": Code("{probability}", "UCUM", "probability"),
}


@dataclass(frozen=True)
class AlgorithmInfo:
    """Who made the result: from the model checkpoint (name, version, device UID) and the node's configuration."""

    name: str
    version: str
    manufacturer: str
    device_uid: str
    model_name: str | None = None  # ManufacturerModelName; defaults to ``name``
    serial_number: str = "0"  # DeviceSerialNumber (required by the SEG's Enhanced General Equipment module)
    institution_name: str | None = None
    parameters: dict[str, str] = field(default_factory=dict)  # e.g. {"threshold": "0.76"}
    # The software that ran the model (e.g. "dicom-node 0.2.0"), passed in by the caller: pipeline/ never
    # imports the node, so it cannot know the node's version by itself.
    software: str | None = None

    @property
    def model(self) -> str:
        return self.model_name or self.name

    @property
    def software_versions(self) -> str | list[str]:
        """SoftwareVersions (0018,1020), multi-valued: the model's version (it pairs with ManufacturerModelName,
        the model's name), then the software that ran it when known (a list: pydicom's form of a multi-value)."""
        return [self.version, self.software] if self.software else self.version


def research_description(kind: str) -> str:
    """SeriesDescription for a derived object, e.g. ``ILD brain mets SEG - RESEARCH USE ONLY`` (<= 64 chars)."""
    return f"ILD brain mets {kind} - {RESEARCH_USE}"[:64]


def contributing_equipment(algorithm: AlgorithmInfo, when: datetime | None = None) -> list[hd.ContributingEquipment]:
    """Contributing Equipment Sequence item describing the algorithm (Processing Equipment)."""
    return [hd.ContributingEquipment(
        manufacturer=algorithm.manufacturer,
        purpose_of_reference=PROCESSING_EQUIPMENT,
        manufacturer_model_name=algorithm.model,
        software_versions=algorithm.software_versions,
        device_serial_number=algorithm.serial_number,
        institution_name=algorithm.institution_name,
        contribution_datetime=when or datetime.now(),
        contribution_description=f"{algorithm.name} {algorithm.version}: automatic brain metastasis segmentation"
                                 f" ({RESEARCH_USE})"[:1024],
    )]


def algorithm_parameters(algorithm: AlgorithmInfo) -> dict[str, str]:
    """Algorithm parameters written with the algorithm identification: the configured ones plus ``device_uid``.

    Device UID (0018,1002) is not an attribute of the Contributing Equipment Sequence nor of the SEG's equipment
    modules in the standard (dciodvfy flags it), so the SEG carries the checkpoint's device UID here; the SR
    also has it as the observer device's UID (TID 1004).
    """
    return {**algorithm.parameters, "device_uid": algorithm.device_uid}


def algorithm_identification_sequence(algorithm: AlgorithmInfo) -> hd.AlgorithmIdentificationSequence:
    """For SEG segment descriptions."""
    return hd.AlgorithmIdentificationSequence(
        name=algorithm.name, family=FAMILY_AI, version=algorithm.version,
        source=algorithm.manufacturer, parameters=algorithm_parameters(algorithm))


def sr_algorithm_identification(algorithm: AlgorithmInfo) -> hd.sr.AlgorithmIdentification:
    """For SR measurements (TID 4019)."""
    params = [f"{k}={v}" for k, v in algorithm_parameters(algorithm).items()]
    return hd.sr.AlgorithmIdentification(name=algorithm.name, version=algorithm.version, parameters=params,
                                         manufacturer=algorithm.manufacturer)


def coding_scheme_identification() -> Dataset:
    """Coding Scheme Identification Sequence item declaring the private ``99ILD`` scheme."""
    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = PRIVATE_SCHEME_NAME
    item.CodingSchemeResponsibleOrganization = "ILD DICOM node project"
    return item


POSITION_TOLERANCE_MM = 0.01  # how far a source frame may lie from a slice of the label grid


def _is_multiframe(ds: Dataset) -> bool:
    return int(ds.get("NumberOfFrames", 1) or 1) > 1 or "PerFrameFunctionalGroupsSequence" in ds


def source_frame_positions(source_datasets: Sequence[Dataset]) -> np.ndarray:
    """(F, 3) ImagePositionPatient of every source frame in order: one per classic instance, or per frame of
    one enhanced multi-frame instance."""
    if len(source_datasets) == 1 and _is_multiframe(source_datasets[0]):
        ds = source_datasets[0]
        shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else Dataset()
        positions = []
        for frame in ds.PerFrameFunctionalGroupsSequence:
            group = frame if "PlanePositionSequence" in frame else shared
            positions.append([float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient])
        return np.asarray(positions)
    if any(_is_multiframe(ds) for ds in source_datasets):
        raise ValueError("give either classic single-frame instances or ONE multi-frame instance")
    return np.asarray([[float(v) for v in ds.ImagePositionPatient] for ds in source_datasets])


def source_frame_slices(image: sitk.Image, source_datasets: Sequence[Dataset]) -> np.ndarray:
    """(F,) slice index of ``image`` (numpy axis 0) for every source frame, matched by position.

    Raises ``ValueError`` unless every source frame lies on one slice of the image's grid (within
    :data:`POSITION_TOLERANCE_MM`), on distinct slices, one frame per slice.
    """
    positions = source_frame_positions(source_datasets)
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    origin = np.asarray(image.GetOrigin(), dtype=float)
    n_slices = int(image.GetSize()[2])
    index = (positions - origin) @ direction / spacing  # (F, 3) continuous (x, y, z) index of each frame
    k = np.rint(index[:, 2]).astype(int)
    if (np.abs(index - np.rint(index)).max(initial=0.0) * spacing.max() > POSITION_TOLERANCE_MM
            or np.abs(index[:, :2]).max(initial=0.0) * spacing.max() > POSITION_TOLERANCE_MM
            or k.min(initial=0) < 0 or k.max(initial=0) >= n_slices or len(set(k.tolist())) != len(k)):
        raise ValueError("source frames do not lie on the slices of the label image's grid")
    if len(k) != n_slices:
        raise ValueError(f"{len(k)} source frames for {n_slices} label slices")
    return k


def ordered_sources(source_datasets: Sequence[Dataset]) -> list[Dataset]:
    """Classic instances sorted along the slice normal (ascending), i.e. the order of a SimpleITK volume whose
    third direction column is row x column; a single multi-frame instance is returned as is."""
    datasets = list(source_datasets)
    if len(datasets) == 1:
        return datasets
    iop = np.asarray([float(v) for v in datasets[0].ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    return sorted(datasets, key=lambda ds: float(np.dot(normal, [float(v) for v in ds.ImagePositionPatient])))
