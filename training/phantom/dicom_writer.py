"""Write a :class:`SyntheticStudy` as DICOM MR, classic (one file per slice) or enhanced (one multi-frame file).

Geometry conventions (DICOM and SimpleITK share LPS millimetres):

* ImageOrientationPatient = the first two direction columns of the SimpleITK image (direction of increasing
  column index, then of increasing row index).
* ImagePositionPatient of slice ``k`` = origin + k * spacing_z * third direction column (centre of the first
  voxel of that slice).
* PixelSpacing = [row spacing, column spacing] = [spacing_y, spacing_x].

Every UID is derived from the study seed and content (``pydicom.uid.generate_uid(entropy_srcs=...)``), so
writing the same study twice gives byte-identical headers. Derived series (ADC, MPR) are always written as
classic MR Image Storage, also when ``enhanced=True``: scanners export reformats and parametric maps that way.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import Code, codes
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)
from pydicom.valuerep import DSfloat

from training.phantom.types import SyntheticStudy
from training.phantom.vendors import (
    ContrastAgent,
    Scanner,
    SeriesStyle,
    StudyStyle,
    seeded_rng,
    series_styles,
    study_style,
)

GYROMAGNETIC_RATIO_MHZ_PER_T = 42.577478  # 1H


@dataclass(frozen=True)
class SliceGeometry:
    """Geometry of a SimpleITK volume in DICOM terms (LPS mm)."""

    origin: np.ndarray  # centre of voxel (0, 0, 0)
    row_direction: np.ndarray  # IOP[0:3]: along a row, i.e. increasing column index
    column_direction: np.ndarray  # IOP[3:6]: down a column, i.e. increasing row index
    slice_direction: np.ndarray  # from slice k to slice k + 1
    spacing: tuple[float, float, float]  # (x = between columns, y = between rows, z = between slices)
    columns: int
    rows: int
    slices: int

    @classmethod
    def of(cls, image: sitk.Image) -> SliceGeometry:
        d = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
        nx, ny, nz = image.GetSize()
        sx, sy, sz = image.GetSpacing()
        return cls(np.asarray(image.GetOrigin(), dtype=float), d[:, 0], d[:, 1], d[:, 2],
                   (sx, sy, sz), nx, ny, nz)

    def position(self, k: int) -> np.ndarray:
        """ImagePositionPatient of slice ``k`` (mm)."""
        return self.origin + k * self.spacing[2] * self.slice_direction

    @property
    def orientation(self) -> list[float]:
        return [*self.row_direction, *self.column_direction]

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_direction, self.column_direction)

    def slice_location(self, k: int) -> float:
        """SliceLocation as scanners write it: the slice position projected on the IOP normal (mm)."""
        return float(np.dot(self.position(k), self.normal))


@dataclass(frozen=True)
class SeriesPlan:
    """All identifiers and times of one series, fixed before any file is written."""

    index: int  # into study.series
    style: SeriesStyle
    enhanced: bool
    series_uid: str
    folder: str
    start: datetime  # acquisition start
    content: datetime  # reconstruction end (ContentTime / SeriesTime)


@dataclass(frozen=True)
class StudyPlan:
    """Study-level identifiers, times and the per-series plans (same order as ``study.series``)."""

    style: StudyStyle
    study_uid: str
    frame_of_reference_uid: str
    accession_number: str
    study_id: str
    study_start: datetime
    contrast_start: datetime | None  # injection time, when any series is post-contrast
    series: list[SeriesPlan]


def _fingerprint(study: SyntheticStudy) -> list[str]:
    """What makes two studies of one seed different (grid, present series); part of every UID's entropy."""
    ref = study.label
    kinds = sorted(f"{s.kind.value}:{int(s.contrast)}" for s in study.series)
    return [str(study.seed), study.vendor.value, str(ref.GetSize()), f"{ref.GetSpacing()}", *kinds]


def _uid(study: SyntheticStudy, *parts: object) -> str:
    return generate_uid(entropy_srcs=["dicom-node-phantom", *_fingerprint(study), *map(str, parts)])


def _safe(text: str) -> str:
    """Folder-safe form of a description: letters, digits, '.', '-' and single underscores."""
    return re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9.\-]+", "_", text)).strip("_") or "series"


def _occurrence(study: SyntheticStudy, index: int) -> int:
    """How many series of the same kind precede ``index`` (keeps UIDs unique for repeated kinds)."""
    kind = study.series[index].kind
    return sum(1 for s in study.series[:index] if s.kind == kind)


def plan_study(study: SyntheticStudy, enhanced: bool = False) -> StudyPlan:
    """Fix UIDs, numbers and acquisition times of ``study`` as :func:`write_dicom_study` will write them."""
    style = study_style(study)
    styles = series_styles(study, style)
    rng = seeded_rng(study.seed, "dates", study.vendor.value)
    day = date(2018, 1, 1) + timedelta(days=int(rng.integers(0, 6 * 365)))
    study_start = datetime(day.year, day.month, day.day, 7, 30) + timedelta(
        seconds=int(rng.integers(0, 10 * 3600)))
    accession = f"{int(rng.integers(10**7, 10**8))}"
    study_id = f"{int(rng.integers(1000, 99999))}"

    order = sorted(range(len(study.series)), key=lambda i: (study.series[i].acquisition_index, i))
    starts: dict[int, datetime] = {}
    ends: dict[int, datetime] = {}
    clock = study_start + timedelta(seconds=90)  # patient positioning before the first scan
    for i in order:
        if styles[i].derived:
            continue
        starts[i] = clock
        ends[i] = clock + timedelta(seconds=styles[i].acquisition_duration_s)
        clock = ends[i] + timedelta(seconds=int(rng.integers(20, 90)))
    for i in order:
        if styles[i].derived:
            # A derived series keeps the acquisition time of its source and is reconstructed right after it.
            src = next((j for j in starts if study.series[j].kind == study.series[i].derived_from), None)
            starts[i] = starts[src] if src is not None else clock
            ends[i] = (ends[src] if src is not None else clock) + timedelta(seconds=20)
    post = [starts[i] for i in range(len(study.series)) if study.series[i].contrast and not styles[i].derived]
    contrast_start = min(post) - timedelta(seconds=60) if post else None

    plans = []
    for i, s in enumerate(styles):
        is_enhanced = enhanced and not s.derived
        fmt = "enhanced" if is_enhanced else "classic"
        plans.append(SeriesPlan(
            index=i, style=s, enhanced=is_enhanced,
            series_uid=_uid(study, "series", study.series[i].kind.value, _occurrence(study, i), fmt),
            folder=f"{s.series_number}_{_safe(s.series_description)}",
            start=starts[i], content=ends[i] + timedelta(seconds=5)))
    return StudyPlan(style, _uid(study, "study"), _uid(study, "frame-of-reference"), accession, study_id,
                     study_start, contrast_start, plans)


def reference_series_uid(study: SyntheticStudy, enhanced: bool = False) -> str | None:
    """SeriesInstanceUID that the reference series (``study.reference_kind``) gets when written."""
    plan = plan_study(study, enhanced)
    return next((p.series_uid for p in plan.series if study.series[p.index].kind == study.reference_kind), None)


# --------------------------------------------------------------------------------------------------------------
# Value helpers


def _da(t: datetime | date) -> str:
    return t.strftime("%Y%m%d")


def _tm(t: datetime) -> str:
    return t.strftime("%H%M%S.%f")


def _dt(t: datetime) -> str:
    return t.strftime("%Y%m%d%H%M%S.%f")


def _ds(values: Sequence[float] | np.ndarray) -> list[DSfloat]:
    """Decimal strings at full 16-character precision (positions round-trip to ~1e-10 mm)."""
    return [DSfloat(float(v), auto_format=True) for v in values]


def _code_item(code: Code) -> Dataset:
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    item.CodeMeaning = code.meaning
    return item


def _window(array: np.ndarray) -> tuple[float, float]:
    """WindowCenter/Width spanning the 1st..99.5th percentile of the non-zero signal."""
    body = array[array > 0]
    if body.size == 0:
        return 0.5, 1.0
    lo, hi = np.percentile(body, [1.0, 99.5])
    return float(round((lo + hi) / 2.0)), float(max(round(hi - lo), 1))


def _age(years: int) -> str:
    return f"{min(max(years, 0), 999):03d}Y"


# --------------------------------------------------------------------------------------------------------------
# Modules shared by classic and enhanced objects


def _patient_study_series(ds: Dataset, study: SyntheticStudy, plan: StudyPlan, sp: SeriesPlan) -> None:
    """Patient, General Study, Patient Study, General/MR Series, Frame of Reference, General Equipment."""
    scanner: Scanner = plan.style.scanner
    style = sp.style
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.StudyDate = _da(plan.study_start)
    ds.SeriesDate = _da(sp.content)
    ds.ContentDate = _da(sp.content)
    ds.StudyTime = _tm(plan.study_start)
    ds.SeriesTime = _tm(sp.content)
    ds.ContentTime = _tm(sp.content)
    ds.AccessionNumber = plan.accession_number
    ds.Modality = "MR"
    ds.Manufacturer = scanner.manufacturer
    ds.InstitutionName = plan.style.institution
    ds.ReferringPhysicianName = ""
    ds.StationName = scanner.station_name
    ds.StudyDescription = plan.style.study_description
    ds.SeriesDescription = style.series_description
    ds.ManufacturerModelName = scanner.model_name
    ds.PatientName = study.patient.name
    ds.PatientID = study.patient.patient_id
    ds.PatientBirthDate = study.patient.birth_date
    ds.PatientSex = study.patient.sex
    ds.PatientAge = _age(study.patient.age_years)
    ds.BodyPartExamined = "HEAD"
    ds.MagneticFieldStrength = scanner.field_strength_t
    ds.DeviceSerialNumber = scanner.device_serial_number
    ds.SoftwareVersions = list(scanner.software_versions)
    ds.ProtocolName = style.protocol_name
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = plan.study_uid
    ds.SeriesInstanceUID = sp.series_uid
    ds.StudyID = plan.study_id
    ds.SeriesNumber = style.series_number
    ds.AcquisitionNumber = 1
    ds.FrameOfReferenceUID = plan.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""


def _private(ds: Dataset, style: SeriesStyle) -> None:
    for el in style.private:
        block = ds.private_block(el.group, el.creator, create=True)
        block.add_new(el.offset, el.vr, el.value)


def _image_pixel(ds: Dataset, image: sitk.Image, geo: SliceGeometry) -> None:
    """Image Pixel attributes for 16-bit grey pixels (signedness from the SimpleITK pixel type)."""
    signed = image.GetPixelID() == sitk.sitkInt16
    if image.GetPixelID() not in (sitk.sitkUInt16, sitk.sitkInt16):
        raise ValueError(f"series pixels must be UInt16 or Int16, got {image.GetPixelIDTypeAsString()}")
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = geo.rows
    ds.Columns = geo.columns
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if signed else 0


def _file_meta(sop_class: str, sop_instance: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "DNODE_PHANTOM"
    return meta


def _save(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


# --------------------------------------------------------------------------------------------------------------
# Classic MR Image Storage


def _classic_contrast(ds: Dataset, agent: ContrastAgent, start: datetime) -> None:
    """Contrast/Bolus module (C.7.6.4): free-text agent as typed at the console plus its coded form."""
    ds.ContrastBolusAgent = agent.text
    ds.ContrastBolusAgentSequence = DicomSequence([_code_item(agent.code)])
    ds.ContrastBolusRoute = "IV"
    ds.ContrastBolusAdministrationRouteSequence = DicomSequence([_code_item(codes.CID11.IntravenousRoute)])
    ds.ContrastBolusVolume = agent.volume_ml
    ds.ContrastBolusStartTime = _tm(start)
    ds.ContrastBolusTotalDose = agent.volume_ml
    ds.ContrastBolusIngredient = "GADOLINIUM"
    ds.ContrastBolusIngredientConcentration = agent.ingredient_concentration_mg_ml


def _classic_series_dataset(study: SyntheticStudy, plan: StudyPlan, sp: SeriesPlan, geo: SliceGeometry,
                            image: sitk.Image, window: tuple[float, float]) -> Dataset:
    series = study.series[sp.index]
    style = sp.style
    scanner = plan.style.scanner
    ds = Dataset()
    _patient_study_series(ds, study, plan, sp)
    ds.ImageType = list(style.image_type)
    ds.SOPClassUID = MRImageStorage
    ds.AcquisitionDate = _da(sp.start)
    ds.AcquisitionTime = _tm(sp.start)
    ds.InstanceCreationDate = _da(sp.content)
    ds.InstanceCreationTime = _tm(sp.content)
    if style.derivation_description:
        ds.DerivationDescription = style.derivation_description
    if style.contrast_agent is not None and plan.contrast_start is not None:
        _classic_contrast(ds, style.contrast_agent, plan.contrast_start)
    # MR Image module (C.8.3.1)
    ds.ScanningSequence = list(style.scanning_sequence)
    ds.SequenceVariant = list(style.sequence_variant)
    ds.ScanOptions = list(style.scan_options)
    ds.MRAcquisitionType = "3D" if series.is_3d else "2D"
    if style.sequence_name:
        ds.SequenceName = style.sequence_name
    ds.AngioFlag = "N"
    ds.SliceThickness = _ds([series.slice_thickness_mm or geo.spacing[2]])[0]
    ds.RepetitionTime = style.repetition_time_ms
    ds.EchoTime = style.echo_time_ms
    # InversionTime is only allowed when ScanningSequence says IR; GE BRAVO often shows the preparation only in
    # its private pulse sequence name, and then the classic header cannot carry TI.
    if style.inversion_time_ms is not None and "IR" in style.scanning_sequence:
        ds.InversionTime = style.inversion_time_ms
    ds.NumberOfAverages = style.number_of_averages
    ds.ImagingFrequency = round(GYROMAGNETIC_RATIO_MHZ_PER_T * scanner.field_strength_t, 6)
    ds.ImagedNucleus = "1H"
    ds.EchoNumbers = 1
    ds.SpacingBetweenSlices = _ds([geo.spacing[2]])[0]
    ds.NumberOfPhaseEncodingSteps = geo.rows
    ds.EchoTrainLength = style.echo_train_length
    ds.PercentSampling = 100
    ds.PercentPhaseFieldOfView = 100
    ds.PixelBandwidth = style.pixel_bandwidth_hz
    ds.ReconstructionDiameter = _ds([geo.columns * geo.spacing[0]])[0]
    ds.ReceiveCoilName = scanner.receive_coil
    ds.TransmitCoilName = scanner.transmit_coil
    ds.AcquisitionMatrix = [0, geo.columns, geo.rows, 0]
    ds.InPlanePhaseEncodingDirection = "ROW"
    ds.FlipAngle = style.flip_angle_deg
    ds.VariableFlipAngleFlag = "N"
    ds.ImagesInAcquisition = geo.slices
    _image_pixel(ds, image, geo)
    ds.PixelSpacing = _ds([geo.spacing[1], geo.spacing[0]])
    ds.ImageOrientationPatient = _ds(geo.orientation)
    ds.WindowCenter, ds.WindowWidth = window
    _private(ds, style)
    return ds


def _write_classic(study: SyntheticStudy, plan: StudyPlan, sp: SeriesPlan, out_dir: Path) -> list[Path]:
    image = study.series[sp.index].image
    geo = SliceGeometry.of(image)
    pixels = sitk.GetArrayFromImage(image)
    template = _classic_series_dataset(study, plan, sp, geo, image, _window(pixels))
    dtype = "<i2" if template.PixelRepresentation else "<u2"
    paths = []
    for k in range(geo.slices):
        ds = copy.deepcopy(template)
        ds.SOPInstanceUID = _uid(study, "instance", sp.series_uid, k)
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = _ds(geo.position(k))
        ds.SliceLocation = _ds([geo.slice_location(k)])[0]
        ds.PixelData = np.ascontiguousarray(pixels[k], dtype=dtype).tobytes()
        ds.file_meta = _file_meta(MRImageStorage, ds.SOPInstanceUID)
        paths.append(_save(ds, out_dir / sp.folder / f"IM{k + 1:04d}.dcm"))
    return paths


# --------------------------------------------------------------------------------------------------------------
# Enhanced MR Image Storage


def _item(**attributes: object) -> Dataset:
    item = Dataset()
    for keyword, value in attributes.items():
        setattr(item, keyword, value)
    return item


def _seq(*items: Dataset) -> DicomSequence:
    return DicomSequence(list(items))


def _enhanced_contrast(ds: Dataset, agent: ContrastAgent) -> None:
    """Enhanced Contrast/Bolus module (C.7.6.4b); agent number 1 is referenced by the usage functional group."""
    item = _code_item(agent.code)
    item.ContrastBolusAgentNumber = 1
    item.ContrastBolusAdministrationRouteSequence = _seq(_code_item(codes.CID11.IntravenousRoute))
    item.ContrastBolusIngredientCodeSequence = _seq(_code_item(codes.CID13.Gadolinium))
    item.ContrastBolusVolume = agent.volume_ml
    item.ContrastBolusIngredientConcentration = agent.ingredient_concentration_mg_ml
    ds.ContrastBolusAgentSequence = _seq(item)


def _shared_groups(study: SyntheticStudy, plan: StudyPlan, sp: SeriesPlan, geo: SliceGeometry,
                   window: tuple[float, float]) -> Dataset:
    series = study.series[sp.index]
    style = sp.style
    scanner = plan.style.scanner
    g = Dataset()
    g.PixelMeasuresSequence = _seq(_item(
        SliceThickness=_ds([series.slice_thickness_mm or geo.spacing[2]])[0],
        SpacingBetweenSlices=_ds([geo.spacing[2]])[0],
        PixelSpacing=_ds([geo.spacing[1], geo.spacing[0]])))
    g.PlaneOrientationSequence = _seq(_item(ImageOrientationPatient=_ds(geo.orientation)))
    g.FrameAnatomySequence = _seq(_item(AnatomicRegionSequence=_seq(_code_item(codes.CID4.Head)),
                                        FrameLaterality="U"))
    g.FrameVOILUTSequence = _seq(_item(WindowCenter=window[0], WindowWidth=window[1]))
    g.PixelValueTransformationSequence = _seq(_item(RescaleIntercept=0, RescaleSlope=1, RescaleType="US"))
    g.MRImageFrameTypeSequence = _seq(_item(
        FrameType=list(style.enhanced_image_type), PixelPresentation="MONOCHROME",
        VolumetricProperties="VOLUME", VolumeBasedCalculationTechnique="NONE",
        ComplexImageComponent="MAGNITUDE", AcquisitionContrast=style.acquisition_contrast))
    gradient = style.echo_pulse_sequence == "GRADIENT"
    g.MRTimingAndRelatedParametersSequence = _seq(_item(
        RepetitionTime=style.repetition_time_ms,
        FlipAngle=style.flip_angle_deg,
        EchoTrainLength=style.echo_train_length,
        RFEchoTrainLength=0 if gradient else style.echo_train_length,
        GradientEchoTrainLength=style.echo_train_length if gradient else 0,
        SpecificAbsorptionRateSequence=_seq(_item(SpecificAbsorptionRateDefinition="IEC_HEAD",
                                                  SpecificAbsorptionRateValue=0.4)),
        OperatingModeSequence=_seq(_item(OperatingModeType="GRADIENT", OperatingMode="IEC_NORMAL"),
                                   _item(OperatingModeType="RF", OperatingMode="IEC_NORMAL")),
        GradientOutputType="PER_NERVE_STIM",
        GradientOutput=0.6))
    fov = _item(InPlanePhaseEncodingDirection="ROW", MRAcquisitionFrequencyEncodingSteps=geo.columns,
                MRAcquisitionPhaseEncodingStepsInPlane=geo.rows, PercentSampling=100,
                PercentPhaseFieldOfView=100)
    if series.is_3d:
        fov.MRAcquisitionPhaseEncodingStepsOutOfPlane = geo.slices
    g.MRFOVGeometrySequence = _seq(fov)
    g.MREchoSequence = _seq(_item(EffectiveEchoTime=style.echo_time_ms))
    modifier = _item(InversionRecovery="YES" if style.inversion_time_ms is not None else "NO",
                     FlowCompensation="NONE", T2Preparation="NO", SpectrallySelectedExcitation="NONE",
                     SpatialPresaturation="NONE", PartialFourier="NO",
                     ParallelAcquisition="YES" if style.parallel_factor else "NO")
    if style.inversion_time_ms is not None:
        modifier.InversionTimes = [style.inversion_time_ms]
    if gradient:
        modifier.Spoiling = "RF"
    if style.parallel_factor:
        modifier.ParallelAcquisitionTechnique = style.parallel_technique
        modifier.ParallelReductionFactorInPlane = style.parallel_factor
        modifier.ParallelReductionFactorOutOfPlane = 1.0
        modifier.ParallelReductionFactorSecondInPlane = 1.0
    g.MRModifierSequence = _seq(modifier)
    g.MRImagingModifierSequence = _seq(_item(
        MagnetizationTransfer="NONE", BloodSignalNulling="NO", Tagging="NONE",
        TransmitterFrequency=round(GYROMAGNETIC_RATIO_MHZ_PER_T * scanner.field_strength_t, 6),
        PixelBandwidth=style.pixel_bandwidth_hz))
    g.MRReceiveCoilSequence = _seq(_item(
        ReceiveCoilName=scanner.receive_coil, ReceiveCoilManufacturerName=scanner.manufacturer,
        ReceiveCoilType="MULTICOIL", QuadratureReceiveCoil="NO",
        MultiCoilDefinitionSequence=_seq(*(_item(MultiCoilElementName=name, MultiCoilElementUsed="YES")
                                           for name in scanner.coil_elements))))
    g.MRTransmitCoilSequence = _seq(_item(TransmitCoilName=scanner.transmit_coil,
                                          TransmitCoilManufacturerName=scanner.manufacturer,
                                          TransmitCoilType="BODY"))
    g.MRAveragesSequence = _seq(_item(NumberOfAverages=style.number_of_averages))
    if style.diffusion_b_value is not None:
        g.MRDiffusionSequence = _seq(_item(DiffusionBValue=style.diffusion_b_value,
                                           DiffusionDirectionality="ISOTROPIC"))
    if style.contrast_agent is not None:
        g.ContrastBolusUsageSequence = _seq(_item(ContrastBolusAgentNumber=1, ContrastBolusAgentAdministered="YES",
                                                  ContrastBolusAgentDetected="YES"))
    return g


def _enhanced_dataset(study: SyntheticStudy, plan: StudyPlan, sp: SeriesPlan) -> Dataset:
    series = study.series[sp.index]
    style = sp.style
    image = series.image
    geo = SliceGeometry.of(image)
    pixels = sitk.GetArrayFromImage(image)
    window = _window(pixels)
    ds = Dataset()
    _patient_study_series(ds, study, plan, sp)
    ds.SOPClassUID = EnhancedMRImageStorage
    ds.SOPInstanceUID = _uid(study, "instance", sp.series_uid, 0)
    ds.InstanceCreationDate = _da(sp.content)
    ds.InstanceCreationTime = _tm(sp.content)
    ds.InstanceNumber = 1
    # Enhanced MR Image module (C.8.13.1)
    ds.ImageType = list(style.enhanced_image_type)
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.ComplexImageComponent = "MAGNITUDE"
    ds.AcquisitionContrast = style.acquisition_contrast
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"
    # MR Image and Spectroscopy Instance module (C.8.13.2)
    ds.AcquisitionDateTime = _dt(sp.start)
    ds.AcquisitionDuration = style.acquisition_duration_s
    ds.ContentQualification = "PRODUCT"
    ds.ResonantNucleus = "1H"
    ds.KSpaceFiltering = "NONE"
    ds.ApplicableSafetyStandardAgency = "IEC"
    # MR Pulse Sequence module (C.8.13.4)
    ds.PulseSequenceName = style.pulse_sequence_name
    ds.MRAcquisitionType = "3D" if series.is_3d else "2D"
    ds.EchoPulseSequence = style.echo_pulse_sequence
    if style.echo_pulse_sequence == "SPIN":
        ds.MultipleSpinEcho = "NO"
    ds.MultiPlanarExcitation = "NO"
    ds.PhaseContrast = "NO"
    ds.TimeOfFlightContrast = "NO"
    ds.SteadyStatePulseSequence = "NONE"
    ds.EchoPlanarPulseSequence = "YES" if style.echo_planar else "NO"
    ds.SaturationRecovery = "NO"
    ds.SpectrallySelectedSuppression = "NONE"
    ds.OversamplingPhase = "NONE"
    ds.GeometryOfKSpaceTraversal = "RECTILINEAR"
    ds.RectilinearPhaseEncodeReordering = "LINEAR"
    ds.SegmentedKSpaceTraversal = "SINGLE" if style.echo_train_length <= 1 else "PARTIAL"
    if series.is_3d:
        ds.CoverageOfKSpace = "FULL"
    ds.NumberOfKSpaceTrajectories = 1
    if style.contrast_agent is not None:
        _enhanced_contrast(ds, style.contrast_agent)
    ds.AcquisitionContextSequence = DicomSequence([])
    # Multi-frame Dimension module: frames are indexed by stack and position in the stack.
    dim_uid = _uid(study, "dimension-organization", sp.series_uid)
    ds.DimensionOrganizationSequence = _seq(_item(DimensionOrganizationUID=dim_uid))
    ds.DimensionOrganizationType = "3D"
    ds.DimensionIndexSequence = _seq(
        _item(DimensionOrganizationUID=dim_uid, DimensionIndexPointer=0x00209056,
              FunctionalGroupPointer=0x00209111, DimensionDescriptionLabel="Stack ID"),
        _item(DimensionOrganizationUID=dim_uid, DimensionIndexPointer=0x00209057,
              FunctionalGroupPointer=0x00209111, DimensionDescriptionLabel="In-Stack Position Number"))
    _image_pixel(ds, image, geo)
    ds.NumberOfFrames = geo.slices
    ds.SharedFunctionalGroupsSequence = _seq(_shared_groups(study, plan, sp, geo, window))
    frame_time = _dt(sp.start)
    per_frame = []
    for k in range(geo.slices):
        per_frame.append(_item(
            FrameContentSequence=_seq(_item(
                FrameAcquisitionNumber=1, FrameReferenceDateTime=frame_time,
                FrameAcquisitionDateTime=frame_time,
                FrameAcquisitionDuration=style.acquisition_duration_s * 1000.0,
                StackID="1", InStackPositionNumber=k + 1, DimensionIndexValues=[1, k + 1])),
            PlanePositionSequence=_seq(_item(ImagePositionPatient=_ds(geo.position(k))))))
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    _private(ds, style)
    dtype = "<i2" if ds.PixelRepresentation else "<u2"
    ds.PixelData = np.ascontiguousarray(pixels, dtype=dtype).tobytes()
    ds.file_meta = _file_meta(EnhancedMRImageStorage, ds.SOPInstanceUID)
    return ds


# --------------------------------------------------------------------------------------------------------------


def write_dicom_study(study: SyntheticStudy, out_dir: Path, enhanced: bool = False) -> list[Path]:
    """Write every series of ``study`` under ``out_dir/<SeriesNumber>_<description>/``; returns the files.

    Classic: one ``IMnnnn.dcm`` per slice (MR Image Storage). ``enhanced=True``: one multi-frame
    ``IM0001.dcm`` per acquired series (Enhanced MR Image Storage); ADC and MPR stay classic.
    """
    out_dir = Path(out_dir)
    plan = plan_study(study, enhanced)
    paths: list[Path] = []
    for sp in plan.series:
        if sp.enhanced:
            paths.append(_save(_enhanced_dataset(study, plan, sp), out_dir / sp.folder / "IM0001.dcm"))
        else:
            paths.extend(_write_classic(study, plan, sp, out_dir))
    return paths
