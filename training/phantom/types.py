"""Typed records passed between the phantom's stages.

Conventions used throughout the phantom:

* Images are ``SimpleITK.Image`` objects: geometry in LPS millimetres (origin = centre of
  voxel (0, 0, 0); direction columns = LPS unit vectors of the column, row and slice axes).
  ``sitk.GetArrayFromImage`` gives a numpy array in (slice, row, column) order.
* The generator builds anatomy in one "patient" space; every acquired series samples it on its own
  grid and with its own small rigid pose (the misregistration a real patient shows between series).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import SimpleITK as sitk

from pipeline.roles import REFERENCE_PREFERENCE, ROLES  # noqa: F401  (re-exported for the phantom)


class SeriesKind(str, Enum):
    """What an acquired synthetic series is: one of the four roles or a distractor."""

    T1_BRAVO_POST = "t1_bravo_post"
    T1_CUBE_PRE = "t1_cube_pre"
    T1_CUBE_POST = "t1_cube_post"
    FLAIR = "flair"
    LOCALIZER = "localizer"
    DWI = "dwi"  # b=1000 trace-weighted, 2D EPI
    ADC = "adc"  # derived from the DWI
    MPR = "mpr"  # derived reformat of a T1 series

    @property
    def is_role(self) -> bool:
        return self.value in ROLES


class Vendor(str, Enum):
    GE = "ge"
    SIEMENS = "siemens"
    PHILIPS = "philips"


class Plane(str, Enum):
    AXIAL = "axial"
    SAGITTAL = "sagittal"
    CORONAL = "coronal"


@dataclass(frozen=True)
class PatientInfo:
    """Fake demographics only; never a real person."""

    name: str  # DICOM PN, e.g. "PHANTOM^ALPHA"
    patient_id: str
    birth_date: str  # YYYYMMDD
    sex: str  # "M" | "F" | "O"
    age_years: int


@dataclass
class SyntheticSeries:
    """One acquired series: stored pixel values on the series' own grid."""

    kind: SeriesKind
    image: sitk.Image  # sitkUInt16 (or sitkInt16), 3D; geometry in LPS mm
    plane: Plane
    is_3d: bool  # 3D acquisition (MRAcquisitionType 3D) vs 2D multi-slice
    contrast: bool  # acquired after gadolinium
    acquisition_index: int  # 0-based order within the session; drives AcquisitionTime
    derived_from: SeriesKind | None = None  # for ADC / MPR
    # What the generator simulated, for headers consistent with the pixels (None when not known):
    slice_thickness_mm: float | None = None  # 2D slices can be thinner than their spacing (a gap)
    # DICOM keyword -> value: RepetitionTime, EchoTime, InversionTime (ms), FlipAngle (deg), ...
    sequence: dict[str, float] | None = None


@dataclass(frozen=True)
class LesionTruth:
    """One metastasis of the ground truth; ``label`` is its value in the label mask."""

    label: int
    kind: str  # "solid" | "ring" | "irregular"
    centroid_lps_mm: tuple[float, float, float]  # on the reference series' grid
    volume_mm3: float  # voxel count x voxel volume of the reference-grid label
    diameter_mm: float  # nominal diameter drawn by the generator
    edema: bool


@dataclass
class SyntheticStudy:
    """A whole generated study plus its ground truth; deterministic for ``seed``."""

    seed: int
    vendor: Vendor
    patient: PatientInfo
    series: list[SyntheticSeries]
    reference_kind: SeriesKind  # the series whose grid carries the ground truth
    label: sitk.Image  # sitkUInt16, one value per lesion (0 = background), reference grid
    brain_mask: sitk.Image  # sitkUInt8, reference grid
    lesions: list[LesionTruth]
    # Each present role resampled onto the reference grid with the true alignment
    # (what `--format nifti` writes for fast training); keys are role names.
    coregistered: dict[str, sitk.Image] = field(default_factory=dict)

    def series_of(self, kind: SeriesKind) -> SyntheticSeries | None:
        return next((s for s in self.series if s.kind == kind), None)
