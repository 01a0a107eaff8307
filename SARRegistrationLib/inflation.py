"""A 3D SAR model that starts from a trained 2D one, by inflating its kernels.

Every 3×3 kernel of the 2D networks becomes a 3×3×3 kernel that repeats it along ``z``, divided
by 3 (the "inflation" of Carreira & Zisserman, CVPR 2017). On a volume that does not change along
``z`` the inflated network then computes what the 2D network computes on each slice: its features,
masks and in-plane field; the ``z`` component of the field starts at zero. Training the 3D model
from there needs far fewer steps than from random weights, which is what makes a 3D model
trainable on a CPU. No library inflates arbitrary networks, hence this module.
"""

from __future__ import annotations

import torch

from .errors import WeightsError
from .model import SARModel, model_from_state
from .networks.feature_extractor import FeatureExtractor


def inflate_to_3d(model: SARModel, working_size: int | None = None) -> SARModel:
    """The 3D model whose networks are the inflated networks of the 2D ``model``.

    Args:
        model: a 2D SAR model with the project's own feature extractor (VGG16 is 2D only).
        working_size: the 3D model's working size; the 2D model's when ``None``.
    """
    if model.ndims != 2:
        raise WeightsError(f"Only a 2D model can be inflated to 3D; this one is {model.ndims}D.")
    if not isinstance(model.feature_extractor, FeatureExtractor):
        raise WeightsError("A model whose content loss uses VGG16 cannot be inflated: VGG16 is a 2D network.")
    flat = model.state()
    configs = {name: {**config, "ndims": 3} for name, config in flat["configs"].items()}
    target = model_from_state({**flat, "configs": configs, "weights": {}})
    weights = {}
    for name, network in target.networks.items():
        planar = flat["weights"][name]
        weights[name] = {key: _inflate_tensor(key, planar[key], value, name == "generator")
                         for key, value in network.state_dict().items()}
    inflated = model_from_state({**flat, "configs": configs, "weights": weights,
                                 "working_size": working_size or model.working_size})
    inflated.metadata = {"inflated_from": dict(model.metadata)}
    return inflated


def _inflate_tensor(key: str, planar: torch.Tensor, volumetric: torch.Tensor, generator: bool) -> torch.Tensor:
    """The 3D value of one state-dict entry, given its 2D value and its (untrained) 3D value."""
    if generator and key.startswith("flow_head."):
        # Output channels are field components in array order: 2D (y, x) becomes 3D (z, y, x), z = 0.
        planar = torch.cat([torch.zeros_like(planar[:1]), planar])
    if planar.dim() == volumetric.dim() - 1 and planar.dim() == 4:  # a convolution kernel (out, in, y, x)
        depth = volumetric.shape[2]
        planar = planar.unsqueeze(2).expand(-1, -1, depth, -1, -1) / depth
    if planar.shape != volumetric.shape:
        raise WeightsError(f"Cannot inflate {key}: 2D shape {tuple(planar.shape)}, 3D shape {tuple(volumetric.shape)}.")
    return planar.clone().to(volumetric.dtype)
