"""The bad-input matrix (issue 5), as users meet it on the command line and in the Python API.

Every refused input stops ``register`` with ``error: <a message naming the problem>`` and exit
status 2, and leaves no output behind. Every hard but valid input (integer types of any range,
thick slices, oblique directions, tiny images) is registered with correct geometry. The README's
table of bad inputs lists every refused case of this file, with the words the user sees.
"""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from helpers import (RunsCodeOnLoad, index_to_physical, one_torch_thread, perturb_head, rotation_3d,  # noqa: F401
                     small_float, small_pair_2d, tiny_model, with_geometry)
from SARRegistrationLib import cli, grids, register
from SARRegistrationLib.model import CHECKPOINT_FORMAT, save_model

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(scope="module")
def good(tmp_path_factory, read_test_image):
    """Valid inputs as files: a small 2D pair, a small 3D volume, and tiny 2D and 3D weights."""
    folder = tmp_path_factory.mktemp("good_inputs")
    reference, floating = small_pair_2d(read_test_image, 3)
    volume = small_float(read_test_image("brain3d_t1.nii.gz"), 4)
    paths = {"reference": folder / "reference.nrrd", "floating": folder / "floating.nrrd",
             "volume": folder / "volume.nrrd", "weights_2d": folder / "tiny_2d.pt", "weights_3d": folder / "tiny_3d.pt"}
    for image, name in ((reference, "reference"), (floating, "floating"), (volume, "volume")):
        sitk.WriteImage(image, str(paths[name]))
    save_model(tiny_model(2), paths["weights_2d"])
    save_model(tiny_model(3), paths["weights_3d"])
    return {**paths, "images": {"reference": reference, "floating": floating, "volume": volume}}


def _write(image: sitk.Image, path: Path) -> Path:
    sitk.WriteImage(image, str(path))
    return path


def _modified_floating(good, change) -> sitk.Image:
    array = sitk.GetArrayFromImage(good["images"]["floating"])
    image = sitk.GetImageFromArray(change(array))
    image.CopyInformation(good["images"]["floating"])
    return image


# Each refused case: a name (as in README's table), what it changes in the command line, and the
# words the error message must contain. A builder gets (folder, good inputs) and returns options.

def two_d_against_three_d(folder, good):
    return {"--floating": good["volume"]}


def four_d_image(folder, good):
    volume = good["images"]["volume"]
    return {"--floating": _write(sitk.JoinSeries([volume, volume]), folder / "four_d.nrrd")}


def colour_image(folder, good):
    floating = good["images"]["floating"]
    return {"--floating": _write(sitk.Compose(floating, floating * 0.5, floating), folder / "colour.nrrd")}


def empty_file(folder, good):
    (folder / "empty.nrrd").write_bytes(b"")
    return {"--floating": folder / "empty.nrrd"}


def all_zero_image(folder, good):
    return {"--floating": _write(_modified_floating(good, np.zeros_like), folder / "zeros.nrrd")}


def nan_voxels(folder, good):
    def with_nan(array):
        array[5:8, 5:8] = np.nan
        return array
    return {"--floating": _write(_modified_floating(good, with_nan), folder / "nan.nrrd")}


def infinite_voxels(folder, good):
    def with_inf(array):
        array[0, 0] = np.inf
        return array
    return {"--reference": _write(_modified_floating(good, with_inf), folder / "inf.nrrd")}


def too_small_image(folder, good):
    return {"--reference": _write(sitk.GetImageFromArray(np.random.default_rng(0).random((3, 3))),
                                  folder / "three_by_three.nrrd")}


def single_slice_volume_mode(folder, good):
    one_slice = good["images"]["volume"][:, :, 7:8]
    path = _write(one_slice, folder / "one_slice.nrrd")
    return {"--reference": path, "--floating": path, "--weights": good["weights_3d"], "--mode": "volume"}


def no_physical_overlap(folder, good):
    far = sitk.Image(good["images"]["floating"])
    far.SetOrigin([value + 1000.0 for value in far.GetOrigin()])
    return {"--floating": _write(far, folder / "far_away.nrrd")}


def corrupt_file(folder, good):
    (folder / "noise.nrrd").write_bytes(np.random.default_rng(0).bytes(4000))
    return {"--floating": folder / "noise.nrrd"}


def _truncated(source: Path, target: Path) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[:len(data) * 2 // 3])
    return target


def truncated_nrrd(folder, good):
    return {"--floating": _truncated(good["floating"], folder / "truncated.nrrd")}


def truncated_nifti(folder, good):
    whole = _write(good["images"]["floating"], folder / "whole.nii.gz")
    return {"--floating": _truncated(whole, folder / "truncated.nii.gz")}


def missing_file(folder, good):
    return {"--floating": folder / "no_such_file.nrrd"}


def mask_of_another_dimension(folder, good):
    return {"--reference-mask": good["volume"]}


def foreign_weights(folder, good):
    torch.save({"state_dict": {"weight": torch.zeros(3)}}, folder / "other_model.pt")
    return {"--weights": folder / "other_model.pt"}


def weights_that_run_code(folder, good):
    torch.save({"format": CHECKPOINT_FORMAT, "version": 1,
                "payload": RunsCodeOnLoad(f"touch '{folder / 'code_ran'}'")}, folder / "malicious.pt")
    return {"--weights": folder / "malicious.pt"}


def weights_not_matching_card(folder, good):
    weights = save_model(tiny_model(2, seed=1), folder / "tampered.pt")
    (folder / "tampered.json").write_text(json.dumps({"sha256": "0" * 64}))
    return {"--weights": weights}


def truncated_weights(folder, good):
    return {"--weights": _truncated(good["weights_2d"], folder / "truncated.pt")}


def missing_weights(folder, good):
    return {"--weights": folder / "no_such_weights.pt"}


def two_d_weights_for_volume_mode(folder, good):
    return {"--reference": good["volume"], "--floating": good["volume"], "--mode": "volume"}


def cuda_without_gpu(folder, good):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU, so device cuda is valid here")
    return {"--device": "cuda"}


def no_iterations(folder, good):
    return {"--max-iterations": "0"}


def negative_tolerance(folder, good):
    return {"--tolerance": "-1"}


def output_folder_is_a_file(folder, good):
    (folder / "out").write_text("a file where the output folder should be")
    return {}


REFUSED = [
    ("2D reference, 3D floating image", two_d_against_three_d, "is 2D but the floating image is 3D"),
    ("4D image (a time series)", four_d_image, "is 4D; SAR registers 2D images and 3D volumes"),
    ("colour or vector image", colour_image, "components per voxel"),
    ("empty (zero-byte) file", empty_file, "could not be read as an image"),
    ("all-zero or constant image", all_zero_image, "is constant"),
    ("NaN voxels", nan_voxels, "NaN or infinite voxels"),
    ("infinite voxels", infinite_voxels, "NaN or infinite voxels"),
    ("tiny image (3 x 3)", too_small_image, "too small to register"),
    ("single-slice volume in volume mode", single_slice_volume_mode, "slice-wise (mode 'slicewise')"),
    ("no physical overlap (origins 1 m apart)", no_physical_overlap, "does not overlap the reference"),
    ("corrupt file (random bytes)", corrupt_file, "could not be read as an image"),
    ("truncated NRRD file", truncated_nrrd, "could not be read as an image"),
    ("truncated NIfTI file", truncated_nifti, "is truncated or corrupt"),
    ("missing file", missing_file, "does not exist"),
    ("mask of another dimension", mask_of_another_dimension, "reference mask is 3D but the reference is 2D"),
    ("weights of another program", foreign_weights, "not a SAR weights file"),
    ("weights file that would run code", weights_that_run_code, "loading them could run code"),
    ("weights not matching their model card", weights_not_matching_card, "does not match its model card"),
    ("truncated weights file", truncated_weights, "not a readable SAR weights file"),
    ("missing weights file", missing_weights, "does not exist"),
    ("2D weights for volume mode", two_d_weights_for_volume_mode, "needs a 3D model"),
    ("CUDA asked for, none present", cuda_without_gpu, "sees no CUDA GPU"),
    ("iteration limit 0", no_iterations, "iteration limit must be a whole number of at least 1"),
    ("negative tolerance", negative_tolerance, "tolerance must be a finite number of at least 0"),
    ("output folder is a file", output_folder_is_a_file, "is a file, not a folder"),
]


@pytest.mark.parametrize("name, build, message", REFUSED, ids=[case[1].__name__ for case in REFUSED])
def test_refused_input_names_the_problem_and_writes_nothing(tmp_path, good, capsys, name, build, message):
    options = {"--reference": good["reference"], "--floating": good["floating"], "--output-dir": tmp_path / "out",
               "--weights": good["weights_2d"], "--device": "cpu", "--max-iterations": "2"}
    options.update(build(tmp_path, good))
    before = {path: path.stat().st_mtime_ns for path in tmp_path.rglob("*")}

    status = cli.main(["register", *(str(item) for option in options.items() for item in option)])

    error = capsys.readouterr().err
    assert status == 2
    last_line = error.strip().splitlines()[-1]  # after the progress bar
    assert last_line.startswith("error: ") and message in last_line, error
    assert "Traceback" not in error
    # Nothing was written: no output folder, no file changed, and no code ran from a weights file.
    assert {path: path.stat().st_mtime_ns for path in tmp_path.rglob("*")} == before


def test_readme_lists_every_refused_input_with_its_message():
    section = README.read_text().split("### Bad inputs", 1)[1].splitlines()
    start = next(i for i, line in enumerate(section) if line.startswith("|"))
    table = section[start:start + next(i for i, line in enumerate(section[start:] + [""]) if not line.startswith("|"))]
    rows = {cells[0]: cells[1] for cells in (re.split(r"\s*\|\s*", line.strip("| ")) for line in table[2:])}
    for name, _, message in REFUSED:
        assert name in rows, f"README's bad-input table has no row '{name}'"
        assert message in rows[name].replace("`", ""), f"README's row '{name}' does not quote '{message}'"


# ----------------------------------------------------------------------------------------- accepted

INTEGER_TYPES = [np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32, np.uint64, np.int64]


@pytest.fixture(scope="module")
def float_result(good):
    model = perturb_head(tiny_model(2), bias=[0.5, -0.75], weight_std=0.02)
    images = good["images"]
    return model, {optimise: register(images["reference"], images["floating"], model, device="cpu", max_iterations=3,
                                      tolerance=0, instance_optimisation=optimise) for optimise in (False, True)}


@pytest.mark.parametrize("dtype", INTEGER_TYPES + [np.float64], ids=lambda dtype: np.dtype(dtype).name)
def test_integer_types_of_full_range_register_like_float(good, float_result, dtype):
    """Intensities stretched over a type's whole range (e.g. 0 to 2**64) must not overflow anywhere:
    the field is that of the float32 images, whose intensities are an affine map of these. Instance
    optimisation, whose path is a sensitive function of its inputs (a change of 1e-7 in the
    intensities moves its field by up to a few tenths of a voxel), must reach the same objective:
    within 0.02 of the 0.17 it gains (with the bias field, the objective reached varied by up to 0.016
    between these types on this 60 x 72 pair; without it, by 0.003)."""
    model, expected_by_optimisation = float_result
    expected = expected_by_optimisation[False]
    limits = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else np.finfo(np.float32)
    # 0.99 of the range: float64 cannot hold 2**63 - 1 exactly, and must not round past it.
    low, high = 0.99 * float(limits.min), 0.99 * float(limits.max)

    def stretched(image):
        array = sitk.GetArrayFromImage(image).astype(np.float64)
        array = low + (array - array.min()) / (array.max() - array.min()) * (high - low)
        result = sitk.GetImageFromArray(array.astype(dtype))
        result.CopyInformation(image)
        return result

    images = good["images"]
    for optimise in (False, True):
        result = register(stretched(images["reference"]), stretched(images["floating"]), model, device="cpu",
                          max_iterations=3, tolerance=0, instance_optimisation=optimise)
        warped = sitk.GetArrayFromImage(result.warped)
        assert np.isfinite(warped).all() and warped.min() >= low * 1.0001 - 1 and warped.max() <= high * 1.0001 + 1
        if optimise:
            assert np.isfinite(sitk.GetArrayFromImage(result.displacement)).all()
            reached, expected_loss = (run.metrics["instance_optimisation"]["loss_after"]
                                      for run in (result, expected_by_optimisation[True]))
            assert reached == pytest.approx(expected_loss, abs=0.02)
        else:
            np.testing.assert_allclose(sitk.GetArrayFromImage(result.displacement),
                                       sitk.GetArrayFromImage(expected.displacement), atol=0.02)


@pytest.mark.parametrize("spacing, direction", [
    ((0.5, 0.5, 5.0), rotation_3d(0.0, 0.0)),  # thick CT/MR slices
    ((1.1, 0.9, 1.3), rotation_3d(25.0, -35.0)),  # oblique acquisition
    ((0.5, 0.5, 5.0), rotation_3d(-15.0, 40.0)),  # both
], ids=["anisotropic", "oblique", "anisotropic_oblique"])
def test_anisotropic_and_oblique_volumes_get_the_physical_field(good, spacing, direction):
    """A constant network field of ``bias`` working voxels is the same physical vector everywhere,
    whatever the spacing and direction; the warp by that field is that translation."""
    volume = with_geometry(good["images"]["volume"], (-20.0, 35.0, 10.0), spacing, direction)
    floating = with_geometry(good["images"]["volume"], (-18.0, 33.0, 12.0), spacing, direction)
    bias = np.array([0.5, -1.0, 0.75])  # working-grid voxels along array axes (z, y, x)
    model = perturb_head(tiny_model(3), bias=bias)
    # affine=False: the pair is 2 mm apart, which the automatic pre-alignment would take up.
    result = register(volume, floating, model, mode="volume", device="cpu", finetune=False, instance_optimisation=False,
                      affine=False)

    grid = grids.working_grid(volume, model.working_size, model.generator.shape_multiple)
    expected_mm = index_to_physical(grid) @ bias[::-1]
    field = sitk.GetArrayFromImage(result.displacement)
    np.testing.assert_allclose(field, np.broadcast_to(expected_mm, field.shape), atol=1e-6)
    for image in (result.warped, result.displacement):
        assert image.GetSize() == volume.GetSize()
        np.testing.assert_allclose(image.GetSpacing(), spacing)
        np.testing.assert_allclose(image.GetDirection(), direction, atol=1e-12)
        np.testing.assert_allclose(image.GetOrigin(), volume.GetOrigin())
    translated = sitk.Resample(floating, volume, sitk.TranslationTransform(3, expected_mm.tolist()), sitk.sitkLinear,
                               0.0, sitk.sitkFloat32)
    np.testing.assert_allclose(sitk.GetArrayFromImage(result.warped), sitk.GetArrayFromImage(translated), atol=1e-3)


@pytest.mark.parametrize("shape, mode, ndims", [((8, 8, 8), "volume", 3), ((8, 8, 8), "slicewise", 2),
                                                ((8, 8), "volume", 2), ((1, 16, 16), "slicewise", 2),
                                                ((4, 4, 4), "volume", 3)],
                         ids=["8^3_volume", "8^3_slicewise", "8x8", "single_slice_slicewise", "4^3_volume"])
def test_tiny_images_register(shape, mode, ndims, tmp_path):
    array = np.random.default_rng(0).random(shape).astype(np.float32)
    reference, floating = sitk.GetImageFromArray(array), sitk.GetImageFromArray(np.roll(array, 1, axis=-1))
    result = register(reference, floating, tiny_model(ndims), mode=mode, device="cpu", max_iterations=3)
    assert result.displacement.GetSize() == reference.GetSize()
    assert np.isfinite(sitk.GetArrayFromImage(result.displacement)).all()
    assert 0.0 <= result.metrics["folding_fraction"] <= 1.0
    # Saved as the command line saves, QA figure included (narrower than its checkerboard's tiles).
    assert (tmp_path / "qa.png") in result.save(tmp_path)
