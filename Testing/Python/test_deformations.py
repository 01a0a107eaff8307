"""Known-field training pairs, the sitk <-> voxel field conventions, affine alignment, synthetic data."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage
from skimage.metrics import normalized_mutual_information

from SARRegistrationLib import affine, deformations, fields, spatial, synthetic


def _torch_warp(array: np.ndarray, displacement: np.ndarray, mode: str = "bilinear") -> np.ndarray:
    """spatial.warp on one numpy image ``spatial`` and field ``(ndims, *spatial)``."""
    moving = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    field = torch.from_numpy(np.ascontiguousarray(displacement, dtype=np.float32))[None]
    return spatial.warp(moving, field, mode=mode)[0, 0].numpy()


def _float_image(image: sitk.Image) -> sitk.Image:
    """``image`` as float32 scaled to [0, 1], geometry kept."""
    return sitk.RescaleIntensity(sitk.Cast(image, sitk.sitkFloat32), 0.0, 1.0)


def _brain_crop(read_test_image) -> sitk.Image:
    """A 64×64×32 crop of the 3D brain: 2×2×3 mm voxels, a non-identity direction and origin."""
    return read_test_image("brain3d_t1.nii.gz")[32:96, 32:96, 15:47]


def _moved_geometry(image: sitk.Image) -> sitk.Image:
    """``image`` with an unusual origin, anisotropic spacing and an oblique direction (same voxels)."""
    moved = sitk.Image(image)
    ndims = image.GetDimension()
    if ndims == 2:
        rotation = sitk.Euler2DTransform()
        rotation.SetAngle(np.deg2rad(30))
        moved.SetSpacing((0.7, 1.3))
        moved.SetOrigin((-31.5, 17.25))
    else:
        rotation = sitk.Euler3DTransform()
        rotation.SetRotation(0.4, -0.3, 0.6)
        moved.SetSpacing((0.8, 1.5, 2.5))
        moved.SetOrigin((12.0, -40.5, 7.25))
    moved.SetDirection(rotation.GetMatrix())
    return moved


@pytest.fixture(params=["2d", "3d"])
def oblique_image(request, read_test_image) -> sitk.Image:
    image = read_test_image("rat_lung_1.nrrd") if request.param == "2d" else _brain_crop(read_test_image)
    return _moved_geometry(_float_image(image))


def _smooth_field(shape, seed: int, amplitude_voxels: float) -> np.ndarray:
    """Random smooth displacement ``(ndims, *shape)`` in voxels, each channel drawn independently."""
    rng = np.random.default_rng(seed)
    field = np.stack([ndimage.gaussian_filter(rng.standard_normal(shape), sigma=6) for _ in shape])
    return field * (amplitude_voxels / np.abs(field).max())


# --------------------------------------------------------------------------------------------- pairs


@pytest.mark.parametrize("affine", [False, True])
def test_known_field_reproduces_reference_2d(read_test_image, affine):
    image = read_test_image("rat_lung_1.nrrd")
    pair = deformations.make_training_pair(image, None, np.random.default_rng(3), max_displacement_mm=8.0,
                                           affine=affine, intensity=False)
    warped = _torch_warp(pair["floating"], pair["displacement"])
    error = np.abs(warped - pair["reference"]).mean()
    unwarped_error = np.abs(pair["floating"] - pair["reference"]).mean()
    assert unwarped_error > 0.02
    assert error < 1e-3
    assert error < unwarped_error / 50


def test_known_field_reproduces_reference_3d(read_test_image):
    pair = deformations.make_training_pair(_brain_crop(read_test_image), None, np.random.default_rng(5),
                                           max_displacement_mm=8.0, intensity=False)
    assert pair["displacement"].shape == (3, 32, 64, 64)
    warped = _torch_warp(pair["floating"], pair["displacement"])
    error = np.abs(warped - pair["reference"]).mean()
    unwarped_error = np.abs(pair["floating"] - pair["reference"]).mean()
    assert unwarped_error > 0.01
    assert error < unwarped_error / 50


def test_masks_follow_the_field(read_test_image):
    image = read_test_image("rat_lung_1.nrrd")
    mask = read_test_image("rat_lung_1.nrrd") > 60
    pair = deformations.make_training_pair(image, mask, np.random.default_rng(8), intensity=False)
    assert set(np.unique(pair["floating_mask"])) == {0.0, 1.0}
    warped_mask = _torch_warp(pair["floating_mask"], pair["displacement"], mode="nearest")
    changed = pair["reference_mask"] != pair["floating_mask"]
    assert changed.mean() > 0.02
    assert (warped_mask == pair["reference_mask"]).mean() > 0.99


def test_derived_foreground_mask_is_the_bright_body(read_test_image):
    image = read_test_image("fat_mri.nrrd")
    mask = sitk.GetArrayFromImage(deformations.foreground_mask(image)).astype(bool)
    array = sitk.GetArrayFromImage(image)
    assert 0.1 < mask.mean() < 0.9
    assert array[mask].mean() > 3 * array[~mask].mean()
    assert ndimage.label(mask)[1] == 1
    assert not ndimage.binary_fill_holes(mask)[~mask].any()


def test_intensity_augmentation_changes_only_intensities(read_test_image):
    image = read_test_image("rat_lung_1.nrrd")
    plain = deformations.make_training_pair(image, None, np.random.default_rng(2), intensity=False)
    augmented = deformations.make_training_pair(image, None, np.random.default_rng(2), intensity=True)
    for name in ("displacement", "reference_mask", "floating_mask"):
        np.testing.assert_array_equal(plain[name], augmented[name])
    for name in ("reference", "floating"):
        assert augmented[name].dtype == np.float32
        assert augmented[name].min() >= 0.0 and augmented[name].max() <= 1.0
        assert np.abs(augmented[name] - plain[name]).mean() > 1e-3
        # Contrast may be remapped non-monotonically, but the result is still a function of the
        # original: far more mutual information than with a shuffled copy.
        shuffled = np.random.default_rng(0).permutation(plain[name].ravel()).reshape(plain[name].shape)
        informative = normalized_mutual_information(augmented[name], plain[name], bins=32)
        assert informative > 1.1
        assert informative > normalized_mutual_information(augmented[name], shuffled, bins=32) + 0.08


def test_pairs_are_reproducible(read_test_image):
    image = read_test_image("rat_lung_1.nrrd")
    first = deformations.make_training_pair(image, None, np.random.default_rng(11))
    again = deformations.make_training_pair(image, None, np.random.default_rng(11))
    other = deformations.make_training_pair(image, None, np.random.default_rng(12))
    for name in first:
        assert first[name].dtype == np.float32
        np.testing.assert_array_equal(first[name], again[name])
    assert not np.array_equal(first["displacement"], other["displacement"])


# ----------------------------------------------------------------------------------- transforms


@pytest.mark.parametrize("seed", range(4))
def test_bspline_respects_max_displacement_and_holds_border(oblique_image, seed):
    max_mm = 6.0
    transform = deformations.random_bspline_transform(oblique_image, np.random.default_rng(seed), max_mm)
    to_field = sitk.TransformToDisplacementFieldFilter()
    to_field.SetReferenceImage(oblique_image)
    millimetres = np.abs(sitk.GetArrayFromImage(to_field.Execute(transform)))
    assert millimetres.max() <= max_mm + 1e-9
    assert millimetres.max() > 0.2 * max_mm
    ndims = oblique_image.GetDimension()
    for axis in range(ndims):
        border = np.take(millimetres, [0, -1], axis=axis)
        assert border.max() <= max_mm / 6 + 1e-9


def test_random_affine_stays_within_bounds(oblique_image):
    ndims = oblique_image.GetDimension()
    transform = deformations.random_affine_transform(oblique_image, np.random.default_rng(0), max_rotation_deg=10,
                                                     max_scale=0.1, max_translation_mm=5)
    matrix = np.array(transform.GetMatrix()).reshape(ndims, ndims)
    singular_values = np.linalg.svd(matrix, compute_uv=False)
    assert np.all((singular_values > 0.9 - 1e-9) & (singular_values < 1.1 + 1e-9))
    assert np.all(np.abs(transform.GetTranslation()) <= 5)
    np.testing.assert_allclose(transform.GetCenter(), deformations.image_centre(oblique_image))
    assert not np.allclose(matrix, np.eye(ndims))


def test_displacement_points_where_the_transform_maps(oblique_image):
    """Per voxel: index + u (array order, voxels) is the continuous index of T(physical point)."""
    transform = deformations.random_affine_transform(oblique_image, np.random.default_rng(1))
    displacement = fields.transform_to_displacement(transform, oblique_image)
    ndims = oblique_image.GetDimension()
    assert displacement.shape == (ndims, *sitk.GetArrayViewFromImage(oblique_image).shape)
    rng = np.random.default_rng(0)
    for array_index in zip(*(rng.integers(0, n, size=20) for n in displacement.shape[1:])):
        itk_index = [int(i) for i in array_index[::-1]]
        mapped = transform.TransformPoint(oblique_image.TransformIndexToPhysicalPoint(itk_index))
        expected = np.array(oblique_image.TransformPhysicalPointToContinuousIndex(mapped))[::-1]
        np.testing.assert_allclose(np.array(array_index) + displacement[(slice(None), *array_index)], expected,
                                   atol=1e-6)


def test_displacement_round_trip(oblique_image):
    rng = np.random.default_rng(4)
    transform = sitk.CompositeTransform([deformations.random_affine_transform(oblique_image, rng),
                                         deformations.random_bspline_transform(oblique_image, rng, 5.0)])
    displacement = fields.transform_to_displacement(transform, oblique_image)
    field = fields.displacement_to_sitk(displacement, oblique_image)
    assert field.GetPixelID() == sitk.sitkVectorFloat64
    assert field.GetOrigin() == oblique_image.GetOrigin()
    assert field.GetSpacing() == oblique_image.GetSpacing()
    assert field.GetDirection() == oblique_image.GetDirection()
    again = fields.transform_to_displacement(sitk.DisplacementFieldTransform(field), oblique_image)
    np.testing.assert_allclose(again, displacement, atol=1e-9)


def test_sitk_resample_agrees_with_spatial_warp(oblique_image):
    """A voxel field handed to SimpleITK in mm resamples exactly like spatial.warp (pins axes and units)."""
    array = sitk.GetArrayFromImage(oblique_image)
    displacement = _smooth_field(array.shape, seed=7, amplitude_voxels=4.0)
    transform = sitk.DisplacementFieldTransform(fields.displacement_to_sitk(displacement, oblique_image))
    resampled = sitk.GetArrayFromImage(sitk.Resample(oblique_image, oblique_image, transform, sitk.sitkLinear))
    warped = _torch_warp(array, displacement)
    # Outside the grid SimpleITK and grid_sample extrapolate differently; compare where both interpolate.
    positions = spatial.identity_grid(array.shape).numpy() + displacement
    inside = np.all((positions >= 0) & (positions <= np.reshape(array.shape, (-1,) + (1,) * array.ndim) - 1), axis=0)
    assert inside.mean() > 0.8
    assert np.abs(warped - array)[inside].mean() > 0.01
    np.testing.assert_allclose(resampled[inside], warped[inside], atol=1e-4)


def test_affine_align_recovers_a_known_affine(read_test_image):
    fixed = _float_image(read_test_image("rat_lung_1.nrrd"))
    truth = deformations.random_affine_transform(fixed, np.random.default_rng(6), max_rotation_deg=8,
                                                 max_scale=0.08, max_translation_mm=5)
    moving = sitk.Resample(fixed, truth, sitk.sitkLinear, 0.0)  # moving(x) = fixed(truth(x))
    # Aligning moving to fixed needs moving(T(x)) = fixed(x), i.e. T = truth⁻¹.
    expected = fields.transform_to_displacement(truth.GetInverse(), fixed)
    found = affine.affine_align(fixed, moving)
    centre = (slice(None), slice(16, -16), slice(16, -16))
    initial = np.linalg.norm(expected[centre], axis=0).mean()
    residual = np.linalg.norm(fields.transform_to_displacement(found, fixed)[centre] - expected[centre],
                              axis=0).mean()
    assert initial > 2.0
    assert residual < 0.15 * initial
    # Deterministic up to the rounding of multi-threaded sums.
    again = affine.affine_align(fixed, moving)
    np.testing.assert_allclose(fields.transform_to_displacement(again, fixed),
                               fields.transform_to_displacement(found, fixed), atol=1e-9)


# ------------------------------------------------------------------------------------ synthetic


@pytest.mark.parametrize("shape", [(48, 40), (24, 32, 28)])
@pytest.mark.parametrize("num_labels", [5, 8])
def test_synthetic_label_map_has_every_label(shape, num_labels):
    for seed in range(3):
        labels = synthetic.synthetic_label_map(shape, np.random.default_rng(seed), num_labels=num_labels)
        assert labels.shape == shape
        assert set(np.unique(labels)) == set(range(num_labels))
        # Smooth noise gives blobs, not salt and pepper: most voxels share the label of their neighbour.
        assert (np.diff(labels, axis=0) == 0).mean() > 0.8


def test_synthetic_image_follows_labels():
    labels = synthetic.synthetic_label_map((64, 64), np.random.default_rng(0))
    image = synthetic.synthetic_image(labels, np.random.default_rng(1))
    assert image.shape == labels.shape and image.dtype == np.float32
    assert image.min() >= 0.0 and image.max() <= 1.0
    label_means = ndimage.mean(image, labels, index=np.arange(labels.max() + 1))
    # Labels explain most of the variance: intensities are piecewise constant up to blur, bias and noise.
    explained = np.var(label_means[labels]) / np.var(image)
    assert explained > 0.6


@pytest.mark.parametrize("shape,spacing", [((40, 48), (0.5, 2.0)), ((16, 24, 20), None)])
def test_synthetic_sample(shape, spacing):
    image, mask = synthetic.synthetic_sample(shape, np.random.default_rng(9), spacing=spacing)
    assert sitk.GetArrayViewFromImage(image).shape == shape
    assert image.GetSpacing() == (spacing or (1.0,) * len(shape))
    assert mask.GetSpacing() == image.GetSpacing()
    structure = sitk.GetArrayFromImage(mask)
    assert set(np.unique(structure)) == {0, 1}
    again_image, again_mask = synthetic.synthetic_sample(shape, np.random.default_rng(9), spacing=spacing)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(again_image), sitk.GetArrayViewFromImage(image))
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(again_mask), structure)
    pair = deformations.make_training_pair(image, mask, np.random.default_rng(0), max_displacement_mm=4.0)
    assert pair["displacement"].shape == (len(shape), *shape)


def test_known_deformation_moves_image_and_mask_by_the_returned_transform(read_test_image):
    """The moved image is the float image sampled through the returned B-spline (no rounding to the
    input's integer type), the mask follows it, and the contrast remapping leaves the geometry alone."""
    image = read_test_image("brain_t1.nrrd")  # uint8
    mask = sitk.Cast(read_test_image("brain_ventricles.nrrd") != 0, sitk.sitkUInt8)
    moved, moved_mask, transform = deformations.known_deformation(image, mask, np.random.default_rng(3), 6.0)
    assert moved.GetPixelID() == sitk.sitkFloat32
    expected = sitk.Resample(sitk.Cast(image, sitk.sitkFloat32), image, transform, sitk.sitkLinear, 0.0)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(moved), sitk.GetArrayFromImage(expected))
    assert not np.array_equal(sitk.GetArrayFromImage(moved), sitk.GetArrayFromImage(image).astype(np.float32))
    moved_labels = sitk.GetArrayFromImage(moved_mask)
    assert set(np.unique(moved_labels)) == {0, 1}
    assert not np.array_equal(moved_labels, sitk.GetArrayFromImage(mask))

    remapped, remapped_mask, same = deformations.known_deformation(image, None, np.random.default_rng(3), 6.0,
                                                                   remap_intensity=True)
    assert remapped_mask is None
    assert same.GetParameters() == transform.GetParameters()
    assert not np.allclose(sitk.GetArrayFromImage(remapped), sitk.GetArrayFromImage(moved))
