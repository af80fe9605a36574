"""pipeline.lesions: hand-computed geometry, 26-connectivity, ordering, counts, and a phantom's planted truth."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from pipeline.lesions import Lesion, LesionResult, find_lesions, in_plane_diameters


def _rotation() -> np.ndarray:
    """An oblique, right-handed rotation (columns = LPS directions of the x, y, z index axes)."""
    axis = np.array([1.0, 0.5, 0.2]) / np.linalg.norm([1.0, 0.5, 0.2])
    angle = 0.4
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * k @ k


def _image(array: np.ndarray, spacing=(1.0, 1.0, 1.0), direction=None, origin=(0.0, 0.0, 0.0)) -> sitk.Image:
    img = sitk.GetImageFromArray(array.astype(np.float32))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(tuple(np.asarray(direction).ravel()))
    return img


def test_cube_anisotropic_oblique_volume_centroid_diameter():
    spacing = (0.7, 1.3, 2.5)  # x, y, z
    rot = _rotation()
    origin = (-12.0, 30.5, 7.25)
    arr = np.zeros((9, 10, 11))
    arr[2:5, 3:6, 4:7] = 0.9  # z 2..4, y 3..5, x 4..6
    arr[3, 4, 5] = 0.95
    result = find_lesions(_image(arr, spacing, rot, origin), 0.5)

    assert isinstance(result, LesionResult)
    assert result.count_all == 1
    (les,) = result.lesions
    assert isinstance(les, Lesion)
    assert les.number == 1 and les.voxel_count == 27
    assert les.volume_mm3 == pytest.approx(27 * 0.7 * 1.3 * 2.5)
    # centre voxel (x, y, z) = (5, 4, 3): LPS = origin + R @ (idx * spacing)
    expected = np.asarray(origin) + rot @ (np.array([5, 4, 3]) * np.asarray(spacing))
    np.testing.assert_allclose(les.centroid_lps_mm, expected, atol=1e-9)
    # space diagonal between opposite corner voxel centres: 2 steps along each axis
    assert les.max_diameter_mm == pytest.approx(math.sqrt((2 * 0.7) ** 2 + (2 * 1.3) ** 2 + (2 * 2.5) ** 2))
    assert les.max_probability == pytest.approx(0.95)
    assert les.mean_probability == pytest.approx((26 * 0.9 + 0.95) / 27)
    assert les.bbox_index == ((2, 5), (3, 6), (4, 7))
    assert result.total_volume_mm3 == pytest.approx(les.volume_mm3)
    assert result.threshold == 0.5

    labels = result.labels
    assert labels.GetPixelID() == sitk.sitkUInt16
    assert labels.GetSize() == (11, 10, 9)
    np.testing.assert_allclose(labels.GetDirection(), rot.ravel())
    assert labels.GetOrigin() == pytest.approx(origin)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labels), (arr >= 0.5).astype(np.uint16))


def test_threshold_is_inclusive():
    arr = np.zeros((3, 3, 3))
    arr[1, 1, 1] = 0.76
    assert find_lesions(_image(arr), 0.76).count_all == 1
    assert find_lesions(_image(arr), 0.7600001).count_all == 0


def test_corner_touching_blobs_are_one_lesion():
    arr = np.zeros((6, 6, 6))
    arr[0:2, 0:2, 0:2] = 1.0
    arr[2:4, 2:4, 2:4] = 1.0  # touches the first block only at the corner (1,1,1)-(2,2,2)
    result = find_lesions(_image(arr), 0.5)
    assert result.count_all == 1
    assert result.lesions[0].voxel_count == 16
    # diameter: voxel centres (0,0,0) .. (3,3,3)
    assert result.lesions[0].max_diameter_mm == pytest.approx(3 * math.sqrt(3))


def test_ordering_by_decreasing_volume_and_counts():
    arr = np.zeros((20, 20, 20))
    arr[0, 0, 0] = 1.0  # 1 voxel: 8 mm^3 at 2 mm
    arr[5:7, 5:7, 5:7] = 1.0  # 8 voxels: 64 mm^3
    arr[10:13, 10:13, 10:13] = 1.0  # 27 voxels
    arr[17, 17, 17:19] = 1.0  # 2 voxels: 16 mm^3
    arr[0, 19, 19] = 1.0  # 1 voxel, after arr[0,0,0] in raster order
    result = find_lesions(_image(arr, (2.0, 2.0, 2.0)), 0.5)
    assert [les.voxel_count for les in result.lesions] == [27, 8, 2, 1, 1]
    assert [les.number for les in result.lesions] == [1, 2, 3, 4, 5]
    assert result.count_all == 5
    assert result.count_ge_10mm3 == 3  # 216, 64, 16 >= 10; 8, 8 < 10
    assert result.total_volume_mm3 == pytest.approx(39 * 8.0)
    labels = sitk.GetArrayFromImage(result.labels)
    assert labels[11, 11, 11] == 1 and labels[5, 5, 5] == 2 and labels[17, 17, 18] == 3
    assert labels[0, 0, 0] == 4 and labels[0, 19, 19] == 5  # equal volumes: raster order
    # the 10 mm^3 limit is inclusive and configurable
    assert find_lesions(_image(arr, (2.0, 2.0, 2.0)), 0.5, min_volume_mm3_for_count=16.0).count_ge_10mm3 == 3
    assert find_lesions(_image(arr, (2.0, 2.0, 2.0)), 0.5, min_volume_mm3_for_count=16.1).count_ge_10mm3 == 2


def test_no_lesions():
    result = find_lesions(_image(np.full((4, 5, 6), 0.2)), 0.5)
    assert result.count_all == 0 and result.count_ge_10mm3 == 0 and result.lesions == ()
    assert result.total_volume_mm3 == 0.0
    assert not sitk.GetArrayFromImage(result.labels).any()


def test_diameter_of_flat_and_large_components_matches_brute_force():
    rng = np.random.default_rng(3)
    arr = np.zeros((12, 30, 30))
    arr[4, 2:25, 3:20] = 1.0  # flat plate: degenerate convex hull input
    ball = np.linalg.norm(np.indices((12, 30, 30)) - np.array([8, 15, 15])[:, None, None, None], axis=0) <= 3.5
    arr[ball] = 1.0
    arr[rng.random(arr.shape) < 0.002] = 1.0
    img = _image(arr, (0.9, 1.1, 1.7), _rotation(), (3.0, -4.0, 5.0))
    result = find_lesions(img, 0.5)
    labels = sitk.GetArrayFromImage(result.labels)
    for les in result.lesions:
        idx = np.argwhere(labels == les.number)
        pts = np.array([img.TransformContinuousIndexToPhysicalPoint(tuple(map(float, p[::-1]))) for p in idx])
        d = np.sqrt(((pts[:, None, :] - pts[None, :, :]) ** 2).sum(-1)).max() if len(pts) > 1 else 0.0
        assert les.max_diameter_mm == pytest.approx(d, abs=1e-9)
        np.testing.assert_allclose(les.centroid_lps_mm, pts.mean(axis=0), atol=1e-9)


def test_phantom_truth_volumes_exact():
    from training.phantom import generate_study

    study = generate_study(1, vendor="ge", voxel_mm=3.0, distractors=False,
                           missing=("t1_cube_pre", "t1_cube_post", "flair"))  # 3 separate planted lesions
    truth = sitk.Cast(study.label > 0, sitk.sitkFloat32)
    result = find_lesions(truth, 0.5)
    truth_by_volume = sorted(study.lesions, key=lambda t: -t.volume_mm3)
    truth_labels = sitk.GetArrayFromImage(study.label)
    labels = sitk.GetArrayFromImage(result.labels)
    assert result.count_all == len(study.lesions) == 3
    assert result.total_volume_mm3 == pytest.approx(sum(t.volume_mm3 for t in study.lesions))
    assert result.count_ge_10mm3 == sum(1 for t in study.lesions if t.volume_mm3 >= 10.0)
    for les, t in zip(result.lesions, truth_by_volume):
        assert les.volume_mm3 == t.volume_mm3  # exactly: voxels x voxel volume of the same grid
        assert np.array_equal(labels == les.number, truth_labels == t.label)
        np.testing.assert_allclose(les.centroid_lps_mm, t.centroid_lps_mm, atol=1e-6)
        assert les.max_probability == 1.0 and les.mean_probability == 1.0


def test_in_plane_diameter_of_a_rectangle_with_anisotropic_pixels():
    """A 5 x 9 pixel rectangle (rows x cols) at 0.5 x 1.2 mm: the long axis is its diagonal between pixel centres,
    the short axis the longest extent across it, perpendicular, both ends on one line."""
    mask = np.zeros((3, 12, 14), dtype=bool)
    mask[1, 2:7, 3:12] = True
    mask[2, 5, 5] = True  # a smaller slice: not the one where the lesion is longest
    d = in_plane_diameters(mask, (0.5, 1.2))
    assert d.slice_index == 1
    assert d.long_axis_mm == pytest.approx(math.hypot(4 * 0.5, 8 * 1.2))
    assert {d.long_axis[0], d.long_axis[1]} in ({(2.0, 3.0), (6.0, 11.0)}, {(6.0, 3.0), (2.0, 11.0)})
    assert d.short_axis is not None
    (r0, c0), (r1, c1) = d.short_axis
    (a0, b0), (a1, b1) = d.long_axis
    assert (r1 - r0) * 0.5 * (a1 - a0) * 0.5 + (c1 - c0) * 1.2 * (b1 - b0) * 1.2 == pytest.approx(0, abs=1e-9)
    assert d.short_axis_mm == pytest.approx(math.hypot((r1 - r0) * 0.5, (c1 - c0) * 1.2))
    assert 0 < d.short_axis_mm < d.long_axis_mm
    for r, c in d.short_axis:  # inside the rectangle's pixel centres (with the half-strip tolerance)
        assert 2 - 0.5 <= r <= 6 + 0.5 and 3 - 0.5 <= c <= 11 + 0.5


def test_in_plane_diameter_of_a_disc_matches_brute_force_and_lies_on_the_lesion():
    yy, xx = np.mgrid[:41, :41]
    disc = (yy - 20) ** 2 + ((xx - 20) * 0.8) ** 2 <= 15**2  # an ellipse, 64+ boundary pixels: the hull path
    mask = disc[None]
    d = in_plane_diameters(mask, (1.0, 1.0))
    points = np.argwhere(disc).astype(float)
    brute = max(np.hypot(*(p - q)) for p in points[::7] for q in points)  # sample vs all: a lower bound
    assert d.long_axis_mm >= brute - 1e-9
    assert d.long_axis_mm == pytest.approx(np.hypot(*np.subtract(*d.long_axis)))
    assert all(disc[int(r), int(c)] for r, c in d.long_axis)
    # the short axis: across the long axis at one position along it, so at most the lesion's whole width across
    # it, and (a convex lesion) within two pixels of that width
    u = np.subtract(*d.long_axis) / d.long_axis_mm
    width = np.ptp(points @ np.array([-u[1], u[0]]))
    assert width - 2.0 <= d.short_axis_mm <= width + 1e-9


def test_in_plane_diameter_of_one_voxel_and_of_a_line():
    one = np.zeros((2, 3, 3), dtype=bool)
    one[1, 1, 2] = True
    d = in_plane_diameters(one, (0.9, 0.9))
    assert (d.slice_index, d.long_axis_mm, d.long_axis, d.short_axis_mm, d.short_axis) == \
        (1, 0.0, ((1.0, 2.0), (1.0, 2.0)), 0.0, None)
    line = np.zeros((1, 3, 6), dtype=bool)
    line[0, 1, 1:5] = True
    d = in_plane_diameters(line, (1.0, 2.0))
    assert d.long_axis_mm == pytest.approx(6.0) and d.short_axis is None
    with pytest.raises(ValueError, match="non-empty"):
        in_plane_diameters(np.zeros((2, 2, 2), dtype=bool), (1.0, 1.0))


def test_find_lesions_in_plane_diameter_is_in_full_image_indices():
    arr = np.zeros((6, 20, 20))
    arr[3, 10:13, 4:15] = 0.9  # 3 x 11 pixels on slice 3
    arr[2, 11, 8] = 0.9
    (les,) = find_lesions(_image(arr, (0.5, 1.0, 2.0)), 0.5).lesions
    assert les.in_plane.slice_index == 3
    ends = sorted(les.in_plane.long_axis)
    assert ends in ([(10.0, 4.0), (12.0, 14.0)], [(10.0, 14.0), (12.0, 4.0)])
    assert les.in_plane.long_axis_mm == pytest.approx(math.hypot(2 * 1.0, 10 * 0.5))
