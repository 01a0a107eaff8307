"""Loss terms of SAR registration (paper §2.1–2.2), each usable on its own.

Every function takes ``(B, C, *spatial)`` tensors in 2D or 3D (see :mod:`spatial` for conventions),
runs on whatever device its inputs live on and is differentiable, so it can be used as a loss.
Similarities (NMI, SSIM, Dice) are returned as similarities; the training code decides signs and
weights. Unless a docstring says otherwise, a function averages over the batch and returns a
0-dimensional tensor.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .spatial import compose, spatial_ndims

EPS = 1e-7


def _entropy(probabilities: torch.Tensor, dims) -> torch.Tensor:
    """Shannon entropy (nats) of distributions summed over ``dims``.

    ``p log(p + eps)`` instead of ``xlogy``: the latter's gradient is NaN at ``p == 0``, which
    Gaussian weights reach by underflow far from a bin.
    """
    return -(probabilities * torch.log(probabilities + EPS)).sum(dim=dims)


def _parzen_weights(values: torch.Tensor, bins: int, sigma_ratio: float) -> torch.Tensor:
    """Soft bin memberships ``(B, N, bins)`` of ``values`` ``(B, N)`` in [0, 1] (values outside count as its ends).

    Bin ``k`` is centred at ``(k + 0.5) / bins``, the centres of ``np.histogram``'s bins on
    [0, 1]. Each voxel's memberships sum to one, so the histogram keeps unit mass; ``softmax``
    of the Gaussian log-kernel does that normalisation in one fused, memory-light op.
    """
    centres = (torch.arange(bins, device=values.device, dtype=values.dtype) + 0.5) / bins
    sigma = sigma_ratio / bins
    return torch.softmax(-(values.clamp(0, 1).unsqueeze(-1) - centres) ** 2 / (2 * sigma ** 2), dim=-1)


def _linear_memberships(values: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two bins each value of ``(B, N)`` in [0, 1] falls between, and its weight on the lower one
    (values outside count as its ends).

    A triangular (first-order B-spline) Parzen window over the bin centres ``(k + 0.5) / bins``:
    the weights sum to one and are linear in the value, so they carry its gradient.
    """
    position = (values * bins - 0.5).clamp(0, bins - 1)
    lower = position.detach().long().clamp(max=bins - 2)  # truncation is floor: position >= 0
    return lower, 1 - (position - lower)


def _linear_joint_histogram(a: torch.Tensor, b: torch.Tensor, bins: int, weights: torch.Tensor | None) -> torch.Tensor:
    """Joint histogram ``(B, bins, bins)`` of ``(B, N)`` values by triangular windows: four entries a voxel."""
    batch = a.shape[0]
    lower_a, weight_a = _linear_memberships(a, bins)
    lower_b, weight_b = _linear_memberships(b, bins)
    joint = a.new_zeros(batch, bins * bins)
    lowest = lower_a * bins + lower_b  # the entry of both lower bins; the other three are offsets from it
    for offset_a, share_a in ((0, weight_a), (bins, 1 - weight_a)):
        for offset_b, share_b in ((0, weight_b), (1, 1 - weight_b)):
            share = share_a * share_b if weights is None else share_a * share_b * weights
            offset = offset_a + offset_b
            joint = joint.scatter_add(1, lowest + offset if offset else lowest, share)
    return joint.view(batch, bins, bins)


def normalised_mutual_information(a: torch.Tensor, b: torch.Tensor, bins: int = 32,
                                  mask: torch.Tensor | None = None,
                                  sigma_ratio: float = 0.5, kernel: str = "gaussian",
                                  reduction: str = "mean") -> torch.Tensor:
    """Studholme's normalised mutual information ``(H(A) + H(B)) / H(A, B)``, in [1, 2].

    Histograms are Parzen-window estimates, which makes the measure differentiable. With the
    Gaussian kernel (standard deviation ``sigma_ratio`` bin widths) the joint histogram is
    ``Wa^T Wb`` with ``W (B, N, bins)`` soft memberships, so memory grows as ``N * bins``, not
    ``N * bins**2`` (a 128^3 volume with 32 bins needs a few 256 MiB buffers per image).
    ``kernel="linear"`` uses triangular windows one bin wide instead: each voxel adds to four
    bins only, so the cost is that of a few passes over the voxels whatever ``bins`` is (instance
    optimisation evaluates NMI hundreds of times per pair).
    Because the kernel blurs the histograms, values sit slightly below the hard-histogram NMI of
    ``skimage.metrics.normalized_mutual_information``; NMI(a, a) is below 2 for the same reason.

    Args:
        a, b: ``(B, C, *spatial)`` images with intensities in [0, 1]; all channels of a sample are
            pooled into one histogram.
        bins: histogram bins per image on [0, 1].
        mask: optional ``(B, 1 or C, *spatial)`` voxel weights in [0, 1] for both histograms; a
            binary mask restricts the measure to the voxels inside it.
        sigma_ratio: Gaussian kernel width in bins.
        kernel: ``"gaussian"`` or ``"linear"``.
        reduction: ``"mean"`` or ``"none"`` (one value per sample of the batch).

    Returns:
        The batch mean of the per-sample NMI (or each sample's), 1 for independent and 2 for
        identical images.
    """
    if a.shape != b.shape:
        raise ValueError(f"NMI needs images of equal shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    batch = a.shape[0]
    weights = None if mask is None else mask.expand_as(a).reshape(batch, -1).to(a.dtype)
    if kernel == "linear":
        joint = _linear_joint_histogram(a.reshape(batch, -1), b.reshape(batch, -1), bins, weights)
    elif kernel == "gaussian":
        weights_a = _parzen_weights(a.reshape(batch, -1), bins, sigma_ratio)
        weights_b = _parzen_weights(b.reshape(batch, -1), bins, sigma_ratio)
        if weights is not None:
            weights_a = weights_a * weights.unsqueeze(-1)
        joint = torch.bmm(weights_a.transpose(1, 2), weights_b)  # (B, bins, bins)
    else:
        raise ValueError(f"kernel must be 'gaussian' or 'linear', got {kernel!r}")
    joint = joint / (joint.sum(dim=(1, 2), keepdim=True) + EPS)
    entropy_a = _entropy(joint.sum(dim=2), dims=1)
    entropy_b = _entropy(joint.sum(dim=1), dims=1)
    entropy_ab = _entropy(joint, dims=(1, 2))
    per_sample = (entropy_a + entropy_b) / (entropy_ab + EPS)
    return per_sample.mean() if reduction == "mean" else per_sample


def mind_ssc(image: torch.Tensor, radius: int = 1, dilation: int = 1) -> torch.Tensor:
    """MIND-SSC descriptors (Heinrich et al. 2013), ``(B, C, *spatial)`` for a ``(B, 1, *spatial)`` image.

    The self-similarity context: for each pair of the ``2 * ndims`` neighbours at ``dilation``
    voxels that lie on different axes (12 pairs in 3D, 4 in 2D), the patch distance between the
    image shifted by one neighbour and by the other, box-averaged over ``(2 * radius + 1)`` voxels
    per axis; then ``exp(-d / v)`` with ``v`` the voxel's mean distance. It describes local
    structure, not intensity, so it holds under contrast changes and bias fields, which is why
    ConvexAdam registers on it. Written here: none of the engine's libraries (torch, SimpleITK,
    scikit-image) has it.
    """
    ndims = spatial_ndims(image)
    offsets = [tuple(sign * dilation if k == axis else 0 for k in range(ndims))
               for axis in range(ndims) for sign in (-1, 1)]
    pairs = [(a, b) for i, a in enumerate(offsets) for b in offsets[i + 1:]
             if [k for k, v in enumerate(a) if v] != [k for k, v in enumerate(b) if v]]
    padded = F.pad(image, [dilation] * (2 * ndims), mode="replicate")

    def shifted(offset):
        return padded[(slice(None), slice(None), *(slice(dilation + o, dilation + o + n)
                                                  for o, n in zip(offset, image.shape[2:])))]

    distances = torch.cat([(shifted(a) - shifted(b)) ** 2 for a, b in pairs], dim=1)
    distances = F.pad(distances, [radius] * (2 * ndims), mode="replicate")
    # The box filter, one axis at a time, as sums of shifted views: avg_pool3d took 95 ms per axis
    # on 12 channels of 128 x 128 x 62 here, the sums a fraction of that.
    for axis in range(2, 2 + ndims):
        count = distances.shape[axis] - 2 * radius
        distances = sum(distances.narrow(axis, shift, count) for shift in range(2 * radius + 1)) / (2 * radius + 1)
    distances = distances - distances.amin(dim=1, keepdim=True)  # exp of the smallest is 1: no underflow
    variance = distances.mean(dim=1, keepdim=True)
    mean_variance = variance.mean()
    variance = variance.clamp(mean_variance * 1e-3 + EPS, mean_variance * 1e3 + EPS)
    return torch.exp(-distances / variance)


def ssim(a: torch.Tensor, b: torch.Tensor, window_size: int = 7) -> torch.Tensor:
    """Mean structural similarity, as ``skimage.metrics.structural_similarity(data_range=1)``.

    Same choices as skimage's defaults: a uniform ``window_size``-wide window, sample
    (``N / (N - 1)``) covariances, ``K1 = 0.01``, ``K2 = 0.03``, and the mean taken only over
    voxels whose window lies inside the image (skimage crops ``(window_size - 1) // 2`` voxels at
    each border after filtering, so its boundary handling never reaches the result; valid
    pooling gives exactly those voxels).

    Args:
        a, b: ``(B, C, *spatial)`` images with intensities in [0, 1], every spatial side at least
            ``window_size``. Channels are compared separately.
        window_size: odd width of the window.

    Returns:
        Mean SSIM over batch, channels and voxels, in [-1, 1]; 1 for identical images.
    """
    ndims = spatial_ndims(a)
    if a.shape != b.shape:
        raise ValueError(f"SSIM needs images of equal shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if window_size % 2 == 0 or min(a.shape[2:]) < window_size:
        raise ValueError(f"window_size must be odd and at most the smallest image side, "
                         f"got {window_size} for spatial shape {tuple(a.shape[2:])}")
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    samples = window_size ** ndims
    covariance_norm = samples / (samples - 1)
    pool = getattr(F, f"avg_pool{ndims}d")
    # One pooling call for all five local moments.
    moments = pool(torch.cat([a, b, a * a, b * b, a * b], dim=1), window_size, stride=1)
    mean_a, mean_b, mean_aa, mean_bb, mean_ab = moments.chunk(5, dim=1)
    var_a = covariance_norm * (mean_aa - mean_a * mean_a)
    var_b = covariance_norm * (mean_bb - mean_b * mean_b)
    cov_ab = covariance_norm * (mean_ab - mean_a * mean_b)
    numerator = (2 * mean_a * mean_b + c1) * (2 * cov_ab + c2)
    denominator = (mean_a ** 2 + mean_b ** 2 + c1) * (var_a + var_b + c2)
    return (numerator / denominator).mean()


def minmax_normalise(features: torch.Tensor) -> torch.Tensor:
    """Scale each map (each sample's channel) of a ``(B, C, *spatial)`` tensor to [0, 1]."""
    flat = features.flatten(2)
    low = flat.amin(dim=2, keepdim=True)
    high = flat.amax(dim=2, keepdim=True)
    return ((flat - low) / (high - low + EPS)).view_as(features)


def feature_distance(a: torch.Tensor, b: torch.Tensor,
                     extractor: Callable[[torch.Tensor], Sequence[torch.Tensor]],
                     b_maps: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """Multi-scale feature-map distance (the ``VGG`` term of Eqn. 2).

    Every map is min-max normalised to [0, 1] per sample and channel ("all feature maps are
    normalized between 0 and 1"), so each scale contributes a mean squared difference in [0, 1]
    whatever its activation range.

    Args:
        a, b: ``(B, 1, *spatial)`` images in [0, 1].
        extractor: maps an image batch to a list of ``(B, C_s, *spatial_s)`` feature maps, e.g. a
            frozen :class:`~SARRegistrationLib.networks.feature_extractor.FeatureExtractor`.
        b_maps: ``extractor(b)`` when already known (a fixed reference), to save computing it.

    Returns:
        Mean over scales of the mean squared difference of normalised maps, in [0, 1].
    """
    maps_a, maps_b = extractor(a), (b_maps if b_maps is not None else extractor(b))
    distances = [F.mse_loss(minmax_normalise(fa), minmax_normalise(fb)) for fa, fb in zip(maps_a, maps_b)]
    return torch.stack(distances).mean()


def soft_dice(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Dice overlap ``2|A∩B| / (|A| + |B|)`` of soft masks.

    Args:
        a, b: ``(B, C, *spatial)`` masks in [0, 1]; each channel is a structure of its own.

    Returns:
        Dice in [0, 1] averaged over batch and channels; two empty masks count as a perfect 1.
    """
    intersection = (a * b).flatten(2).sum(dim=2)
    total = a.flatten(2).sum(dim=2) + b.flatten(2).sum(dim=2)
    return ((2 * intersection + EPS) / (total + EPS)).mean()


def log_dice_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Segmentation term of Eqn. 5, ``-log(Dice + eps)``: 0 for perfect overlap, about 16 for none.

    Args:
        a, b: ``(B, C, *spatial)`` masks in [0, 1].
    """
    return -torch.log(soft_dice(a, b) + EPS)


def normalised_field_error(recovered: torch.Tensor, applied: torch.Tensor) -> torch.Tensor:
    """Mean squared error between displacement fields, normalised to [0, 1] (``NMSE`` of Eqn. 5).

    ``mse / (2 (mean(applied^2) + mean(recovered^2)) + eps)`` per sample: since
    ``|r - a|^2 <= 2|r|^2 + 2|a|^2`` pointwise, the ratio never exceeds 1; it is 0 for equal
    fields, 1/2 for uncorrelated fields of equal energy and 1 for ``recovered == -applied``.
    Unlike dividing by a fixed maximum displacement, this needs no knowledge of the field range.

    Args:
        recovered, applied: ``(B, ndims, *spatial)`` displacements in voxels.

    Returns:
        Batch mean of the normalised error, in [0, 1].
    """
    mse = ((recovered - applied) ** 2).flatten(1).mean(dim=1)
    energy = (applied ** 2).flatten(1).mean(dim=1) + (recovered ** 2).flatten(1).mean(dim=1)
    return (mse / (2 * energy + EPS)).mean()


def cycle_consistency(forward: torch.Tensor, backward: torch.Tensor) -> torch.Tensor:
    """Cycle loss of Eqn. 4: the fields of a pair must invert each other.

    ``compose(forward, backward)`` is the displacement of going through ``forward`` then
    ``backward``; for exact inverses it is zero everywhere, and so is the reverse composition.

    Args:
        forward, backward: ``(B, ndims, *spatial)`` displacements in voxels on the same grid.

    Returns:
        Mean (over both compositions, batch and voxels) of the squared displacement norm, in
        voxels^2; 0 for mutually inverse fields.
    """
    there_and_back = compose(forward, backward)
    back_and_there = compose(backward, forward)
    return 0.5 * ((there_and_back ** 2).sum(dim=1).mean() + (back_and_there ** 2).sum(dim=1).mean())


def smoothness(displacement: torch.Tensor) -> torch.Tensor:
    """Diffusion regulariser: mean squared Jacobian norm of the displacement by forward differences.

    Args:
        displacement: ``(B, ndims, *spatial)`` in voxels.

    Returns:
        ``sum_i mean((d u / d x_i)^2)`` over spatial axes ``i``, in voxels^2 / voxel^2; 0 for a
        constant field.
    """
    ndims = spatial_ndims(displacement)
    return sum((torch.diff(displacement, dim=2 + axis) ** 2).mean() for axis in range(ndims))


def _bce(probabilities: torch.Tensor, target: float) -> torch.Tensor:
    """Binary cross-entropy of probabilities against a constant label, clamped away from 0 and 1.

    The clamp keeps ``log`` finite when a saturated sigmoid rounds to exactly 0 or 1 in float32;
    there the sigmoid's own gradient has vanished already, so no learning signal is lost.
    """
    clamped = probabilities.clamp(EPS, 1 - EPS)
    return F.binary_cross_entropy(clamped, torch.full_like(clamped, target))


def discriminator_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Discriminator side of Eqn. 3: ``-(E[log D(real)] + E[log(1 - D(fake))])``.

    Args:
        real: discriminator outputs for real pairs, probabilities in [0, 1] (the discriminator
            ends in a sigmoid), any shape (a probability map is averaged).
        fake: outputs for generated pairs, same convention.

    Returns:
        Non-negative loss, 2 log 2 ≈ 1.386 for an undecided discriminator (all outputs 1/2).
    """
    return _bce(real, 1.0) + _bce(fake, 0.0)


def generator_adversarial_loss(fake: torch.Tensor) -> torch.Tensor:
    """Generator side of Eqn. 3 in the non-saturating form ``-E[log D(fake)]``.

    Goodfellow et al.'s recommended replacement of minimising ``log(1 - D(fake))``, which has
    vanishing gradients while the discriminator still rejects the generator's output confidently.

    Args:
        fake: discriminator probabilities in [0, 1] for generated pairs, any shape.

    Returns:
        Non-negative loss, log 2 ≈ 0.693 when the discriminator outputs 1/2.
    """
    return _bce(fake, 1.0)
