"""MR signal of each tissue per sequence (3 T), then what the scanner adds: noise, bias field, gain, gamma.

Signals are relative (proton density 1, no receiver gain); ``tissue_signals`` gives one value per tissue of
``anatomy.TISSUES`` so that a voxel's signal is the fraction-weighted sum (partial-volume mixing of
magnetisation). Times are in ms, angles in degrees, diffusion in mm^2/s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from numpy.typing import NDArray

from training.phantom.types import SeriesKind, Vendor

F32 = NDArray[np.float32]

R1_GD = 4.0e-3  # gadolinium T1 relaxivity at 3 T, 1/(mM ms) (~4 L/mmol/s for gadobutrol / gadoterate)
R2_GD = 5.0e-3  # T2 relaxivity, 1/(mM ms)


@dataclass(frozen=True)
class Tissue:
    """Relaxation and related properties of one tissue at 3 T."""

    t1: float  # ms, before contrast
    t2: float  # ms
    pd: float  # relative proton density (CSF = 1)
    adc: float  # mm^2/s
    gd: float = 0.0  # gadolinium concentration after injection, mM
    flow: bool = False  # flowing blood: void on spin-echo and EPI readouts, bright on gradient echo
    fat: float = 0.0  # fat fraction: suppressed in the DWI (fat-saturated EPI)
    pulsation: float = 1.0  # signal kept in long spin-echo trains (CSF pulsation dephases)


TISSUE_PROPERTIES: dict[str, Tissue] = {
    "wm": Tissue(830, 80, 0.69, 0.75e-3, gd=0.01),
    "gm": Tissue(1330, 110, 0.80, 0.85e-3, gd=0.02),
    "csf": Tissue(4000, 2000, 1.00, 3.1e-3, pulsation=0.7),
    "dura": Tissue(1000, 55, 0.55, 1.0e-3, gd=0.2),  # no blood-brain barrier: enhances (thin, smooth)
    "bone": Tissue(1000, 1.0, 0.05, 0.2e-3),  # cortical bone: T2* of ~1 ms, no signal
    "marrow": Tissue(450, 90, 0.80, 0.3e-3, gd=0.05, fat=0.6),  # fatty diploe
    "fat": Tissue(380, 100, 0.90, 0.02e-3, fat=1.0),
    "muscle": Tissue(1420, 32, 0.75, 1.5e-3, gd=0.05),
    "skin": Tissue(1000, 45, 0.70, 1.0e-3, gd=0.1),
    "vessel": Tissue(1650, 120, 0.85, 3.0e-3, gd=0.9, flow=True),  # venous and arterial blood
    "choroid": Tissue(1200, 100, 0.85, 1.2e-3, gd=0.8),  # choroid plexus: avid enhancement
    # vasogenic oedema: intact barrier, no enhancement; T1 long enough to stay hypointense to WM on T1 FSE
    "edema": Tissue(1400, 180, 0.83, 1.4e-3),
    "tumor_hi": Tissue(1300, 120, 0.85, 0.9e-3, gd=0.75),
    "tumor_lo": Tissue(1300, 120, 0.85, 0.9e-3, gd=0.2),
    "necrosis": Tissue(2300, 450, 0.95, 2.2e-3, gd=0.02),  # proteinaceous fluid: not nulled on FLAIR
}


@dataclass(frozen=True)
class IrSpgr:
    """Inversion-recovery prepared 3D spoiled gradient echo (BRAVO, MPRAGE, 3D T1 TFE)."""

    ti: float  # the TI the scanner displays (GE: prep time to the first excitation; others: to k-space centre)
    prep: float  # inversion to the first excitation of the shot
    tr: float  # echo spacing (the GRE repetition time)
    te: float
    flip: float
    shot_interval: float  # time between inversions
    shot_length: int  # excitations per inversion
    centre_fraction: float  # position of the k-space centre within the shot (0.5 = linear ordering)


@dataclass(frozen=True)
class FastSpinEcho:
    """T1-weighted 3D fast spin echo with variable refocusing (CUBE, SPACE, VISTA); flow is suppressed."""

    tr: float
    te: float
    etl: int
    blood_suppression: float  # residual fraction of flowing-blood signal (black blood)


@dataclass(frozen=True)
class Flair:
    """Fluid-attenuated inversion recovery, 2D or 3D fast spin echo readout."""

    tr: float
    ti: float
    te: float
    flow_residual: float  # fraction of flowing-blood signal left (flow void)


@dataclass(frozen=True)
class Diffusion:
    """Single-shot spin-echo EPI diffusion; ``b`` in s/mm^2 (0 gives the b=0 image)."""

    tr: float
    te: float
    b: float


@dataclass(frozen=True)
class Gre:
    """Fast spoiled gradient echo (the localizer)."""

    tr: float
    te: float
    flip: float


Sequence = IrSpgr | FastSpinEcho | Flair | Diffusion | Gre


def _post_t1(t: Tissue, contrast: bool) -> float:
    return 1.0 / (1.0 / t.t1 + R1_GD * t.gd) if contrast else t.t1


def _post_t2(t: Tissue, contrast: bool) -> float:
    return 1.0 / (1.0 / t.t2 + R2_GD * t.gd) if contrast else t.t2


def ir_spgr_mz(t1: float, seq: IrSpgr, inversion_efficiency: float = 0.96) -> float:
    """Longitudinal magnetisation (fraction of M0) just before the k-space-centre excitation, in the
    steady state over repeated shots; closed form for the spoiled-GRE train, iterated over shots."""
    a = math.radians(seq.flip)
    n_c = int(round(seq.centre_fraction * seq.shot_length))
    ta = seq.prep
    td = max(seq.shot_interval - ta - seq.shot_length * seq.tr, 0.0)
    e = math.exp(-seq.tr / t1)
    q = math.cos(a) * e
    m_inf = (1.0 - e) / (1.0 - q)

    def train(m0: float, n: int) -> float:  # n pulses: m <- m cos(a) e + (1 - e)
        return m_inf + (m0 - m_inf) * q**n

    def relax(m0: float, t: float) -> float:
        return 1.0 - (1.0 - m0) * math.exp(-t / t1)

    m = 1.0
    centre = 0.0
    for _ in range(12):  # converges in a few shots
        m = relax(-inversion_efficiency * m, ta)
        centre = train(m, n_c)
        m = relax(train(m, seq.shot_length), td)
    return centre


def tissue_signal(t: Tissue, seq: Sequence, contrast: bool) -> float:
    """Magnitude signal (relative to M0 = 1) of a pure voxel of tissue ``t``."""
    t1 = _post_t1(t, contrast)
    t2 = _post_t2(t, contrast)
    if isinstance(seq, IrSpgr):
        t2s = 0.6 * t2  # T2* for the ~3 ms gradient echo
        return t.pd * math.sin(math.radians(seq.flip)) * abs(ir_spgr_mz(t1, seq)) * math.exp(-seq.te / t2s)
    if isinstance(seq, FastSpinEcho):
        # the recovery period is what remains of TR after the echo train
        tr_eff = max(seq.tr - 0.5 * seq.etl * 4.0, 0.3 * seq.tr)
        s = t.pd * (1.0 - math.exp(-tr_eff / t1)) * math.exp(-seq.te / t2) * t.pulsation
        return s * (seq.blood_suppression if t.flow else 1.0)
    if isinstance(seq, Flair):
        mz = 1.0 - 2.0 * math.exp(-seq.ti / t1) + math.exp(-seq.tr / t1)
        s = t.pd * abs(mz) * math.exp(-seq.te / t2)
        return s * (seq.flow_residual if t.flow else 1.0)
    if isinstance(seq, Diffusion):
        s = t.pd * (1.0 - math.exp(-seq.tr / t1)) * math.exp(-seq.te / t2) * math.exp(-seq.b * t.adc)
        return s * (1.0 - 0.95 * t.fat) * (0.1 if t.flow else 1.0)
    if isinstance(seq, Gre):
        a = math.radians(seq.flip)
        e = math.exp(-seq.tr / t1)
        return t.pd * math.sin(a) * (1.0 - e) / (1.0 - math.cos(a) * e) * math.exp(-seq.te / (0.6 * t2))
    raise TypeError(f"unknown sequence {seq!r}")


def tissue_signals(seq: Sequence, contrast: bool, tissues: tuple[str, ...]) -> F32:
    """Per-tissue signal (in ``tissues`` order) of one sequence, before or after gadolinium."""
    return np.array([tissue_signal(TISSUE_PROPERTIES[n], seq, contrast) for n in tissues], dtype=np.float32)


def sample_sequence(rng: np.random.Generator, kind: SeriesKind, vendor: Vendor, is_3d: bool) -> Sequence:
    """Draw vendor-flavoured acquisition parameters for a series of ``kind``."""
    if kind is SeriesKind.T1_BRAVO_POST:
        if vendor is Vendor.GE:  # BRAVO: the displayed TI is the prep time before the first excitation
            tr, n = rng.uniform(7.6, 8.8), int(rng.integers(80, 110))
            prep = rng.uniform(400, 500)
            return IrSpgr(ti=prep, prep=prep, tr=tr, te=rng.uniform(2.9, 3.4), flip=rng.uniform(10, 13),
                          shot_interval=prep + n * tr + rng.uniform(300, 500), shot_length=n, centre_fraction=0.5)
        if vendor is Vendor.SIEMENS:  # MPRAGE: TI to the centre of k-space, linear ordering
            tr, n, ti = rng.uniform(6.5, 7.5), int(rng.integers(160, 192)), rng.uniform(850, 1000)
            return IrSpgr(ti=ti, prep=ti - 0.5 * n * tr, tr=tr, te=rng.uniform(2.2, 3.0), flip=rng.uniform(8, 9.5),
                          shot_interval=rng.uniform(1900, 2300), shot_length=n, centre_fraction=0.5)
        tr, n, ti = rng.uniform(7.5, 8.5), int(rng.integers(150, 200)), rng.uniform(850, 1000)  # 3D T1 TFE
        return IrSpgr(ti=ti, prep=ti - 0.4 * n * tr, tr=tr, te=rng.uniform(3.4, 3.9), flip=rng.uniform(8, 10),
                      shot_interval=rng.uniform(2000, 2500), shot_length=n, centre_fraction=0.4)
    if kind in (SeriesKind.T1_CUBE_PRE, SeriesKind.T1_CUBE_POST):
        tr_range = {Vendor.GE: (500, 650), Vendor.SIEMENS: (600, 700), Vendor.PHILIPS: (550, 650)}[vendor]
        te_range = {Vendor.GE: (12, 16), Vendor.SIEMENS: (10, 14), Vendor.PHILIPS: (15, 20)}[vendor]
        return FastSpinEcho(tr=rng.uniform(*tr_range), te=rng.uniform(*te_range), etl=int(rng.integers(20, 36)),
                            blood_suppression=rng.uniform(0.04, 0.12))
    if kind is SeriesKind.FLAIR:
        tr = rng.uniform(6000, 7000) if is_3d else rng.uniform(8000, 9500)
        t1_csf = TISSUE_PROPERTIES["csf"].t1
        ti_null = t1_csf * math.log(2.0 / (1.0 + math.exp(-tr / t1_csf)))
        return Flair(tr=tr, ti=ti_null * rng.uniform(0.97, 1.03), te=rng.uniform(100, 140),
                     flow_residual=rng.uniform(0.15, 0.4))
    if kind in (SeriesKind.DWI, SeriesKind.ADC):
        return Diffusion(tr=rng.uniform(4000, 6500), te=rng.uniform(65, 90), b=1000.0)
    if kind is SeriesKind.LOCALIZER:
        return Gre(tr=rng.uniform(5.0, 8.0), te=rng.uniform(1.5, 2.5), flip=rng.uniform(20, 30))
    raise ValueError(f"no sequence for {kind}")


def header_values(seq: Sequence, vendor: Vendor) -> dict[str, float]:
    """The acquisition parameters as the vendor's DICOM headers state them (keyword -> ms, degrees, s/mm^2).
    Siemens reports an MPRAGE's TR as the inversion interval, GE and Philips the echo spacing."""
    if isinstance(seq, IrSpgr):
        tr = seq.shot_interval if vendor is Vendor.SIEMENS else seq.tr
        return {"RepetitionTime": round(tr, 1), "EchoTime": round(seq.te, 2), "InversionTime": round(seq.ti, 1),
                "FlipAngle": round(seq.flip, 1)}
    if isinstance(seq, FastSpinEcho):
        return {"RepetitionTime": round(seq.tr, 1), "EchoTime": round(seq.te, 2), "FlipAngle": 90.0,
                "EchoTrainLength": float(seq.etl)}
    if isinstance(seq, Flair):
        return {"RepetitionTime": round(seq.tr, 1), "EchoTime": round(seq.te, 2), "InversionTime": round(seq.ti, 1),
                "FlipAngle": 90.0}
    if isinstance(seq, Diffusion):
        return {"RepetitionTime": round(seq.tr, 1), "EchoTime": round(seq.te, 2), "FlipAngle": 90.0,
                "DiffusionBValue": seq.b}
    return {"RepetitionTime": round(seq.tr, 2), "EchoTime": round(seq.te, 2), "FlipAngle": round(seq.flip, 1)}


def b0_of(seq: Diffusion) -> Diffusion:
    """The b = 0 image of a diffusion acquisition."""
    return replace(seq, b=0.0)


@dataclass(frozen=True)
class ScannerScaling:
    """How a scanner turns a relative signal into stored pixel values."""

    noise_sigma: float  # std of each of the two Gaussian channels, in signal units
    gain: float  # stored value of signal ``reference`` (before gamma)
    reference: float  # signal mapped to ``gain``
    gamma: float
    bias_amplitude: float  # 0..1 strength of the smooth receive-coil bias


def sample_scaling(
    rng: np.random.Generator, signals: F32, brain: float, snr: tuple[float, float],
    top: tuple[float, float] = (2500, 4000),
) -> ScannerScaling:
    """Noise and gain for one series: ``brain`` is the typical brain-tissue signal, noise is set from a
    signal-to-noise ratio drawn in ``snr``, and the brightest tissue lands near a value drawn in ``top``."""
    return ScannerScaling(
        noise_sigma=brain / rng.uniform(*snr),
        gain=rng.uniform(*top),
        reference=float(np.max(signals)),
        gamma=rng.uniform(0.9, 1.1),
        bias_amplitude=rng.uniform(0.08, 0.25),
    )


def apply_bias_field(
    signal: F32, rng: np.random.Generator, spacing: tuple[float, float, float], centre_index: NDArray[np.float64],
    amplitude: float,
) -> None:
    """Multiply a (slices, rows, columns) signal in place by a smooth receive-coil bias: along each grid axis
    a low-order wobble times a central bump (together the 3 T centre brightening); separable so it costs
    three broadcast multiplications. ``spacing`` is in array order, ``centre_index`` the head centre."""
    for ax in range(3):
        n = signal.shape[ax]
        pos = (np.arange(n) - centre_index[ax]) * spacing[ax] / 100.0  # in units of 100 mm
        c = rng.normal(0.0, 1.0, 3) * amplitude * np.array([0.5, 0.35, 0.2])
        f = np.exp(c[0] * pos + c[1] * pos**2 + c[2] * pos**3)
        f *= 1.0 + amplitude * rng.uniform(0.1, 0.3) * np.exp(-0.5 * (pos / 0.9) ** 2)
        shape = [1, 1, 1]
        shape[ax] = n
        signal *= f.astype(np.float32).reshape(shape)


def add_rician_noise(signal: F32, sigma: float, rng: np.random.Generator) -> F32:
    """Magnitude of the signal plus complex Gaussian noise of std ``sigma`` per channel (in place)."""
    re = rng.standard_normal(signal.shape, dtype=np.float32)
    re *= sigma
    re += signal
    im = rng.standard_normal(signal.shape, dtype=np.float32)
    im *= sigma
    np.hypot(re, im, out=re)
    return re


def to_stored(signal: F32, scaling: ScannerScaling) -> NDArray[np.uint16]:
    """Apply gain and gamma and round to unsigned 16-bit stored values, as scanners store magnitude images."""
    x = np.maximum(signal, 0.0, out=signal)
    x *= 1.0 / scaling.reference
    np.power(x, scaling.gamma, out=x)
    x *= scaling.gain
    np.clip(x, 0.0, 65535.0, out=x)
    return np.rint(x).astype(np.uint16)
