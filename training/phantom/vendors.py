"""Header style real MR scanners write, per vendor and per series kind.

The node recognises the series it needs from header rules, so the synthetic studies must carry the same
conventions (and the same untidiness) that GE, Siemens and Philips scanners write: descriptions, sequence
names, ScanningSequence/SequenceVariant/ScanOptions, ImageType, typical timing parameters and the private
tags a classifier may look at. Everything here is a pure function of the study seed, so a study always gets
the same style; different seeds pick among several realistic site "dialects" and scanner models.

Times are in ms, angles in degrees, field strength in tesla, durations in seconds.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydicom.sr.codedict import Code, codes

from training.phantom.types import Plane, SeriesKind, SyntheticSeries, SyntheticStudy, Vendor

EchoPulse = Literal["GRADIENT", "SPIN"]
AcquisitionContrast = Literal["T1", "FLUID_ATTENUATED", "DIFFUSION"]

# Private creators, spelled as the scanners spell them.
GE_ACQU = "GEMS_ACQU_01"
GE_PARM = "GEMS_PARM_01"
SIEMENS_HEADER = "SIEMENS MR HEADER"
PHILIPS_IMAGING = "Philips Imaging DD 001"


@dataclass(frozen=True)
class Scanner:
    """One scanner model with the equipment attributes it writes."""

    manufacturer: str
    model_name: str
    software_versions: tuple[str, ...]
    field_strength_t: float
    station_name: str
    device_serial_number: str
    receive_coil: str
    transmit_coil: str
    coil_elements: tuple[str, ...]  # MultiCoilDefinitionSequence element names (enhanced)


@dataclass(frozen=True)
class ContrastAgent:
    """A gadolinium agent as the technologist records it (free text) plus its coded form."""

    text: str  # ContrastBolusAgent as typed at the console, e.g. "Gadovist 7.5ml"
    code: Code  # CID 12 Imaging Contrast Agent
    volume_ml: float
    ingredient_concentration_mg_ml: float  # of the gadolinium chelate


@dataclass(frozen=True)
class PrivateElement:
    """One private data element: ``(group, creator)`` reserves a block, ``offset`` is the low byte."""

    group: int
    creator: str
    offset: int
    vr: str
    value: object


@dataclass(frozen=True)
class SeriesStyle:
    """Everything the DICOM writer needs to know about one series besides its pixels and geometry."""

    series_number: int
    series_description: str
    protocol_name: str
    sequence_name: str | None  # (0018,0024); GE leaves it out
    pulse_sequence_name: str  # (0018,9005) in enhanced objects
    scanning_sequence: tuple[str, ...]
    sequence_variant: tuple[str, ...]
    scan_options: tuple[str, ...]
    image_type: tuple[str, ...]  # classic ImageType
    enhanced_image_type: tuple[str, ...]  # ImageType / FrameType of the enhanced object
    acquisition_contrast: AcquisitionContrast
    echo_pulse_sequence: EchoPulse
    echo_planar: bool
    repetition_time_ms: float
    echo_time_ms: float
    inversion_time_ms: float | None  # None: no inversion preparation
    flip_angle_deg: float
    echo_train_length: int
    number_of_averages: float
    pixel_bandwidth_hz: float
    parallel_factor: float | None  # in-plane acceleration (ASSET / GRAPPA / SENSE)
    parallel_technique: str | None
    diffusion_b_value: float | None
    acquisition_duration_s: float
    contrast_agent: ContrastAgent | None  # None for pre-contrast series and where the console omitted it
    derived: bool
    derivation_description: str | None
    private: tuple[PrivateElement, ...]


@dataclass(frozen=True)
class StudyStyle:
    """Per-study choices shared by all series: scanner, naming dialect and contrast agent."""

    vendor: Vendor
    scanner: Scanner
    dialect: int
    agent: ContrastAgent
    # Indices (into study.series) of post-contrast series whose console record lacks ContrastBolusAgent: the
    # description alone says post. Real-world twist the classifier must cope with.
    agent_omitted: frozenset[int]
    institution: str
    study_description: str


_SCANNERS: dict[Vendor, tuple[Scanner, ...]] = {
    Vendor.GE: (
        Scanner("GE MEDICAL SYSTEMS", "SIGNA Premier", ("28", "LX", "MR29.1_R01_2033.b"), 3.0,
                "GEMRP01", "0000000PHANTOM1", "48HAP", "BODY", ("48HAP",)),
        Scanner("GE MEDICAL SYSTEMS", "DISCOVERY MR750w", ("27", "LX", "MR DV26.0_R03_1831.b"), 3.0,
                "GEMR750W", "0000000PHANTOM2", "HNS Head", "BODY", ("HNS Head",)),
        Scanner("GE MEDICAL SYSTEMS", "SIGNA Artist", ("28", "LX", "MR29.1_EA_2039.g"), 1.5,
                "GEMRART", "0000000PHANTOM3", "AIR 48 HEAD", "BODY", ("AIR 48 HEAD",)),
    ),
    Vendor.SIEMENS: (
        Scanner("SIEMENS", "Skyra", ("syngo MR E11",), 3.0, "AWP00001", "PHANTOM01",
                "HeadNeck_20", "Body", ("HE1-4", "NE1,2")),
        Scanner("SIEMENS", "Avanto_fit", ("syngo MR E11",), 1.5, "AWP00002", "PHANTOM02",
                "HeadNeck_20_TCS", "Body", ("HE1-4",)),
        Scanner("Siemens Healthineers", "MAGNETOM Vida", ("syngo MR XA30",), 3.0, "MRC00003", "PHANTOM03",
                "HeadNeck_64", "Body", ("HC1-7", "NC1")),
    ),
    Vendor.PHILIPS: (
        Scanner("Philips", "Ingenia", ("5.6.1", "5.6.1.2"), 3.0, "PHILIPS-PH0001", "PHANTOM-P1",
                "dS Head 32ch", "B", ("dS Head 32ch",)),
        Scanner("Philips Medical Systems", "Achieva", ("5.1.7", "5.1.7.2"), 1.5, "PHILIPS-PH0002",
                "PHANTOM-P2", "SENSE-Head-8", "B", ("SENSE-Head-8",)),
        Scanner("Philips", "Ingenia Elition X", ("5.7.1", "5.7.1.1"), 3.0, "PHILIPS-PH0003", "PHANTOM-P3",
                "dS HeadNeckSpine", "B", ("dS HeadNeckSpine",)),
    ),
}

# (console text, CID 12 code, dose ml, chelate concentration mg/ml); doses are for a ~75 kg adult.
_AGENTS: tuple[ContrastAgent, ...] = (
    ContrastAgent("Gadobutrol", codes.CID12.Gadobutrol, 7.5, 604.72),
    ContrastAgent("Gadovist 7.5ml", codes.CID12.Gadobutrol, 7.5, 604.72),
    ContrastAgent("Dotarem", codes.CID12.GadoterateMeglumine, 15.0, 376.9),
    ContrastAgent("DOTAREM 15 ML", codes.CID12.GadoterateMeglumine, 15.0, 376.9),
    ContrastAgent("MultiHance", codes.CID12.GadobenateDimeglumine, 15.0, 529.0),
    ContrastAgent("ProHance", codes.CID12.Gadoteridol, 15.0, 279.3),
)

# Siemens writes "Region^Program"; GE and Philips the ordered procedure or exam card name.
_STUDY_DESCRIPTIONS: dict[Vendor, tuple[str, str, str]] = {
    Vendor.GE: ("MR BRAIN W/WO CONTRAST", "BRAIN METS", "MRI BRAIN WITH AND WITHOUT CONTRAST"),
    Vendor.SIEMENS: ("Neuro^Brain", "Head^Neuro", "Kopf^Metastasen"),
    Vendor.PHILIPS: ("Brain Metastases", "MR Brain w/wo Gd", "NEURO^BRAIN"),
}

_INSTITUTIONS = ("PHANTOM IMAGING CENTER", "SYNTHETIC NEURO INSTITUTE", "DEMO UNIVERSITY HOSPITAL")

N_DIALECTS = 3


def seeded_rng(*keys: int | str) -> np.random.Generator:
    """A generator seeded from a tuple of keys, independent of every other draw in the phantom."""
    words = [abs(k) if isinstance(k, int) else zlib.crc32(k.encode()) for k in keys]
    return np.random.default_rng(words)


def study_style(study: SyntheticStudy) -> StudyStyle:
    """Pick scanner, dialect and agent for ``study``; a pure function of its seed and vendor."""
    rng = seeded_rng(study.seed, "style", study.vendor.value)
    scanners = _SCANNERS[study.vendor]
    scanner = scanners[int(rng.integers(len(scanners)))]
    dialect = int(rng.integers(N_DIALECTS))
    agent = _AGENTS[int(rng.integers(len(_AGENTS)))]
    # Only acquired series have a console record; reformats and maps copy their source's.
    post = [i for i, s in enumerate(study.series) if s.contrast and s.derived_from is None]
    # ~80 %: every post series carries the agent; ~10 %: none does; ~10 %: one series lacks it.
    draw = float(rng.random())
    if not post or draw < 0.8:
        omitted: frozenset[int] = frozenset()
    elif draw < 0.9:
        omitted = frozenset(post)
    else:
        omitted = frozenset({post[int(rng.integers(len(post)))]})
    institution = _INSTITUTIONS[int(rng.integers(len(_INSTITUTIONS)))]
    return StudyStyle(study.vendor, scanner, dialect, agent, omitted, institution,
                      _STUDY_DESCRIPTIONS[study.vendor][dialect])


def _plane_word(vendor: Vendor, plane: Plane, dialect: int) -> str:
    if vendor is Vendor.GE:
        word = {Plane.AXIAL: "Ax", Plane.SAGITTAL: "Sag", Plane.CORONAL: "Cor"}[plane]
        return word.upper() if dialect == 1 else word
    return {Plane.AXIAL: "tra", Plane.SAGITTAL: "sag", Plane.CORONAL: "cor"}[plane]


def _descriptions(vendor: Vendor, series: SyntheticSeries, dialect: int,
                  source: SeriesStyle | None, source_kind: SeriesKind | None) -> tuple[str, str]:
    """(SeriesDescription, ProtocolName) in the vendor's and site's naming dialect.

    Derived series (ADC, MPR) are named after their source's style, as consoles do.
    """
    p = _plane_word(vendor, series.plane, dialect)
    kind = series.kind
    if kind in (SeriesKind.ADC, SeriesKind.MPR):
        return _derived_descriptions(vendor, kind, p, dialect, source, source_kind)
    k3 = series.is_3d
    if vendor is Vendor.GE:
        table: dict[SeriesKind, tuple[str, str, str]] = {
            SeriesKind.T1_BRAVO_POST: (f"{p} BRAVO +C", f"{p} T1 BRAVO POST", f"{p} 3D BRAVO +GAD"),
            SeriesKind.T1_CUBE_PRE: (f"{p} CUBE T1", f"{p} T1 CUBE PRE", f"{p} 3D T1 Cube"),
            SeriesKind.T1_CUBE_POST: (f"{p} CUBE T1 +C", f"{p} T1 CUBE POST", f"{p} 3D T1 Cube +GAD"),
            SeriesKind.FLAIR: ((f"{p} CUBE FLAIR", f"{p} 3D FLAIR CUBE", f"{p} T2 FLAIR Cube") if k3
                               else (f"{p} T2 FLAIR", f"{p} T2 FLAIR", f"{p} T2 FLAIR ASSET")),
            SeriesKind.LOCALIZER: ("3-Plane Loc", "3 PLANE LOC", "Localizer"),
            SeriesKind.DWI: (f"{p} DWI 1000b", f"{p} DWI B1000", f"{p} DWI Asset"),
        }
        # GE sites name the exam protocol, not the series, in ProtocolName.
        return table[kind][dialect], _GE_PROTOCOLS[dialect]
    if vendor is Vendor.SIEMENS:
        table = {
            SeriesKind.T1_BRAVO_POST: (f"t1_mprage_{p}_p2_iso_KM", "T1 MPRAGE post", f"t1_mpr_{p}_iso_KM"),
            SeriesKind.T1_CUBE_PRE: (f"t1_space_{p}_p2_iso", f"T1 SPACE {p}", f"t1_spc_{p}_iso"),
            SeriesKind.T1_CUBE_POST: (f"t1_space_{p}_p2_iso_KM", f"T1 SPACE {p} post", f"t1_spc_{p}_iso_KM"),
            SeriesKind.FLAIR: ((f"t2_space_dark-fluid_{p}_p2_iso", f"FLAIR SPACE {p}", f"t2_spc_da-fl_{p}_p2_iso")
                               if k3 else (f"t2_tirm_{p}_dark-fluid", f"T2 FLAIR {p}", f"t2_tirm_{p}_dark-fluid")),
            SeriesKind.LOCALIZER: (("AAHead_Scout", "localizer", "AAHead_Scout") if k3
                                   else ("localizer", "localizer", "Localizer")),
            SeriesKind.DWI: ("ep2d_diff_3scan_trace_p2", "DWI b1000", f"ep2d_diff_{p}_b1000"),
        }
        protocol = table[kind][dialect]
        # Siemens keeps the protocol as ProtocolName and appends the reconstruction to the description.
        return protocol + ("_TRACEW" if kind is SeriesKind.DWI and dialect != 1 else ""), protocol
    table = {
        SeriesKind.T1_BRAVO_POST: ("3D T1 TFE Gd", "T1W_3D_TFE +C", "3D T1 TFE post"),
        SeriesKind.T1_CUBE_PRE: ("T1 VISTA", "T1W_3D_VISTA", "T1 3D VISTA"),
        SeriesKind.T1_CUBE_POST: ("T1 VISTA Gd", "T1W_3D_VISTA +C", "T1 3D VISTA GADO"),
        SeriesKind.FLAIR: ("3D FLAIR", "3D_FLAIR", "FLAIR 3D") if k3 else ("T2W FLAIR", "T2W_FLAIR", f"FLAIR {p}"),
        SeriesKind.LOCALIZER: ("Survey", "SmartSurvey", "Survey"),
        SeriesKind.DWI: ("DWI", "DWI_SENSE", "DWI b1000"),
    }
    protocol = {
        SeriesKind.T1_BRAVO_POST: "3D_T1_TFE",
        SeriesKind.T1_CUBE_PRE: "3D_VISTA",
        SeriesKind.T1_CUBE_POST: "3D_VISTA",
        SeriesKind.FLAIR: "3D_FLAIR" if k3 else "T2W_FLAIR",
        SeriesKind.LOCALIZER: "Survey",
        SeriesKind.DWI: "DWI",
    }[kind]
    if series.contrast:
        protocol += " +C" if dialect == 1 else " Gd"
    return table[kind][dialect], protocol


_GE_PROTOCOLS = ("BRAIN MET W WO", "NEURO/BRAIN METS", "BRAIN W/WO CONTRAST")
_GE_SOURCE_WORD = {SeriesKind.T1_BRAVO_POST: "BRAVO", SeriesKind.T1_CUBE_PRE: "CUBE T1",
                   SeriesKind.T1_CUBE_POST: "CUBE T1 +C", SeriesKind.FLAIR: "CUBE FLAIR"}


def _derived_descriptions(vendor: Vendor, kind: SeriesKind, plane_word: str, dialect: int,
                          source: SeriesStyle | None, source_kind: SeriesKind | None) -> tuple[str, str]:
    src_desc = source.series_description if source is not None else ""
    src_protocol = source.protocol_name if source is not None else ""
    if vendor is Vendor.GE:
        if kind is SeriesKind.ADC:
            return "Apparent Diffusion Coefficient (mm2/s)", src_protocol or _GE_PROTOCOLS[dialect]
        word = _GE_SOURCE_WORD.get(source_kind or SeriesKind.T1_BRAVO_POST, "BRAVO")
        desc = (f"MPR {plane_word} {word}", f"MPR {plane_word} {word.upper()}", f"{plane_word} {word} MPR")[dialect]
        return desc, src_protocol or _GE_PROTOCOLS[dialect]
    if vendor is Vendor.SIEMENS:
        base = src_protocol or ("ep2d_diff_3scan_trace_p2" if kind is SeriesKind.ADC else "t1_mprage")
        return (f"{base}_ADC" if kind is SeriesKind.ADC else f"{base}_MPR_{plane_word}"), base
    if kind is SeriesKind.ADC:
        return ("dADC", f"dADC_{src_desc or 'DWI'}", "dADC")[dialect], src_protocol or "DWI"
    return f"{src_desc or '3D T1 TFE'} MPR {plane_word}", src_protocol or "3D_T1_TFE"


@dataclass(frozen=True)
class _Sequence:
    """The acquisition recipe of one kind on one vendor (before per-seed jitter)."""

    sequence_name: str | None
    pulse_sequence_name: str
    scanning_sequence: tuple[str, ...]
    sequence_variant: tuple[str, ...]
    scan_options: tuple[str, ...]
    image_type: tuple[str, ...]
    acquisition_contrast: AcquisitionContrast
    echo_pulse_sequence: EchoPulse
    echo_planar: bool
    tr_ms: float
    te_ms: float
    ti_ms: float | None
    flip_deg: float
    etl: int
    bandwidth_hz: float
    parallel: float | None
    duration_s: float
    private_sequence: str | None  # GE (0019,109C) / Philips (2001,1020)


def _recipe(vendor: Vendor, kind: SeriesKind, k3: bool, variant: int, xa: bool) -> _Sequence:
    """Sequence recipe of an acquired ``kind`` (3D if ``k3``); ``variant`` picks among realistic encodings.

    ``xa``: Siemens syngo MR XA software, which writes DIS2D/DIS3D where VE11 writes ND in ImageType.
    """
    S = _Sequence
    if vendor is Vendor.GE:
        orig = ("ORIGINAL", "PRIMARY", "OTHER")
        if kind is SeriesKind.T1_BRAVO_POST:
            # Both encodings exist in the field: the IR preparation shows either in ScanningSequence or only in
            # ScanOptions/the private name (then the classic header cannot carry TI without breaking the IOD).
            ss = ("GR", "IR") if variant % 2 else ("GR",)
            return S(None, "efgre3d", ss, ("SS", "SP", "SK"), ("FAST_GEMS", "EDR_GEMS", "ACC_GEMS", "IR_GEMS"),
                     orig, "T1", "GRADIENT", False, 8.2, 3.2, 450.0, 12.0, 1, 244.1, 2.0, 300.0, "efgre3d")
        if kind in (SeriesKind.T1_CUBE_PRE, SeriesKind.T1_CUBE_POST):
            return S(None, "cube", ("SE",), ("SK", "MP"), ("FAST_GEMS", "EDR_GEMS", "ACC_GEMS"),
                     orig, "T1", "SPIN", False, 602.0, 13.6, None, 90.0, 24, 488.3, 2.0, 330.0, "cube")
        if kind is SeriesKind.FLAIR:
            if k3:
                return S(None, "cube", ("SE", "IR"), ("SK", "MP"), ("FAST_GEMS", "EDR_GEMS", "ACC_GEMS", "IR_GEMS"),
                         orig, "FLUID_ATTENUATED", "SPIN", False, 6000.0, 115.0, 1807.0, 90.0, 200, 488.3,
                         2.0, 360.0, "cube")
            return S(None, "fse-ir", ("SE", "IR"), ("SK", "MP"), ("FAST_GEMS", "EDR_GEMS", "IR_GEMS"),
                     orig, "FLUID_ATTENUATED", "SPIN", False, 9000.0, 120.0, 2250.0, 90.0, 24, 244.1,
                     None, 180.0, "fse-ir")
        if kind is SeriesKind.LOCALIZER:
            return S(None, "fgre", ("GR",), ("SS",), ("FAST_GEMS",), ("ORIGINAL", "PRIMARY", "LOCALIZER"),
                     "T1", "GRADIENT", False, 5.2, 1.6, None, 30.0, 1, 488.3, None, 25.0, "fgre")
        if kind is SeriesKind.DWI:
            return S(None, "epi2", ("EP", "SE"), ("NONE",), ("EDR_GEMS", "EPI_GEMS", "ACC_GEMS", "FS"),
                     orig, "DIFFUSION", "SPIN", True, 6000.0, 75.0, None, 90.0, 1, 1953.1, 2.0,
                     60.0, "epi2")
    elif vendor is Vendor.SIEMENS:
        norm = ("NORM", "DIS3D" if k3 else "DIS2D") if xa else ("ND", "NORM")
        m = ("ORIGINAL", "PRIMARY", "M") + norm
        if kind is SeriesKind.T1_BRAVO_POST:
            return S("*tfl3d1_16ns", "*tfl3d1_16ns", ("GR", "IR"), ("SK", "SP", "MP"), ("IR",), m, "T1",
                     "GRADIENT", False, 2300.0, 2.32, 900.0, 8.0, 1, 200.0, 2.0, 320.0, None)
        if kind in (SeriesKind.T1_CUBE_PRE, SeriesKind.T1_CUBE_POST):
            name = "*spcR3d1_42ns" if variant % 2 else "*spc3d1_42ns"
            return S(name, name, ("SE",), ("SK", "SP", "OSP"), ("PFP",), m, "T1", "SPIN", False,
                     700.0, 12.0, None, 120.0, 42, 501.0, 2.0, 330.0, None)
        if kind is SeriesKind.FLAIR:
            if k3:
                return S("*spcir3d1_282ns", "*spcir3d1_282ns", ("SE", "IR"), ("SK", "SP", "MP", "OSP"), ("IR",),
                         m, "FLUID_ATTENUATED", "SPIN", False, 5000.0, 387.0, 1800.0, 120.0, 282, 751.0, 2.0,
                         380.0, None)
            return S("*tir2d1_16", "*tir2d1_16", ("SE", "IR"), ("SK", "SP", "MP"), ("IR",), m,
                     "FLUID_ATTENUATED", "SPIN", False, 9000.0, 81.0, 2500.0, 150.0, 16, 287.0, 2.0, 200.0, None)
        if kind is SeriesKind.LOCALIZER:
            name = "*fl3d1_ns" if k3 else "*fl2d1"
            tr, te = (3.15, 1.37) if k3 else (8.6, 4.0)
            return S(name, name, ("GR",), ("SK",), ("PFP",) if k3 else ("SP",), m, "T1", "GRADIENT",
                     False, tr, te, None, 8.0 if k3 else 20.0, 1, 540.0, None, 14.0, None)
        if kind is SeriesKind.DWI:
            return S("*ep_b1000t", "*ep_b1000t", ("EP",), ("SK", "SP"), ("PFP", "FS"),
                     ("ORIGINAL", "PRIMARY", "DIFFUSION", "TRACEW") + norm, "DIFFUSION", "SPIN", True,
                     6300.0, 89.0, None, 90.0, 1, 1002.0, 2.0, 110.0, None)
    else:
        if kind is SeriesKind.T1_BRAVO_POST:
            ti = 1000.0 if variant % 2 else None  # Philips shows the TFE inversion delay only on some releases
            ss = ("GR", "IR") if ti is not None else ("GR",)
            return S("T1TFE", "T1TFE", ss, ("MP", "SK", "SS") if ti is None else ("SK", "MP"), (),
                     ("ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"), "T1", "GRADIENT", False, 8.1, 3.7, ti, 8.0,
                     240, 241.0, 2.0, 300.0, "T1TFE")
        if kind in (SeriesKind.T1_CUBE_PRE, SeriesKind.T1_CUBE_POST):
            return S("VISTA", "VISTA", ("SE",), ("SK",), (), ("ORIGINAL", "PRIMARY", "M_SE", "M", "SE"),
                     "T1", "SPIN", False, 500.0, 24.0, None, 90.0, 32, 723.0, 2.0, 330.0, "VISTA")
        if kind is SeriesKind.FLAIR:
            name = "3D_FLAIR" if k3 else "IR"
            return S(name, name, ("IR",), ("SK", "MP"), (), ("ORIGINAL", "PRIMARY", "M_IR", "M", "IR"),
                     "FLUID_ATTENUATED", "SPIN", False, 4800.0 if k3 else 11000.0, 320.0 if k3 else 125.0,
                     1650.0 if k3 else 2800.0, 90.0, 180 if k3 else 32, 1011.0, 2.0, 360.0, "IR")
        if kind is SeriesKind.LOCALIZER:
            return S("FFE", "FFE", ("GR",), ("SS",), (), ("ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"),
                     "T1", "GRADIENT", False, 11.0, 4.6, None, 15.0, 1, 191.0, None, 30.0, "FFE")
        if kind is SeriesKind.DWI:
            return S("DwiSE", "DwiSE", ("SE",), ("SK",), ("FS",), ("ORIGINAL", "PRIMARY", "DIFFUSION", "TRACEW"),
                     "DIFFUSION", "SPIN", True, 4700.0, 78.0, None, 90.0, 53, 1580.0, 2.0, 80.0, "DwiSE")
    raise ValueError(f"{kind.value} has no acquisition recipe (derived kinds take the source's)")


def _enhanced_flavor(series: SyntheticSeries) -> str:
    """ImageType value 3 ("image flavor") of an enhanced MR object; defined terms of PS3.3 C.8.16.1."""
    if series.kind is SeriesKind.LOCALIZER:
        return "LOCALIZER"
    if series.kind in (SeriesKind.DWI, SeriesKind.ADC):
        return "DIFFUSION"
    if series.is_3d or series.kind is SeriesKind.MPR:
        return "VOLUME"
    return "FLUID_ATTENUATED" if series.kind is SeriesKind.FLAIR else "T1"


def _jitter(rng: np.random.Generator, value: float, rel: float, ndigits: int) -> float:
    """A per-study perturbation of a protocol parameter (sites tune protocols), rounded like consoles do."""
    return round(float(value * (1.0 + rel * rng.uniform(-1.0, 1.0))), ndigits)


def _derived_image_type(vendor: Vendor, kind: SeriesKind, xa: bool) -> tuple[str, ...]:
    if kind is SeriesKind.ADC:
        base = ("DERIVED", "PRIMARY", "DIFFUSION", "ADC")
        return base + (("NORM", "DIS2D") if xa else ("ND", "NORM")) if vendor is Vendor.SIEMENS else base
    if vendor is Vendor.SIEMENS:
        return ("DERIVED", "PRIMARY", "MPR") + (("NORM", "DIS3D") if xa else ("ND", "NORM"))
    return ("DERIVED", "SECONDARY", "MPR")


def _private_elements(vendor: Vendor, recipe: _Sequence, b_value: float | None,
                      duration_s: float) -> tuple[PrivateElement, ...]:
    """The few private tags that recognition code is known to consult."""
    out: list[PrivateElement] = []
    if vendor is Vendor.GE and recipe.private_sequence:
        out += [PrivateElement(0x0019, GE_ACQU, 0x9C, "LO", recipe.private_sequence),
                PrivateElement(0x0019, GE_ACQU, 0x9E, "LO", recipe.private_sequence.upper())]
        if b_value is not None:
            # GE stores the b-value in "slop integer 6", offset by 1e9 on recent releases.
            out.append(PrivateElement(0x0043, GE_PARM, 0x39, "IS", [int(1e9 + b_value), 0, 0, 0]))
    elif vendor is Vendor.SIEMENS:
        minutes, seconds = divmod(int(round(duration_s)), 60)
        out += [PrivateElement(0x0051, SIEMENS_HEADER, 0x08, "CS", "IMAGE NUM 4"),
                PrivateElement(0x0051, SIEMENS_HEADER, 0x0A, "LO", f"TA {minutes:02d}:{seconds:02d}")]
        if b_value is not None:
            out.append(PrivateElement(0x0019, SIEMENS_HEADER, 0x0C, "IS", int(b_value)))
    elif vendor is Vendor.PHILIPS and recipe.private_sequence:
        out.append(PrivateElement(0x2001, PHILIPS_IMAGING, 0x20, "LO", recipe.private_sequence))
    return tuple(out)


def series_numbers(vendor: Vendor, study: SyntheticStudy) -> list[int]:
    """SeriesNumber per ``study.series`` entry, numbered in acquisition order the way each vendor does.

    GE: 1, 2, 3 ...; derived maps get 100 x the source number (e.g. ADC 800 of DWI 8). Siemens: 1, 2, ...;
    derived series take the next free number. Philips: 101, 201, 301 ...; derived use source + 1 (501 -> 502).
    """
    order = sorted(range(len(study.series)), key=lambda i: (study.series[i].acquisition_index, i))
    numbers: dict[int, int] = {}
    acquired = [i for i in order if study.series[i].derived_from is None]
    for n, i in enumerate(acquired, start=1):
        numbers[i] = n * 100 + 1 if vendor is Vendor.PHILIPS else n
    next_free = len(acquired) + 1
    for i in order:
        if i in numbers:
            continue
        src = _source_index(study, i)
        if src is None or src not in numbers:
            numbers[i] = next_free * 100 + 1 if vendor is Vendor.PHILIPS else next_free
            next_free += 1
        elif vendor is Vendor.GE:
            numbers[i] = numbers[src] * 100 + sum(1 for j in numbers if _source_index(study, j) == src)
        elif vendor is Vendor.PHILIPS:
            numbers[i] = numbers[src] + 1 + sum(1 for j in numbers if _source_index(study, j) == src)
        else:
            numbers[i] = next_free
            next_free += 1
    return [numbers[i] for i in range(len(study.series))]


def _source_index(study: SyntheticStudy, index: int) -> int | None:
    """Index of the series that ``study.series[index]`` was derived from (the first of that kind)."""
    src_kind = study.series[index].derived_from
    if src_kind is None:
        return None
    return next((j for j, s in enumerate(study.series) if s.kind == src_kind and s.derived_from is None), None)


def series_styles(study: SyntheticStudy, style: StudyStyle | None = None) -> list[SeriesStyle]:
    """Header style of every entry of ``study.series`` (same order)."""
    style = style or study_style(study)
    numbers = series_numbers(study.vendor, study)
    out: list[SeriesStyle | None] = [None] * len(study.series)
    # Acquired series first: derived ones borrow their source's recipe and description.
    order = sorted(range(len(study.series)), key=lambda i: study.series[i].derived_from is not None)
    for i in order:
        out[i] = _series_style(study, style, i, numbers[i], out)
    return [s for s in out if s is not None]


# ParallelAcquisitionTechnique is enumerated (PILS, SENSE, SMASH): GE ASSET and Philips SENSE are image-space
# SENSE; Siemens GRAPPA is k-space (SMASH family) and "GRAPPA" itself is rejected by dciodvfy as an error.
_PARALLEL_TECHNIQUE = {Vendor.GE: "SENSE", Vendor.SIEMENS: "SMASH", Vendor.PHILIPS: "SENSE"}

# Derived kinds take the acquisition recipe of what they are computed from.
_DERIVED_SOURCE_DEFAULT = {SeriesKind.ADC: SeriesKind.DWI, SeriesKind.MPR: SeriesKind.T1_BRAVO_POST}


def _series_style(study: SyntheticStudy, style: StudyStyle, index: int, number: int,
                  done: Sequence[SeriesStyle | None]) -> SeriesStyle:
    series = study.series[index]
    vendor = study.vendor
    rng = seeded_rng(study.seed, "series", vendor.value, series.kind.value, index)
    variant = int(seeded_rng(study.seed, "variant", vendor.value).integers(4))
    derived = series.derived_from is not None or series.kind in _DERIVED_SOURCE_DEFAULT
    src_index = _source_index(study, index)
    source_series = study.series[src_index] if src_index is not None else None
    source_style = done[src_index] if src_index is not None else None
    if derived:
        recipe_kind = series.derived_from or _DERIVED_SOURCE_DEFAULT[series.kind]
        recipe_3d = source_series.is_3d if source_series is not None else recipe_kind is not SeriesKind.DWI
    else:
        recipe_kind, recipe_3d = series.kind, series.is_3d
    xa = any("XA" in version for version in style.scanner.software_versions)
    recipe = _recipe(vendor, recipe_kind, recipe_3d, variant, xa)
    desc, protocol = _descriptions(vendor, series, style.dialect, source_style, recipe_kind)
    field = style.scanner.field_strength_t
    # 1.5 T protocols run slightly shorter TR/TI for inversion-prepared sequences (shorter T1s).
    tr = _jitter(rng, recipe.tr_ms * (0.9 if field < 2 and recipe.tr_ms > 1000 else 1.0), 0.05, 2)
    te = _jitter(rng, recipe.te_ms, 0.04, 2)
    ti = None if recipe.ti_ms is None else _jitter(rng, recipe.ti_ms * (0.9 if field < 2 else 1.0), 0.05, 0)
    flip, etl = recipe.flip_deg, recipe.etl
    simulated = series.sequence or {}
    if simulated:
        # The generator's own parameters, so the header states what produced the pixels; the recipe
        # still decides whether an inversion time belongs in this vendor's header at all.
        tr = simulated.get("RepetitionTime", tr)
        te = simulated.get("EchoTime", te)
        ti = simulated.get("InversionTime", ti) if ti is not None else None
        flip = simulated.get("FlipAngle", flip)
        etl = int(simulated.get("EchoTrainLength", etl))
    if source_style is not None:
        # Reformats and parametric maps repeat the timing of the acquisition they were computed from.
        tr, te, ti = source_style.repetition_time_ms, source_style.echo_time_ms, source_style.inversion_time_ms
    if source_style is not None:
        agent = source_style.contrast_agent if series.contrast else None
    else:
        agent = style.agent if series.contrast and index not in style.agent_omitted else None
    image_type = _derived_image_type(vendor, series.kind, xa) if derived else recipe.image_type
    b_value = 1000.0 if series.kind in (SeriesKind.DWI, SeriesKind.ADC) else None
    value3 = _enhanced_flavor(series)
    value4 = "ADC" if series.kind is SeriesKind.ADC else "NONE"
    duration = 0.0 if derived else _jitter(rng, recipe.duration_s, 0.1, 0)
    return SeriesStyle(
        series_number=number,
        series_description=desc,
        protocol_name=protocol,
        sequence_name=None if vendor is Vendor.GE else recipe.sequence_name,
        pulse_sequence_name=recipe.pulse_sequence_name,
        scanning_sequence=recipe.scanning_sequence,
        sequence_variant=recipe.sequence_variant,
        scan_options=recipe.scan_options,
        image_type=image_type,
        enhanced_image_type=(image_type[0], image_type[1], value3, value4),
        acquisition_contrast=recipe.acquisition_contrast,
        echo_pulse_sequence=recipe.echo_pulse_sequence,
        echo_planar=recipe.echo_planar,
        repetition_time_ms=tr,
        echo_time_ms=te,
        inversion_time_ms=ti,
        flip_angle_deg=flip,
        echo_train_length=etl,
        number_of_averages=1.0,
        pixel_bandwidth_hz=recipe.bandwidth_hz,
        parallel_factor=recipe.parallel,
        parallel_technique=None if recipe.parallel is None else _PARALLEL_TECHNIQUE[vendor],
        diffusion_b_value=b_value,
        acquisition_duration_s=duration,
        contrast_agent=agent,
        derived=derived,
        derivation_description={SeriesKind.ADC: "Apparent diffusion coefficient map from b=0 and b=1000",
                                SeriesKind.MPR: "Multiplanar reformat"}.get(series.kind) if derived else None,
        private=_private_elements(vendor, recipe, b_value, duration),
    )
