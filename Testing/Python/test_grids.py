"""Tests of SARRegistrationLib.grids: the working grid's size, extent and axes."""

import numpy as np
import pytest
import SimpleITK as sitk

from helpers import corner_points, rotation_2d, rotation_3d, with_geometry
from SARRegistrationLib import grids

# What a generator of four scales (the shipped channels) needs: it halves the grid three times.
MULTIPLE = 8


GEOMETRIES = {
    2: ((12.5, -30.25), (0.7, 1.3), rotation_2d(30.0)),
    3: ((12.5, -30.25, 7.0), (0.7, 1.3, 2.1), rotation_3d(30.0, -20.0)),
}


@pytest.mark.parametrize("size, max_size", [((181, 217), 64), ((217, 181), 64), ((128, 128, 62), 32),
                                            ((61, 73), 32), ((10, 12), 64), ((300, 40, 20), 128)])
def test_working_grid_size_and_extent(size, max_size):
    ndims = len(size)
    origin, spacing, direction = GEOMETRIES[ndims]
    reference = with_geometry(sitk.Image(list(size), sitk.sitkUInt8), origin, spacing, direction)

    grid = grids.working_grid(reference, max_size, MULTIPLE)

    assert all(n % MULTIPLE == 0 and n > 0 for n in grid.GetSize())
    assert max(grid.GetSize()) <= max(max_size, int(np.ceil(max(size) / 8) * 8))
    if max(size) >= max_size:
        assert max(grid.GetSize()) <= max_size
    np.testing.assert_allclose(grid.GetDirection(), direction)
    np.testing.assert_allclose(corner_points(grid), corner_points(reference), atol=1e-9)


def test_working_grid_downsamples_the_largest_axis_to_max_size():
    reference = sitk.Image([181, 217], sitk.sitkUInt8)
    assert grids.working_grid(reference, 64, MULTIPLE).GetSize() == (56, 64)


@pytest.mark.parametrize("size, max_size", [((187, 150), 96), ((281, 100), 160), ((273, 40), 192)])
def test_working_grid_never_exceeds_max_size(size, max_size):
    grid = grids.working_grid(sitk.Image(list(size), sitk.sitkUInt8), max_size, MULTIPLE)
    assert max(grid.GetSize()) <= max_size


def test_working_grid_keep_axes_keeps_the_slice_count():
    origin, spacing, direction = GEOMETRIES[3]
    reference = with_geometry(sitk.Image([128, 100, 13], sitk.sitkUInt8), origin, spacing, direction)

    grid = grids.working_grid(reference, 32, MULTIPLE, keep_axes=(2,))

    # 89.6 x 130 mm in-plane: y gets 32 voxels of 4.06 mm, x 22 of them, rounded up to 24.
    assert grid.GetSize() == (24, 32, 13)
    assert grid.GetSpacing()[2] == pytest.approx(spacing[2])
    np.testing.assert_allclose(corner_points(grid), corner_points(reference), atol=1e-9)


def test_working_grid_of_thick_slices_is_nearly_isotropic():
    # 0.5 x 0.5 x 5 mm, 512 x 512 x 30: 256 x 256 x 150 mm. A 64-voxel grid has 4 mm voxels in-plane;
    # the 30 slices stay 30 (rounded up to 32), not shrunk to 8 as a per-voxel scaling would.
    reference = with_geometry(sitk.Image([512, 512, 30], sitk.sitkUInt8), (0.0, 0.0, 0.0), (0.5, 0.5, 5.0),
                              rotation_3d(0.0, 0.0))
    grid = grids.working_grid(reference, 64, MULTIPLE)
    assert grid.GetSize() == (64, 64, 32)
    np.testing.assert_allclose(grid.GetSpacing(), (4.0, 4.0, 150.0 / 32))
    np.testing.assert_allclose(corner_points(grid), corner_points(reference), atol=1e-9)


@pytest.mark.parametrize("ndims", [2, 3])
def test_normalised_map_takes_grid_points_to_the_other_grids_through_the_transform(ndims):
    """``q = L p + b`` agrees with SimpleITK at random points: an oblique, anisotropic grid mapped
    through an affine transform onto another oblique grid (and identity onto itself)."""
    origin, spacing, direction = GEOMETRIES[ndims]
    source = with_geometry(sitk.Image([9, 11, 7][:ndims], sitk.sitkFloat32), origin, spacing, direction)
    target = with_geometry(sitk.Image([14, 6, 10][:ndims], sitk.sitkFloat32), np.add(origin, 3.5),
                           np.multiply(spacing, 1.7), rotation_2d(-15.0) if ndims == 2 else rotation_3d(-15.0, 25.0))
    transform = sitk.AffineTransform(ndims)
    transform.SetMatrix((np.eye(ndims) * 1.1 + 0.05).ravel().tolist())
    transform.SetTranslation([2.0, -1.0, 0.5][:ndims])
    transform.SetCenter(source.TransformContinuousIndexToPhysicalPoint([4.0] * ndims))
    linear, offset = grids.normalised_map(source, target, transform)
    identity_linear, identity_offset = grids.normalised_map(source, source)
    assert np.allclose(identity_linear, np.eye(ndims)) and np.allclose(identity_offset, 0)
    source_size, target_size = np.array(source.GetSize()[::-1]) - 1, np.array(target.GetSize()[::-1]) - 1
    for p in np.random.default_rng(0).uniform(-1.2, 1.2, size=(5, ndims)):
        index = ((p + 1) / 2 * source_size)[::-1]
        point = transform.TransformPoint(source.TransformContinuousIndexToPhysicalPoint(index.tolist()))
        expected = np.array(target.TransformPhysicalPointToContinuousIndex(point))[::-1] / target_size * 2 - 1
        assert np.allclose(linear @ p + offset, expected, atol=1e-9)
