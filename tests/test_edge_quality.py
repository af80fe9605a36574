"""Lesion boundaries at the reference resolution (#18 part 5): the model-grid map brought onto a finer reference
grid puts the threshold's contour where the model's logit field has it, and the boundary-distance metric."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from pipeline.preprocess import model_grid, probability_to_reference
from training.metrics.boundary import mean_surface_distance, surface_distances

THRESHOLD = 0.00044500583317130804  # the bundled model's (lesion-FROC) threshold: far in the sigmoid's tail
# log-odds per mm across the boundary: the bundled model's map has a median 1/mm at its threshold's contour on
# phantom seeds 0 and 3 (GE), an upper quartile of 1.9-3.1/mm; 4/mm stands for its sharper edges
SLOPE_PER_MM = 4.0
CENTRE = np.array([0.3, -0.2, 0.17])  # mm, off the voxel centres of both grids
RADIUS_MM = 6.0


def centres_mm(img: sitk.Image) -> np.ndarray:
    """(slice, row, column, 3) LPS mm of every voxel centre of ``img``."""
    size = img.GetSize()
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in size], indexing="ij"), axis=-1)
    d = np.asarray(img.GetDirection()).reshape(3, 3)
    pts = np.asarray(img.GetOrigin()) + (idx * np.asarray(img.GetSpacing())) @ d.T
    return pts.transpose(2, 1, 0, 3)


def sphere_case() -> tuple[np.ndarray, sitk.Image, sitk.Image, np.ndarray]:
    """(model-grid probability, model grid, reference, radius of every reference voxel centre in mm): a 0.5 mm
    reference, its 1 mm model grid (32 x 32 x 32), and a sphere whose log-odds fall linearly with the distance
    from its surface, crossing THRESHOLD exactly on the surface."""
    ref = sitk.Image([64, 64, 64], sitk.sitkFloat32)
    ref.SetSpacing([0.5, 0.5, 0.5])
    ref.SetOrigin([-16.0, -16.0, -16.0])
    grid = model_grid(ref, size=32, through_plane_mm=1.0)
    assert grid.GetSpacing() == pytest.approx((1.0, 1.0, 1.0))
    r_grid = np.linalg.norm(centres_mm(grid) - CENTRE, axis=-1)
    logit = SLOPE_PER_MM * (RADIUS_MM - r_grid) + math.log(THRESHOLD / (1.0 - THRESHOLD))
    prob = (1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
    return prob, grid, ref, np.linalg.norm(centres_mm(ref) - CENTRE, axis=-1)


def worst_misplacement_mm(mask: np.ndarray, r_ref: np.ndarray) -> float:
    """The largest distance (mm) from the sphere's surface of a reference voxel centre on the wrong side of the
    predicted boundary (0 when every voxel is on its side)."""
    wrong = mask != (r_ref <= RADIUS_MM)
    return float(np.abs(r_ref - RADIUS_MM)[wrong].max()) if wrong.any() else 0.0


def test_boundary_within_half_a_reference_voxel_of_the_sphere() -> None:
    """Thresholded on the 0.5 mm reference grid, the lesion's boundary lies within a quarter of a reference voxel
    (bound: 0.125 mm; half a voxel is 0.25 mm) of the sphere: measured 0.029 mm worst misplaced voxel centre,
    mean symmetric surface distance 0.042 mm to the voxelised sphere, volume 0.98 x.

    Before (the probability itself interpolated linearly, computed here as the old code did) it failed the same
    bound and half a voxel too: 0.41 mm worst, 0.34 mm mean surface distance, volume 1.16 x (grown outwards
    wherever the contour falls between model-grid points; at 8/mm log-odds: 0.76 mm, 0.46 mm, 1.25 x)."""
    prob, grid, ref, r_ref = sphere_case()
    truth = r_ref <= RADIUS_MM
    new = sitk.GetArrayFromImage(probability_to_reference(prob, grid, ref)) >= np.float32(THRESHOLD)
    img = sitk.GetImageFromArray(prob)
    img.CopyInformation(grid)
    old_map = sitk.Resample(img, ref, sitk.Transform(3, sitk.sitkIdentity), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    old = sitk.GetArrayFromImage(old_map) >= np.float32(THRESHOLD)

    bound = 0.25 * 0.5
    assert worst_misplacement_mm(new, r_ref) <= bound, worst_misplacement_mm(new, r_ref)
    assert mean_surface_distance(new, truth, (0.5, 0.5, 0.5)) < 0.1
    assert worst_misplacement_mm(old, r_ref) > 0.25  # beyond half a voxel, so beyond the bound too
    assert mean_surface_distance(old, truth, (0.5, 0.5, 0.5)) > 0.25


def test_model_grid_points_keep_their_probability() -> None:
    """On the model grid itself (the calibration's grid) the map comes back unchanged to float32 rounding:
    0 and 1 stay 0 and 1, the bundled threshold stays the threshold."""
    prob, grid, _, _ = sphere_case()
    prob[0, 0, :4] = (0.0, 1.0, THRESHOLD, 0.5)
    back = sitk.GetArrayFromImage(probability_to_reference(prob, grid, grid))
    assert back[0, 0, 0] == 0.0 and back[0, 0, 1] == 1.0
    # float32 log-odds carry ~7 digits: relative error ~ their rounding (4e-6 at log-odds -70, 3e-7 at the
    # threshold's -7.7); subnormal probabilities (< 1.2e-38) have fewer digits of their own
    near = prob >= 1e-6
    np.testing.assert_allclose(back[near], prob[near], rtol=1e-6)
    np.testing.assert_allclose(back, prob, rtol=1e-5, atol=1e-37)


def test_mean_surface_distance_of_shifted_cubes() -> None:
    """A 6-voxel cube and the same cube shifted by one voxel along x (2 mm spacing there), 152 surface voxels
    each. Of the first's: the trailing x face (36) is 2 mm from the other surface; on the leading x face (where
    the shifted cube is inside) the 4 x 4 interior is 1 mm (a ring of 12, from the y/z faces) or 2 mm (the
    central 4) away; all others lie on it. By symmetry the same for the other: mean (2 x (40 x 2 + 12)) / 304."""
    a = np.zeros((12, 12, 12), bool)
    a[3:9, 3:9, 3:9] = True
    b = np.roll(a, 1, axis=2)
    spacing = (1.0, 1.0, 2.0)
    to_b, to_a = surface_distances(a, b, spacing)
    for d in (to_b, to_a):
        assert d.size == 152
        assert np.count_nonzero(d == 2.0) == 40 and np.count_nonzero(d == 1.0) == 12
        assert np.count_nonzero(d == 0.0) == 100
    assert mean_surface_distance(a, b, spacing) == pytest.approx(2 * (40 * 2 + 12) / 304)
    assert mean_surface_distance(a, a, spacing) == 0.0
    assert mean_surface_distance(np.zeros_like(a), np.zeros_like(a), spacing) == 0.0
    assert mean_surface_distance(a, np.zeros_like(a), spacing) == math.inf
    with pytest.raises(ValueError):
        surface_distances(a, b[:, :, :5], spacing)
