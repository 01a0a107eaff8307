"""Known deformations of the benchmark beyond the engine's small B-splines.

The engine's :func:`SARRegistrationLib.deformations.known_deformation` draws one family: a cubic
B-spline on a 4-interval mesh, every component within a few millimetres. SAR is trained on that
family too, and Elastix's transform model *is* that family, so a benchmark made only of it
favours both. This module adds:

- :func:`large_deformation_transform`: the same B-spline family with control points up to
  15-20 mm, after a rotation of a few degrees and a shift of a few millimetres about the image
  centre, so that capture range matters;
- :func:`velocity_field_transform`: the exponential of a smooth random stationary velocity field
  (SynthMorph's deformation model, Hoffmann et al. 2022): Gaussian noise on a coarse grid,
  cubic-spline upsampled, integrated by scaling and squaring. It is diffeomorphic by construction,
  more local than the B-spline mesh and free everywhere, including near the border.

Both return SimpleITK transforms in the ITK convention (reference point ``p`` -> ``T(p)``), for
:func:`move`: ``moved(p) = image(T(p))``, so a registration of ``image`` (floating) onto
``moved`` (reference) should recover ``T(p) - p``; the benchmark uses them the other way round,
``moved`` as the floating image, and measures the masks only.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch

from SARRegistrationLib.deformations import random_affine_transform, random_bspline_transform, smooth_noise
from SARRegistrationLib.fields import displacement_in_voxels, displacement_to_sitk
from SARRegistrationLib.spatial import integrate_velocity

VELOCITY_NODE_SPACING_MM = 20.0  # the velocity noise's coarse grid: about one node per 20 mm
VELOCITY_SD_MM = (2.0, 3.0)  # range of the velocity's standard deviation per component, drawn per pair
INTEGRATION_STEPS = 7  # scaling and squaring: 2**7 self-compositions


def large_deformation_transform(image: sitk.Image, rng: np.random.Generator, max_displacement_mm: float = 20.0,
                                max_rotation_deg: float = 5.0, max_shift_mm: float = 4.0) -> sitk.CompositeTransform:
    """A rigid motion about the image centre (angles uniform in ±``max_rotation_deg``, shifts in
    ±``max_shift_mm`` per axis), then a random B-spline with control points in ±``max_displacement_mm``
    (:func:`random_bspline_transform`, the engine's family, larger): ``T(p) = R(B(p))``."""
    rigid = random_affine_transform(image, rng, max_rotation_deg=max_rotation_deg, max_scale=0.0,
                                    max_translation_mm=max_shift_mm)
    bspline = random_bspline_transform(image, rng, max_displacement_mm)
    return sitk.CompositeTransform([rigid, bspline])  # the last-listed transform applies first


def random_velocity_field(image: sitk.Image, rng: np.random.Generator,
                          node_spacing_mm: float = VELOCITY_NODE_SPACING_MM,
                          sd_mm: tuple[float, float] = VELOCITY_SD_MM) -> np.ndarray:
    """Smooth random velocity ``(*spatial, ndims)`` in mm, physical ``x, y, z`` components, on ``image``'s grid.

    Each physical component is standard normal noise on a coarse grid of about one node per
    ``node_spacing_mm`` (at least 4 per axis), cubic-spline upsampled
    (:func:`deformations.smooth_noise`), times one standard deviation drawn uniformly from ``sd_mm``.
    """
    ndims = image.GetDimension()
    shape = image.GetSize()[::-1]
    extent_mm = np.multiply(image.GetSize(), image.GetSpacing())[::-1]
    coarse_shape = tuple(max(4, int(round(length / node_spacing_mm))) for length in extent_mm)
    sd = rng.uniform(*sd_mm)
    return np.stack([sd * smooth_noise(shape, rng, coarse_shape) for _ in range(ndims)], axis=-1)


def velocity_field_transform(image: sitk.Image, rng: np.random.Generator,
                             node_spacing_mm: float = VELOCITY_NODE_SPACING_MM,
                             sd_mm: tuple[float, float] = VELOCITY_SD_MM,
                             steps: int = INTEGRATION_STEPS) -> sitk.DisplacementFieldTransform:
    """The exponential of :func:`random_velocity_field`, as a displacement field transform on ``image``'s grid.

    The velocity goes to voxels of the grid (:func:`fields.displacement_in_voxels`), is integrated
    by the engine's :func:`spatial.integrate_velocity` (scaling and squaring, ``steps`` halvings)
    and comes back in mm (:func:`fields.displacement_to_sitk`).
    """
    velocity_mm = sitk.GetImageFromArray(random_velocity_field(image, rng, node_spacing_mm, sd_mm), isVector=True)
    velocity_mm.CopyInformation(image)
    velocity = torch.from_numpy(np.ascontiguousarray(displacement_in_voxels(velocity_mm)))[None]
    displacement = integrate_velocity(velocity, steps)[0].numpy()
    return sitk.DisplacementFieldTransform(displacement_to_sitk(displacement, image))


def move(image: sitk.Image, mask: sitk.Image, transform: sitk.Transform) -> tuple[sitk.Image, sitk.Image]:
    """``image`` (linear, 0 outside; in its own pixel type, float32 for a float image) and ``mask``
    (nearest neighbour) pulled through ``transform``: a CT in int16 stays int16, as a scanner's is."""
    integer = image.GetPixelID() in (sitk.sitkInt16, sitk.sitkInt32)
    moved = sitk.Resample(image, image, transform, sitk.sitkLinear, 0.0,
                          image.GetPixelID() if integer else sitk.sitkFloat32)
    return moved, sitk.Resample(mask, mask, transform, sitk.sitkNearestNeighbor, 0)
