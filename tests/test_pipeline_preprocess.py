"""pipeline.preprocess: model grid geometry, resampling round trip, normalisation, 2.5D stack, prepare_study."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage as ndi

from pipeline.preprocess import (
    PreparedStudy,
    grid_covers,
    model_grid,
    normalise_slices,
    prepare_study,
    probability_to_reference,
    resample_to_grid,
    stack_25d,
)
from pipeline.registration import ROLES
from training.phantom import generate_study
from training.phantom.types import SeriesKind


def image(size, spacing, direction=None, origin=(-90.0, -110.0, -60.0), pixel=sitk.sitkFloat32) -> sitk.Image:
    img = sitk.Image([int(v) for v in size], pixel)
    img.SetSpacing([float(v) for v in spacing])
    img.SetDirection([float(v) for v in (np.eye(3) if direction is None else np.asarray(direction, float)).ravel()])
    img.SetOrigin([float(v) for v in origin])
    return img


def rotation(angles_deg) -> np.ndarray:
    tx = sitk.Euler3DTransform()
    tx.SetRotation(*(math.radians(a) for a in angles_deg))
    return np.asarray(tx.GetMatrix()).reshape(3, 3)


def grid_direction(grid: sitk.Image) -> np.ndarray:
    return np.asarray(grid.GetDirection()).reshape(3, 3)


def check_common(grid: sitk.Image, ref: sitk.Image, size: int = 256) -> np.ndarray:
    d = grid_direction(grid)
    assert grid.GetSize()[:2] == (size, size)
    assert np.allclose(d.T @ d, np.eye(3), atol=1e-9)  # orthonormal
    assert np.linalg.det(d) == pytest.approx(1.0)  # a right-handed frame like an axial DICOM series
    assert d[2, 2] > 0.9 and d[0, 0] > 0.9 and d[1, 1] > 0.9  # slices axial, columns -> L, rows -> P
    sp = grid.GetSpacing()
    assert sp[0] == pytest.approx(sp[1])  # square pixels
    assert grid_covers(grid, ref)
    # the same centre as the reference
    c_ref = ref.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in ref.GetSize()])
    c_grid = grid.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in grid.GetSize()])
    assert np.allclose(c_ref, c_grid, atol=1e-6)
    return d


def test_grid_of_axial_reference() -> None:
    ref = image((240, 200, 150), (1.0, 1.1, 1.2))
    grid = model_grid(ref)
    d = check_common(grid, ref)
    assert np.allclose(d, np.eye(3))
    assert grid.GetSpacing()[0] == pytest.approx(240.0 / 256)  # FOV 240 x 220 mm: the larger side / 256
    assert grid.GetSize()[2] == 180 and grid.GetSpacing()[2] == pytest.approx(1.0)  # 150 x 1.2 mm
    assert grid.GetPixelID() == sitk.sitkUInt8 and not sitk.GetArrayViewFromImage(grid).any()


def test_grid_of_sagittal_reference() -> None:
    # a typical sagittal 3D series: columns A->P, rows S->I, slices R->L... stored here as L->R (-x)
    d_sag = np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    ref = image((256, 256, 176), (1.0, 1.0, 1.0), d_sag, origin=(80.0, -120.0, 100.0))
    grid = model_grid(ref, through_plane_mm=1.0)
    d = check_common(grid, ref)
    assert np.allclose(d, np.eye(3))  # an axial grid from a sagittal series
    # in-plane: the sagittal slice direction (176 mm, L-R) and columns (256 mm, A-P): 256 mm / 256
    assert grid.GetSpacing()[0] == pytest.approx(1.0)
    assert grid.GetSize()[2] == 256 and grid.GetSpacing()[2] == pytest.approx(1.0)  # rows (S-I) give the slices


def test_grid_of_oblique_reference() -> None:
    r = rotation((18.0, -7.0, 12.0))
    ref = image((200, 220, 90), (1.1, 1.1, 1.5), r, origin=(-100.0, -120.0, -40.0))
    grid = model_grid(ref, size=128, through_plane_mm=1.0)
    d = check_common(grid, ref, size=128)
    assert np.allclose(d, r, atol=1e-12)  # the reference's own (tilted) axes: slices parallel to its slices
    assert grid.GetSize()[2] == 135  # 90 x 1.5 mm
    # an oblique coronal-ish series whose axis closest to S-I is its row axis
    d_cor = rotation((5.0, 0.0, 10.0)) @ np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])
    ref2 = image((256, 200, 120), (0.9, 1.0, 1.6), d_cor)
    g2 = model_grid(ref2)
    d2 = check_common(g2, ref2)
    assert np.allclose(np.abs(d2[:, 2]), np.abs(d_cor[:, 1]))  # slices along the reference's rows
    assert g2.GetSpacing()[2] == pytest.approx(200.0 / round(200.0))


def smooth_field(img: sitk.Image) -> sitk.Image:
    """A smooth function of physical position (wavelengths >= 60 mm) sampled on ``img``."""
    size = img.GetSize()
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in size], indexing="ij"), axis=-1)
    d = np.asarray(img.GetDirection()).reshape(3, 3)
    pts = np.asarray(img.GetOrigin()) + (idx * np.asarray(img.GetSpacing())) @ d.T
    x, y, z = pts[..., 0], pts[..., 1], pts[..., 2]
    f = 100 + 40 * np.sin(x / 12.0) * np.cos(y / 15.0) + 20 * np.cos(z / 10.0)
    out = sitk.GetImageFromArray(f.transpose(2, 1, 0).astype(np.float32))
    out.CopyInformation(img)
    return out


def test_resample_round_trip_returns_the_reference_values() -> None:
    ref = smooth_field(image((48, 56, 40), (3.0, 3.0, 3.0), rotation((10.0, 5.0, -8.0))))
    grid = model_grid(ref, size=128, through_plane_mm=1.5)
    on_grid = resample_to_grid(ref, grid)
    assert on_grid.dtype == np.float32 and on_grid.shape == (grid.GetSize()[2], 128, 128)
    expected_grid = sitk.GetArrayFromImage(smooth_field(sitk.Cast(grid, sitk.sitkFloat32)))
    # grid points at least 1.5 voxels inside the reference (near its edge the interpolator holds the edge value)
    inside = ndi.binary_erosion(on_grid > 0, iterations=3)
    assert inside.mean() > 0.4
    assert np.abs(on_grid - expected_grid)[inside].max() < 4.0  # linear interpolation of 3 mm voxels
    # as a probability (the field / 200 lies in 0.2-0.8; its log-odds are interpolated, also smooth)
    back = probability_to_reference(on_grid / 200.0, grid, ref)
    assert back.GetSize() == ref.GetSize() and back.GetPixelID() == sitk.sitkFloat32
    assert np.allclose(back.GetOrigin(), ref.GetOrigin()) and np.allclose(back.GetDirection(), ref.GetDirection())
    a, b = sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(ref) / 200.0
    interior = np.zeros(a.shape, bool)
    interior[2:-2, 2:-2, 2:-2] = True
    err = np.abs(a - b)[interior]
    assert err.max() < 0.02 and err.mean() < 0.0025, (err.max(), err.mean())


def test_resample_applies_the_registration_transform() -> None:
    ref = image((64, 64, 64), (2.0, 2.0, 2.0), origin=(-64.0, -64.0, -64.0))
    arr = np.zeros((64, 64, 64), np.float32)
    arr[30:34, 30:34, 30:34] = 1.0  # a cube around (0, 0, 0) mm (indices 30..33 -> -4..2 mm)
    moving = sitk.GetImageFromArray(arr)
    moving.CopyInformation(ref)
    grid = model_grid(ref, size=64, through_plane_mm=2.0)
    tx = sitk.TranslationTransform(3, (10.0, 0.0, 0.0))  # reference point p -> moving point p + 10 mm in x
    plain = resample_to_grid(moving, grid, None, sitk.sitkNearestNeighbor)
    shifted = resample_to_grid(moving, grid, tx, sitk.sitkNearestNeighbor)
    assert plain.sum() == shifted.sum() == 64
    def com(v: np.ndarray) -> np.ndarray:
        return np.array(np.nonzero(v)).mean(axis=1)

    assert np.allclose(com(plain) - com(shifted), (0.0, 0.0, 5.0))  # 10 mm = 5 columns towards -x


def test_probability_to_reference_shape_check_and_values() -> None:
    ref = image((40, 40, 30), (3.0, 3.0, 4.0), np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]))
    grid = model_grid(ref, size=96, through_plane_mm=1.0)
    with pytest.raises(ValueError):
        probability_to_reference(np.zeros((3, 96, 96), np.float32), grid, ref)
    ones = np.ones(tuple(reversed(grid.GetSize())), np.float32)
    back = sitk.GetArrayFromImage(probability_to_reference(ones, grid, ref))
    assert np.allclose(back, 1.0)  # the grid covers the whole reference


@pytest.fixture(scope="module")
def phantom():
    return generate_study(7, "siemens", voxel_mm=3.0)


def test_normalisation_invariant_to_gain_and_offset(phantom) -> None:
    ref = phantom.series_of(phantom.reference_kind).image
    vol = sitk.GetArrayFromImage(ref).astype(np.float32)
    vol[0] = 0.0  # an empty slice (e.g. outside the field of view)
    base = normalise_slices(vol)
    assert base.dtype == np.float32 and base.shape == vol.shape
    assert base.min() >= 0.0 and base.max() <= 1.0
    assert not base[0].any()
    mid = base[vol.shape[0] // 2]
    assert (mid == 0).mean() > 0.2 and (mid >= 0.999).mean() > 0.001  # air -> 0, the brightest -> 1
    for gain, offset in ((3.0, 0.0), (3.0, 250.0), (0.5, -40.0)):
        out = normalise_slices(vol * gain + offset)
        assert np.allclose(out, base, atol=2e-5), (gain, offset, np.abs(out - base).max())
    # with a mask: statistics from the mask only, still gain/offset invariant, empty slice still zero
    mask = sitk.GetArrayFromImage(sitk.Resample(phantom.brain_mask, ref)) > 0
    with_mask = normalise_slices(vol, mask)
    assert np.allclose(normalise_slices(vol * 3 + 100, mask), with_mask, atol=2e-5)
    assert not with_mask[0].any()
    k = int(np.argmax(mask.sum(axis=(1, 2))))
    brain_vals = with_mask[k][mask[k]]
    assert np.percentile(brain_vals, 50) > 0.1 and (brain_vals >= 0.999).mean() < 0.02


def test_constant_and_tiny_slices() -> None:
    vol = np.zeros((3, 32, 32), np.float32)
    vol[1] = 5.0  # constant
    vol[2, 10, 10] = 7.0  # a single hot voxel on zeros: too little content to scale, stays zero
    out = normalise_slices(vol)
    assert not out[0].any() and not out[1].any() and not out[2].any()
    vol[2, 4:12, 4:12] = np.arange(64, dtype=np.float32).reshape(8, 8) + 10.0  # a small object on zeros
    out = normalise_slices(vol)
    assert out[2, 4:12, 4:12].min() == 0.0 and out[2, 4:12, 4:12].max() == pytest.approx(1.0)
    assert not out[2, 12:].any() and out[2, 7, 7] == pytest.approx((3 * 8 + 3 - 0.63) / (62.685 - 0.63), abs=1e-3)
    with pytest.raises(ValueError):
        normalise_slices(np.zeros((4, 4), np.float32))


def ramp(n: int, base: float, size: int = 8) -> np.ndarray:
    return (base + np.arange(n, dtype=np.float32))[:, None, None] * np.ones((1, size, size), np.float32)


def test_stack_shape_order_and_edge_padding() -> None:
    n = 7
    vols = {"t1_bravo_post": ramp(n, 0.0), "t1_cube_pre": ramp(n, 100.0), "t1_cube_post": ramp(n, 200.0),
            "flair": ramp(n, 300.0)}
    out = stack_25d(vols, ROLES)
    assert out.shape == (n, 20, 8, 8) and out.dtype == np.float32
    for i in range(n):
        for r, base in enumerate((0.0, 100.0, 200.0, 300.0)):
            for j, off in enumerate(range(-2, 3)):
                assert np.all(out[i, r * 5 + j] == base + min(max(i + off, 0), n - 1))
    # first centre slice: replicated edge 0, 0, 0, 1, 2
    assert [out[0, c, 0, 0] for c in range(5)] == [0, 0, 0, 1, 2]
    assert [out[n - 1, 15 + c, 0, 0] for c in range(5)] == [304, 305, 306, 306, 306]
    # a batch of centre slices equals the same rows of the full stack (lazy, bounded memory)
    assert np.array_equal(stack_25d(vols, ROLES, indices=range(2, 5)), out[2:5])
    assert np.array_equal(stack_25d(vols, ROLES, indices=[6, 0]), out[[6, 0]])
    # 3 slices per role, another role order
    small = stack_25d(vols, ("flair", "t1_bravo_post"), slices_per_role=3, indices=[3])
    assert [small[0, c, 0, 0] for c in range(6)] == [302, 303, 304, 2, 3, 4]


def test_stack_missing_roles_are_zeros_unscaled() -> None:
    n = 5
    vols = {"t1_bravo_post": None, "t1_cube_pre": ramp(n, 1.0), "flair": ramp(n, 10.0)}  # cube_post absent
    out = stack_25d(vols, ROLES)
    assert out.shape == (n, 20, 8, 8)
    assert not out[:, 0:5].any() and not out[:, 10:15].any()
    assert np.all(out[2, 5:10, 0, 0] == [1, 2, 3, 4, 5])  # present roles untouched (no dropout scaling here)
    assert np.all(out[2, 15:20, 0, 0] == [10, 11, 12, 13, 14])
    with pytest.raises(ValueError):
        stack_25d({"flair": None}, ROLES)
    with pytest.raises(ValueError):
        stack_25d(vols, ROLES, slices_per_role=4)
    with pytest.raises(ValueError):
        stack_25d({"flair": ramp(n, 0.0), "t1_cube_pre": ramp(n + 1, 0.0)}, ROLES)
    with pytest.raises(IndexError):
        stack_25d(vols, ROLES, indices=[n])


def test_prepare_study_on_phantom(phantom) -> None:
    ref_role = phantom.reference_kind.value
    images = {r: phantom.series_of(SeriesKind(r)).image for r in ROLES if r != "flair"}
    ref = images[ref_role]
    # true alignment is not needed for the mechanics: scanner coordinates (no transforms)
    prep = prepare_study(images, {}, ref_role, size=64, through_plane_mm=3.0)
    assert isinstance(prep, PreparedStudy)
    assert prep.roles == ROLES and prep.volumes["flair"] is None
    assert prep.present == tuple(r for r in ROLES if r != "flair")
    n = prep.n_slices
    for r in prep.present:
        v = prep.volumes[r]
        assert v is not None and v.shape == (n, 64, 64) and v.dtype == np.float32
        assert 0.0 <= v.min() and v.max() <= 1.0 and v.max() > 0.99
    # the reference on the grid is exactly the normalised resampled reference
    assert np.array_equal(prep.volumes[ref_role], normalise_slices(resample_to_grid(ref, prep.grid)))
    batches = list(prep.batches(4))
    assert [len(r) for r, _ in batches][:-1] == [4] * (len(batches) - 1)
    full = np.concatenate([b for _, b in batches])
    assert full.shape == (n, 20, 64, 64)
    assert not full[:, 15:20].any()  # flair missing
    assert np.array_equal(full, prep.stack())
    # a transform passed for a role is used
    shift = sitk.TranslationTransform(3, (6.0, 0.0, 0.0))
    moved = prepare_study(images, {"t1_cube_pre": shift}, ref_role, size=64, through_plane_mm=3.0)
    assert not np.array_equal(moved.volumes["t1_cube_pre"], prep.volumes["t1_cube_pre"])
    assert np.array_equal(moved.volumes[ref_role], prep.volumes[ref_role])
    with pytest.raises(ValueError):
        prepare_study(images, {}, "flair")
