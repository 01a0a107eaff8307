"""Tests of SARRegistrationLib.imageio: reading, checking and normalising images."""

import numpy as np
import pytest
import SimpleITK as sitk

from helpers import rotation_2d, rotation_3d, with_geometry
from SARRegistrationLib import imageio
from SARRegistrationLib.errors import InputImageError, SARError


def _ramp(shape, dtype=np.float32):
    return (np.arange(int(np.prod(shape))).reshape(shape) % 251).astype(dtype)


GEOMETRIES = {
    2: ((12.5, -30.25), (0.7, 1.3), rotation_2d(30.0)),
    3: ((12.5, -30.25, 7.0), (0.7, 1.3, 2.1), rotation_3d(30.0, -20.0)),
}


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz", ".mha"])
@pytest.mark.parametrize("ndims", [2, 3])
def test_read_image_keeps_geometry(tmp_path, suffix, ndims):
    origin, spacing, direction = GEOMETRIES[ndims]
    array = _ramp((6, 7) if ndims == 2 else (5, 6, 7))
    image = with_geometry(sitk.GetImageFromArray(array), origin, spacing, direction)
    path = tmp_path / f"image{suffix}"
    sitk.WriteImage(image, str(path))

    read = imageio.read_image(path)

    assert read.GetDimension() == ndims
    assert read.GetSize() == image.GetSize()
    np.testing.assert_allclose(read.GetOrigin(), origin, atol=1e-4)
    np.testing.assert_allclose(read.GetSpacing(), spacing, atol=1e-5)
    np.testing.assert_allclose(read.GetDirection(), direction, atol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read), array)


def test_read_png_keeps_spacing_and_values(tmp_path):
    array = _ramp((9, 11), np.uint8)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.5, 0.25))
    path = tmp_path / "image.png"
    sitk.WriteImage(image, str(path))

    read = imageio.read_image(path)

    assert read.GetDimension() == 2 and read.GetNumberOfComponentsPerPixel() == 1
    np.testing.assert_allclose(read.GetSpacing(), (0.5, 0.25))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read), array)


def test_equal_channel_rgb_png_is_read_as_one_channel(tmp_path):
    grey = _ramp((10, 12), np.uint8)
    rgb = sitk.GetImageFromArray(np.stack([grey, grey, grey], axis=-1), isVector=True)
    path = tmp_path / "grey_as_rgb.png"
    sitk.WriteImage(rgb, str(path))
    assert sitk.ReadImage(str(path)).GetNumberOfComponentsPerPixel() == 3

    read = imageio.read_image(path, "reference")

    assert read.GetNumberOfComponentsPerPixel() == 1
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read), grey)


def test_colour_png_is_rejected(tmp_path):
    grey = _ramp((10, 12), np.uint8)
    rgb = sitk.GetImageFromArray(np.stack([grey, grey, 255 - grey], axis=-1), isVector=True)
    path = tmp_path / "colour.png"
    sitk.WriteImage(rgb, str(path))

    with pytest.raises(InputImageError, match="floating image has 3 components"):
        imageio.read_image(path, "floating image")


def test_read_image_missing_and_unreadable_files(tmp_path):
    with pytest.raises(InputImageError, match="reference file .*nothing.nrrd.* does not exist"):
        imageio.read_image(tmp_path / "nothing.nrrd", "reference")
    garbage = tmp_path / "garbage.nrrd"
    garbage.write_bytes(b"this is not an image\n" * 10)
    with pytest.raises(InputImageError, match="could not be read as an image"):
        imageio.read_image(garbage, "reference")


def test_check_image_rejects_4d():
    image = sitk.Image([3, 3, 3, 3], sitk.sitkFloat32)
    image[1, 1, 1, 1] = 1.0
    with pytest.raises(InputImageError, match="reference is 4D; SAR registers 2D images and 3D volumes"):
        imageio.check_image(image, "reference")


def test_check_image_rejects_empty():
    with pytest.raises(InputImageError, match=r"floating image is empty \(size \(0, 5\)\)"):
        imageio.check_image(sitk.Image([0, 5], sitk.sitkFloat32), "floating image")


def test_check_image_rejects_constant_but_allows_constant_masks():
    constant = sitk.GetImageFromArray(np.full((6, 7), 3.0, np.float32))
    with pytest.raises(InputImageError, match="reference is constant .*3.0"):
        imageio.check_image(constant, "reference")
    assert imageio.check_image(constant, "mask", allow_constant=True) is not None


def test_check_image_rejects_nan_and_infinity():
    array = _ramp((6, 7))
    array[2, 3] = np.nan
    array[4, 4] = np.inf
    with pytest.raises(InputImageError, match="reference has 2 NaN or infinite voxels"):
        imageio.check_image(sitk.GetImageFromArray(array), "reference")


def test_check_image_errors_are_sar_errors():
    with pytest.raises(SARError):
        imageio.check_image(sitk.Image([0, 5], sitk.sitkUInt8))


def test_check_pair_rejects_2d_against_3d():
    image_2d = sitk.GetImageFromArray(_ramp((6, 7)))
    image_3d = sitk.GetImageFromArray(_ramp((4, 6, 7)))
    imageio.check_pair(image_2d, image_2d)
    imageio.check_pair(image_3d, image_3d)
    with pytest.raises(InputImageError, match="reference is 2D but the floating image is 3D"):
        imageio.check_pair(image_2d, image_3d)
    with pytest.raises(InputImageError, match="reference is 3D but the floating image is 2D"):
        imageio.check_pair(image_3d, image_2d)


def test_normalise_intensity_range_and_outlier(read_test_image):
    array = sitk.GetArrayFromImage(read_test_image("brain_pd.nrrd")).astype(np.float32)
    normalised = imageio.normalise_intensity(array)
    assert normalised.dtype == np.float32 and normalised.shape == array.shape
    assert normalised.min() == 0.0 and normalised.max() == 1.0

    with_outlier = array.copy()
    with_outlier[0, 0] = 1e6  # one hot voxel must not squash the rest of the range
    robust = imageio.normalise_intensity(with_outlier)
    assert robust.min() >= 0.0 and robust.max() <= 1.0
    inside = np.ones(array.shape, bool)
    inside[0, 0] = False
    np.testing.assert_allclose(robust[inside], normalised[inside], atol=1e-6)
    assert robust[0, 0] == 1.0
    assert np.median(robust) == pytest.approx(np.median(normalised), abs=1e-6)


def test_normalise_intensity_mostly_constant_image():
    array = np.zeros((20, 20), np.float32)
    array[0, 0] = 5.0  # above the 99th percentile: percentiles are equal, fall back to the full range
    normalised = imageio.normalise_intensity(array)
    assert normalised.min() == 0.0 and normalised.max() == 1.0 and np.isfinite(normalised).all()
