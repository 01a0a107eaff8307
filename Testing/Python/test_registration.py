"""Tests of SARRegistrationLib.registration.register: geometry, the ITK field convention, outputs, errors."""

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from helpers import (index_to_physical, one_torch_thread, perturb_head, rotation_2d,  # noqa: F401
                     small_float, small_label, small_pair_2d, tiny_model, with_geometry)
from SARRegistrationLib import grids, imageio, metrics
from SARRegistrationLib.deformations import known_deformation
from SARRegistrationLib.errors import (DeviceError, InputImageError, RegistrationCancelled, SARError,
                                       SettingsError, WeightsError)
from SARRegistrationLib.model import save_model
from SARRegistrationLib.registration import RegistrationResult, register

REFERENCE_GEOMETRY = ((-40.0, 25.5), (2.9, 3.1), rotation_2d(20.0))
FLOATING_GEOMETRY = ((-38.5, 23.0), (3.0, 3.0), rotation_2d(20.0))


# ----------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def pair_2d(read_test_image):
    """Small real 2D pair (61 x 73 voxels) with non-trivial, different origins, spacings and directions."""
    reference, floating = small_pair_2d(read_test_image, 3)
    return with_geometry(reference, *REFERENCE_GEOMETRY), with_geometry(floating, *FLOATING_GEOMETRY)


@pytest.fixture(scope="module")
def masks_2d(read_test_image):
    reference_mask = small_label(read_test_image("brain_ventricles.nrrd"), 3)
    floating_mask = small_label(read_test_image("sample_floating_ventricles.nrrd"), 3)
    return with_geometry(reference_mask, *REFERENCE_GEOMETRY), with_geometry(floating_mask, *FLOATING_GEOMETRY)


@pytest.fixture(scope="module")
def volume(read_test_image):
    """brain3d_t1 shrunk to 32 x 32 x 15 voxels (8 x 8 x 12 mm), with its non-identity direction."""
    image = small_float(read_test_image("brain3d_t1.nii.gz"), 4)
    assert image.GetSize() == (32, 32, 15)
    return image


@pytest.fixture(scope="module")
def weights_2d(tmp_path_factory):
    return save_model(tiny_model(2), tmp_path_factory.mktemp("weights2d") / "tiny_2d.pt")


@pytest.fixture(scope="module")
def weights_3d(tmp_path_factory):
    return save_model(tiny_model(3), tmp_path_factory.mktemp("weights3d") / "tiny_3d.pt")


# ----------------------------------------------------------------------------------------------- helpers

def _same_grid(image, grid):
    assert image.GetSize() == grid.GetSize()
    np.testing.assert_allclose(image.GetOrigin(), grid.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(image.GetSpacing(), grid.GetSpacing(), atol=1e-9)
    np.testing.assert_allclose(image.GetDirection(), grid.GetDirection(), atol=1e-9)


def _itk_warp(floating, reference, displacement):
    transform = sitk.DisplacementFieldTransform(sitk.Image(displacement))
    return sitk.Resample(floating, reference, transform, sitk.sitkLinear)


def _assert_itk_reproduces_warped(result, reference, floating):
    assert floating.GetPixelID() == sitk.sitkFloat32  # so that Resample keeps float output
    expected = sitk.GetArrayFromImage(_itk_warp(floating, reference, result.displacement))
    warped = sitk.GetArrayFromImage(result.warped)
    assert np.abs(warped - expected).max() < 1e-4 * max(1.0, np.abs(expected).max())
    # ... and the field is not a near-zero one, for which this check would say little
    unwarped = sitk.GetArrayFromImage(sitk.Resample(floating, reference, sitk.Transform(), sitk.sitkLinear))
    assert np.abs(warped - unwarped).max() > 0.1 * np.abs(unwarped).max()


def _field_mm(result):
    return sitk.GetArrayFromImage(result.displacement)  # (*spatial, ndims), physical x, y(, z)


def _index_steps(result, reference):
    """The field in index steps of the reference (x, y(, z) order, last axis)."""
    return _field_mm(result) @ np.linalg.inv(index_to_physical(reference)).T


# ----------------------------------------------------------------------------------------------- geometry

def test_outputs_are_on_the_reference_grid(pair_2d, weights_2d):
    reference, floating = pair_2d
    result = register(reference, floating, weights=weights_2d, device="cpu", max_iterations=3, tolerance=0)

    assert isinstance(result, RegistrationResult)
    for image in (result.warped, result.displacement, result.reference_mask):
        _same_grid(image, reference)
    _same_grid(result.floating_mask, floating)
    assert result.displacement.GetNumberOfComponentsPerPixel() == 2
    assert result.displacement.GetPixelID() == sitk.sitkVectorFloat64
    assert result.warped.GetPixelID() == sitk.sitkFloat32
    for mask in (result.reference_mask, result.floating_mask):
        values = np.unique(sitk.GetArrayFromImage(mask))
        assert set(values.tolist()) <= {0, 1} and len(values) == 2
    assert result.metrics["iterations"] == 3 and result.metrics["converged"] is False
    assert result.metrics["mode"] == "image" and result.metrics["device"] == "cpu"
    assert result.metrics["weights"] == str(weights_2d)
    assert 0.0 <= result.metrics["folding_fraction"] <= 1.0
    assert result.transform().GetName() == "DisplacementFieldTransform"


def test_itk_resample_with_the_field_reproduces_warped_2d(pair_2d):
    reference, floating = pair_2d
    model = perturb_head(tiny_model(2), bias=[1.5, -2.0], weight_std=0.05)
    result = register(reference, floating, model, device="cpu", finetune=False)

    assert np.linalg.norm(_field_mm(result), axis=-1).max() > 2.0  # mm: several voxels of the working grid
    _assert_itk_reproduces_warped(result, reference, floating)
    assert result.metrics["max_displacement_mm"] == pytest.approx(np.linalg.norm(_field_mm(result), axis=-1).max())


def test_itk_resample_reproduces_warped_after_finetuning(pair_2d):
    reference, floating = pair_2d
    model = perturb_head(tiny_model(2), bias=[-1.0, 2.5], weight_std=0.05)
    result = register(reference, floating, model, device="cpu", max_iterations=3, tolerance=0)
    assert result.metrics["iterations"] == 3
    _assert_itk_reproduces_warped(result, reference, floating)


def test_constant_network_field_is_the_expected_physical_translation_2d(pair_2d):
    reference, floating = pair_2d
    model = tiny_model(2)
    bias = np.array([1.25, -2.5])  # working-grid voxels along array axes (y, x)
    perturb_head(model, bias=bias, weight_std=0.0)
    result = register(reference, floating, model, device="cpu", finetune=False, instance_optimisation=False,
                      affine=False)

    grid = grids.working_grid(reference, model.working_size, model.generator.shape_multiple)
    expected_mm = index_to_physical(grid) @ bias[::-1]  # index order x, y
    field = _field_mm(result)
    np.testing.assert_allclose(field, np.broadcast_to(expected_mm, field.shape), atol=1e-6)
    # Warping by the field is translating the floating image by that vector (reference -> floating point).
    translated = sitk.Resample(floating, reference, sitk.TranslationTransform(2, expected_mm.tolist()),
                               sitk.sitkLinear)
    np.testing.assert_allclose(sitk.GetArrayFromImage(result.warped), sitk.GetArrayFromImage(translated),
                               atol=1e-3)


def test_volume_mode_with_a_3d_model(volume):
    reference = volume
    floating = sitk.Resample(volume, sitk.TranslationTransform(3, (3.0, -2.0, 4.0)), sitk.sitkLinear)
    model = tiny_model(3)
    bias = np.array([0.5, 1.0, -1.5])  # working-grid voxels along (z, y, x)
    perturb_head(model, bias=bias, weight_std=0.0)
    result = register(reference, floating, model, mode="volume", device="cpu", finetune=False,
                      instance_optimisation=False)

    for image in (result.warped, result.displacement, result.reference_mask):
        _same_grid(image, reference)
    assert result.displacement.GetNumberOfComponentsPerPixel() == 3
    assert result.displacement.GetPixelID() == sitk.sitkVectorFloat64
    assert result.metrics["mode"] == "volume"
    grid = grids.working_grid(reference, model.working_size, model.generator.shape_multiple)
    assert grid.GetSize() == (32, 32, 16)
    expected_mm = index_to_physical(grid) @ bias[::-1]
    field = _field_mm(result)
    np.testing.assert_allclose(field, np.broadcast_to(expected_mm, field.shape), atol=1e-6)
    _assert_itk_reproduces_warped(result, reference, floating)


def test_volume_mode_non_constant_field_3d(volume):
    reference = volume
    floating = sitk.Resample(volume, sitk.TranslationTransform(3, (3.0, -2.0, 4.0)), sitk.sitkLinear)
    model = perturb_head(tiny_model(3), bias=[0.5, 1.0, -1.5], weight_std=0.03)
    result = register(reference, floating, model, mode="volume", device="cpu", max_iterations=2, tolerance=0)
    assert np.ptp(_field_mm(result)[..., 0]) > 0.1  # not a translation
    _assert_itk_reproduces_warped(result, reference, floating)


def test_slicewise_mode_with_a_2d_model(volume):
    reference = volume
    floating = sitk.Resample(volume, sitk.TranslationTransform(3, (3.0, -2.0, 4.0)), sitk.sitkLinear)
    model = perturb_head(tiny_model(2), bias=[1.0, -1.5], weight_std=0.05)
    result = register(reference, floating, model, mode="slicewise", device="cpu", finetune=False,
                      instance_optimisation=False)

    for image in (result.warped, result.displacement, result.reference_mask):
        _same_grid(image, reference)
    assert result.displacement.GetNumberOfComponentsPerPixel() == 3
    assert result.metrics["mode"] == "slicewise"
    steps = _index_steps(result, reference)
    # Nothing moves across slices: the k (third index) component is zero, the in-plane ones are not.
    assert np.abs(steps[..., 2]).max() < 1e-9
    assert np.abs(steps[..., :2]).max() > 0.5
    # This volume's direction maps k to physical -y: the physical y component is then zero.
    assert np.allclose(np.array(reference.GetDirection()).reshape(3, 3)[:, 2], (0, -1, 0))
    assert np.abs(_field_mm(result)[..., 1]).max() < 1e-9
    _assert_itk_reproduces_warped(result, reference, floating)


def test_slicewise_mode_with_finetuning(volume):
    reference = volume  # 15 slices: more than finetuning tunes on at once
    floating = sitk.Resample(volume, sitk.TranslationTransform(3, (3.0, -2.0, 4.0)), sitk.sitkLinear)
    model = perturb_head(tiny_model(2), bias=[1.0, -1.5], weight_std=0.05)
    result = register(reference, floating, model, mode="slicewise", device="cpu", max_iterations=2, tolerance=0,
                      instance_optimisation=False)
    assert result.metrics["iterations"] == 2
    assert np.abs(_index_steps(result, reference)[..., 2]).max() < 1e-9
    _assert_itk_reproduces_warped(result, reference, floating)


def test_slicewise_identity_direction_has_zero_z_component(volume):
    reference = with_geometry(volume, (5.0, -3.0, 12.0), volume.GetSpacing(), np.eye(3).ravel())
    model = tiny_model(2)
    bias = np.array([1.0, -1.5])  # (y, x) in-plane voxels of the working grid
    perturb_head(model, bias=bias, weight_std=0.0)
    result = register(reference, reference, model, mode="slicewise", device="cpu", finetune=False,
                      instance_optimisation=False)

    field = _field_mm(result)
    assert np.abs(field[..., 2]).max() == 0.0
    grid = grids.working_grid(reference, model.working_size, model.generator.shape_multiple, keep_axes=(2,))
    assert grid.GetSize() == (32, 32, 15)
    np.testing.assert_allclose(field[..., 0], bias[1] * grid.GetSpacing()[0], atol=1e-6)
    np.testing.assert_allclose(field[..., 1], bias[0] * grid.GetSpacing()[1], atol=1e-6)


def test_identity_pair_gives_a_near_zero_field(pair_2d, weights_2d):
    reference, _ = pair_2d
    result = register(reference, reference, weights=weights_2d, device="cpu", finetune=False,
                      instance_optimisation=False)
    assert np.abs(_field_mm(result)).max() < 1e-2
    assert result.metrics["iterations"] == 0 and result.metrics["converged"] is None
    assert result.metrics["folding_fraction"] == 0.0
    np.testing.assert_allclose(sitk.GetArrayFromImage(result.warped), sitk.GetArrayFromImage(reference), atol=0.1)


def test_register_does_not_modify_the_model(pair_2d):
    reference, floating = pair_2d
    model = perturb_head(tiny_model(2), bias=[0.5, 0.5], weight_std=0.02)
    before = {name: {k: v.clone() for k, v in net.state_dict().items()} for name, net in model.networks.items()}
    register(reference, floating, model, device="cpu", max_iterations=2, tolerance=0)
    for name, network in model.networks.items():
        for key, value in network.state_dict().items():
            assert torch.equal(value, before[name][key]), f"{name}.{key}"


# ----------------------------------------------------------------------------------------------- masks, saving

def test_masks_give_before_and_after_metrics(pair_2d, masks_2d, weights_2d):
    reference, floating = pair_2d
    reference_mask, floating_mask = masks_2d
    result = register(reference, floating, weights=weights_2d, reference_mask=reference_mask,
                      floating_mask=floating_mask, device="cpu", max_iterations=2)
    for when in ("before", "after"):
        assert set(result.metrics[when]) == {"dice", "hd95_mm", "mad_mm"}
        assert 0.0 <= result.metrics[when]["dice"] <= 1.0
        assert result.metrics[when]["hd95_mm"] >= 0 and result.metrics[when]["mad_mm"] >= 0
    assert result.metrics["before"]["dice"] > 0.1  # the ventricles overlap before registration
    _same_grid(result.warped_floating_mask, reference)
    assert set(np.unique(sitk.GetArrayFromImage(result.warped_floating_mask)).tolist()) <= {0, 1}


def test_identical_masks_and_images_give_perfect_overlap(pair_2d, masks_2d, weights_2d):
    reference, _ = pair_2d
    reference_mask, _ = masks_2d
    result = register(reference, reference, weights=weights_2d, reference_mask=reference_mask,
                      floating_mask=reference_mask * 7, device="cpu", finetune=False)  # any non-zero label
    assert result.metrics["before"] == {"dice": 1.0, "hd95_mm": 0.0, "mad_mm": 0.0}
    assert result.metrics["after"]["dice"] == 1.0


def test_label_maps_are_warped_with_their_labels_and_measured_label_by_label(read_test_image):
    # The ventricles as two labels (1 left of column 78, 2 from it on), the pair moved by a known B-spline.
    floating, ventricles = read_test_image("brain_t1.nrrd"), read_test_image("brain_ventricles.nrrd")
    array = sitk.GetArrayFromImage(ventricles)
    array[:, 78:] *= 2
    floating_labels = imageio.image_like(array, ventricles)
    reference, reference_labels, _ = known_deformation(floating, floating_labels, np.random.default_rng(3), 6.0)
    result = register(reference, floating, reference_mask=reference_labels, floating_mask=floating_labels)
    warped = sitk.GetArrayFromImage(result.warped_floating_mask)
    assert set(np.unique(warped).tolist()) == {0, 1, 2}
    for when in ("before", "after"):
        per_label = result.metrics[when]["labels"]
        assert set(per_label) == {"1", "2"}
        for name in ("dice", "hd95_mm", "mad_mm"):
            assert result.metrics[when][name] == pytest.approx(np.mean([per_label[k][name] for k in ("1", "2")]))
    for label in (1, 2):  # each label is registered and measured on its own, against the map written out
        after = result.metrics["after"]["labels"][str(label)]["dice"]
        assert after > result.metrics["before"]["labels"][str(label)]["dice"] + 0.05 and after > 0.9
        assert after == pytest.approx(metrics.dice(sitk.GetArrayFromImage(reference_labels) == label, warped == label))
    # Binary masks keep their one-structure metrics (the masks do not steer the registration: same field).
    binary = register(reference, floating, reference_mask=reference_labels != 0, floating_mask=ventricles)
    assert "labels" not in binary.metrics["after"]
    assert binary.metrics["after"]["dice"] == pytest.approx(metrics.dice(sitk.GetArrayFromImage(reference_labels),
                                                                         warped))
    # The QA figure outlines label by label, an atlas's floating map alone included; binary masks as one.
    atlas = register(reference, floating, floating_mask=floating_labels)
    assert result._qa_planes()["by_label"] and atlas._qa_planes()["by_label"]
    assert not binary._qa_planes()["by_label"]
    (cut,) = atlas._qa_planes()["planes"]
    assert cut.masks["reference_mask"] is None
    np.testing.assert_array_equal(cut.masks["floating_mask"], sitk.GetArrayFromImage(floating_labels))
    np.testing.assert_array_equal(cut.masks["warped_mask"], warped)


def test_a_floating_mask_alone_is_warped(pair_2d, masks_2d):
    reference, floating = pair_2d
    result = register(reference, floating, floating_mask=masks_2d[1] * 255, network=False)
    _same_grid(result.warped_floating_mask, reference)
    assert set(np.unique(sitk.GetArrayFromImage(result.warped_floating_mask)).tolist()) == {0, 255}
    assert "before" not in result.metrics and "after" not in result.metrics


def test_a_probability_map_counts_as_one_structure(pair_2d, masks_2d):
    reference, floating = pair_2d
    probabilities = sitk.Cast(masks_2d[1], sitk.sitkFloat32) * 0.8
    result = register(reference, floating, reference_mask=masks_2d[0], floating_mask=probabilities, network=False)
    assert set(np.unique(sitk.GetArrayFromImage(result.warped_floating_mask)).tolist()) == {0, 1}
    assert result.metrics["after"]["dice"] > 0.5


def test_save_writes_every_output(tmp_path, pair_2d, masks_2d, weights_2d):
    reference, floating = pair_2d
    result = register(reference, floating, weights=weights_2d, device="cpu", max_iterations=2, tolerance=0)
    output = tmp_path / "out"
    written = result.save(output)

    names = ["displacement.nrrd", "floating_mask.nrrd", "metrics.json", "qa.png", "reference_mask.nrrd", "warped.nrrd"]
    assert sorted(p.name for p in output.iterdir()) == names
    assert sorted(p.name for p in written) == names
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["iterations"] == 2
    assert metrics["seconds"] > 0
    assert 0.0 <= metrics["folding_fraction"] <= 1.0
    displacement = sitk.ReadImage(str(output / "displacement.nrrd"))
    _same_grid(displacement, reference)
    assert displacement.GetPixelID() == sitk.sitkVectorFloat32  # as the peers write fields; uncompressed
    np.testing.assert_array_equal(sitk.GetArrayFromImage(displacement), _field_mm(result).astype(np.float32))
    warped = sitk.ReadImage(str(output / "warped.nrrd"))
    _same_grid(warped, reference)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(warped), sitk.GetArrayFromImage(result.warped))
    assert (output / "qa.png").read_bytes()[:4] == b"\x89PNG"
    # README's recipe: the file read as float64 vectors reproduces warped.nrrd through SimpleITK.
    transform = sitk.DisplacementFieldTransform(sitk.ReadImage(str(output / "displacement.nrrd"),
                                                               sitk.sitkVectorFloat64))
    again = sitk.Resample(floating, reference, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    np.testing.assert_allclose(sitk.GetArrayFromImage(again), sitk.GetArrayFromImage(warped), atol=1e-4)


def test_save_with_masks_and_without_figure(tmp_path, pair_2d, masks_2d, weights_2d):
    reference, floating = pair_2d
    result = register(reference, floating, weights=weights_2d, reference_mask=masks_2d[0],
                      floating_mask=masks_2d[1], device="cpu", finetune=False)
    output = tmp_path / "out"
    result.save(output, qa_figure=False)
    assert sorted(p.name for p in output.iterdir()) == ["displacement.nrrd", "floating_mask.nrrd", "metrics.json",
                                                        "reference_mask.nrrd", "warped.nrrd",
                                                        "warped_floating_mask.nrrd"]
    metrics = json.loads((output / "metrics.json").read_text())
    assert set(metrics["after"]) == {"dice", "hd95_mm", "mad_mm"}


def test_register_from_files(tmp_path, pair_2d, weights_2d):
    reference, floating = pair_2d
    sitk.WriteImage(reference, str(tmp_path / "reference.nrrd"))
    sitk.WriteImage(floating, str(tmp_path / "floating.mha"))
    result = register(str(tmp_path / "reference.nrrd"), tmp_path / "floating.mha", weights=weights_2d,
                      device="cpu", max_iterations=1)
    _same_grid(result.warped, reference)


def test_progress_reaches_one(pair_2d, weights_2d):
    reference, floating = pair_2d
    fractions = []
    register(reference, floating, weights=weights_2d, device="cpu", max_iterations=3, tolerance=0,
             progress=lambda fraction, message: fractions.append(fraction))
    assert fractions == sorted(fractions)
    assert 0 < fractions[0] and fractions[-1] == 1.0
    assert len(fractions) >= 3 + 3


# ----------------------------------------------------------------------------------------------- errors

@pytest.fixture
def empty_dir(tmp_path):
    """A folder that must stay empty: register() never writes."""
    folder = tmp_path / "untouched"
    folder.mkdir()
    yield folder
    assert not any(folder.iterdir())


def test_2d_reference_and_3d_floating(pair_2d, volume, weights_2d, empty_dir):
    with pytest.raises(InputImageError, match="reference is 2D but the floating image is 3D"):
        register(pair_2d[0], volume, weights=weights_2d, device="cpu")


def test_missing_input_file(pair_2d, weights_2d, empty_dir):
    missing = empty_dir.parent / "no_such_floating.nrrd"
    with pytest.raises(InputImageError, match="floating image file .*no_such_floating.nrrd.* does not exist"):
        register(pair_2d[0], missing, weights=weights_2d, device="cpu")


def test_nan_image(pair_2d, weights_2d, empty_dir):
    array = sitk.GetArrayFromImage(pair_2d[1])
    array[10, 10] = np.nan
    nan_image = sitk.GetImageFromArray(array)
    with pytest.raises(InputImageError, match="floating image has 1 NaN"):
        register(pair_2d[0], nan_image, weights=weights_2d, device="cpu")


def test_constant_image(pair_2d, weights_2d, empty_dir):
    constant = sitk.Image(pair_2d[0].GetSize(), sitk.sitkFloat32) + 4.0
    with pytest.raises(InputImageError, match="reference is constant"):
        register(constant, pair_2d[1], weights=weights_2d, device="cpu")


def test_missing_weights_file(pair_2d, empty_dir):
    with pytest.raises(WeightsError, match="missing_weights.pt.* does not exist"):
        register(pair_2d[0], pair_2d[1], weights=empty_dir.parent / "missing_weights.pt", device="cpu")


def test_cuda_without_gpu(pair_2d, weights_2d, empty_dir):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is available: device='cuda' is valid here")
    with pytest.raises(DeviceError, match="CUDA was requested"):
        register(pair_2d[0], pair_2d[1], weights=weights_2d, device="cuda")


def test_unknown_device_and_mode(pair_2d, weights_2d, empty_dir):
    with pytest.raises(DeviceError, match="Unknown device"):
        register(pair_2d[0], pair_2d[1], weights=weights_2d, device="tpu")
    with pytest.raises(SettingsError, match="Unknown mode"):
        register(pair_2d[0], pair_2d[1], weights=weights_2d, device="cpu", mode="affine")


def test_3d_weights_for_a_2d_image(pair_2d, weights_3d, empty_dir):
    with pytest.raises(WeightsError, match="for 3D images but .* needs a 2D model"):
        register(pair_2d[0], pair_2d[1], weights=weights_3d, device="cpu")


def test_2d_weights_for_volume_mode(volume, weights_2d, empty_dir):
    with pytest.raises(WeightsError, match="needs a 3D model .*slicewise"):
        register(volume, volume, weights=weights_2d, mode="volume", device="cpu")


def test_errors_are_sar_errors(pair_2d, weights_3d):
    with pytest.raises(SARError):
        register(pair_2d[0], pair_2d[1], weights=weights_3d, device="cpu")


@pytest.mark.parametrize("calls_before_cancel", [0, 1, 2, 4])
def test_cancel(pair_2d, weights_2d, empty_dir, calls_before_cancel):
    asked = []

    def cancel():
        asked.append(True)
        return len(asked) > calls_before_cancel

    with pytest.raises(RegistrationCancelled, match="cancelled"):
        register(pair_2d[0], pair_2d[1], weights=weights_2d, device="cpu", max_iterations=5, tolerance=0,
                 cancel=cancel)
    assert len(asked) == calls_before_cancel + 1


@pytest.mark.parametrize("affine", [False, True])
def test_outputs_made_in_slabs_equal_outputs_made_whole(volume, monkeypatch, affine):
    from SARRegistrationLib import registration

    floating = sitk.Resample(volume, sitk.TranslationTransform(3, (3.0, -2.0, 4.0)), sitk.sitkLinear)
    model = perturb_head(tiny_model(3), bias=[0.5, 1.0, -1.5], weight_std=0.03)
    results = []
    for slab in (1000, 4):  # whole, then 4 slabs of 4, 4, 4 and 3 slices
        monkeypatch.setattr(registration, "_OUTPUT_SLAB_SLICES", slab)
        # With the affine pre-alignment, instance optimisation is off: its path would turn the
        # pre-alignment's rounding (below) into differences of a few tenths of a voxel.
        results.append(register(volume, floating, model, mode="volume", device="cpu", finetune=False, affine=affine,
                                instance_optimisation=not affine))
    whole, slabs = results
    # Equal up to rounding: a slab's origin is computed, not copied, and the affine pre-alignment
    # (run anew for each registration) sums over voxels in threads, in no fixed order.
    np.testing.assert_allclose(_field_mm(slabs), _field_mm(whole), atol=1e-4 if affine else 1e-9)
    np.testing.assert_allclose(sitk.GetArrayFromImage(slabs.warped), sitk.GetArrayFromImage(whole.warped), atol=1e-3)
    _same_grid(slabs.displacement, volume)
    _same_grid(slabs.warped, volume)


def test_cancel_while_the_outputs_are_made(volume, monkeypatch):
    from SARRegistrationLib import registration

    monkeypatch.setattr(registration, "_OUTPUT_SLAB_SLICES", 4)
    messages = []
    with pytest.raises(RegistrationCancelled):
        register(volume, volume, tiny_model(3), mode="volume", device="cpu", finetune=False,
                 progress=lambda fraction, message: messages.append(message),
                 cancel=lambda: "warping the floating image" in messages)
    assert messages[-1] == "warping the floating image"  # stopped after the first slab of the warp


def test_3d_qa_figure_shows_three_planes_where_the_warped_mask_is_largest(tmp_path, volume):
    """A volume's QA figure shows the axial, coronal and sagittal planes through the slices where
    the warped mask is largest across (the middle ones without a mask), cut from slabs of the
    outputs and turned to LPS: this volume stores coronal slices (k runs anterior), yet its planes
    equal the whole volume's turned to LPS, images, masks, in-plane field and Jacobian alike."""
    from SARRegistrationLib.fields import displacement_in_voxels
    from SARRegistrationLib.imageio import normalise_intensity

    floating = sitk.Resample(volume, sitk.TranslationTransform(3, (3.0, -2.0, 4.0)), sitk.sitkLinear)
    array = np.zeros(sitk.GetArrayViewFromImage(volume).shape, np.uint8)  # 15 slices of 32 x 32
    array[2:5, 8:24, 10:20] = 1
    array[3, 4:28, 6:26] = 1  # widest across in slice 3
    mask = imageio.image_like(array, volume)
    model = perturb_head(tiny_model(3), bias=[0.5, 1.0, -1.5], weight_std=0.05)
    result = register(volume, floating, model, reference_mask=mask, floating_mask=mask, mode="volume",
                      device="cpu", max_iterations=2)
    warped_mask = sitk.GetArrayFromImage(result.warped_floating_mask)
    centre = [int(np.argmax(np.count_nonzero(warped_mask, axis=tuple(k for k in range(3) if k != axis))))
              for axis in range(3)]
    assert 2 <= centre[0] <= 4
    figure = result._qa_planes()
    assert [cut.name for cut in figure["planes"]] == [f"axial (j = {centre[1]})", f"coronal (k = {centre[0]})",
                                                      f"sagittal (i = {centre[2]})"]
    turned = {name: sitk.DICOMOrient(image, "LPS") for name, image in (
        ("reference", volume), ("mask", result.warped_floating_mask), ("field", result.displacement))}
    reference, turned_mask = (sitk.GetArrayFromImage(turned[name]) for name in ("reference", "mask"))
    displacement = displacement_in_voxels(turned["field"])
    whole = metrics.jacobian_determinant(displacement)
    focus = turned["reference"].TransformPhysicalPointToIndex(
        volume.TransformIndexToPhysicalPoint(tuple(centre[::-1])))[::-1]  # array order: S, P, L
    for axis, cut in enumerate(figure["planes"]):  # axial: along S (array axis 0), coronal: P, sagittal: L
        at = tuple(focus[axis] if k == axis else slice(None) for k in range(3))
        np.testing.assert_array_equal(cut.reference, normalise_intensity(reference[at]))
        np.testing.assert_array_equal(cut.masks["warped_mask"], turned_mask[at])
        np.testing.assert_allclose(cut.determinant, whole[at], atol=1e-9)
        np.testing.assert_allclose(cut.in_plane, displacement[[k for k in range(3) if k != axis]][(slice(None), *at)],
                                   atol=1e-9)
        assert cut.rows_up == (axis != 0)  # superior at the top of the coronal and sagittal planes
    assert figure["folded_fraction"] == result.metrics["folding_fraction"] == pytest.approx(np.mean(whole <= 0))
    result.save(tmp_path / "out")
    assert (tmp_path / "out" / "qa.png").read_bytes()[:4] == b"\x89PNG"

    # Without a mask, the middle slices; a mask widest on the first slice gives the second, which
    # has a neighbour on each side.
    plain = register(volume, floating, model, mode="volume", device="cpu", max_iterations=2)._qa_planes()
    assert [cut.name for cut in plain["planes"]] == ["axial (j = 16)", "coronal (k = 7)", "sagittal (i = 16)"]
    array[0] = 1
    edge = register(volume, floating, floating_mask=imageio.image_like(array, volume), network=False)._qa_planes()
    assert edge["planes"][1].name == "coronal (k = 1)"


@pytest.mark.parametrize("slices", [1, 5])
def test_qa_figure_of_a_thin_volume(tmp_path, slices, read_test_image):
    """A volume of one slice is drawn in its own plane only; one of 5 slices in three, whose k
    planes are narrower than the checkerboard's 8 tiles (which once killed the process)."""
    image = sitk.Shrink(read_test_image("brain_t1.nrrd"), [3, 3])
    mask = sitk.Shrink(read_test_image("brain_ventricles.nrrd"), [3, 3])
    volume, labels = (sitk.JoinSeries([source] * slices) for source in (image, mask))
    volume = sitk.Cast(volume, sitk.sitkFloat32)
    result = register(volume, volume, reference_mask=labels, floating_mask=labels,
                      optimisation_iterations=2, optimisation_levels=1)
    planes = result._qa_planes()["planes"]
    assert [cut.name.split()[0] for cut in planes] == (["axial"] if slices == 1 else ["axial", "coronal", "sagittal"])
    result.save(tmp_path / "out")
    assert (tmp_path / "out" / "qa.png").read_bytes()[:4] == b"\x89PNG"


def test_an_image_much_finer_than_the_working_grid_is_averaged_not_decimated():
    """Noise on a 1024 x 1024 image, on instance optimisation's 256 x 256 grid: every voxel is read
    (block means of 4 x 4 voxels, a quarter of the noise's spread), not the 4 around each grid point
    that linear resampling alone reads (about half of it: 0.499 against 0.250 here)."""
    from SARRegistrationLib.registration import OPTIMISATION_GRID_SIZE, network_input

    noise = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)
    image = sitk.GetImageFromArray(noise)
    grid = grids.working_grid(image, OPTIMISATION_GRID_SIZE[2], multiple=1)
    assert grid.GetSize() == (256, 256)
    working = network_input(image, grid, False, torch.device("cpu"), normalise=False)[0, 0].numpy()
    assert abs(working.std() - 0.25) < 0.03
