"""Grid geometry: the working grid over an image's extent, other grids of its extent, resampling
onto a grid, and the physical extent and overlap of images (millimetres, ITK's LPS space)."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from .errors import InputImageError


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


def working_grid(reference: sitk.Image, max_size: int, multiple: int, keep_axes=()) -> sitk.Image:
    """A working grid over the reference's extent: at most ``max_size`` voxels per axis.

    Its voxels are as close to cubic as the image allows, since the networks are trained on
    isotropic grids: the physically longest axis gets ``max_size`` voxels (or its own count, if
    fewer) and the others the same spacing, but never more voxels than they have (thick slices of
    0.5 x 0.5 x 5 mm are not interpolated up). Sizes are then rounded up to a multiple of
    ``multiple`` (the network's ``generator.shape_multiple``, which its channels set; instance
    optimisation's grid takes 1, so an image within its size is its own grid); axes in
    ``keep_axes`` (SimpleITK ``x, y, z`` order) keep their voxel count, as the slice axis does in
    slice-wise registration.
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


def averaged_resample(image: sitk.Image, grid: sitk.Image, transform=None) -> sitk.Image:
    """``image`` resampled linearly onto ``grid`` (through ``transform``, as :func:`resample_to`), first
    averaged over blocks of whole voxels where ``grid`` is at least twice as coarse (``sitk.BinShrink``),
    so that the resampling reads every voxel rather than a few.

    Linear resampling alone reads 4 (2D) or 8 (3D) voxels around each point of the grid: a
    2048 x 2048 image on a 256 x 256 grid keeps under 1 % of its voxels, and its noise and fine
    detail alias. On noisy 2048 x 2048 versions of the 2D tuning images, averaging first lowered
    instance optimisation's field error from 0.071 to 0.057 mm (``benchmarks/robustness.py``);
    Gaussian smoothing instead did as well in a one-off script, at 0.6 s more a pair.
    """
    finest = min(grid.GetSpacing())  # the grid's voxels are near cubic (grids.working_grid)
    factors = [max(1, int(finest / size + 1e-6)) for size in image.GetSpacing()]
    if max(factors) > 1:
        image = sitk.BinShrink(sitk.Cast(image, sitk.sitkFloat32), factors)
    return resample_to(image, grid, transform=transform)


def normalised_map(from_grid: sitk.Image, to_grid: sitk.Image, transform=None) -> tuple[np.ndarray, np.ndarray]:
    """The affine map ``q = L p + b`` from ``from_grid``'s normalised coordinates to ``to_grid``'s.

    Normalised coordinates are ``grid_sample``'s with ``align_corners=True``, in array axis order:
    ``-1`` and ``1`` at the first and last voxel centre of each axis. A point of ``from_grid`` goes
    to physical space, through ``transform`` (ITK convention: a reference point to the floating
    image's; identity if None) and into ``to_grid``. ``transform`` must be affine (the map is read
    off at ``ndims + 1`` points, so anything else would be linearised there).
    """
    ndims = from_grid.GetDimension()
    transform = transform if transform is not None else sitk.Transform(ndims, sitk.sitkIdentity)

    def to_index(grid, p):  # normalised, array order -> continuous index, x-first
        size = np.array(grid.GetSize()[::-1], dtype=float)
        return ((np.asarray(p) + 1) / 2 * np.maximum(size - 1, 1))[::-1]

    def to_normalised(grid, index):
        size = np.array(grid.GetSize()[::-1], dtype=float)
        return np.asarray(index)[::-1] / np.maximum(size - 1, 1) * 2 - 1

    def mapped(p):
        physical = from_grid.TransformContinuousIndexToPhysicalPoint(to_index(from_grid, p).tolist())
        return to_normalised(to_grid, to_grid.TransformPhysicalPointToContinuousIndex(
            transform.TransformPoint(physical)))

    offset = mapped(np.zeros(ndims))
    linear = np.stack([mapped(np.eye(ndims)[axis]) - offset for axis in range(ndims)], axis=1)
    return linear, offset
