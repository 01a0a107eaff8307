"""Displacement fields between the engine's voxel convention and ITK's physical one.

The engine's fields are ``(ndims, *spatial)`` arrays in voxels of their grid, channel ``i`` along
array axis ``i`` (``z, y, x``) — see :mod:`spatial`. ITK's (and so SimpleITK's, Elastix's and ANTs')
are vector images in millimetres with physical ``x, y, z`` (LPS) components. Both map a point of
the reference (fixed) grid to the floating (moving) image: ``p -> p + d(p)``.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk


def index_to_physical(reference: sitk.Image) -> np.ndarray:
    """``direction · diag(spacing)``: maps an index step (``x, y, z`` order) to a physical step in mm."""
    ndims = reference.GetDimension()
    direction = np.array(reference.GetDirection()).reshape(ndims, ndims)
    return direction @ np.diag(reference.GetSpacing())


def transform_to_displacement(transform: sitk.Transform, reference: sitk.Image) -> np.ndarray:
    """Displacement ``T(x) - x`` of ``transform`` sampled on the grid of ``reference``.

    Returns:
        float64 ``(ndims, *spatial)`` in voxels of ``reference``, channel ``i`` along array axis ``i``
        (so channel 0 is ``z`` in 3D), the convention of :func:`spatial.warp`.
    """
    to_field = sitk.TransformToDisplacementFieldFilter()
    to_field.SetReferenceImage(reference)
    to_field.SetOutputPixelType(sitk.sitkVectorFloat64)
    return displacement_in_voxels(to_field.Execute(transform))


def displacement_in_voxels(field_mm: sitk.Image, rows: slice = slice(None)) -> np.ndarray:
    """An ITK displacement field image in voxels of its own grid, as ``(ndims, *spatial)`` float64.

    ``rows`` selects a range along array axis 0 (``z`` in 3D): converting a large field a slab at a
    time keeps memory to the slab, since the image's buffer is only viewed, never copied whole.
    """
    millimetres = sitk.GetArrayViewFromImage(field_mm)[rows]  # (*spatial, ndims), physical x, y, z
    index_steps = millimetres @ np.linalg.inv(index_to_physical(field_mm)).T  # index x, y, z
    return np.moveaxis(index_steps[..., ::-1], -1, 0)


def displacement_to_sitk(displacement_voxels: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """Inverse of :func:`transform_to_displacement`: a voxel field as an ITK displacement field image.

    Args:
        displacement_voxels: ``(ndims, *spatial)`` in voxels, array axis order, on the grid of
            ``reference``.
    Returns:
        Vector float64 image in mm with physical ``x, y, z`` components and the geometry of
        ``reference``, ready for ``sitk.DisplacementFieldTransform``.
    """
    index_steps = np.moveaxis(np.asarray(displacement_voxels, dtype=np.float64), 0, -1)[..., ::-1]
    millimetres = index_steps @ index_to_physical(reference).T
    field = sitk.GetImageFromArray(np.ascontiguousarray(millimetres), isVector=True)
    field.CopyInformation(reference)
    return field
