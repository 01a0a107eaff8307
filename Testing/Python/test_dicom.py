"""Tests of reading DICOM series (SARRegistrationLib.imageio.read_image): a series is read as one
volume from its folder or from any one of its files; folders that hold no series or several are
refused with a message that says what to give instead."""

import locale

import numpy as np
import pytest
import SimpleITK as sitk

from helpers import one_torch_thread, rotation_3d  # noqa: F401  (autouse fixture)
from SARRegistrationLib import batch, datasets, imageio, register
from SARRegistrationLib.errors import InputImageError

SHAPE = (6, 20, 24)  # z, y, x
SPACING = (1.5, 1.25, 3.0)  # x, y, z: unequal in-plane spacing catches rows and columns swapped
ORIGIN = (-40.0, 25.5, 110.0)
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
STUDY_UID = "1.2.826.0.1.3680043.2.1125.7"
CT_UID, MR_UID = STUDY_UID + ".1", STUDY_UID + ".2"


def _volume(shape=SHAPE, shift=0):
    """A smooth blob on a ramp (every slice different), in CT-like int16, shifted ``shift`` voxels along x."""
    z, y, x = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij")
    blob = np.exp(-((x - shift - shape[2] / 2) ** 2 / 30 + (y - shape[1] / 2) ** 2 / 20 + (z - shape[0] / 2) ** 2 / 4))
    return (-1000 + 1200 * blob + 7 * z + x).astype(np.int16)


def write_series(folder, array, uid, *, direction=IDENTITY, modality="CT", description="", suffix=".dcm"):
    """Write ``array`` (z, y, x) as a DICOM series of one file per slice, as a scanner would: each
    slice's position, orientation and spacing in its tags. The files are named in the reverse of
    their slice order, so that reading them in name order would flip the volume."""
    folder.mkdir(parents=True, exist_ok=True)
    volume = sitk.GetImageFromArray(array)
    volume.SetOrigin(ORIGIN)
    volume.SetSpacing(SPACING)
    volume.SetDirection(direction)
    writer = sitk.ImageFileWriter()
    writer.SetImageIO("GDCMImageIO")  # files without a suffix too
    writer.KeepOriginalImageUIDOn()
    # GDCM's writer of tags sets the C locale, which would make later tests' files ASCII.
    process_locale = locale.setlocale(locale.LC_ALL)
    try:
        for k in range(array.shape[0]):
            image = sitk.GetImageFromArray(array[k])
            image.SetSpacing(SPACING[:2])
            tags = {"0008|0060": modality, "0008|103e": description, "0020|000d": STUDY_UID, "0020|000e": uid,
                    "0020|0032": "\\".join(map(str, volume.TransformIndexToPhysicalPoint((0, 0, k)))),
                    "0020|0037": "\\".join(map(str, direction[0::3] + direction[1::3])),  # row, then column cosines
                    "0028|0030": f"{SPACING[1]}\\{SPACING[0]}", "0018|0050": str(SPACING[2]),
                    "0020|0013": str(k + 1)}
            for tag, value in tags.items():
                image.SetMetaData(tag, value)
            writer.SetFileName(str(folder / f"{uid[-1]}_{array.shape[0] - k:03d}{suffix}"))
            writer.Execute(image)
    finally:
        locale.setlocale(locale.LC_ALL, process_locale)
    return volume


def _files_and_times(folder):
    return {path: path.stat().st_mtime_ns for path in folder.rglob("*")}


@pytest.mark.parametrize("direction", [IDENTITY, rotation_3d(30.0, -20.0)], ids=["axial", "oblique"])
def test_series_folder_is_read_as_one_volume_with_its_geometry(tmp_path, direction):
    array = _volume()
    written = write_series(tmp_path / "ct", array, CT_UID, direction=direction)

    read = imageio.read_image(tmp_path / "ct", "reference")

    assert read.GetSize() == written.GetSize() == (24, 20, 6)
    np.testing.assert_allclose(read.GetSpacing(), SPACING, atol=1e-5)  # the slice spacing too
    np.testing.assert_allclose(read.GetOrigin(), ORIGIN, atol=1e-4)
    np.testing.assert_allclose(read.GetDirection(), direction, atol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read), array)


def test_one_file_reads_the_whole_series_it_belongs_to(tmp_path):
    """A folder of two series: a file of each picks its own; the MR's files have no suffix (DICOM by its marker)."""
    ct, mr = _volume(), _volume((4, 20, 24), shift=3)[:, ::-1]
    write_series(tmp_path, ct, CT_UID)
    write_series(tmp_path, mr, MR_UID, modality="MR", suffix="")

    read_ct = imageio.read_image(tmp_path / "1_003.dcm", "reference")
    read_mr = imageio.read_image(tmp_path / "2_002", "floating image")

    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_ct), ct)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_mr), mr)
    np.testing.assert_allclose(read_mr.GetSpacing(), SPACING, atol=1e-5)


def test_a_file_alone_in_its_series_is_read_alone_as_a_2d_image(tmp_path):
    """A single slice (an X-ray, say) is 2D, as a PNG of it is: ITK alone reads a volume one slice thick."""
    write_series(tmp_path, _volume(), CT_UID)
    write_series(tmp_path, _volume()[2:3], MR_UID, modality="MR")

    read = imageio.read_image(tmp_path / "2_001.dcm")

    assert read.GetDimension() == 2 and read.GetSize() == (24, 20)
    np.testing.assert_allclose(read.GetSpacing(), SPACING[:2], atol=1e-5)
    np.testing.assert_allclose(read.GetOrigin(), ORIGIN[:2], atol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read), _volume()[2])


def test_folder_of_several_series_lists_them_and_says_what_to_give(tmp_path):
    write_series(tmp_path, _volume(), CT_UID, description="chest 3 mm")
    write_series(tmp_path, _volume((4, 20, 24)), MR_UID, modality="MR")
    before = _files_and_times(tmp_path)

    with pytest.raises(InputImageError) as raised:
        imageio.read_image(tmp_path, "reference")

    message = str(raised.value)
    assert f"reference folder {str(tmp_path)!r} holds 2 DICOM series" in message
    assert f"{CT_UID} (6 files, CT, 'chest 3 mm')" in message and f"{MR_UID} (4 files, MR)" in message
    assert "Give one file of the series you want, or a folder that holds only that series" in message
    assert _files_and_times(tmp_path) == before


def _empty(folder):
    pass


def _not_dicom(folder):
    (folder / "notes.txt").write_text("not an image")
    (folder / "fake.dcm").write_bytes(bytes(300))
    sitk.WriteImage(sitk.Image(8, 8, sitk.sitkUInt8), str(folder / "image.png"))


@pytest.mark.parametrize("fill", [_empty, _not_dicom])
def test_folder_without_a_series_says_what_sar_reads(tmp_path, fill):
    folder = tmp_path / "scans"
    folder.mkdir()
    fill(folder)
    before = _files_and_times(tmp_path)

    with pytest.raises(InputImageError, match=r"The floating image folder .*scans' holds no DICOM series .*"
                                              r"SAR reads \.nrrd, .*\.png files and DICOM series: a folder of one "
                                              r"series, or any one file of a series\.$"):
        imageio.read_image(folder, "floating image")
    assert _files_and_times(tmp_path) == before


def test_a_missing_path_does_not_exist_and_a_damaged_dicom_file_is_unreadable(tmp_path):
    with pytest.raises(InputImageError, match="reference file .*no_series.* does not exist"):
        imageio.read_image(tmp_path / "no_series", "reference")
    (tmp_path / "fake.dcm").write_bytes(bytes(300))
    with pytest.raises(InputImageError, match="reference file .*fake.dcm.* could not be read as an image"):
        imageio.read_image(tmp_path / "fake.dcm", "reference")


def test_batch_ids_and_training_folders_of_a_series(tmp_path):
    """A manifest's series folder gives its whole name as the pair's id (dots are not a suffix), and
    ``train --images`` takes a folder of no image files as the series it holds."""
    write_series(tmp_path / "CT.2024.01", _volume(), CT_UID)
    (tmp_path / "pairs.csv").write_text("reference,floating\nCT.2024.01,CT.2024.01\n")

    assert [pair.id for pair in batch.read_pairs(tmp_path / "pairs.csv")] == ["CT.2024.01"]
    assert datasets.expand_image_paths([tmp_path / "CT.2024.01"]) == [tmp_path / "CT.2024.01"]


def test_register_two_series_folders(tmp_path):
    """Series folders register as the same volumes saved as NRRD files do; the output is on the reference's grid."""
    reference = write_series(tmp_path / "reference", _volume(), CT_UID)
    floating = write_series(tmp_path / "floating", np.roll(_volume(), 1, axis=2), MR_UID)
    for name, image in (("reference.nrrd", reference), ("floating.nrrd", floating)):
        sitk.WriteImage(image, str(tmp_path / name))
    options = {"device": "cpu", "affine": False, "optimisation_levels": 1, "optimisation_iterations": 10}

    warped = register(reference=tmp_path / "reference", floating=tmp_path / "floating", **options).warped
    from_files = register(reference=tmp_path / "reference.nrrd", floating=tmp_path / "floating.nrrd", **options).warped

    assert warped.GetSize() == reference.GetSize()
    np.testing.assert_allclose(warped.GetSpacing(), SPACING, atol=1e-5)
    np.testing.assert_allclose(warped.GetOrigin(), ORIGIN, atol=1e-4)
    np.testing.assert_allclose(warped.GetDirection(), IDENTITY, atol=1e-6)
    np.testing.assert_allclose(sitk.GetArrayFromImage(warped), sitk.GetArrayFromImage(from_files), atol=1e-3)
