"""Images in: reading and checking them, array and image conversion, intensity normalisation.

SimpleITK images carry the geometry (origin, spacing, direction, in ITK's LPS physical space);
numpy arrays and tensors are in SimpleITK's array order (``z, y, x``). Geometry never lives in an
array: whatever leaves this module as an array comes back through a SimpleITK image of known grid.
"""

from __future__ import annotations

import gzip
import math
import struct
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputImageError, last_line

SUPPORTED_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd", ".png")
# Fewer voxels than this along a registered axis leave nothing to deform.
MIN_VOXELS_PER_AXIS = 4


def read_image(path, role: str = "image", allow_constant: bool = False) -> sitk.Image:
    """Read an image file and check that it can be registered.

    Colour files whose channels are all equal (grey PNGs saved as RGB) are read as one channel.
    ``role`` names the input in error messages ("reference", "floating mask", ...).
    """
    path = Path(path)
    if not path.is_file():
        raise InputImageError(f"The {role} file {str(path)!r} does not exist.")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        reason = last_line(error, "unknown reason")
        if "Unable to determine ImageIO reader" in reason:
            reason = f"its format is not recognised or it is damaged (SAR reads {', '.join(SUPPORTED_SUFFIXES)})"
        raise InputImageError(f"The {role} file {str(path)!r} could not be read as an image: {reason}.") from None
    _check_nifti_complete(path, role)
    return check_image(image, role, allow_constant)


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
