"""What the module makes of the engine's field besides the transform: composition with a linear
initial transform, the inverse, the Jacobian determinant and landmark errors.

Plain numpy, SimpleITK and the engine (no ``slicer``, ``qt`` or ``vtk``), so it runs in the worker
thread.
Conventions: a displacement ``d`` maps a point ``p`` to ``p + d(p)`` (ITK's resampling direction);
RAS arrays are ``k, j, i, 3`` on a voxel grid given by its 4 x 4 IJK-to-RAS matrix; matrices are
4 x 4 homogeneous, in RAS, millimetres.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import SimpleITK as sitk

# Inverting a field (fixed-point iterations): stop at this many, once the mean change of the
# inverse between two iterations, |u(x) + d(x + u(x))|, falls below INVERSE_MEAN_CHANGE_MM, or
# once it stops falling (by less than INVERSE_STALL_RATIO of itself): a few voxels at the grid's
# border, where x + u(x) leaves the grid, swing between two values and never settle.
INVERSE_ITERATIONS = 50
INVERSE_MEAN_CHANGE_MM = 1e-3
INVERSE_STALL_RATIO = 0.01


def _slabPositions(ijkToRAS: np.ndarray, shape, k: int) -> np.ndarray:
    """RAS positions ``(j, i, 3)`` of the voxel centres of slab ``k`` of a ``k, j, i`` grid."""
    j, i = np.meshgrid(np.arange(shape[1], dtype=float), np.arange(shape[2], dtype=float), indexing="ij")
    ijk = np.stack([i, j, np.full_like(i, k), np.ones_like(i)], axis=-1)
    return (ijk @ ijkToRAS.T)[..., :3]


def composeLinearAfter(displacementRAS: np.ndarray, ijkToRAS: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``matrix(p + d(p)) - p`` for every voxel ``p``: the field followed by a linear map (in place).

    One slab at a time, so that the voxel positions never take more memory than a slab.
    """
    if np.allclose(matrix, np.eye(4)):
        return displacementRAS
    linear, offset = matrix[:3, :3], matrix[:3, 3]
    for k in range(displacementRAS.shape[0]):
        positions = _slabPositions(ijkToRAS, displacementRAS.shape, k)
        displacementRAS[k] = (positions + displacementRAS[k]) @ linear.T + offset - positions
    return displacementRAS


def addLinearDisplacement(displacementRAS: np.ndarray, ijkToRAS: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``d(p) + matrix(p) - p`` for every voxel ``p`` (in place)."""
    if np.allclose(matrix, np.eye(4)):
        return displacementRAS
    linear, offset = matrix[:3, :3], matrix[:3, 3]
    for k in range(displacementRAS.shape[0]):
        positions = _slabPositions(ijkToRAS, displacementRAS.shape, k)
        displacementRAS[k] += positions @ linear.T + offset - positions
    return displacementRAS


def invertDisplacement(displacement: sitk.Image, progress: Callable[[float], None] | None = None,
                       cancelled: Callable[[], bool] | None = None) -> sitk.Image:
    """The inverse field on the same grid: ``u`` with ``d(x + u(x)) = -u(x)``, so that ``x + u(x)``
    is mapped back to ``x``.

    The fixed-point iteration ``u <- -d(x + u(x))`` (each step one SimpleITK resampling), which
    converges where the field's gradient is below 1, as a registration field's is. It is written
    out rather than SimpleITK's InvertDisplacementFieldImageFilter because that filter cannot be
    stopped: here ``cancelled()`` is checked between steps (the partial inverse is returned, and
    the caller's next check stops the run). Beyond the grid, ``d`` takes its nearest border value.
    """
    field = sitk.Cast(displacement, sitk.sitkVectorFloat64)
    inverse = sitk.Image(field.GetSize(), sitk.sitkVectorFloat64, field.GetDimension())
    inverse.CopyInformation(field)
    previous = np.inf
    for iteration in range(INVERSE_ITERATIONS):
        if cancelled is not None and cancelled():
            break
        # d at x + u(x); beyond the grid the nearest border value, so that the border converges too.
        composed = sitk.Resample(field, field, sitk.DisplacementFieldTransform(sitk.Image(inverse)),
                                 sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64, True)
        updated = -composed
        statistics = sitk.StatisticsImageFilter()
        statistics.Execute(sitk.VectorMagnitude(updated - inverse))
        inverse, change = updated, statistics.GetMean()
        if progress is not None:
            progress((iteration + 1) / INVERSE_ITERATIONS)
        if change < INVERSE_MEAN_CHANGE_MM or previous - change < INVERSE_STALL_RATIO * change:
            break
        previous = change
    return inverse


def jacobianDeterminant(displacement: sitk.Image, linearDeterminant: float = 1.0, slabRows: int = 16) -> np.ndarray:
    """The Jacobian determinant of ``p -> p + d(p)``, times that of a linear map applied after it.

    The engine's own determinant (:func:`SARRegistrationLib.metrics.jacobian_determinant` of the
    field in voxels, which accounts for the grid's direction; SimpleITK's filter does not), a slab
    of ``slabRows`` rows at a time with one row of margin, so that memory stays a slab's. Returns a
    float32 array in SimpleITK's array order; below 0 the mapping folds, 1 keeps volumes.
    """
    from SARRegistrationLib.fields import displacement_in_voxels
    from SARRegistrationLib.metrics import jacobian_determinant

    rows = sitk.GetArrayViewFromImage(displacement).shape[0]
    determinant = np.empty(sitk.GetArrayViewFromImage(displacement).shape[:-1], dtype=np.float32)
    for start in range(0, rows, slabRows):
        stop = min(start + slabRows, rows)
        low, high = max(start - 1, 0), min(stop + 1, rows)
        slab = jacobian_determinant(displacement_in_voxels(displacement, slice(low, high)))
        determinant[start:stop] = slab[start - low:stop - low] * linearDeterminant
    return determinant


def targetRegistrationErrors(referencePoints: np.ndarray, floatingPoints: np.ndarray,
                             mapToFloating: Callable[[np.ndarray], np.ndarray]) -> dict:
    """Landmark distances (mm) before and after: ``|p - q|`` and ``|mapToFloating(p) - q|``.

    ``referencePoints[n]`` and ``floatingPoints[n]`` are the same landmark, ``(N, 3)`` RAS; the
    mapping takes ``(N, 3)`` reference points to where the registration puts them in the floating
    volume's world.
    """
    reference = np.asarray(referencePoints, dtype=float).reshape(-1, 3)
    floating = np.asarray(floatingPoints, dtype=float).reshape(-1, 3)
    if len(reference) != len(floating) or len(reference) == 0:
        raise ValueError(f"Landmarks come in pairs: {len(reference)} reference and {len(floating)} floating points.")
    before = np.linalg.norm(reference - floating, axis=1)
    after = np.linalg.norm(np.asarray(mapToFloating(reference), dtype=float) - floating, axis=1)

    def summary(distances):
        return {"mean_mm": float(distances.mean()), "max_mm": float(distances.max()),
                "per_point_mm": [round(float(value), 4) for value in distances]}

    return {"points": len(reference), "before": summary(before), "after": summary(after)}
