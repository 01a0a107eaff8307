"""Per-pair finetuning of the generator's last layer (paper §2.3).

Everything before the last layer depends only on the image pair, so it is computed once
(:func:`encode_pair`); each iteration then costs the last layer, the warp and the losses. The
network itself is never modified: a copy of its last layer is tuned, so one loaded model can serve
many registrations, also at the same time.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from .errors import RegistrationCancelled
from .model import SARModel
from .networks.generator import soft_otsu_mask
from .objective import LossWeights, registration_terms, total_loss
from .spatial import downsample, downsample_displacement

ProgressCallback = Callable[[float, str], None]
CancelCheck = Callable[[], bool]


@dataclass
class PairEncoding:
    """What the frozen part of the generator gives for a pair, computed once."""

    forward: torch.Tensor  # penultimate features of (reference, floating)
    backward: torch.Tensor  # penultimate features of (floating, reference), for the cycle term
    reference_map: torch.Tensor  # fused feature map of the reference, (B, 1, *spatial) in [0, 1]
    floating_map: torch.Tensor


@dataclass
class FinetuneSettings:
    """When to stop, and how the loss is weighted. ``smoothness`` is the user's regularisation knob."""

    max_iterations: int = 100
    tolerance: float = 1e-4  # stop when |loss(i) - loss(i-1)| falls below this
    learning_rate: float = 2e-3
    # Slice-wise, the one last layer serves every slice, so it is tuned on at most this many
    # evenly spaced slices: the cost per iteration stays that of a few 2D images.
    max_slices: int = 8
    # The loss is evaluated on a grid of at most this many voxels per image (images and field
    # area-averaged onto it); the field itself keeps the working grid. In 3D this makes an
    # iteration several times cheaper, at the cost of detail finer than the loss grid.
    max_loss_voxels: int = 65536
    weights: LossWeights = field(default_factory=lambda: LossWeights().for_finetuning())


@dataclass
class FinetuneResult:
    displacement: torch.Tensor  # (B, ndims, *spatial) voxels, from the tuned last layer
    head: nn.Module  # the tuned copy of the last layer
    losses: list  # total loss of every iteration
    converged: bool  # stopped by the tolerance rather than the iteration limit

    @property
    def iterations(self) -> int:
        return len(self.losses)


# Slice-wise, the slices are one batch. They go through the frozen network this many at a time:
# the activations of 300 CT slices at once took over 5 GB, and a cancel is seen between chunks.
ENCODE_CHUNK = 16


@torch.no_grad()
def encode_pair(model: SARModel, reference: torch.Tensor, floating: torch.Tensor, cancel: CancelCheck | None = None,
                progress: Callable[[float], None] | None = None, chunk: int = ENCODE_CHUNK) -> PairEncoding:
    """Run the frozen part of the generator on a pair, ``chunk`` batch items (slices) at a time;
    ``progress(fraction)`` follows the chunks."""
    generator = model.generator
    generator._check_input(reference, floating)
    parts = []
    for start in range(0, reference.shape[0], chunk):
        if cancel is not None and cancel():
            raise RegistrationCancelled("Registration cancelled; nothing was written.")
        reference_features, floating_features = generator.encode(reference[start:start + chunk],
                                                                 floating[start:start + chunk])
        parts.append((generator.penultimate(reference_features, floating_features),
                      generator.penultimate(floating_features, reference_features),
                      generator.fused_map(reference_features), generator.fused_map(floating_features)))
        if progress is not None:
            progress(min(start + chunk, reference.shape[0]) / reference.shape[0])
    return PairEncoding(*(torch.cat(tensors) for tensors in zip(*parts)))


def finetune_last_layer(model: SARModel, encoding: PairEncoding, reference: torch.Tensor, floating: torch.Tensor,
                        settings: FinetuneSettings | None = None, progress: ProgressCallback | None = None,
                        cancel: CancelCheck | None = None, ignore_mask: torch.Tensor | None = None) -> FinetuneResult:
    """Tune a copy of the generator's last layer on one pair until the loss stops changing.

    ``model`` must be in evaluation mode (as :func:`model.load_model` and :func:`register` leave
    it), so that batch-norm statistics are used, not updated. Raises :class:`RegistrationCancelled`
    as soon as ``cancel()`` returns true. ``ignore_mask`` (shaped like ``reference``, 1 = ignore)
    marks regions the images are not compared in (see :func:`objective.registration_terms`).
    """
    settings = settings or FinetuneSettings()
    generator = model.generator
    head = copy.deepcopy(generator.flow_head).requires_grad_(True)
    optimiser = torch.optim.Adam(head.parameters(), lr=settings.learning_rate)
    tuned_on = _evenly_spaced(reference.shape[0], settings.max_slices)
    encoding_subset = PairEncoding(*(getattr(encoding, name)[tuned_on] for name in PairEncoding.__dataclass_fields__))
    loss_shape = _loss_grid(reference.shape[2:], settings.max_loss_voxels)
    # Everything but the field is fixed while the last layer is tuned: prepare it once.
    fixed = {
        "reference": downsample(reference[tuned_on], loss_shape),
        "floating": downsample(floating[tuned_on], loss_shape),
        "reference_mask": downsample(soft_otsu_mask(encoding_subset.reference_map), loss_shape),
        "floating_mask": downsample(soft_otsu_mask(encoding_subset.floating_map), loss_shape),
        "discriminator": model.discriminator, "feature_extractor": model.feature_extractor}
    if ignore_mask is not None:
        fixed["ignore_mask"] = downsample(ignore_mask[tuned_on], loss_shape)
    if settings.weights.features:
        with torch.no_grad():
            fixed["reference_feature_maps"] = model.feature_extractor(fixed["reference"])

    history, converged = [], False
    for iteration in range(settings.max_iterations):
        if cancel is not None and cancel():
            raise RegistrationCancelled("Registration cancelled during finetuning; nothing was written.")
        optimiser.zero_grad(set_to_none=True)
        forward_field = downsample_displacement(generator.field(encoding_subset.forward, head), loss_shape)
        backward_field = downsample_displacement(generator.field(encoding_subset.backward, head), loss_shape) \
            if settings.weights.cycle else None
        terms = registration_terms(settings.weights, forward_field=forward_field, backward_field=backward_field,
                                   **fixed)
        loss = total_loss(settings.weights, terms)
        # Gradients flow through the frozen networks to the field but are kept for the head alone.
        loss.backward(inputs=list(head.parameters()))
        optimiser.step()
        history.append(float(loss.detach()))
        if progress is not None:
            progress((iteration + 1) / settings.max_iterations, f"finetuning: iteration {iteration + 1}, loss {history[-1]:.4f}")
        if len(history) > 1 and abs(history[-1] - history[-2]) < settings.tolerance:
            converged = True
            break
    with torch.no_grad():
        displacement = generator.field(encoding.forward, head)
    return FinetuneResult(displacement, head.requires_grad_(False), history, converged)


def _loss_grid(shape, max_voxels: int) -> tuple:
    """``shape`` divided by the smallest integer factor that brings its voxel count to ``max_voxels``."""
    factor = 1
    while np.prod([-(-n // factor) for n in shape]) > max_voxels:
        factor += 1
    return tuple(-(-n // factor) for n in shape)


def _evenly_spaced(count: int, at_most: int) -> torch.Tensor:
    """Indices of at most ``at_most`` of ``count`` batch items, spread evenly (all when they fit)."""
    if count <= at_most:
        return torch.arange(count)
    return torch.linspace(0, count - 1, at_most).round().long()
