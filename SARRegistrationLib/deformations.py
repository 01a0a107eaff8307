"""Training pairs with a known deformation, 2D or 3D, and their random transforms and intensity augmentation.

The geometry is done by SimpleITK in physical space (millimetres, ``x, y, z`` order); what
leaves this module follows :mod:`SARRegistrationLib.spatial`: numpy arrays in ``z, y, x`` order and
displacements ``(ndims, *spatial)`` in voxels of their grid, channel ``i`` along array axis ``i``,
pulling back (``warped(x) = moving(x + u(x))``, the ITK ``DisplacementFieldTransform`` convention).

A training pair is built so that its field is known exactly (paper §2.1): an image ``I`` (after an
optional random affine augmentation) is the *floating* image, and the *reference* is ``I`` pulled
through a random cubic B-spline ``T``: ``reference(x) = I(T(x))``. The known displacement is then
``T(x) - x`` sampled on the grid, and ``spatial.warp(floating, displacement)`` reproduces the
reference up to interpolation.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .fields import transform_to_displacement
from .imageio import array_of, image_like, normalise_intensity

# ---------------------------------------------------------------------------------------------
# Random transforms


def random_bspline_transform(image: sitk.Image, rng: np.random.Generator, max_displacement_mm: float,
                             mesh_size: int = 4) -> sitk.BSplineTransform:
    """Random cubic B-spline transform over the extent of ``image``.

    Control-point displacements are uniform in ``±max_displacement_mm`` per physical component. A
    cubic B-spline is a convex combination of its control points, so every component of the
    displacement stays within ``±max_displacement_mm`` everywhere. The two outer layers of control
    points are zero, which holds the image border within ``max_displacement_mm / 6`` of fixed and
    keeps content from being pulled in from outside the image.

    Args:
        image: defines the transform domain (origin, spacing, direction, size); 2D or 3D.
        mesh_size: B-spline intervals per axis (>= 2, so that some control points are free).
    """
    if mesh_size < 2:
        raise ValueError(f"mesh_size must be at least 2, got {mesh_size}")
    ndims = image.GetDimension()
    transform = sitk.BSplineTransformInitializer(image, [mesh_size] * ndims, 3)
    grid_shape = transform.GetCoefficientImages()[0].GetSize()[::-1]
    free = np.zeros(grid_shape, dtype=bool)
    free[(slice(2, -2),) * ndims] = True
    coefficients = rng.uniform(-max_displacement_mm, max_displacement_mm, size=(ndims, *grid_shape)) * free
    # Parameters are one coefficient image per physical component, each flattened x-fastest, which
    # is the C order of the (z, y, x) array.
    transform.SetParameters(coefficients.ravel().tolist())
    return transform


def known_deformation(image: sitk.Image, mask: sitk.Image | None, rng: np.random.Generator,
                      max_displacement_mm: float, remap_intensity: bool = False):
    """``image`` and ``mask`` moved by a seeded random B-spline, for tests of registration accuracy.

    Returns ``(moved image, moved mask or None, transform)``: the image float32 (linear
    interpolation, 0 outside), the mask by nearest neighbour, and the B-spline, whose field is what
    a registration of the original to the moved image should recover. With ``remap_intensity`` the
    moved image also gets a random contrast remapping, so the pair differs as two MR sequences do.
    """
    transform = random_bspline_transform(image, rng, max_displacement_mm)
    moved = sitk.Resample(image, image, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    moved_mask = None if mask is None else sitk.Resample(mask, mask, transform, sitk.sitkNearestNeighbor, 0)
    if remap_intensity:
        remapped = augment_intensity(normalise_intensity(array_of(moved)), rng, 1.0)
        moved = image_like(remapped.astype(np.float32), moved)
    return moved, moved_mask, transform


def image_centre(image: sitk.Image) -> tuple[float, ...]:
    """Physical point (mm, ``x, y, z``) at the centre of the image's voxel grid."""
    centre_index = [(n - 1) / 2.0 for n in image.GetSize()]
    return image.TransformContinuousIndexToPhysicalPoint(centre_index)


def _rotation_matrix(ndims: int, angles_rad: np.ndarray) -> np.ndarray:
    """Rotation ``(ndims, ndims)`` from one angle (2D) or three Euler angles about x, y, z (3D)."""
    rotation = sitk.Euler2DTransform() if ndims == 2 else sitk.Euler3DTransform()
    if ndims == 2:
        rotation.SetAngle(float(angles_rad[0]))
    else:
        rotation.SetRotation(*map(float, angles_rad))
    return np.array(rotation.GetMatrix()).reshape(ndims, ndims)


def random_affine_transform(image: sitk.Image, rng: np.random.Generator, max_rotation_deg: float = 10,
                            max_scale: float = 0.1, max_translation_mm: float = 5) -> sitk.AffineTransform:
    """Random affine about the image centre: rotation, per-axis scaling, translation.

    Rotation angles (one in 2D, three Euler angles in 3D) are uniform in ``±max_rotation_deg``, scale
    factors uniform in ``1 ± max_scale`` per physical axis, translations uniform in
    ``±max_translation_mm`` per physical axis.
    """
    ndims = image.GetDimension()
    angles = np.deg2rad(rng.uniform(-max_rotation_deg, max_rotation_deg, size=1 if ndims == 2 else 3))
    scales = rng.uniform(1 - max_scale, 1 + max_scale, size=ndims)
    transform = sitk.AffineTransform(ndims)
    transform.SetCenter(image_centre(image))
    transform.SetMatrix((_rotation_matrix(ndims, angles) @ np.diag(scales)).ravel().tolist())
    transform.SetTranslation(rng.uniform(-max_translation_mm, max_translation_mm, size=ndims).tolist())
    return transform


# ---------------------------------------------------------------------------------------------
# Intensities


def smooth_noise(shape: tuple[int, ...], rng: np.random.Generator, coarse_shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal noise on a ``coarse_shape`` grid, cubic-spline upsampled to ``shape``."""
    coarse = rng.standard_normal(coarse_shape)
    return ndimage.zoom(coarse, np.divide(shape, coarse_shape), order=3, mode="nearest")


def augment_intensity(array: np.ndarray, rng: np.random.Generator, remap_probability: float = 0.5) -> np.ndarray:
    """Random bias field, gamma, contrast remapping and Gaussian noise on a ``[0, 1]`` image.

    The bias field is ``exp(a · smooth noise)`` on a 4-per-axis grid with ``a`` up to 0.3, the gamma
    is log-uniform in ``[0.7, 1.4]`` and the noise standard deviation up to 0.03. With probability
    ``remap_probability`` intensities also go through a random, generally non-monotonic, piecewise
    linear curve: the two images of a pair then differ in contrast as T1 and PD do, which teaches
    the network to register across modalities (the contrast-agnostic idea of SynthMorph).
    Returns the image renormalised to ``[0, 1]``.
    """
    coarse_shape = tuple(min(4, n) for n in array.shape)
    bias = np.exp(rng.uniform(0, 0.3) * smooth_noise(array.shape, rng, coarse_shape))
    gamma = np.exp(rng.uniform(np.log(0.7), np.log(1.4)))
    augmented = normalise_intensity(np.clip(array * bias, 0, None) ** gamma)
    if rng.uniform() < remap_probability:
        knots = np.linspace(0.0, 1.0, 6)
        augmented = np.interp(augmented, knots, rng.uniform(0.0, 1.0, knots.size))
    return normalise_intensity(augmented + rng.normal(0, rng.uniform(0, 0.03), size=array.shape))


# ---------------------------------------------------------------------------------------------
# Training pairs


def foreground_mask(image: sitk.Image) -> sitk.Image:
    """Rough foreground (the imaged body, not an organ): Otsu threshold, holes filled, largest component."""
    bright = sitk.OtsuThreshold(sitk.Cast(image, sitk.sitkFloat32), 0, 1)
    filled = sitk.BinaryFillhole(bright)
    components = sitk.RelabelComponent(sitk.ConnectedComponent(filled), sortByObjectSize=True)
    return sitk.Cast(components == 1, sitk.sitkUInt8)


def make_training_pair(image: sitk.Image, mask: sitk.Image | None, rng: np.random.Generator,
                       max_displacement_mm: float = 10.0, affine: bool = True, intensity: bool = True,
                       mesh_size: int = 4, contrast_remap: float = 0.2) -> dict[str, np.ndarray]:
    """A reference/floating pair whose displacement is known exactly.

    ``I`` is ``image`` normalised to ``[0, 1]`` and, with ``affine``, moved by a random affine; the
    floating image is ``I`` and the reference is ``I(T(x))`` for a random B-spline ``T`` (border
    values are extended, like ``padding_mode="border"`` in :func:`spatial.warp`). With ``intensity``
    each image then gets its own random bias field, gamma and noise, so the pair differs in contrast
    as well as in geometry. Masks follow the geometry with nearest-neighbour interpolation.

    Args:
        image: 2D or 3D scalar image.
        mask: the structure of interest (non-zero inside), on the grid of ``image``; ``None`` uses
            :func:`foreground_mask` of the image instead.
        max_displacement_mm: bound on each physical component of the B-spline displacement.
        mesh_size: B-spline intervals per axis; larger gives more local deformations.
        contrast_remap: probability that each image's contrast is remapped by a random curve
            (see :func:`augment_intensity`); it teaches registration across contrasts, at the
            price of a harder task for a small network.
    Returns:
        float32 arrays in array axis order: ``reference``, ``floating`` (``spatial``, in ``[0, 1]``),
        ``reference_mask``, ``floating_mask`` (``spatial``, 0/1) and ``displacement``
        (``(ndims, *spatial)``, voxels) with ``warp(floating, displacement) ≈ reference``.
    """
    scaled = sitk.GetImageFromArray(normalise_intensity(sitk.GetArrayFromImage(image)))
    scaled.CopyInformation(image)
    mask = foreground_mask(image) if mask is None else sitk.Cast(mask != 0, sitk.sitkUInt8)
    if affine:
        augmentation = random_affine_transform(scaled, rng)
        scaled = sitk.Resample(scaled, augmentation, sitk.sitkLinear, 0.0)
        mask = sitk.Resample(mask, augmentation, sitk.sitkNearestNeighbor, 0)
    bspline = random_bspline_transform(scaled, rng, max_displacement_mm, mesh_size)
    reference = sitk.Resample(scaled, bspline, sitk.sitkLinear, 0.0, useNearestNeighborExtrapolator=True)
    reference_mask = sitk.Resample(mask, bspline, sitk.sitkNearestNeighbor, 0, useNearestNeighborExtrapolator=True)
    pair = {
        "reference": sitk.GetArrayFromImage(reference),
        "floating": sitk.GetArrayFromImage(scaled),
        "reference_mask": sitk.GetArrayFromImage(reference_mask),
        "floating_mask": sitk.GetArrayFromImage(mask),
        "displacement": transform_to_displacement(bspline, scaled),
    }
    if intensity:
        pair["reference"] = augment_intensity(pair["reference"], rng, contrast_remap)
        pair["floating"] = augment_intensity(pair["floating"], rng, contrast_remap)
    return {name: array.astype(np.float32) for name, array in pair.items()}
