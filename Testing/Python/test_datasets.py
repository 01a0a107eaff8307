"""Image folders with masks, patient-level splits and the pair datasets."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SARRegistrationLib import datasets, spatial

# ChestX-ray14-style names: patient 1 has three visits, patient 2 one, patient 3 two.
NAMES = ["00000001_000.png", "00000001_001.png", "00000001_002.png", "00000002_000.png",
         "00000003_000.png", "00000003_001.png"]


@pytest.fixture
def xray_folder(tmp_path):
    """PNG folder: grey images, one of them stored as RGB with equal channels, and masks for some."""
    image_dir, mask_dir = tmp_path / "images", tmp_path / "masks"
    image_dir.mkdir()
    mask_dir.mkdir()
    rng = np.random.default_rng(0)
    for k, name in enumerate(NAMES):
        grey = rng.integers(0, 256, size=(20, 24), dtype=np.uint8)
        image = sitk.GetImageFromArray(np.repeat(grey[..., None], 3, axis=-1), isVector=True) if k == 0 \
            else sitk.GetImageFromArray(grey)
        sitk.WriteImage(image, str(image_dir / name))
        if k % 2 == 0:  # masks exist for some images only; 255 inside, as lung masks are stored
            mask = np.zeros((20, 24), np.uint8)
            mask[5:10 + k, 4:12] = 255
            sitk.WriteImage(sitk.GetImageFromArray(mask), str(mask_dir / name))
    (image_dir / "notes.txt").write_text("not an image")
    return image_dir, mask_dir


def test_patient_id():
    assert datasets.patient_id("/data/images/00000001_000.png") == "00000001"
    assert datasets.patient_id("00012345_010.nii.gz") == "00012345"
    assert datasets.patient_id("case7.nrrd") == "case7"


def test_folder_images_are_paired_with_masks_by_name(xray_folder):
    """What ``train --images DIR --masks DIR`` reads: every image file of the folder, masks by name."""
    image_dir, mask_dir = xray_folder
    paths = datasets.expand_image_paths([image_dir])
    assert [path.name for path in paths] == NAMES
    assert [datasets.patient_id(path) for path in paths] == ["00000001"] * 3 + ["00000002"] + ["00000003"] * 2
    sources = datasets.load_training_sources(paths, mask_dir)
    assert len(sources) == len(NAMES)
    for k, (name, (image, mask)) in enumerate(zip(NAMES, sources)):
        assert image.GetNumberOfComponentsPerPixel() == 1
        assert image.GetSize() == (24, 20)
        if k % 2 == 0:
            assert datasets.mask_path_for(paths[k], mask_dir) == mask_dir / name
            expected = np.zeros((20, 24), np.uint8)
            expected[5:10 + k, 4:12] = 1
            np.testing.assert_array_equal(sitk.GetArrayFromImage(mask), expected)
        else:
            assert datasets.mask_path_for(paths[k], mask_dir) is None and mask is None
    assert all(mask is None for _, mask in datasets.load_training_sources(paths))


def test_equal_colour_channels_read_as_one(xray_folder):
    image_dir, _ = xray_folder
    colour = sitk.ReadImage(str(image_dir / NAMES[0]))
    assert colour.GetNumberOfComponentsPerPixel() == 3
    grey = datasets.read_image(image_dir / NAMES[0])
    assert grey.GetNumberOfComponentsPerPixel() == 1
    np.testing.assert_array_equal(sitk.GetArrayFromImage(grey), sitk.GetArrayFromImage(colour)[..., 0])


def _many_patients(num_patients=60):
    rng = np.random.default_rng(1)
    return [f"/x/{p:08d}_{v:03d}.png" for p in range(num_patients) for v in range(rng.integers(1, 6))]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_by_patient_keeps_patients_together(seed):
    paths = _many_patients()
    folds = datasets.split_by_patient(paths, (0.7, 0.1, 0.2), seed=seed)
    assert set(folds) == {"train", "validation", "test"}
    assert sorted(sum(folds.values(), [])) == sorted(paths)
    patients = {name: {datasets.patient_id(p) for p in fold} for name, fold in folds.items()}
    assert not patients["train"] & patients["validation"]
    assert not patients["train"] & patients["test"]
    assert not patients["validation"] & patients["test"]
    for name, fraction in zip(("train", "validation", "test"), (0.7, 0.1, 0.2)):
        # Off by at most one patient (5 images) at each fold boundary.
        assert abs(len(folds[name]) - fraction * len(paths)) <= 10
    assert folds == datasets.split_by_patient(paths, (0.7, 0.1, 0.2), seed=seed)


def test_split_by_patient_depends_on_seed_and_fractions():
    paths = _many_patients()
    assert datasets.split_by_patient(paths, seed=0) != datasets.split_by_patient(paths, seed=1)
    folds = datasets.split_by_patient(paths, (1, 0, 1))
    assert folds["validation"] == []
    assert abs(len(folds["train"]) - len(paths) / 2) <= 5


def test_resample_to_shape_keeps_the_physical_extent(read_test_image):
    volume = read_test_image("brain3d_t1.nii.gz")
    resampled = datasets.resample_to_shape(volume, (31, 48, 40))
    assert sitk.GetArrayViewFromImage(resampled).shape == (31, 48, 40)
    assert resampled.GetDirection() == volume.GetDirection()
    for image_corner in ([-0.5] * 3, [n - 0.5 for n in volume.GetSize()]):
        resampled_corner = [-0.5] * 3 if image_corner[0] < 0 else [n - 0.5 for n in resampled.GetSize()]
        np.testing.assert_allclose(resampled.TransformContinuousIndexToPhysicalPoint(resampled_corner),
                                   volume.TransformContinuousIndexToPhysicalPoint(image_corner), atol=1e-9)
    assert abs(sitk.GetArrayViewFromImage(resampled).mean() - sitk.GetArrayViewFromImage(volume).mean()) < 1.0


EXPECTED_KEYS = {"reference", "floating", "reference_mask", "floating_mask", "displacement"}


def _check_item(item, shape):
    assert set(item) == EXPECTED_KEYS
    for name, tensor in item.items():
        assert tensor.dtype == torch.float32
        assert tuple(tensor.shape) == ((len(shape),) if name == "displacement" else (1,)) + tuple(shape)
    for name in ("reference", "floating"):
        assert 0.0 <= item[name].min() and item[name].max() <= 1.0
    for name in ("reference_mask", "floating_mask"):
        assert set(torch.unique(item[name]).tolist()) <= {0.0, 1.0}
        assert item[name].mean() > 0.01


def test_pair_dataset_items(read_test_image):
    sources = [(read_test_image("rat_lung_1.nrrd"), None),
               (read_test_image("fat_mri.nrrd"), read_test_image("fat_mri.nrrd") > 40)]
    dataset = datasets.PairDataset(sources, (64, 64), length=5, seed=3)
    assert len(dataset) == 5
    for index in range(len(dataset)):
        _check_item(dataset[index], (64, 64))
    first, again = dataset[2], dataset[2]
    for name in EXPECTED_KEYS:
        assert torch.equal(first[name], again[name])
    assert not torch.equal(dataset[0]["displacement"], dataset[2]["displacement"])
    other_seed = datasets.PairDataset(sources, (64, 64), length=5, seed=4)
    assert not torch.equal(first["displacement"], other_seed[2]["displacement"])
    with pytest.raises(IndexError):
        dataset[5]


def test_pair_dataset_field_is_known_on_the_working_grid(read_test_image):
    dataset = datasets.PairDataset([(read_test_image("fat_mri.nrrd"), None)], (96, 96), length=1,
                                   intensity=False, max_displacement_mm=12.0)
    item = dataset[0]
    warped = spatial.warp(item["floating"][None], item["displacement"][None])[0]
    error = (warped - item["reference"]).abs().mean()
    assert error < (item["floating"] - item["reference"]).abs().mean() / 20


def test_synthetic_pair_dataset_3d():
    dataset = datasets.SyntheticPairDataset((24, 32, 28), length=3, seed=5, spacing=(1.5, 1.5, 2.0),
                                            max_displacement_mm=4.0)
    item = dataset[1]
    _check_item(item, (24, 32, 28))
    assert torch.equal(item["floating"], dataset[1]["floating"])
    assert not torch.equal(item["floating"], dataset[2]["floating"])
    # The B-spline bound is in mm: at most 4 mm / 1.5 mm per voxel along x and y, 4 / 2 along z.
    bound = torch.tensor([4.0 / 2.0, 4.0 / 1.5, 4.0 / 1.5]).view(3, 1, 1, 1)
    assert torch.all(item["displacement"].abs() <= bound + 1e-5)


def test_datasets_work_with_a_loader(read_test_image):
    dataset = datasets.PairDataset([(read_test_image("rat_lung_1.nrrd"), None)], (32, 32), length=4)
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=2)))
    assert batch["displacement"].shape == (2, 2, 32, 32)
    assert batch["reference"].shape == (2, 1, 32, 32)

