"""The SAR generator (paper §2.1): registered image, deformation field and segmentation masks.

A shared (siamese) encoder of residual blocks reads the reference and the floating image apart, so
each image gets its own feature maps; a decoder of residual blocks reads both and its last layer,
``flow_head``, gives the field. The paper's generator keeps full resolution throughout, which is
far too slow on a CPU, hence the encoder–decoder; its outputs are the paper's.

Segmentation masks come from the network's own convolution layers: every encoder feature map is
normalised to [0, 1], the maps are fused with learnt, positive weights, and the fused map is
thresholded with Otsu's method (a sigmoid around the Otsu threshold while training, so that the
mask terms of the loss reach the encoder).

One public path runs through the network: :meth:`SARGenerator.check_input`, :meth:`~SARGenerator.encode`,
:meth:`~SARGenerator.penultimate`, :meth:`~SARGenerator.field` and :meth:`~SARGenerator.fused_map`.
:meth:`~SARGenerator.fields_and_masks` composes them for :meth:`~SARGenerator.forward` and the
training step; :func:`finetuning.encode_pair` composes them chunk by chunk. Per-pair finetuning
(paper §2.3) changes only ``flow_head``; ``penultimate`` gives everything before it so that it can
be computed once per pair.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..losses import minmax_normalise
from ..spatial import integrate_velocity, warp
from .blocks import ConvBlock, ResidualBlock, conv

# Width of the sigmoid that softens Otsu's threshold during training, in fused-map units ([0, 1]).
SOFT_THRESHOLD_WIDTH = 0.02


@dataclass
class GeneratorOutput:
    """What the generator gives for a batch. Shapes: ``(B, C, *spatial)`` on the input grid."""

    displacement: torch.Tensor  # (B, ndims, *spatial), voxels, pull-back: warped(x) = floating(x + u(x))
    warped: torch.Tensor  # (B, 1, *spatial), the floating image registered to the reference
    reference_mask: torch.Tensor  # (B, 1, *spatial), soft Otsu mask of the reference in [0, 1]
    floating_mask: torch.Tensor  # (B, 1, *spatial), soft Otsu mask of the floating image


class Encoder(nn.Module):
    """Residual blocks at ``len(channels)`` scales; each scale after the first halves the grid."""

    def __init__(self, ndims: int, channels):
        super().__init__()
        self.levels = nn.ModuleList()
        previous = 1
        for level, width in enumerate(channels):
            stride = 1 if level == 0 else 2
            self.levels.append(nn.Sequential(ConvBlock(ndims, previous, width, stride), ResidualBlock(ndims, width)))
            previous = width

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        features = []
        x = image
        for level in self.levels:
            x = level(x)
            features.append(x)
        return features


class Decoder(nn.Module):
    """Reads the encoder features of both images from the coarsest scale up to full resolution."""

    def __init__(self, ndims: int, channels):
        super().__init__()
        self.bottom = nn.Sequential(ConvBlock(ndims, 2 * channels[-1], channels[-1]), ResidualBlock(ndims, channels[-1]))
        self.up = nn.ModuleList(
            nn.Sequential(ConvBlock(ndims, channels[level + 1] + 2 * channels[level], channels[level]),
                          ResidualBlock(ndims, channels[level]))
            for level in reversed(range(len(channels) - 1)))

    def forward(self, reference_features, floating_features) -> torch.Tensor:
        x = self.bottom(torch.cat([reference_features[-1], floating_features[-1]], dim=1))
        for level, block in zip(reversed(range(len(self.up))), self.up):
            skip = [reference_features[level], floating_features[level]]
            x = _resize(x, skip[0].shape[2:])
            x = block(torch.cat([x, *skip], dim=1))
        return x


class FeatureMapFusion(nn.Module):
    """Fuses every normalised encoder feature map into one map in [0, 1] with learnt weights.

    Weights are softmax-normalised, per channel within a scale and then across scales, so they stay
    positive, sum to one and say how much each map matters. Fusing within a scale before upsampling
    is the same linear combination as upsampling every map first, at a fraction of the memory.
    """

    def __init__(self, channels):
        super().__init__()
        self.channel_logits = nn.ParameterList(nn.Parameter(torch.zeros(width)) for width in channels)
        self.scale_logits = nn.Parameter(torch.zeros(len(channels)))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        shape = features[0].shape[2:]
        scale_weights = torch.softmax(self.scale_logits, dim=0)
        fused = 0.0
        for feature, logits, scale_weight in zip(features, self.channel_logits, scale_weights):
            channel_weights = torch.softmax(logits, dim=0).view(1, -1, *([1] * (feature.dim() - 2)))
            level_map = (minmax_normalise(feature) * channel_weights).sum(dim=1, keepdim=True)
            fused = fused + scale_weight * _resize(level_map, shape)
        return fused


class SARGenerator(nn.Module):
    """Reference + floating image in, registered image, field and masks out (2D or 3D).

    Args:
        ndims: 2 for images, 3 for volumes.
        channels: feature count of each encoder scale; the input shape must be divisible by
            ``2 ** (len(channels) - 1)``.
        diffeomorphic: if true the last layer gives a stationary velocity field, integrated by
            scaling and squaring into a displacement that does not fold.
        integration_steps: squarings of the diffeomorphic variant.
    """

    def __init__(self, ndims: int = 2, channels=(16, 32, 32, 64), diffeomorphic: bool = False,
                 integration_steps: int = 7):
        super().__init__()
        self.ndims = ndims
        self.channels = tuple(channels)
        self.diffeomorphic = diffeomorphic
        self.integration_steps = integration_steps
        self.encoder = Encoder(ndims, self.channels)
        self.fusion = FeatureMapFusion(self.channels)
        self.decoder = Decoder(ndims, self.channels)
        self.flow_head = conv(ndims, self.channels[0], ndims)
        # A near-zero last layer starts from the identity, so early training is stable.
        nn.init.normal_(self.flow_head.weight, std=1e-5)
        nn.init.zeros_(self.flow_head.bias)

    @property
    def config(self) -> dict:
        """The constructor's arguments, as stored in checkpoints."""
        return {"ndims": self.ndims, "channels": list(self.channels), "diffeomorphic": self.diffeomorphic,
                "integration_steps": self.integration_steps}

    @property
    def shape_multiple(self) -> int:
        return 2 ** (len(self.channels) - 1)

    def check_input(self, reference: torch.Tensor, floating: torch.Tensor) -> None:
        """Raise ``ValueError`` unless both are ``(B, 1, *spatial)`` of one shape, a multiple of :attr:`shape_multiple`."""
        if reference.dim() != self.ndims + 2 or reference.shape != floating.shape:
            raise ValueError(f"this {self.ndims}D generator needs two (B, 1, *spatial) tensors of one shape, "
                             f"got {tuple(reference.shape)} and {tuple(floating.shape)}")
        if any(n % self.shape_multiple for n in reference.shape[2:]):
            raise ValueError(f"spatial shape {tuple(reference.shape[2:])} is not a multiple of {self.shape_multiple}")

    def encode(self, reference: torch.Tensor, floating: torch.Tensor):
        """Encoder features of both images, computed as one batch so batch norm sees both."""
        features = self.encoder(torch.cat([reference, floating], dim=0))
        batch = reference.shape[0]
        return [f[:batch] for f in features], [f[batch:] for f in features]

    def fused_map(self, features: list[torch.Tensor]) -> torch.Tensor:
        """The fused, normalised feature map of one image, ``(B, 1, *spatial)`` in [0, 1]."""
        return self.fusion(features)

    def penultimate(self, reference_features, floating_features) -> torch.Tensor:
        """Everything before the last layer: full-resolution features of the pair."""
        return self.decoder(reference_features, floating_features)

    def field(self, penultimate: torch.Tensor, head: nn.Module | None = None) -> torch.Tensor:
        """The displacement (voxels) that ``head`` (by default the network's own last layer) gives."""
        output = (head or self.flow_head)(penultimate)
        return integrate_velocity(output, self.integration_steps) if self.diffeomorphic else output

    def fields_and_masks(self, reference: torch.Tensor, floating: torch.Tensor, with_backward: bool = False):
        """``(forward field, backward field or None, reference mask, floating mask)`` of a pair.

        The forward field registers ``floating`` to ``reference``; the backward one, only
        ``with_backward``, the other way. The masks are soft (:func:`soft_otsu_mask`), so that
        mask terms of a loss reach the encoder. The input is not checked (see :meth:`check_input`).
        """
        reference_features, floating_features = self.encode(reference, floating)
        forward_field = self.field(self.penultimate(reference_features, floating_features))
        backward_field = self.field(self.penultimate(floating_features, reference_features)) \
            if with_backward else None
        return (forward_field, backward_field, soft_otsu_mask(self.fused_map(reference_features)),
                soft_otsu_mask(self.fused_map(floating_features)))

    def forward(self, reference: torch.Tensor, floating: torch.Tensor) -> GeneratorOutput:
        """Register ``floating`` to ``reference``; both ``(B, 1, *spatial)`` with intensities in [0, 1]."""
        self.check_input(reference, floating)
        displacement, _, reference_mask, floating_mask = self.fields_and_masks(reference, floating)
        return GeneratorOutput(displacement=displacement, warped=warp(floating, displacement),
                               reference_mask=reference_mask, floating_mask=floating_mask)


def otsu_thresholds(maps: torch.Tensor) -> torch.Tensor:
    """Otsu's threshold (scikit-image) of each map of a ``(B, 1, *spatial)`` batch, as ``(B, 1, 1, ...)``."""
    # Imported here: scikit-image's filters (and the scipy.ndimage they load) take 0.2 s to import,
    # which a registration without the network, the default, would pay for nothing.
    from skimage.filters import threshold_otsu

    values = maps.detach().float().cpu().numpy()
    thresholds = [threshold_otsu(m) if np.ptp(m) > 0 else float(m.flat[0]) for m in values]
    return torch.tensor(thresholds, dtype=maps.dtype, device=maps.device).view(-1, *([1] * (maps.dim() - 1)))


def soft_otsu_mask(maps: torch.Tensor) -> torch.Tensor:
    """A differentiable mask: a narrow sigmoid around each map's Otsu threshold."""
    return torch.sigmoid((maps - otsu_thresholds(maps)) / SOFT_THRESHOLD_WIDTH)


def otsu_mask(maps: torch.Tensor) -> torch.Tensor:
    """The binary mask of the paper: each map above its Otsu threshold."""
    return (maps > otsu_thresholds(maps)).to(maps.dtype)


def _resize(x: torch.Tensor, shape) -> torch.Tensor:
    if tuple(x.shape[2:]) == tuple(shape):
        return x
    return F.interpolate(x, size=tuple(shape), mode="bilinear" if x.dim() == 4 else "trilinear", align_corners=False)
