"""Images in and out: reading, checking, intensity normalisation and the network's working grid.

SimpleITK images carry the geometry (origin, spacing, direction, in ITK's LPS physical space);
numpy arrays and tensors are in SimpleITK's array order (``z, y, x``). Geometry never lives in an
array: whatever leaves this module as an array comes back through a SimpleITK image of known grid.
"""

from __future__ import annotations

import gzip
import math
import os
import signal
import struct
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputImageError, OutputError

SUPPORTED_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd", ".png")
# The network halves the grid three times, so its working shape must be a multiple of 8.
GRID_MULTIPLE = 8
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
        reason = _last_line(error, "unknown reason")
        if "Unable to determine ImageIO reader" in reason:
            reason = f"its format is not recognised or it is damaged (SAR reads {', '.join(SUPPORTED_SUFFIXES)})"
        raise InputImageError(f"The {role} file {str(path)!r} could not be read as an image: {reason}.") from None
    _check_nifti_complete(path, role)
    return check_image(image, role, allow_constant)


def _last_line(error: Exception, default: str) -> str:
    """The last line of an error's message (SimpleITK's end in the one that names the problem)."""
    text = str(error).strip()
    return text.splitlines()[-1] if text else default


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


def physical_bounds(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """The lowest and highest physical coordinates (mm, LPS) of ``image``'s voxel centres."""
    corners = np.array(np.meshgrid(*[(0, n - 1) for n in image.GetSize()], indexing="ij")).reshape(image.GetDimension(), -1).T
    points = np.array([image.TransformContinuousIndexToPhysicalPoint(corner.tolist()) for corner in corners.astype(float)])
    return points.min(axis=0), points.max(axis=0)


def check_overlap(grid: sitk.Image, reference: sitk.Image, floating: sitk.Image, transform=None) -> float:
    """The fraction of ``grid`` (over the reference) whose points, mapped by ``transform``, fall in
    ``floating``; raise :class:`InputImageError` when it is nothing at all."""
    inside = sitk.Image(floating.GetSize(), sitk.sitkUInt8) + 1
    inside.CopyInformation(floating)
    covered = sitk.Resample(inside, grid, transform or sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    fraction = float(np.mean(sitk.GetArrayViewFromImage(covered)))
    if fraction == 0.0:
        def extent(image):
            low, high = physical_bounds(image)
            return " to ".join("(" + ", ".join(f"{v:.1f}" for v in corner) + ")" for corner in (low, high))
        raise InputImageError(f"The floating image does not overlap the reference in physical space: the reference "
                              f"spans {extent(reference)} mm, the floating image {extent(floating)} mm. Check their "
                              "origins, or align them first (affine pre-alignment).")
    return fraction


def normalize_intensity(array: np.ndarray, lower_percentile: float = 1.0, upper_percentile: float = 99.0) -> np.ndarray:
    """Map intensities to [0, 1] by clipping at robust percentiles (bright outliers do not squash the rest)."""
    array = np.asarray(array, dtype=np.float32)
    low, high = np.percentile(array, [lower_percentile, upper_percentile])
    if high <= low:  # mostly-constant images: fall back to the full range
        low, high = float(array.min()), float(array.max())
    return np.clip((array - low) / max(high - low, 1e-12), 0.0, 1.0).astype(np.float32)


def grid_with_shape(image: sitk.Image, size) -> sitk.Image:
    """An empty image of ``size`` voxels (SimpleITK ``x, y, z`` order) covering ``image``'s extent.

    The new grid keeps the direction and the outer voxel boundary, so its voxel centres move
    inwards by half the change of spacing.
    """
    old_size, new_size = np.array(image.GetSize(), dtype=float), np.array(size, dtype=float)
    old_spacing = np.array(image.GetSpacing())
    new_spacing = old_spacing * old_size / new_size
    direction = np.array(image.GetDirection()).reshape(len(old_size), len(old_size))
    grid = sitk.Image([int(n) for n in new_size], sitk.sitkUInt8)
    grid.SetSpacing(new_spacing.tolist())
    grid.SetOrigin((np.array(image.GetOrigin()) + direction @ ((new_spacing - old_spacing) / 2.0)).tolist())
    grid.SetDirection(image.GetDirection())
    return grid


def working_grid(reference: sitk.Image, max_size: int, keep_axes=(), multiple: int = GRID_MULTIPLE) -> sitk.Image:
    """The network's grid over the reference's extent: at most ``max_size`` voxels per axis.

    Its voxels are as close to cubic as the image allows, since the networks are trained on
    isotropic grids: the physically longest axis gets ``max_size`` voxels (or its own count, if
    fewer) and the others the same spacing, but never more voxels than they have (thick slices of
    0.5 x 0.5 x 5 mm are not interpolated up). Sizes are then rounded up to a multiple of
    ``multiple`` (the network's needs 8; instance optimisation's grid takes 1, so an image within
    its size is its own grid); axes in ``keep_axes`` (SimpleITK ``x, y, z`` order) keep their voxel
    count, as the slice axis does in slice-wise registration.
    """
    size = np.array(reference.GetSize())
    extent = size * np.array(reference.GetSpacing())
    scaled_axes = [axis for axis in range(len(size)) if axis not in keep_axes]
    spacing = max(extent[scaled_axes]) / max_size
    counts = np.minimum(size, extent / spacing)
    # Round up to a multiple (the 1e-9 absorbs float error in n * max_size / n), but never past
    # the largest multiple that max_size allows.
    ceiling = max(multiple, max_size // multiple * multiple)
    new_size = [int(size[axis]) if axis in keep_axes else
                min(ceiling, int(np.ceil(counts[axis] / multiple - 1e-9)) * multiple)
                for axis in range(len(size))]
    return grid_with_shape(reference, new_size)


def resample_to(image: sitk.Image, grid: sitk.Image, label: bool = False, transform=None) -> sitk.Image:
    """Resample ``image`` onto ``grid`` (identity in physical space unless a transform is given)."""
    interpolator = sitk.sitkNearestNeighbor if label else sitk.sitkLinear
    transform = transform if transform is not None else sitk.Transform()
    output_type = image.GetPixelID() if label else sitk.sitkFloat32
    return sitk.Resample(image, grid, transform, interpolator, 0.0, output_type)


def array_of(image: sitk.Image) -> np.ndarray:
    """A copy of the voxels as a numpy array in SimpleITK's ``z, y, x`` order."""
    return sitk.GetArrayFromImage(image)


def image_like(array: np.ndarray, grid: sitk.Image, is_vector: bool = False) -> sitk.Image:
    """Wrap an array as an image with ``grid``'s origin, spacing and direction."""
    image = sitk.GetImageFromArray(array, isVector=is_vector)
    image.CopyInformation(grid)
    return image


@contextmanager
def staged_output_dir(output_dir):
    """Yield a staging folder; move its files into ``output_dir`` only if the block succeeds.

    Outputs are written into a temporary folder beside ``output_dir`` and moved in at the end, so
    an error or Ctrl-C midway leaves ``output_dir`` as it was (and removes it if this call created
    it). Failures to create or write the folder raise :class:`OutputError`.
    """
    output_dir = Path(output_dir)
    created = not output_dir.exists()
    if not created and not output_dir.is_dir():
        raise OutputError(f"The output folder {str(output_dir)!r} is a file, not a folder; choose another name.")
    try:
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
            staging = tempfile.TemporaryDirectory(dir=output_dir, prefix=".sar-partial-")
        except OSError as error:
            raise OutputError(f"The output folder {str(output_dir)!r} cannot be written: "
                              f"{error.strerror or error}.") from None
        with staging as folder:
            try:
                yield Path(folder)
            except (OSError, RuntimeError) as error:  # RuntimeError: SimpleITK's writers
                message = _last_line(error, type(error).__name__)
                raise OutputError(f"Writing the outputs into {str(output_dir)!r} failed: {message}") from None
            _move_all_or_none(Path(folder), output_dir)
    except BaseException:
        if created and output_dir.is_dir() and not any(output_dir.iterdir()):
            output_dir.rmdir()
        raise


def _move_all_or_none(staging: Path, output_dir: Path) -> None:
    """Move every file of ``staging`` into ``output_dir``, or, if anything fails, none.

    Files about to be replaced are set aside in ``staging`` and put back on failure. Ctrl-C is
    held back during the moves (a few renames) and then undoes them, so it can never leave a mix
    of old and new outputs.
    """
    replaced = staging / ".replaced"
    replaced.mkdir()
    moved = []
    with _interrupts_recorded() as interrupted:
        try:
            for staged in sorted(path for path in staging.iterdir() if path != replaced):
                target = output_dir / staged.name
                if target.exists():
                    os.replace(target, replaced / staged.name)
                os.replace(staged, target)
                moved.append(staged.name)
            if interrupted:
                raise KeyboardInterrupt
        except BaseException as error:
            for name in moved:
                os.replace(output_dir / name, staging / name)
            for old in replaced.iterdir():
                os.replace(old, output_dir / old.name)
            if isinstance(error, OSError):
                raise OutputError(f"Moving the outputs into {str(output_dir)!r} failed: {error.strerror or error}; "
                                  "the folder is as it was.") from None
            raise


@contextmanager
def _interrupts_recorded():
    """Record Ctrl-C (SIGINT) in the yielded list instead of raising it; only the main thread can
    change signal handling, so elsewhere the list stays empty."""
    received = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield received
    finally:
        signal.signal(signal.SIGINT, previous)
