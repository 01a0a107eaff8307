"""The SAR discriminator (paper §2.1, Fig. 1b): is this image a real reference or a registered one?

Eight convolutions whose width grows by a factor of 2 from ``width`` to ``8 * width`` (64 -> 512
in the paper), LeakyReLU, strided convolutions where the width doubles, then two dense layers and a
sigmoid. The image is first average-pooled to at most ``input_size`` voxels per axis: the
adversarial signal is about global intensity distribution, and judging a 256² image or a 128³
volume at full resolution would dominate the cost of per-pair finetuning on a CPU.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import batch_norm, conv


class SARDiscriminator(nn.Module):
    """``(B, 1, *spatial)`` image in [0, 1] -> ``(B, 1)`` probability that it is a real reference."""

    def __init__(self, ndims: int = 2, width: int = 64, input_size: int = 64):
        super().__init__()
        self.ndims, self.width, self.input_size = ndims, width, input_size
        widths = [width, width, 2 * width, 2 * width, 4 * width, 4 * width, 8 * width, 8 * width]
        layers, previous = [], 1
        for index, channels in enumerate(widths):
            stride = 2 if index % 2 else 1
            layers.append(conv(ndims, previous, channels, 3, stride))
            if index:  # as in SRGAN's discriminator, no normalisation on the first layer
                layers.append(batch_norm(ndims, channels))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            previous = channels
        self.features = nn.Sequential(*layers)
        self.pool = getattr(nn, f"AdaptiveAvgPool{ndims}d")(1)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(previous, 2 * previous), nn.LeakyReLU(0.2, inplace=True),
                                        nn.Linear(2 * previous, 1), nn.Sigmoid())

    @property
    def config(self) -> dict:
        return {"ndims": self.ndims, "width": self.width, "input_size": self.input_size}

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        largest = max(image.shape[2:])
        if largest > self.input_size:
            image = getattr(F, f"adaptive_avg_pool{self.ndims}d")(image, self._pooled_shape(image))
        return self.classifier(self.pool(self.features(image)))

    def _pooled_shape(self, image: torch.Tensor):
        factor = self.input_size / max(image.shape[2:])
        return tuple(max(1, round(n * factor)) for n in image.shape[2:])
