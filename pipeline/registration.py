"""Reference choice and rigid co-registration of the input series (method spec, "Pre-processing").

Conventions
-----------
* Images are ``SimpleITK.Image`` in LPS millimetres (as read from DICOM).
* A registration transform follows the SimpleITK/ITK convention: it maps a point of the FIXED image (the
  reference series) to the corresponding point of the MOVING image, so
  ``sitk.Resample(moving, reference, result.transform, ...)`` puts the moving series on the reference grid.
* Initialisation is the scanner frame (identity: both series share the scanner's patient coordinates),
  with the centre of rotation at the centre of the fixed image. ``CenteredTransformInitializer(GEOMETRY)``
  is used only to obtain that centre; the translation it proposes (centre of the moving field of view minus
  centre of the fixed one) is discarded, because the fields of view of e.g. a sagittal CUBE and an axial BRAVO
  differ by centimetres while the head itself moves only a few millimetres between series.
* Metric values are SimpleITK's Mattes mutual information, which is NEGATIVE mutual information (lower is
  better); both ``metric_initial`` (identity) and ``metric_final`` are evaluated at full resolution with the
  same (fixed-seed) sampling, so they are comparable.
* Images finer than ``working_spacing_mm`` (default 2 mm) are bin-averaged first: a rigid MI fit is accurate
  well below the voxel size, and 0.5-1 mm reconstructions cost 8-64x the voxels (head mask, metric evaluations,
  pyramid) for nothing a rigid fit needs. Metric evaluations "at full resolution" are on this working grid. A
  series much thicker-sliced than the reference (2D FLAIR, 5 mm) is registered the other way round (its own
  voxels are the metric's samples, the reference is interpolated) and
  the result inverted: interpolating across 5 mm slice gaps made the optimizer diverge on realistic phantoms.
  In that case the metric values are those of the swapped pair.

The guard: a result is replaced by the identity (scanner coordinates) and a warning recorded when the
optimizer raises, when the estimated rotation or translation exceeds what a patient does between series of one
exam (``max_rotation_deg`` / ``max_translation_mm``), when the metric at the result is not better than at
identity, or when the images share (almost) no information at all (mutual information below
``min_mutual_information`` at both identity and result: e.g. a series of noise, a wrong series).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from pipeline.roles import REFERENCE_PREFERENCE, ROLES, choose_reference  # noqa: F401  (re-exported)


@dataclass(frozen=True)
class RegistrationSettings:
    """Parameters of the rigid registration; the defaults are for clinical (~1 mm) series.

    Tests may shrink ``iterations`` / ``sampling_fraction`` for speed; the guard limits stay."""

    histogram_bins: int = 32
    sampling_fraction: float = 0.05  # of the fixed (masked) voxels, per resolution level
    sampling_seed: int = 20240521  # fixed: the same inputs give the same result
    # levels on the working grid: ~4 mm then ~2 mm voxels. Rigid MI is accurate well below the voxel size, and a
    # 1 mm finest level cost ~6x the time (35 s against ~7 s for a realistic study, bench/registration_speed.py)
    # for no accuracy that matters (< 0.6 mm mean residual on brain points either way)
    shrink_factors: tuple[int, ...] = (2, 1)
    smoothing_sigmas_mm: tuple[float, ...] = (2.0, 0.5)  # Gaussian sigma per level, physical units
    iterations: int = 200  # per level (a cap: the optimizer stops on min_step well before, ~20-100)
    learning_rate: float = 1.0  # mm (optimizer scales from physical shift)
    min_step: float = 1e-3
    relaxation: float = 0.5
    use_head_mask: bool = True  # sample the fixed image only inside its head (Otsu foreground)
    use_moving_mask: bool = False  # also count only points landing in the moving head (less accurate on phantoms)
    working_spacing_mm: float = 2.0  # finer images are first bin-averaged (per axis, integer factor) to about this
    # spacing (0.5 mm -> 2 mm, 0.94 mm -> 1.9 mm, 1.2 mm unchanged); the head mask is also computed on this grid
    sample_thick_series: bool = True  # a series with > 1.5x coarser voxels than the reference is the metric's
    # fixed image (samples on its own voxels) and the result inverted; the returned transform is unaffected
    max_rotation_deg: float = 10.0
    max_translation_mm: float = 20.0
    min_mutual_information: float = 0.05  # nats; a head against a head shares far more (~0.3-1)
    threads: int | None = None  # SimpleITK threads for this registration (None: SimpleITK's default)


@dataclass(frozen=True)
class RegistrationResult:
    """One series registered to the reference. ``transform`` maps reference points to series points."""

    role: str
    transform: sitk.Transform
    metric_initial: float  # Mattes MI (negative: lower is better) at identity
    metric_final: float  # at the returned transform (= metric_initial when fell back)
    rotation_deg: tuple[float, float, float]  # Euler angles about x, y, z (LPS) of the ESTIMATE
    translation_mm: tuple[float, float, float]  # translation of the ESTIMATE (LPS), centre = fixed centre
    fell_back: bool  # True: ``transform`` is the identity (scanner coordinates), see ``warning``
    warning: str | None
    seconds: float

    @property
    def rotation_magnitude_deg(self) -> float:
        """Total rotation angle of the estimate (axis-angle), degrees."""
        return _rotation_angle_deg(self.rotation_deg)

    @property
    def translation_magnitude_mm(self) -> float:
        return float(np.linalg.norm(self.translation_mm))


def identity_result(role: str, reference: sitk.Image) -> RegistrationResult:
    """The result for the reference itself (or a series deliberately left in scanner coordinates)."""
    return RegistrationResult(
        role=role, transform=_scanner_frame(reference), metric_initial=float("nan"), metric_final=float("nan"),
        rotation_deg=(0.0, 0.0, 0.0), translation_mm=(0.0, 0.0, 0.0), fell_back=False, warning=None, seconds=0.0,
    )


def register(
    fixed: sitk.Image, moving: sitk.Image, role: str, *, settings: RegistrationSettings = RegistrationSettings()
) -> RegistrationResult:
    """Rigidly register ``moving`` (series ``role``) to ``fixed`` (the reference series); see the module doc."""
    start = time.perf_counter()
    if len(settings.shrink_factors) != len(settings.smoothing_sigmas_mm):
        raise ValueError("shrink_factors and smoothing_sigmas_mm must have the same length")
    fixed_f = _working_image(fixed, settings.working_spacing_mm)
    moving_f = _working_image(moving, settings.working_spacing_mm)
    initial = _scanner_frame(fixed_f)
    # a thick-slice series (e.g. 2D FLAIR, 5 mm) is sampled on its own voxels and the reference interpolated:
    # interpolating across its slice gaps makes the metric's gradient useless (seen diverging on phantoms)
    swap = settings.sample_thick_series and _coarsest(moving_f) > 1.5 * _coarsest(fixed_f)
    opt_fixed, opt_moving = (moving_f, fixed_f) if swap else (fixed_f, moving_f)
    start_tx = _scanner_frame(opt_fixed)
    method = _method(opt_fixed, opt_moving, settings)

    def evaluate(tx: sitk.Transform) -> float:
        method.SetInitialTransform(sitk.Euler3DTransform(tx), inPlace=False)
        # full resolution for the evaluation (the pyramid applies only to Execute)
        method.SetShrinkFactorsPerLevel([1])
        method.SetSmoothingSigmasPerLevel([0.0])
        try:
            return float(method.MetricEvaluate(opt_fixed, opt_moving))
        finally:
            method.SetShrinkFactorsPerLevel(list(settings.shrink_factors))
            method.SetSmoothingSigmasPerLevel(list(settings.smoothing_sigmas_mm))

    def fall_back(reason: str, metric_initial: float, estimate: sitk.Euler3DTransform | None) -> RegistrationResult:
        rot, trans = _parameters(estimate) if estimate is not None else ((0.0,) * 3, (0.0,) * 3)
        return RegistrationResult(
            role=role, transform=initial, metric_initial=metric_initial, metric_final=metric_initial,
            rotation_deg=rot, translation_mm=trans, fell_back=True,
            warning=f"registration of {role} fell back to scanner coordinates: {reason}",
            seconds=time.perf_counter() - start,
        )

    try:
        metric_initial = evaluate(start_tx)
    except RuntimeError as exc:  # e.g. no overlap at all
        return fall_back(f"metric undefined at identity ({_first_line(exc)})", float("nan"), None)

    method.SetInitialTransform(sitk.Euler3DTransform(start_tx), inPlace=False)
    try:
        raw = sitk.Euler3DTransform(_execute(method, opt_fixed, opt_moving))
    except RuntimeError as exc:
        return fall_back(f"optimizer failed ({_first_line(exc)})", metric_initial, None)
    estimate = _inverse_about(raw, initial.GetCenter()) if swap else raw

    rot, trans = _parameters(estimate)
    angle = _rotation_angle_deg(rot)
    shift = float(np.linalg.norm(trans))
    if not all(math.isfinite(v) for v in (*rot, *trans)):
        return fall_back("non-finite parameters", metric_initial, None)
    if angle > settings.max_rotation_deg:
        return fall_back(f"rotation {angle:.1f} deg > {settings.max_rotation_deg} deg", metric_initial, estimate)
    if shift > settings.max_translation_mm:
        return fall_back(f"translation {shift:.1f} mm > {settings.max_translation_mm} mm", metric_initial, estimate)
    try:
        metric_final = evaluate(raw)
    except RuntimeError as exc:
        return fall_back(f"metric undefined at the result ({_first_line(exc)})", metric_initial, estimate)
    if not metric_final < metric_initial:
        return fall_back(
            f"metric at the result ({metric_final:.4f}) not better than at identity ({metric_initial:.4f})",
            metric_initial, estimate,
        )
    if -metric_final < settings.min_mutual_information:
        return fall_back(
            f"images share almost no information (MI {-metric_final:.4f} < {settings.min_mutual_information})",
            metric_initial, estimate,
        )
    return RegistrationResult(
        role=role, transform=estimate, metric_initial=metric_initial, metric_final=metric_final,
        rotation_deg=rot, translation_mm=trans, fell_back=False, warning=None,
        seconds=time.perf_counter() - start,
    )


def register_study(
    images: Mapping[str, sitk.Image], *, reference_role: str | None = None,
    settings: RegistrationSettings = RegistrationSettings(),
) -> dict[str, RegistrationResult]:
    """Register every series of ``images`` (role -> image) to the reference (``choose_reference`` unless
    given); the reference gets an identity result. Keys follow ``ROLES`` order."""
    ref_role = reference_role or choose_reference(images)
    reference = images[ref_role]
    out: dict[str, RegistrationResult] = {}
    for role in ROLES:
        if role not in images:
            continue
        if role == ref_role:
            out[role] = identity_result(role, reference)
        else:
            out[role] = register(reference, images[role], role, settings=settings)
    return out


# --- internals -----------------------------------------------------------------------------------------------


def _execute(method: sitk.ImageRegistrationMethod, fixed: sitk.Image, moving: sitk.Image) -> sitk.Transform:
    result = method.Execute(fixed, moving)
    # with inPlace=False Execute returns a CompositeTransform wrapping the optimised Euler3D
    if result.GetName() == "CompositeTransform":
        result = sitk.CompositeTransform(result).GetNthTransform(0)
    return result


def _working_image(image: sitk.Image, spacing_mm: float) -> sitk.Image:
    """float32 copy, bin-averaged by an integer factor per axis where the voxels are finer than ``spacing_mm``
    (a 0.5 mm 512-matrix reconstruction carries nothing a rigid registration needs; 4x fewer voxels)."""
    img = sitk.Cast(image, sitk.sitkFloat32)
    factors = [max(1, math.floor(spacing_mm / s + 1e-6)) for s in img.GetSpacing()]
    if any(f > 1 for f in factors):
        img = sitk.BinShrink(img, factors)
    return img


def _method(fixed: sitk.Image, moving: sitk.Image, settings: RegistrationSettings) -> sitk.ImageRegistrationMethod:
    method = sitk.ImageRegistrationMethod()
    if settings.threads is not None:
        method.SetNumberOfThreads(int(settings.threads))
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=settings.histogram_bins)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(settings.sampling_fraction, settings.sampling_seed)
    if settings.use_head_mask:
        method.SetMetricFixedMask(_head_mask(fixed))
        if settings.use_moving_mask:
            method.SetMetricMovingMask(_head_mask(moving))
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=settings.learning_rate, minStep=settings.min_step, numberOfIterations=settings.iterations,
        relaxationFactor=settings.relaxation, gradientMagnitudeTolerance=1e-8,
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(list(settings.shrink_factors))
    method.SetSmoothingSigmasPerLevel(list(settings.smoothing_sigmas_mm))
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    return method


def _scanner_frame(fixed: sitk.Image) -> sitk.Euler3DTransform:
    """Identity (scanner coordinates) with the centre of rotation at the centre of the fixed image."""
    geo = sitk.CenteredTransformInitializer(
        fixed, fixed, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.GEOMETRY
    )
    tx = sitk.Euler3DTransform(geo)
    tx.SetTranslation((0.0, 0.0, 0.0))
    tx.SetRotation(0.0, 0.0, 0.0)
    return tx


def _head_mask(image: sitk.Image) -> sitk.Image:
    """Foreground (head) of a series: Otsu threshold, closed and hole-filled; the whole image when that fails."""
    try:
        mask = sitk.OtsuThreshold(image, 0, 1)
        mask = sitk.BinaryMorphologicalClosing(mask, [2, 2, 2])
        mask = sitk.BinaryFillhole(mask)
        stats = sitk.StatisticsImageFilter()
        stats.Execute(mask)
        if stats.GetSum() >= 0.02 * image.GetNumberOfPixels():
            return sitk.Cast(mask, sitk.sitkUInt8)
    except RuntimeError:
        pass
    full = sitk.Image(image.GetSize(), sitk.sitkUInt8) + 1
    full.CopyInformation(image)
    return full


def _coarsest(image: sitk.Image) -> float:
    return float(max(image.GetSpacing()))


def _inverse_about(tx: sitk.Euler3DTransform, centre: tuple[float, ...]) -> sitk.Euler3DTransform:
    """The inverse of a rigid ``tx``, as an Euler3DTransform about ``centre``."""
    r = np.asarray(tx.GetMatrix()).reshape(3, 3)
    c, t, c2 = (np.asarray(v, dtype=np.float64) for v in (tx.GetCenter(), tx.GetTranslation(), centre))
    inv = sitk.Euler3DTransform()
    inv.SetCenter([float(v) for v in c2])
    inv.SetMatrix([float(v) for v in r.T.ravel()])
    inv.SetTranslation([float(v) for v in r.T @ (c2 - c - t) + c - c2])
    return inv


def _parameters(tx: sitk.Euler3DTransform) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    p = tx.GetParameters()
    rot = tuple(float(math.degrees(v)) for v in p[:3])
    trans = tuple(float(v) for v in p[3:6])
    return rot, trans  # type: ignore[return-value]


def _rotation_angle_deg(euler_deg: tuple[float, float, float]) -> float:
    tx = sitk.Euler3DTransform()
    tx.SetRotation(*(math.radians(v) for v in euler_deg))
    m = np.asarray(tx.GetMatrix()).reshape(3, 3)
    return float(math.degrees(math.acos(max(-1.0, min(1.0, (np.trace(m) - 1.0) / 2.0)))))


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__
