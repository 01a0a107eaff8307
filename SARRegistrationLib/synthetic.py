"""SynthMorph-style synthetic images (Hoffmann et al. 2022), 2D or 3D, to train on without real data.

Random label maps from smoothed noise, random intensities per label, blur, bias field and noise; one
or two labels serve as the structure mask.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .deformations import augment_intensity


def synthetic_label_map(shape: tuple[int, ...], rng: np.random.Generator, num_labels: int = 8) -> np.ndarray:
    """Random label map ``shape`` (int64) with every label ``0 .. num_labels - 1`` present.

    Each label gets smooth noise (a coarse grid of about one node per 16 voxels, at least 4 per axis,
    cubic-spline upsampled); each voxel takes the label whose noise is largest. One distinct coarse
    node per label is raised above all others so that no label can vanish.
    """
    coarse_shape = tuple(max(4, round(n / 16)) for n in shape)
    num_nodes = int(np.prod(coarse_shape))
    if num_labels > num_nodes:
        raise ValueError(f"{num_labels} labels need a larger shape than {shape}")
    coarse = rng.standard_normal((num_labels, num_nodes))
    seeds = rng.choice(num_nodes, size=num_labels, replace=False)
    coarse[np.arange(num_labels), seeds] = coarse.max() + 2.0
    zoom = np.divide(shape, coarse_shape)
    fields = [ndimage.zoom(c.reshape(coarse_shape), zoom, order=3, mode="nearest") for c in coarse]
    return np.argmax(np.stack(fields), axis=0)


def synthetic_image(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Image float32 in ``[0, 1]`` from a label map: random mean and texture per label, blur, bias, noise."""
    num_labels = int(labels.max()) + 1
    means = rng.uniform(0, 1, size=num_labels)
    texture = rng.uniform(0, 0.05, size=num_labels)
    image = means[labels] + texture[labels] * rng.standard_normal(labels.shape)
    image = ndimage.gaussian_filter(image, sigma=rng.uniform(0.5, 1.5))
    return augment_intensity(image, rng)


def synthetic_sample(shape: tuple[int, ...], rng: np.random.Generator,
                     spacing: tuple[float, ...] | None = None) -> tuple[sitk.Image, sitk.Image]:
    """A synthetic image and the mask of one or two of its labels, chosen at random as "the structure".

    Args:
        shape: array shape (``z, y, x`` order), 2D or 3D.
        spacing: voxel spacing in mm in SimpleITK ``x, y, z`` order; 1 mm when ``None``.
    Returns:
        ``(image, mask)``: float32 image in ``[0, 1]`` and uint8 0/1 mask with the same geometry.
    """
    labels = synthetic_label_map(shape, rng)
    structure = rng.choice(int(labels.max()) + 1, size=rng.integers(1, 3), replace=False)
    image = sitk.GetImageFromArray(synthetic_image(labels, rng))
    mask = sitk.GetImageFromArray(np.isin(labels, structure).astype(np.uint8))
    if spacing is not None:
        image.SetSpacing(spacing)
        mask.SetSpacing(spacing)
    return image, mask
