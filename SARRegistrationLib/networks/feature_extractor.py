"""Networks behind :func:`SARRegistrationLib.losses.feature_distance`.

The paper compares images through the feature maps of an ImageNet-trained VGG network. Those
weights cannot be downloaded everywhere, so two extractors are offered:

- :class:`FeatureExtractor`, a small 2D/3D convolutional encoder trained here as an autoencoder
  (:func:`train_feature_extractor`), then frozen by the caller;
- :class:`VGG16Features`, VGG16's convolutional layers loaded from a local torchvision weights file.

Both map a ``(B, 1, *spatial)`` image in [0, 1] to a list of ``(B, C_s, *spatial_s)`` feature maps,
finest scale first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import ConvBlock, instance_norm

_LINEAR_MODE = {2: "bilinear", 3: "trilinear"}


class FeatureExtractor(nn.Module):
    """Small multi-scale convolutional encoder with a light decoder for autoencoder training.

    Scale ``s`` has two conv blocks with ``channels[s]`` filters; every scale after the first starts
    with a stride-2 convolution, so a side of ``n`` voxels becomes ``ceil(n / 2**s)``. The blocks use
    instance norm rather than batch norm (see :func:`blocks.instance_norm`).

    Args:
        ndims: 2 or 3 spatial dimensions.
        channels: filters per scale, finest first.
    """

    def __init__(self, ndims: int, channels: Sequence[int] = (16, 32, 64)):
        super().__init__()
        if ndims not in (2, 3):
            raise ValueError(f"ndims must be 2 or 3, got {ndims}")
        self.ndims = ndims
        self.channels = tuple(channels)
        inputs = (1,) + self.channels[:-1]
        self.encoder = nn.ModuleList(
            nn.Sequential(ConvBlock(ndims, n_in, n_out, stride=1 if scale == 0 else 2, norm=instance_norm),
                          ConvBlock(ndims, n_out, n_out, norm=instance_norm))
            for scale, (n_in, n_out) in enumerate(zip(inputs, self.channels)))
        # The decoder sees only the coarsest map (no skip connections): reconstruction must then go
        # through every scale, so every scale has to learn informative features.
        self.decoder = nn.ModuleList(ConvBlock(ndims, n_in, n_out, norm=instance_norm)
                                     for n_in, n_out in zip(self.channels[:0:-1], self.channels[-2::-1]))
        self.output = getattr(nn, f"Conv{ndims}d")(self.channels[0], 1, 1)

    @property
    def config(self) -> dict:
        """The constructor's arguments, as stored in checkpoints."""
        return {"ndims": self.ndims, "channels": list(self.channels)}

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps of ``x`` ``(B, 1, *spatial)``: ``[(B, channels[s], *spatial_s)]``, finest first."""
        features = []
        for scale in self.encoder:
            x = scale(x)
            features.append(x)
        return features

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Autoencoder output ``(B, 1, *spatial)`` in [0, 1] for ``x`` ``(B, 1, *spatial)``."""
        features = self(x)
        y = features[-1]
        for block, target in zip(self.decoder, features[-2::-1]):
            y = F.interpolate(y, size=target.shape[2:], mode=_LINEAR_MODE[self.ndims], align_corners=False)
            y = block(y)
        return torch.sigmoid(self.output(y))


VGG16_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
# Indices of relu1_2, relu2_2, relu3_3 and relu4_3 in torchvision's ``vgg16().features``.
VGG16_TAPS = (3, 8, 15, 22)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def vgg_layers(config: Sequence[int | str] = VGG16_CONFIG) -> nn.Sequential:
    """VGG convolutional layers numbered as torchvision's ``features`` (conv, ReLU, ..., max-pool)."""
    layers: list[nn.Module] = []
    in_channels = 3
    for item in config:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(in_channels, item, 3, padding=1), nn.ReLU()]
            in_channels = item
    return nn.Sequential(*layers)


def _load_vgg_features(path: Path) -> dict[str, torch.Tensor]:
    """The ``features.*`` tensors of a torchvision VGG16 state dict, with the prefix removed."""
    if not path.is_file():
        raise FileNotFoundError(
            f"VGG16 weights file not found: {path}. Download torchvision's ImageNet VGG16 weights "
            f"(vgg16-397923af.pth, https://download.pytorch.org/models/vgg16-397923af.pth) on a machine "
            f"with internet access and pass its local path, or use FeatureExtractor instead.")
    state = torch.load(path, map_location="cpu", weights_only=True)
    features = {key[len("features."):]: value for key, value in state.items()
                if key.startswith("features.")} if isinstance(state, dict) else {}
    if not features:
        found = list(state)[:5] if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path} is not a torchvision VGG16 state dict: no 'features.*' keys (found {found})")
    return features


class VGG16Features(nn.Module):
    """Frozen ImageNet VGG16 feature maps after relu1_2, relu2_2, relu3_3 and relu4_3.

    Only the layers up to relu4_3 are built; the weights come from a local torchvision-format
    file (keys ``features.0.weight``, ...), other keys (classifier, conv5) are ignored.

    Input is ``(B, 1, H, W)`` or ``(B, 1, D, H, W)`` in [0, 1]; it is repeated to RGB and
    normalised with ImageNet statistics. VGG is 2D, so a volume is processed as its ``D`` axial
    slices and every map is returned as ``(B, C, D, h, w)``. Channels are 64, 128, 256, 512 at
    ``1, 1/2, 1/4, 1/8`` of the in-plane size.

    Args:
        state_dict_path: path to e.g. ``vgg16-397923af.pth``.
    """

    # Its weights stay in the user's file: SAR weights files record only the path.
    external_weights = True

    def __init__(self, state_dict_path: str | Path):
        super().__init__()
        self.state_dict_path = str(state_dict_path)
        self.features = vgg_layers(VGG16_CONFIG)[:VGG16_TAPS[-1] + 1]
        weights = _load_vgg_features(Path(state_dict_path))
        expected = self.features.state_dict().keys()
        missing = sorted(set(expected) - weights.keys())
        if missing:
            raise ValueError(f"{state_dict_path} lacks VGG16 layers: features.{', features.'.join(missing)}")
        self.features.load_state_dict({key: weights[key] for key in expected})
        self.requires_grad_(False)
        self.eval()
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def config(self) -> dict:
        return {"state_dict_path": self.state_dict_path}

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Four feature maps of ``x`` (see the class docstring for shapes)."""
        if x.dim() == 5:
            batch, _, depth = x.shape[:3]
            slices = x.transpose(1, 2).reshape(batch * depth, 1, *x.shape[3:])
            return [m.view(batch, depth, *m.shape[1:]).transpose(1, 2) for m in self(slices)]
        if x.dim() != 4 or x.shape[1] != 1:
            raise ValueError(f"expected a (B, 1, H, W) or (B, 1, D, H, W) image, got shape {tuple(x.shape)}")
        x = (x.expand(-1, 3, -1, -1) - self.mean) / self.std
        maps = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in VGG16_TAPS:
                maps.append(x)
        return maps
