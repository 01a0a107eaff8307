"""Intensity changes of a floating image for the benchmarks: a realistic contrast change for the 3D
benchmark (T1 to a T2-like image, tissue class by tissue class), noise far below an image's own
to measure how much of a difference between two runs is noise (:func:`with_noise`), and synthetic
volumes with CT's intensities (:func:`ct_like_volume`).

Registration across contrasts is what MR sequences demand and what mutual information, NMI and
MIND are built for; a random non-monotonic intensity curve (the training augmentation of
``deformations.augment_intensity``) can map different tissues onto one intensity, and then no
method can find the correspondence. Here the T1 image's tissue classes are found by Otsu's
method with four thresholds (background, CSF, grey matter, white matter, fat/scalp: the class
means of the bundled T1 volume are about 0, 42, 76, 106 and 176), and intensities are remapped by
the piecewise-linear curve through those class means onto T2-like levels: CSF brightest, grey
above white matter (the T1 order inverted), fat intermediate, background dark. Being a function of
intensity it keeps partial volumes in between. A mild smooth bias field and mild noise follow.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from SARRegistrationLib.deformations import smooth_noise
from SARRegistrationLib.imageio import array_of, image_like, normalise_intensity
from SARRegistrationLib.synthetic import synthetic_label_map

# Target level ranges in [0, 1] per class (background, CSF, grey matter, white matter, fat), one
# value drawn uniformly per class and pair: the T2-like order CSF > GM > WM, fat between.
T2_LIKE_LEVELS = ((0.0, 0.0), (0.85, 1.0), (0.5, 0.6), (0.3, 0.4), (0.55, 0.75))
MAX_BIAS = 0.15  # bias field exp(a * smooth noise), a uniform in [0, MAX_BIAS]
MAX_NOISE_SD = 0.02  # Gaussian noise, standard deviation uniform in [0.01, MAX_NOISE_SD] of the range
# CT-like volumes (Hounsfield units): air, bone, and the range the soft tissues' means are drawn from
# (fat at about -100 HU, muscle, organs and blood at 30-80 HU), and fat, which takes air's label in a
# volume cropped inside the body.
CT_AIR_HU, CT_BONE_HU, CT_SOFT_TISSUE_HU, CT_FAT_HU = -1000.0, 700.0, (-100.0, 80.0), -100.0


def tissue_class_means(image: sitk.Image, classes: int = 5) -> np.ndarray:
    """Mean intensity of each Otsu class (``classes - 1`` thresholds), ascending."""
    labels = array_of(sitk.OtsuMultipleThresholds(sitk.Cast(image, sitk.sitkFloat32), classes - 1))
    values = array_of(image).astype(np.float64)
    return np.array([values[labels == k].mean() for k in range(classes)])


def t2_like(image: sitk.Image, rng: np.random.Generator) -> sitk.Image:
    """``image`` (T1) remapped to a T2-like contrast with a mild bias field and noise; float32 in [0, 1].

    The curve passes through (class mean -> level) for the classes of :func:`tissue_class_means`
    (levels drawn from ``T2_LIKE_LEVELS``) and is flat beyond the darkest and brightest means.
    """
    means = tissue_class_means(image, len(T2_LIKE_LEVELS))
    levels = np.array([rng.uniform(low, high) for low, high in T2_LIKE_LEVELS])
    values = array_of(image).astype(np.float64)
    remapped = np.interp(values, means, levels)
    coarse_shape = tuple(min(4, n) for n in values.shape)
    bias = np.exp(rng.uniform(0, MAX_BIAS) * smooth_noise(values.shape, rng, coarse_shape))
    noisy = remapped * bias + rng.normal(0, rng.uniform(0.01, MAX_NOISE_SD), size=values.shape)
    return image_like(normalise_intensity(noisy).astype(np.float32), image)


def with_noise(image: sitk.Image, sigma: float, seed: int) -> sitk.Image:
    """``image`` plus seeded Gaussian noise of ``sigma`` times its intensity sd, in its own pixel type.

    With ``sigma`` of 1e-5 the image is the same to any eye and any registration measure, so what
    changes in a registration's result is the sensitivity of its path, not the image.
    """
    values = array_of(image)
    noise = np.random.default_rng(seed).normal(0.0, sigma * values.std(), values.shape)
    return image_like((values + noise).astype(values.dtype), image)


def ct_like_volume(shape, rng: np.random.Generator, spacing=(2.0, 2.0, 2.0),
                   air: bool = True) -> tuple[sitk.Image, sitk.Image]:
    """A synthetic label-map volume with CT's intensities, and the mask of one or two of its soft tissues.

    Label 0 is air (``CT_AIR_HU``), or fat (``CT_FAT_HU``) without ``air``, as in a volume cropped
    inside the body (its lowest value above -500 HU, which the engine recognises as CT only in an
    integer type, hence int16 then); label 1 is bone (``CT_BONE_HU``), the other six soft tissues, each a
    mean drawn from ``CT_SOFT_TISSUE_HU`` with a texture of up to 15 HU; then a slight blur and 10 HU
    of noise. What makes it CT-like for a registration: after the engine's 1-99 % normalisation the
    soft tissues, most of the voxels and every boundary inside the body, fall into two or three of
    NMI's 32 histogram bins between air and bone (the MR-like synthetic volumes spread their labels
    over the whole range). The structure is a soft tissue, so it is told apart by those boundaries.

    Returns ``(image, mask)``: HU (float32; without ``air`` whole HU in int16, as a scanner stores
    CT, which the engine needs to recognise CT without air) and uint8 0/1 on one grid of ``spacing``
    (x, y, z) mm.
    """
    labels = synthetic_label_map(tuple(shape), rng)
    means = np.concatenate([[CT_AIR_HU if air else CT_FAT_HU, CT_BONE_HU],
                            rng.uniform(*CT_SOFT_TISSUE_HU, size=int(labels.max()) - 1)])
    texture = rng.uniform(0, 15, size=means.size)
    values = means[labels] + texture[labels] * rng.standard_normal(labels.shape)
    values = ndimage.gaussian_filter(values, 0.8) + 10 * rng.standard_normal(labels.shape)
    structure = rng.choice(np.arange(2, means.size), size=rng.integers(1, 3), replace=False)
    image = sitk.GetImageFromArray(values.astype(np.float32) if air else np.round(values).astype(np.int16))
    image.SetSpacing(tuple(float(size) for size in spacing))
    mask = sitk.GetImageFromArray(np.isin(labels, structure).astype(np.uint8))
    mask.CopyInformation(image)
    return image, mask
