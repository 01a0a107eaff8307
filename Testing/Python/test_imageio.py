"""Tests of SARRegistrationLib.imageio: reading, checking, normalising, working grids, staged outputs."""

import os
import signal

import numpy as np
import pytest
import SimpleITK as sitk

from helpers import corner_points, rotation_2d, rotation_3d, with_geometry
from SARRegistrationLib import imageio
from SARRegistrationLib.errors import InputImageError, OutputError, SARError


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


def test_normalize_intensity_range_and_outlier(read_test_image):
    array = sitk.GetArrayFromImage(read_test_image("brain_pd.nrrd")).astype(np.float32)
    normalised = imageio.normalize_intensity(array)
    assert normalised.dtype == np.float32 and normalised.shape == array.shape
    assert normalised.min() == 0.0 and normalised.max() == 1.0

    with_outlier = array.copy()
    with_outlier[0, 0] = 1e6  # one hot voxel must not squash the rest of the range
    robust = imageio.normalize_intensity(with_outlier)
    assert robust.min() >= 0.0 and robust.max() <= 1.0
    inside = np.ones(array.shape, bool)
    inside[0, 0] = False
    np.testing.assert_allclose(robust[inside], normalised[inside], atol=1e-6)
    assert robust[0, 0] == 1.0
    assert np.median(robust) == pytest.approx(np.median(normalised), abs=1e-6)


def test_normalize_intensity_mostly_constant_image():
    array = np.zeros((20, 20), np.float32)
    array[0, 0] = 5.0  # above the 99th percentile: percentiles are equal, fall back to the full range
    normalised = imageio.normalize_intensity(array)
    assert normalised.min() == 0.0 and normalised.max() == 1.0 and np.isfinite(normalised).all()


@pytest.mark.parametrize("size, max_size", [((181, 217), 64), ((217, 181), 64), ((128, 128, 62), 32),
                                            ((61, 73), 32), ((10, 12), 64), ((300, 40, 20), 128)])
def test_working_grid_size_and_extent(size, max_size):
    ndims = len(size)
    origin, spacing, direction = GEOMETRIES[ndims]
    reference = with_geometry(sitk.Image(list(size), sitk.sitkUInt8), origin, spacing, direction)

    grid = imageio.working_grid(reference, max_size)

    assert all(n % imageio.GRID_MULTIPLE == 0 and n > 0 for n in grid.GetSize())
    assert max(grid.GetSize()) <= max(max_size, int(np.ceil(max(size) / 8) * 8))
    if max(size) >= max_size:
        assert max(grid.GetSize()) <= max_size
    np.testing.assert_allclose(grid.GetDirection(), direction)
    np.testing.assert_allclose(corner_points(grid), corner_points(reference), atol=1e-9)


def test_working_grid_downsamples_the_largest_axis_to_max_size():
    reference = sitk.Image([181, 217], sitk.sitkUInt8)
    assert imageio.working_grid(reference, 64).GetSize() == (56, 64)


@pytest.mark.parametrize("size, max_size", [((187, 150), 96), ((281, 100), 160), ((273, 40), 192)])
def test_working_grid_never_exceeds_max_size(size, max_size):
    grid = imageio.working_grid(sitk.Image(list(size), sitk.sitkUInt8), max_size)
    assert max(grid.GetSize()) <= max_size


def test_working_grid_keep_axes_keeps_the_slice_count():
    origin, spacing, direction = GEOMETRIES[3]
    reference = with_geometry(sitk.Image([128, 100, 13], sitk.sitkUInt8), origin, spacing, direction)

    grid = imageio.working_grid(reference, 32, keep_axes=(2,))

    # 89.6 x 130 mm in-plane: y gets 32 voxels of 4.06 mm, x 22 of them, rounded up to 24.
    assert grid.GetSize() == (24, 32, 13)
    assert grid.GetSpacing()[2] == pytest.approx(spacing[2])
    np.testing.assert_allclose(corner_points(grid), corner_points(reference), atol=1e-9)


def test_staged_output_dir_success_moves_files(tmp_path):
    output = tmp_path / "new" / "out"
    with imageio.staged_output_dir(output) as staging:
        assert staging.parent == output
        (staging / "a.txt").write_text("a")
        (staging / "b.txt").write_text("b")
    assert sorted(p.name for p in output.iterdir()) == ["a.txt", "b.txt"]
    assert (output / "a.txt").read_text() == "a"


def test_staged_output_dir_error_removes_new_dir(tmp_path):
    output = tmp_path / "out"
    with pytest.raises(OutputError, match="Writing the outputs into .* failed: midway"):
        with imageio.staged_output_dir(output) as staging:
            (staging / "a.txt").write_text("a")
            raise RuntimeError("midway")  # as SimpleITK's writers raise
    assert not output.exists()


def test_staged_output_dir_error_leaves_existing_dir_as_it_was(tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with imageio.staged_output_dir(output) as staging:
            (staging / "old.txt").write_text("new")
            (staging / "a.txt").write_text("a")
            raise KeyboardInterrupt
    assert [p.name for p in output.iterdir()] == ["old.txt"]
    assert (output / "old.txt").read_text() == "old"


def test_staged_output_dir_error_keeps_existing_empty_dir(tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    with pytest.raises(ValueError):
        with imageio.staged_output_dir(output):
            raise ValueError
    assert output.is_dir() and not any(output.iterdir())


def test_staged_output_dir_that_is_a_file_is_an_output_error(tmp_path):
    output = tmp_path / "out"
    output.write_text("a file, not a folder")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        with imageio.staged_output_dir(output):
            pytest.fail("the block must not run")
    assert output.read_text() == "a file, not a folder"


def _existing_outputs(output):
    output.mkdir()
    for name in ("a.txt", "b.txt", "c.txt"):
        (output / name).write_text("old " + name)


def _stage_new_outputs(staging):
    for name in ("a.txt", "b.txt", "c.txt", "d.txt"):
        (staging / name).write_text("new " + name)


def _assert_old_outputs(output):
    assert sorted(p.name for p in output.iterdir()) == ["a.txt", "b.txt", "c.txt"]
    assert all((output / name).read_text() == "old " + name for name in ("a.txt", "b.txt", "c.txt"))


def test_failed_move_puts_every_replaced_file_back(tmp_path, monkeypatch):
    output = tmp_path / "out"
    _existing_outputs(output)
    real_replace, calls = os.replace, []

    def failing_replace(source, target):
        calls.append(source)
        if len(calls) == 4:  # after a.txt was set aside and replaced, while b.txt moves in
            raise OSError(28, "No space left on device")
        real_replace(source, target)

    monkeypatch.setattr(imageio.os, "replace", failing_replace)
    with pytest.raises(OutputError, match="No space left on device; the folder is as it was"):
        with imageio.staged_output_dir(output) as staging:
            _stage_new_outputs(staging)
    _assert_old_outputs(output)


def test_ctrl_c_while_moving_undoes_the_moves(tmp_path, monkeypatch):
    output = tmp_path / "out"
    _existing_outputs(output)
    real_replace = os.replace

    def interrupted_replace(source, target):
        signal.raise_signal(signal.SIGINT)  # Ctrl-C arrives in the middle of the moves
        real_replace(source, target)

    monkeypatch.setattr(imageio.os, "replace", interrupted_replace)
    with pytest.raises(KeyboardInterrupt):
        with imageio.staged_output_dir(output) as staging:
            _stage_new_outputs(staging)
    _assert_old_outputs(output)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_staged_output_dir_replaces_old_outputs_when_all_goes_well(tmp_path):
    output = tmp_path / "out"
    _existing_outputs(output)
    with imageio.staged_output_dir(output) as staging:
        _stage_new_outputs(staging)
    assert sorted(p.name for p in output.iterdir()) == ["a.txt", "b.txt", "c.txt", "d.txt"]
    assert all((output / name).read_text() == "new " + name for name in ("a.txt", "b.txt", "c.txt", "d.txt"))


def test_working_grid_of_thick_slices_is_nearly_isotropic():
    # 0.5 x 0.5 x 5 mm, 512 x 512 x 30: 256 x 256 x 150 mm. A 64-voxel grid has 4 mm voxels in-plane;
    # the 30 slices stay 30 (rounded up to 32), not shrunk to 8 as a per-voxel scaling would.
    reference = with_geometry(sitk.Image([512, 512, 30], sitk.sitkUInt8), (0.0, 0.0, 0.0), (0.5, 0.5, 5.0),
                              rotation_3d(0.0, 0.0))
    grid = imageio.working_grid(reference, 64)
    assert grid.GetSize() == (64, 64, 32)
    np.testing.assert_allclose(grid.GetSpacing(), (4.0, 4.0, 150.0 / 32))
    np.testing.assert_allclose(corner_points(grid), corner_points(reference), atol=1e-9)


def test_unwritable_output_folder_is_an_output_error_and_leaves_no_folder(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(imageio.tempfile, "TemporaryDirectory", refuse)
    output = tmp_path / "out"
    with pytest.raises(OutputError, match="cannot be written: Permission denied"):
        with imageio.staged_output_dir(output):
            pytest.fail("the block must not run")
    assert not output.exists()
