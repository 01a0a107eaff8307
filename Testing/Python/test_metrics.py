"""Tests of SARRegistrationLib.metrics against hand-computed cases and SimpleITK's filters."""

import math

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.spatial.distance import cdist

from SARRegistrationLib import metrics


def _square(shape=(24, 24), rows=slice(5, 15), cols=slice(2, 12)):
    mask = np.zeros(shape, dtype=np.uint8)
    mask[rows, cols] = 1
    return mask


def _ball(shape, centre, radius):
    grid = np.indices(shape)
    return (sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius ** 2).astype(np.uint8)


def _sitk_hausdorff(a, b, spacing):
    images = [sitk.GetImageFromArray(mask.astype(np.uint8)) for mask in (a, b)]
    for image in images:
        image.SetSpacing(tuple(reversed(spacing)))
    measure = sitk.HausdorffDistanceImageFilter()
    measure.Execute(*images)
    return measure.GetHausdorffDistance()


def _brute_force_surface_distances(a, b, spacing):
    """Independent reference: surface voxels by explicit face-neighbour test, distances by cdist."""
    def surface_points(mask):
        padded = np.pad(mask != 0, 1)
        inner = padded[(slice(1, -1),) * mask.ndim]
        all_neighbours_in = np.ones_like(inner)
        for axis in range(mask.ndim):
            for step in (-1, 1):
                all_neighbours_in &= np.roll(padded, step, axis)[(slice(1, -1),) * mask.ndim]
        return np.argwhere(inner & ~all_neighbours_in) * np.asarray(spacing)

    points_a, points_b = surface_points(a), surface_points(b)
    pairwise = cdist(points_a, points_b)
    return pairwise.min(axis=1), pairwise.min(axis=0)


# --- dice ---------------------------------------------------------------------------------------

def test_dice_hand_computed():
    a = np.array([[1, 1, 0, 0], [0, 1, 0, 0]])
    b = np.array([[0, 7, 7, 0], [0, 7, 0, 0]])  # any nonzero value is foreground
    # |A| = 3, |B| = 3, |A ∩ B| = 2
    assert metrics.dice(a, b) == pytest.approx(4 / 6)
    assert metrics.dice(a, a) == 1.0
    assert metrics.dice(a, 1 - a) == 0.0


def test_dice_matches_simpleitk_on_real_masks(read_test_image):
    reference = read_test_image("brain_ventricles.nrrd")
    floating = read_test_image("sample_floating_ventricles.nrrd")
    overlap = sitk.LabelOverlapMeasuresImageFilter()
    overlap.Execute(reference, floating)
    ours = metrics.dice(sitk.GetArrayFromImage(reference), sitk.GetArrayFromImage(floating))
    assert 0.0 < ours < 1.0
    assert ours == pytest.approx(overlap.GetDiceCoefficient(), abs=1e-12)


def test_dice_of_empty_masks_is_one():
    assert metrics.dice(np.zeros((4, 5)), np.zeros((4, 5))) == 1.0
    assert metrics.dice(np.zeros((4, 5)), _square((4, 5), slice(1, 2), slice(1, 2))) == 0.0


@pytest.mark.parametrize("function", [
    metrics.dice,
    lambda a, b: metrics.surface_distances(a, b, (1.0, 1.0)),
    lambda a, b: metrics.hausdorff95(a, b, (1.0, 1.0)),
    lambda a, b: metrics.overlap_metrics(a, b, (1.0, 1.0)),
])
def test_shape_mismatch_raises(function):
    with pytest.raises(ValueError, match="same shape"):
        function(np.ones((4, 5)), np.ones((5, 4)))


def test_spacing_must_match_dimension():
    with pytest.raises(ValueError, match="spacing"):
        metrics.hausdorff95(_square(), _square(), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        metrics.surface_distances(_square(), _square(), (1.0, 0.0))


# --- surface distances --------------------------------------------------------------------------

def test_square_shifted_along_x_with_anisotropic_spacing():
    # A 10x10 square moved 3 voxels along x (0.5 mm) with 2 mm rows: stepping in y never beats
    # the 1.5 mm shift, so every surface distance is known. Per direction, of the 36 surface voxels:
    # the trailing column (10) and the middle of the leading column (8) lie 1.5 mm away; the two
    # top/bottom voxels 1 and 2 columns in lie 1.0 and 0.5 mm away; the other 14 lie on B's surface.
    a = _square()
    b = np.roll(a, 3, axis=1)
    spacing = (2.0, 0.5)
    expected = np.sort([1.5] * 18 + [1.0] * 2 + [0.5] * 2 + [0.0] * 14)
    d_ab, d_ba = metrics.surface_distances(a, b, spacing)
    np.testing.assert_allclose(np.sort(d_ab), expected)
    np.testing.assert_allclose(np.sort(d_ba), expected)
    assert metrics.hausdorff95(a, b, spacing) == pytest.approx(1.5)
    assert metrics.mean_surface_distance(a, b, spacing) == pytest.approx((18 * 1.5 + 2 * 1.0 + 2 * 0.5) / 36)
    assert max(d_ab.max(), d_ba.max()) == pytest.approx(_sitk_hausdorff(a, b, spacing))


def test_identical_masks_are_zero_apart():
    a = _ball((20, 20, 20), (10, 10, 10), 6)
    assert metrics.overlap_metrics(a, a, (3.0, 1.0, 1.0)) == {"dice": 1.0, "hd95_mm": 0.0, "mad_mm": 0.0}


@pytest.mark.parametrize("shape, centre, radius, spacing, axis", [
    ((40, 40), (20, 18), 9, (0.7, 1.3), 1),
    ((20, 24, 24), (10, 12, 10), 6, (3.0, 1.0, 0.8), 2),
    ((20, 24, 24), (8, 12, 12), 5, (2.5, 1.0, 1.0), 0),
])
def test_shifted_disc_and_sphere(shape, centre, radius, spacing, axis):
    a = _ball(shape, centre, radius)
    b = np.roll(a, 3, axis=axis)
    d_ab, d_ba = metrics.surface_distances(a, b, spacing)
    # Each surface voxel of A has its shifted copy on B's surface, and the trailing pole has
    # nothing nearer: the Hausdorff distance is exactly the shift.
    shift_mm = 3 * spacing[axis]
    assert max(d_ab.max(), d_ba.max()) == pytest.approx(shift_mm)
    assert max(d_ab.max(), d_ba.max()) == pytest.approx(_sitk_hausdorff(a, b, spacing))
    ref_ab, ref_ba = _brute_force_surface_distances(a, b, spacing)
    np.testing.assert_allclose(d_ab, ref_ab)
    np.testing.assert_allclose(d_ba, ref_ba)
    pooled = np.concatenate([ref_ab, ref_ba])
    assert metrics.hausdorff95(a, b, spacing) == pytest.approx(np.percentile(pooled, 95))
    assert 0 < metrics.mean_surface_distance(a, b, spacing) == pytest.approx(pooled.mean())
    assert metrics.mean_surface_distance(a, b, spacing) < metrics.hausdorff95(a, b, spacing) <= shift_mm


def test_hausdorff_matches_simpleitk_on_real_2d_masks(read_test_image):
    reference = read_test_image("brain_ventricles.nrrd")
    floating = read_test_image("sample_floating_ventricles.nrrd")
    spacing = reference.GetSpacing()[::-1]
    a, b = sitk.GetArrayFromImage(reference), sitk.GetArrayFromImage(floating)
    d_ab, d_ba = metrics.surface_distances(a, b, spacing)
    measure = sitk.HausdorffDistanceImageFilter()
    measure.Execute(reference, floating)
    assert max(d_ab.max(), d_ba.max()) == pytest.approx(measure.GetHausdorffDistance())
    assert 0 < metrics.mean_surface_distance(a, b, spacing) < metrics.hausdorff95(a, b, spacing)


def test_hausdorff_matches_simpleitk_on_real_3d_mask(read_test_image):
    ventricles = read_test_image("brain3d_ventricles.nii.gz")
    spacing = ventricles.GetSpacing()[::-1]  # (3, 2, 2) mm
    a = sitk.GetArrayFromImage(ventricles)
    b = np.roll(a, (1, 2), axis=(0, 2))
    d_ab, d_ba = metrics.surface_distances(a, b, spacing)
    assert max(d_ab.max(), d_ba.max()) == pytest.approx(_sitk_hausdorff(a, b, spacing))
    result = metrics.overlap_metrics(a, b, spacing)
    assert 0 < result["dice"] < 1
    assert 0 < result["mad_mm"] < result["hd95_mm"] <= math.hypot(3.0, 4.0)


def test_empty_masks():
    mask = _square()
    empty = np.zeros_like(mask)
    spacing = (1.0, 1.0)
    assert metrics.hausdorff95(empty, empty, spacing) == 0.0
    assert metrics.mean_surface_distance(empty, empty, spacing) == 0.0
    assert metrics.hausdorff95(mask, empty, spacing) == math.inf
    assert metrics.mean_surface_distance(empty, mask, spacing) == math.inf
    d_ab, d_ba = metrics.surface_distances(mask, empty, spacing)
    assert d_ab.size == 36 and np.all(np.isinf(d_ab))
    assert d_ba.size == 0


def test_mask_touching_the_grid_edge_has_a_surface_there():
    full = np.ones((6, 6))
    d_ab, _ = metrics.surface_distances(full, full, (1.0, 1.0))
    assert d_ab.size == 20 and np.all(d_ab == 0)


# --- jacobian determinant -----------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(12, 10), (6, 8, 7)])
def test_jacobian_of_identity_is_one(shape):
    determinant = metrics.jacobian_determinant(np.zeros((len(shape), *shape)))
    assert determinant.shape == shape
    np.testing.assert_allclose(determinant, 1.0)
    assert metrics.folding_fraction(np.zeros((len(shape), *shape))) == 0.0


@pytest.mark.parametrize("shape", [(12, 10), (6, 8, 7)])
def test_jacobian_of_uniform_scaling(shape):
    grid = np.indices(shape, dtype=np.float64)
    np.testing.assert_allclose(metrics.jacobian_determinant(0.1 * grid), 1.1 ** len(shape))


@pytest.mark.parametrize("shape", [(12, 10), (6, 8, 7)])
def test_jacobian_pairs_channel_i_with_axis_i(shape):
    grid = np.indices(shape, dtype=np.float64)
    stretch = np.zeros_like(grid)
    stretch[0] = 0.5 * grid[0]  # stretches along axis 0: volume grows by 1.5
    np.testing.assert_allclose(metrics.jacobian_determinant(stretch), 1.5)
    shear = np.zeros_like(grid)
    shear[0] = 0.5 * grid[1]  # a shear keeps volume
    np.testing.assert_allclose(metrics.jacobian_determinant(shear), 1.0)


@pytest.mark.parametrize("shape", [(12, 10), (6, 8, 7), (1, 8, 7)])
def test_jacobian_of_a_general_linear_map_is_its_determinant(shape):
    """Every entry of the Jacobian counts (the expansion is written out by hand), and an axis of
    one voxel has no derivative: there the map's own entries along it do not count."""
    rng = np.random.default_rng(len(shape))
    ndims = len(shape)
    matrix = rng.uniform(-0.4, 0.4, (ndims, ndims))
    grid = np.indices(shape, dtype=np.float64)
    displacement = np.tensordot(matrix, grid, axes=1)  # u(x) = M x: the Jacobian is I + M
    seen = np.eye(ndims) + matrix * [n > 1 for n in shape]
    np.testing.assert_allclose(metrics.jacobian_determinant(displacement), np.linalg.det(seen))


def test_jacobian_of_millimetre_field_uses_spacing():
    spacing = (3.0, 2.0, 0.5)
    grid = np.indices((5, 6, 7), dtype=np.float64)
    displacement_mm = 0.1 * grid * np.reshape(spacing, (3, 1, 1, 1))
    np.testing.assert_allclose(metrics.jacobian_determinant(displacement_mm, spacing), 1.1 ** 3)
    assert not np.allclose(metrics.jacobian_determinant(displacement_mm), 1.1 ** 3)


def test_folding_fraction_of_a_reflection_is_one():
    grid = np.indices((10, 12), dtype=np.float64)
    mirror = np.zeros_like(grid)
    mirror[1] = 11 - 2 * grid[1]  # x -> 11 - x
    np.testing.assert_allclose(metrics.jacobian_determinant(mirror), -1.0)
    assert metrics.folding_fraction(mirror) == 1.0


@pytest.mark.parametrize("shape", [(20, 20), (8, 20, 20)])
def test_folding_fraction_of_a_local_flip(shape):
    grid = np.indices(shape, dtype=np.float64)
    displacement = np.zeros_like(grid)
    region = (Ellipsis, slice(8, 12), slice(8, 12))
    # Inside the region x -> 19 - x along the last axis; outside the identity.
    displacement[-1][region] = 19 - 2 * grid[-1][region]
    fraction = metrics.folding_fraction(displacement)
    assert 0.0 < fraction < 0.25
    assert fraction == pytest.approx(np.mean(metrics.jacobian_determinant(displacement) <= 0))


@pytest.mark.parametrize("shape", [(3, 8, 8), (2, 8), (2, 4, 4, 4), (8,)])
def test_jacobian_rejects_mismatched_field(shape):
    with pytest.raises(ValueError, match="displacement"):
        metrics.jacobian_determinant(np.zeros(shape))


def test_label_overlap_metrics_measure_each_label_as_its_own_mask():
    rng = np.random.default_rng(0)
    reference = np.zeros((30, 40, 50), np.uint16)
    reference[2:10, 5:20, 5:25] = 1
    reference[12:28, 20:38, 10:45] = 700
    reference[0:4, 0:6, 44:50] = 3  # touches the edge of the grid
    warped = np.roll(reference, (1, -2, 1), axis=(0, 1, 2))
    warped[rng.random(warped.shape) < 0.01] = 0
    spacing = (3.0, 1.0, 1.5)
    result = metrics.label_overlap_metrics(reference, warped, spacing)
    assert set(result["labels"]) == {"1", "3", "700"}
    for label in (1, 3, 700):  # measured within a box around the label, as on the whole grid
        assert result["labels"][str(label)] == pytest.approx(
            metrics.overlap_metrics(reference == label, warped == label, spacing))
    for name in ("dice", "hd95_mm", "mad_mm"):
        assert result[name] == pytest.approx(np.mean([values[name] for values in result["labels"].values()]))


def test_label_overlap_metrics_of_a_label_missing_from_one_map():
    reference = np.zeros((20, 20), np.int32)
    reference[2:8, 2:8], reference[10:18, 10:18] = 1, 2
    warped = np.where(reference == 2, 0, reference)
    result = metrics.label_overlap_metrics(reference, warped, (1.0, 1.0))
    assert result["labels"]["1"]["dice"] == 1.0 and result["labels"]["2"]["dice"] == 0.0
    assert result["labels"]["2"]["hd95_mm"] == np.inf and result["dice"] == 0.5
    # Only the labels asked for; one absent from both maps is left out.
    assert set(metrics.label_overlap_metrics(reference, warped, (1.0, 1.0), np.array([1, 5]))["labels"]) == {"1"}


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float32])
def test_label_values_are_the_non_zero_values(dtype):
    labels = np.zeros((5, 6), dtype)
    labels[0, 0], labels[1, 1], labels[2, 2] = 4, 2, 4
    if dtype == np.int16:
        labels[3, 3] = -1
    assert metrics.label_values(labels).tolist() == ([-1, 2, 4] if dtype == np.int16 else [2, 4])


def test_surface_measures_within_the_masks_box_equal_those_on_the_whole_grid():
    grid = np.indices((40, 50, 60)).astype(float)
    a = ((grid - np.array([20, 30, 40])[:, None, None, None]) ** 2).sum(axis=0) < 8 ** 2
    b = np.roll(a, (2, -1, 3), axis=(0, 1, 2))
    b[0:3, 0:4, :] = True  # a part on the grid's edge
    spacing = (2.0, 1.0, 0.5)
    distances = np.concatenate(metrics.surface_distances(a, b, spacing))  # on the whole grid
    assert metrics.hausdorff95(a, b, spacing) == pytest.approx(np.percentile(distances, 95))
    assert metrics.mean_surface_distance(a, b, spacing) == pytest.approx(distances.mean())
