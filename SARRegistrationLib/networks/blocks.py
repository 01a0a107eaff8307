"""Building blocks shared by the networks, one implementation for 2D and 3D (picked by ``ndims``)."""

import torch
from torch import nn


def conv(ndims: int, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1) -> nn.Module:
    """A same-padded convolution of ``ndims`` spatial dimensions."""
    return getattr(nn, f"Conv{ndims}d")(in_channels, out_channels, kernel_size, stride=stride,
                                        padding=kernel_size // 2)


def batch_norm(ndims: int, channels: int) -> nn.Module:
    return getattr(nn, f"BatchNorm{ndims}d")(channels)


def instance_norm(ndims: int, channels: int) -> nn.Module:
    """Instance norm with a learnt scale and shift: training and evaluation behave the same, batches
    of one work, and the features ignore global intensity scaling, which suits images of any modality."""
    return getattr(nn, f"InstanceNorm{ndims}d")(channels, affine=True)


class ConvBlock(nn.Sequential):
    """3-wide convolution, normalisation (``norm``, batch norm by default), ReLU; ``stride=2`` halves the grid."""

    def __init__(self, ndims: int, in_channels: int, out_channels: int, stride: int = 1, norm=batch_norm):
        super().__init__(conv(ndims, in_channels, out_channels, 3, stride), norm(ndims, out_channels),
                         nn.ReLU(inplace=True))


class ResidualBlock(nn.Module):
    """The paper's residual block: two convolutions with batch norm and ReLU, plus the identity."""

    def __init__(self, ndims: int, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            conv(ndims, channels, channels), batch_norm(ndims, channels), nn.ReLU(inplace=True),
            conv(ndims, channels, channels), batch_norm(ndims, channels))
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(x + self.body(x))
