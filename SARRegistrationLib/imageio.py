"""Images in: reading and checking them, array and image conversion, intensity normalisation.

SimpleITK images carry the geometry (origin, spacing, direction, in ITK's LPS physical space);
numpy arrays and tensors are in SimpleITK's array order (``z, y, x``). Geometry never lives in an
array: whatever leaves this module as an array comes back through a SimpleITK image of known grid.
"""

from __future__ import annotations

import contextlib
import gzip
import math
import struct
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputImageError, last_line

SUPPORTED_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd", ".png")
READABLE = (f"{', '.join(SUPPORTED_SUFFIXES)} files and DICOM series: a folder of one series, "
            "or any one file of a series")
# Fewer voxels than this along a registered axis leave nothing to deform.
MIN_VOXELS_PER_AXIS = 4
SERIES_UID, SERIES_DESCRIPTION, MODALITY = "0020|000e", "0008|103e", "0008|0060"


def read_image(path, role: str = "image", allow_constant: bool = False) -> sitk.Image:
    """Read an image file, or a DICOM series, and check that it can be registered.

    A folder is read as the one DICOM series it holds, and a DICOM file as the whole series it
    belongs to in its folder (alone where it is alone in its series), so one file picks one series
    out of a folder of several. Colour files whose channels are all equal (grey PNGs saved as RGB)
    are read as one channel. ``role`` names the input in error messages ("reference", "floating
    mask", ...).
    """
    path = Path(path)
    is_folder = path.is_dir()
    if not is_folder and not path.is_file():
        raise InputImageError(f"The {role} file {str(path)!r} does not exist.")
    try:
        if is_folder:
            image = _read_dicom_folder(path, role)
        elif _is_dicom(path):
            image = _read_dicom_series_of(path)
        else:
            image = sitk.ReadImage(str(path))
            _check_nifti_complete(path, role)
    except RuntimeError as error:
        reason = last_line(error, "unknown reason")
        if "Unable to determine ImageIO reader" in reason:
            reason = f"its format is not recognised or it is damaged (SAR reads {READABLE})"
        raise InputImageError(f"The {role} {'folder' if is_folder else 'file'} {str(path)!r} could not be read "
                              f"as an image: {reason}.") from None
    return check_image(image, role, allow_constant)


def _is_dicom(path: Path) -> bool:
    """A ``.dcm`` file, or any with the DICOM part 10 marker "DICM" at byte 128 (many have no suffix)."""
    if path.name.lower().endswith(".dcm"):
        return True
    try:
        with open(path, "rb") as stream:
            return stream.read(132)[128:] == b"DICM"
    except OSError:
        return False


@contextlib.contextmanager
def _itk_warnings_off():
    """GDCM's series scan prints ITK warnings ("No Series were found") where SAR raises a clearer error."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def _series_files(folder: Path, uid: str) -> tuple[str, ...]:
    """The files of series ``uid`` in ``folder``, in slice order."""
    with _itk_warnings_off():
        return sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)


def _read_series(files) -> sitk.Image:
    """Several files stacked by the series reader, which takes the slice spacing from their
    positions; one file (a multi-frame volume, or one slice: an X-ray, say) as it is, except that a
    single slice is a 2D image, as a PNG of it would be (ITK reads it as a volume one slice thick)."""
    image = sitk.ReadImage(list(files) if len(files) > 1 else files[0])
    return image[:, :, 0] if image.GetDimension() == 3 and image.GetSize()[2] == 1 else image


def _dicom_tags(path, keys) -> dict[str, str]:
    """The tags ``keys`` that the file holds, without DICOM's padding."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return {key: reader.GetMetaData(key).strip(" \0") for key in keys if reader.HasMetaDataKey(key)}


def _read_dicom_series_of(path: Path) -> sitk.Image:
    """The series of the DICOM file ``path``: the files of its folder with its SeriesInstanceUID."""
    uid = _dicom_tags(path, [SERIES_UID]).get(SERIES_UID)
    files = _series_files(path.parent, uid) if uid else ()
    if path.name not in {Path(name).name for name in files}:
        files = (str(path),)
    return _read_series(files)


def _read_dicom_folder(folder: Path, role: str) -> sitk.Image:
    """The one DICOM series of ``folder`` (not its subfolders)."""
    with _itk_warnings_off():
        uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not uids:
        raise InputImageError(f"The {role} folder {str(folder)!r} holds no DICOM series (its subfolders are not "
                              f"searched). SAR reads {READABLE}.")
    files = {uid: _series_files(folder, uid) for uid in uids}
    if len(uids) > 1:
        listing = "; ".join(_series_summary(uid, names) for uid, names in files.items())
        raise InputImageError(f"The {role} folder {str(folder)!r} holds {len(uids)} DICOM series: {listing}. Give "
                              "one file of the series you want, or a folder that holds only that series.")
    return _read_series(files[uids[0]])


def _series_summary(uid: str, files) -> str:
    """``uid (n files, modality, 'description')``, the tags from its first file where it has them."""
    try:
        tags = _dicom_tags(files[0], [MODALITY, SERIES_DESCRIPTION])
    except RuntimeError:
        tags = {}
    details = [f"{len(files)} file{'s' if len(files) != 1 else ''}", tags.get(MODALITY),
               repr(tags[SERIES_DESCRIPTION]) if tags.get(SERIES_DESCRIPTION) else None]
    return f"{uid} ({', '.join(detail for detail in details if detail)})"


def _check_nifti_complete(path: Path, role: str) -> None:
    """Refuse a truncated NIfTI file. ITK reads one without complaint and fills the missing voxels
    with zeros, so the length of its data is checked here against what its header promises."""
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return
    try:
        with (gzip.open(path, "rb") if name.endswith(".gz") else open(path, "rb")) as stream:
            needed = _nifti_bytes_needed(stream.read(540))
            available = 540 + sum(len(block) for block in iter(lambda: stream.read(1 << 24), b""))
    except (OSError, EOFError):  # a gzip stream that ends early or is damaged
        needed, available = 1, 0
    if needed is not None and available < needed:
        raise InputImageError(f"The {role} file {str(path)!r} is truncated or corrupt: its header promises more "
                              "voxels than it holds. Copy or export it again.")


def _nifti_bytes_needed(header: bytes) -> int | None:
    """Data offset + voxels x bits per voxel / 8, from a NIfTI-1 or NIfTI-2 header (either byte order)."""
    for order in "<>":
        header_size = struct.unpack(order + "i", header[:4])[0] if len(header) >= 4 else 0
        if header_size == 348 and len(header) >= 348:
            dims, bits = struct.unpack(order + "8h", header[40:56]), struct.unpack(order + "h", header[72:74])[0]
            offset = struct.unpack(order + "f", header[108:112])[0]
        elif header_size == 540 and len(header) >= 540:
            bits, dims = struct.unpack(order + "h", header[14:16])[0], struct.unpack(order + "8q", header[16:80])
            offset = struct.unpack(order + "q", header[168:176])[0]
        else:
            continue
        return int(offset) + math.prod(dims[1:1 + min(max(dims[0], 0), 7)]) * bits // 8
    return None


def _grey_from_equal_channels(image: sitk.Image, role: str) -> sitk.Image:
    components = image.GetNumberOfComponentsPerPixel()
    if components == 1:
        return image
    channels = [sitk.VectorIndexSelectionCast(image, i) for i in range(components)]
    first = sitk.GetArrayViewFromImage(channels[0])
    if all(np.array_equal(first, sitk.GetArrayViewFromImage(c)) for c in channels[1:]):
        return channels[0]
    raise InputImageError(f"The {role} has {components} components per voxel (a colour or vector image); "
                          "SAR registers scalar (grey-level) images. Convert it to one channel first.")


def check_image(image: sitk.Image, role: str = "image", allow_constant: bool = False) -> sitk.Image:
    """Return ``image`` as a scalar image, or raise :class:`InputImageError` naming what is wrong.

    It must be 2D or 3D, non-empty, finite and (unless ``allow_constant``, as for an empty mask)
    not constant.
    """
    image = _grey_from_equal_channels(image, role)
    dimension = image.GetDimension()
    if dimension not in (2, 3):
        raise InputImageError(f"The {role} is {dimension}D; SAR registers 2D images and 3D volumes.")
    if min(image.GetSize()) < 1 or image.GetNumberOfPixels() == 0:
        raise InputImageError(f"The {role} is empty (size {image.GetSize()}).")
    array = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        bad = int(np.size(array) - np.isfinite(array).sum())
        raise InputImageError(f"The {role} has {bad} NaN or infinite voxels; fill or mask them before registering.")
    if not allow_constant and array.min() == array.max():
        raise InputImageError(f"The {role} is constant (every voxel is {array.flat[0]}); there is nothing to align.")
    return image


def check_pair(reference: sitk.Image, floating: sitk.Image) -> None:
    """Both images must have the same dimension (a 2D slice cannot be registered to a 3D volume)."""
    if reference.GetDimension() != floating.GetDimension():
        raise InputImageError(f"The reference is {reference.GetDimension()}D but the floating image is "
                              f"{floating.GetDimension()}D; both must be 2D or both 3D.")


def check_size(image: sitk.Image, role: str, slicewise: bool = False) -> None:
    """At least :data:`MIN_VOXELS_PER_AXIS` voxels along each registered axis (slice-wise, the
    slice axis ``k`` may hold a single slice)."""
    size = image.GetSize()
    axes = "xy" if slicewise else "xyz"[:len(size)]
    if min(size[:len(axes)]) < MIN_VOXELS_PER_AXIS:
        hint = " Register a single-slice volume slice-wise (mode 'slicewise')." \
            if len(size) == 3 and size[2] < MIN_VOXELS_PER_AXIS and min(size[:2]) >= MIN_VOXELS_PER_AXIS else ""
        raise InputImageError(f"The {role} is too small to register: {' x '.join(map(str, size))} voxels; SAR needs "
                              f"at least {MIN_VOXELS_PER_AXIS} along each of {', '.join(axes)}.{hint}")


def normalise_intensity(array: np.ndarray, lower_percentile: float = 1.0, upper_percentile: float = 99.0) -> np.ndarray:
    """Map intensities to [0, 1] by clipping at robust percentiles (bright outliers do not squash the rest)."""
    array = np.asarray(array, dtype=np.float32)
    low, high = np.percentile(array, [lower_percentile, upper_percentile])
    if high <= low:  # mostly-constant images: fall back to the full range
        low, high = float(array.min()), float(array.max())
    return np.clip((array - low) / max(high - low, 1e-12), 0.0, 1.0).astype(np.float32)


# CT is calibrated in Hounsfield units: air at -1000, and outside the field of view scanners write
# -1024, -2048 or -3024. So a CT image's lowest voxel lies between these two values; MR, PET and
# ultrasound intensities are not negative, and an image stretched over a signed type's range goes
# far lower. A CT cropped inside the body has no air: its lowest voxel is fat, about -100. That is
# recognised only in whole HU, as CT is stored: a signed integer type of 16 bits or more (8 cannot
# hold air or bone), or floats that are all whole numbers (a NIfTI file whose rescale intercept,
# -1024 on unsigned voxels, makes ITK read it as float). A float image with a few negative
# fractional values is more often a processed MR (interpolation overshoot, a subtraction).
HOUNSFIELD_AIR, HOUNSFIELD_PADDING, HOUNSFIELD_FAT = -500.0, -3100.0, -50.0
HOUNSFIELD_TYPES = (sitk.sitkInt16, sitk.sitkInt32, sitk.sitkInt64)
FLOAT_TYPES = (sitk.sitkFloat32, sitk.sitkFloat64)


def in_hounsfield_units(image: sitk.Image) -> bool:
    """Whether ``image`` looks like CT in Hounsfield units: its lowest voxel is air or a scanner's
    padding (between :data:`HOUNSFIELD_PADDING` and :data:`HOUNSFIELD_AIR`), or, in whole HU (a
    signed integer type of 16 bits or more, or floats that are whole numbers), fat (above
    :data:`HOUNSFIELD_AIR`, at most :data:`HOUNSFIELD_FAT`)."""
    extremes = sitk.MinimumMaximumImageFilter()
    extremes.Execute(image)
    lowest = extremes.GetMinimum()
    if HOUNSFIELD_PADDING <= lowest <= HOUNSFIELD_AIR:
        return True
    if not HOUNSFIELD_AIR < lowest <= HOUNSFIELD_FAT:
        return False
    if image.GetPixelID() in FLOAT_TYPES:  # whole numbers throughout: an evenly strided subset says so
        values = sitk.GetArrayViewFromImage(image).ravel()
        values = values[::max(1, values.size // 65536)]
        return bool(np.array_equal(values, np.round(values)))
    return image.GetPixelID() in HOUNSFIELD_TYPES


def array_of(image: sitk.Image) -> np.ndarray:
    """A copy of the voxels as a numpy array in SimpleITK's ``z, y, x`` order."""
    return sitk.GetArrayFromImage(image)


def image_like(array: np.ndarray, grid: sitk.Image, is_vector: bool = False) -> sitk.Image:
    """Wrap an array as an image with ``grid``'s origin, spacing and direction."""
    image = sitk.GetImageFromArray(array, isVector=is_vector)
    image.CopyInformation(grid)
    return image
