"""Tests of SARRegistrationLib.spatial: warping, composition and velocity integration."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from helpers import one_torch_thread  # noqa: F401  (autouse fixture)
from SARRegistrationLib import spatial


def _image_2d(read_test_image) -> torch.Tensor:
    array = sitk.GetArrayFromImage(sitk.Shrink(read_test_image("brain_pd.nrrd"), [4, 4])).astype(np.float32)
    return torch.from_numpy(array / array.max())[None, None]  # (1, 1, 55, 46)


def _volume_3d(read_test_image) -> torch.Tensor:
    array = sitk.GetArrayFromImage(sitk.Shrink(read_test_image("brain3d_t1.nii.gz"), [4, 4, 4])).astype(np.float32)
    return torch.from_numpy(array / array.max())[None, None]  # (1, 1, 16, 32, 32)


def _constant_field(shape, shift) -> torch.Tensor:
    field = torch.zeros(1, len(shift), *shape)
    for axis, value in enumerate(shift):
        field[:, axis] = value
    return field


def test_identity_grid_holds_indices():
    grid = spatial.identity_grid((3, 4))
    assert grid.shape == (2, 3, 4)
    assert grid[0, 2, 1] == 2 and grid[1, 2, 1] == 1


def test_warp_integer_translation_is_exact_2d(read_test_image):
    image = _image_2d(read_test_image)
    shift = (3, -2)  # rows, columns
    warped = spatial.warp(image, _constant_field(image.shape[2:], shift))
    # pull back: warped[y, x] = image[y + 3, x - 2]
    expected = image[:, :, 3:, :-2]
    torch.testing.assert_close(warped[:, :, :-3, 2:], expected, atol=1e-5, rtol=0)
    assert (warped - image).abs().max() > 0.1  # it did move


def test_warp_integer_translation_is_exact_3d(read_test_image):
    volume = _volume_3d(read_test_image)
    shift = (1, -2, 3)  # z, y, x
    warped = spatial.warp(volume, _constant_field(volume.shape[2:], shift))
    expected = volume[:, :, 1:, :-2, 3:]
    torch.testing.assert_close(warped[:, :, :-1, 2:, :-3], expected, atol=1e-5, rtol=0)


def test_warp_axis_order_single_bright_voxel():
    image = torch.zeros(1, 1, 8, 9)
    image[0, 0, 5, 2] = 1.0
    warped = spatial.warp(image, _constant_field((8, 9), (1, -2)))  # sample at (y + 1, x - 2)
    assert torch.nonzero(warped[0, 0] > 0.999).tolist() == [[4, 4]]


def test_warp_identity_field_returns_the_image(read_test_image):
    for image in (_image_2d(read_test_image), _volume_3d(read_test_image)):
        ndims = image.dim() - 2
        warped = spatial.warp(image, torch.zeros(1, ndims, *image.shape[2:]))
        torch.testing.assert_close(warped, image, atol=1e-5, rtol=0)


def test_warp_batch_and_channels():
    image = torch.rand(3, 2, 8, 8)
    field = torch.zeros(3, 2, 8, 8)
    field[1, 1] = 1.0  # only the second sample moves, by one column
    warped = spatial.warp(image, field)
    torch.testing.assert_close(warped[0], image[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(warped[1, :, :, :-1], image[1, :, :, 1:], atol=1e-5, rtol=0)


def test_nearest_mode_keeps_label_values(read_test_image):
    labels = torch.from_numpy(sitk.GetArrayFromImage(read_test_image("brain_ventricles.nrrd")).astype(np.float32))
    labels = labels * 3.0 + (torch.arange(labels.shape[1]) > 100).float() * 7.0  # several label values
    labels = labels[None, None]
    rows, cols = spatial.identity_grid(labels.shape[2:])
    field = torch.stack([1.7 * torch.sin(cols / 9.0), 2.3 * torch.cos(rows / 11.0)])[None]
    warped = spatial.warp(labels, field, mode="nearest")
    assert set(torch.unique(warped).tolist()) <= set(torch.unique(labels).tolist())
    assert not torch.equal(warped, labels)
    linear = spatial.warp(labels, field)
    assert len(torch.unique(linear)) > len(torch.unique(labels))  # the default interpolates


def test_zeros_padding_mode_is_empty_outside():
    image = torch.ones(1, 1, 6, 6)
    warped = spatial.warp(image, _constant_field((6, 6), (0, 10)), padding_mode="zeros")
    assert warped.abs().max() == 0


@pytest.mark.parametrize("shape", [(20, 24), (8, 12, 10)])
def test_compose_translation_with_its_inverse_is_zero(shape):
    shift = (2.5, -1.25, 0.75)[-len(shape):]
    u = _constant_field(shape, shift)
    composed = spatial.compose(u, -u)
    interior = (slice(None), slice(None)) + tuple(slice(3, -3) for _ in shape)
    assert composed[interior].abs().max() < 1e-4


def test_compose_of_translations_adds_them():
    a, b = _constant_field((16, 16), (1.0, 2.0)), _constant_field((16, 16), (-0.5, 1.5))
    torch.testing.assert_close(spatial.compose(a, b)[..., 3:-3, 3:-3], (a + b)[..., 3:-3, 3:-3], atol=1e-4, rtol=0)


def test_integrate_zero_velocity_is_zero():
    for shape in ((16, 16), (8, 8, 8)):
        velocity = torch.zeros(2, len(shape), *shape)
        assert spatial.integrate_velocity(velocity).abs().max() == 0


@pytest.mark.parametrize("shape", [(24, 24), (12, 12, 12)])
def test_integrate_constant_velocity_is_that_translation(shape):
    shift = (0.8, -0.6, 0.3)[-len(shape):]
    velocity = _constant_field(shape, shift)
    displacement = spatial.integrate_velocity(velocity, steps=7)
    torch.testing.assert_close(displacement, velocity, atol=1e-4, rtol=0)


def test_integrate_velocity_is_invertible_by_negation():
    rows, cols = spatial.identity_grid((32, 32))
    velocity = torch.stack([1.5 * torch.sin(cols / 6.0), 1.5 * torch.cos(rows / 7.0)])[None]
    forward = spatial.integrate_velocity(velocity)
    backward = spatial.integrate_velocity(-velocity)
    residual = spatial.compose(forward, backward)[..., 4:-4, 4:-4]
    assert forward.abs().max() > 0.5
    assert residual.abs().max() < 0.1 * forward.abs().max()


def test_warp_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="cannot warp"):
        spatial.warp(torch.zeros(1, 1, 8, 8), torch.zeros(1, 2, 8, 9))
    with pytest.raises(ValueError, match="cannot warp"):
        spatial.warp(torch.zeros(1, 1, 8, 8), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="cannot warp"):
        spatial.warp(torch.zeros(1, 1, 4, 8, 8), torch.zeros(1, 2, 4, 8, 8))
    with pytest.raises(ValueError, match="expected a"):
        spatial.warp(torch.zeros(1, 8, 8), torch.zeros(1, 8, 8))
    with pytest.raises(ValueError, match="expected a"):
        spatial.spatial_ndims(torch.zeros(1, 1, 2, 2, 2, 2))


@pytest.mark.parametrize("shape, coarse", [((32, 24), (16, 12)), ((16, 16, 8), (8, 8, 4))])
def test_downsampled_translation_keeps_its_physical_length(shape, coarse):
    """A 2-voxel shift on the fine grid is a 1-voxel shift on a grid of half as many voxels."""
    displacement = torch.full((1, len(shape), *shape), 2.0)
    coarse_field = spatial.downsample_displacement(displacement, coarse)
    assert coarse_field.shape == (1, len(shape), *coarse)
    torch.testing.assert_close(coarse_field, torch.full_like(coarse_field, 1.0))


def test_downsampled_warp_matches_warp_then_downsample():
    """Warping on the loss grid approximates downsampling the full-resolution warp of a smooth image."""
    y, x = torch.meshgrid(torch.linspace(0, 3, 64), torch.linspace(0, 3, 48), indexing="ij")
    image = (torch.sin(y) * torch.cos(x))[None, None]
    displacement = torch.zeros(1, 2, 64, 48)
    displacement[:, 0] = 3.0 * torch.sin(x / 2)
    fine = spatial.downsample(spatial.warp(image, displacement), (32, 24))
    coarse = spatial.warp(spatial.downsample(image, (32, 24)), spatial.downsample_displacement(displacement, (32, 24)))
    assert (fine - coarse).abs()[:, :, 2:-2, 2:-2].max() < 0.02
    assert (fine - spatial.downsample(image, (32, 24))).abs().max() > 0.1  # the warp did something
