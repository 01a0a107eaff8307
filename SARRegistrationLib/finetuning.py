"""Per-pair finetuning of the generator's last layer (paper §2.3).

Everything before the last layer depends only on the image pair, so it is computed once
(:func:`encode_pair`); each iteration then costs the last layer, the warp and the losses. The
network itself is never modified: a copy of its last layer is tuned, so one loaded model can serve
many registrations, also at the same time in threads that use one device (``register`` moves the
model to the device it is asked for, so threads asking for different devices must not share one
model). The copy returned is the iterate of lowest loss, the network's own last layer included, so
finetuning never ends worse than the network on its loss; and it is the network's own unless that
iterate also matches the images better (see :attr:`FinetuneSettings.require_similarity_gain`).
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
from .optimisers import Adam
from .spatial import downsample, downsample_displacement

ProgressCallback = Callable[[float, str], None]
CancelCheck = Callable[[], bool]


@dataclass
class PairEncoding:
    """What the frozen part of the generator gives for a pair, computed once."""

    forward: torch.Tensor  # penultimate features of (reference, floating)
    reference_map: torch.Tensor  # fused feature map of the reference, (B, 1, *spatial) in [0, 1]
    floating_map: torch.Tensor
    # Penultimate features of (floating, reference), for the cycle term, of the batch items
    # ``backward_items`` only: finetuning needs them for the few slices it tunes on.
    backward: torch.Tensor
    backward_items: torch.Tensor


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
    # Return the last layer of lowest loss among all iterates, the network's own included, rather
    # than the last one: finetuning never ends worse than the network on its own objective, even
    # when a step overshoots. With LossWeights.for_finetuning, a lower loss after 100 steps than
    # at the start came with a lower field error on all 58 non-brain pairs of
    # benchmarks/finetuning_ablation.py, so this guards accuracy too. It is insurance: there the
    # lowest-loss iterate and the last one gave the same mean error (1.116 and 1.114 mm).
    keep_lowest_loss: bool = True
    # Return the network's own last layer unless the kept one also lowers the image term (NMI).
    # On large deformations (20 mm B-splines with a rotation and a shift) and on velocity fields,
    # nearly all of finetuning's loss drop came from the smoothness term, which pulls a large
    # field back: the images then matched worse while the loss fell. This guard took the pairs
    # made worse (field error up by over 0.02 mm) from 14 of 126 non-brain pairs to 1 (by 0.022 mm),
    # those with a Dice down by over 0.005 from 7 to 2, and kept the mean error (3.048 mm, network
    # alone 3.111 mm): benchmarks/finetuning_families.py, benchmarks/results/finetuning_families.md.
    require_similarity_gain: bool = True


@dataclass
class FinetuneResult:
    displacement: torch.Tensor  # (B, ndims, *spatial) voxels, from the tuned last layer
    head: nn.Module  # the tuned copy of the last layer
    losses: list  # total loss of every iteration, before its step
    converged: bool  # stopped by the tolerance rather than the iteration limit
    kept_step: int  # optimiser steps behind the returned last layer: 0 is the network's own
    kept_loss: float  # the loss of the returned last layer
    # The lowest-loss iterate was turned down because it did not lower the image term, so the
    # network's own last layer was returned (FinetuneSettings.require_similarity_gain).
    declined: bool = False

    @property
    def iterations(self) -> int:
        return len(self.losses)


# Slice-wise, the slices are one batch. They go through the frozen network this many at a time:
# the activations of 300 CT slices at once took over 5 GB, and a cancel is seen between chunks.
ENCODE_CHUNK = 16


@torch.no_grad()
def encode_pair(model: SARModel, reference: torch.Tensor, floating: torch.Tensor, backward_items=None,
                cancel: CancelCheck | None = None, progress: Callable[[float], None] | None = None,
                chunk: int = ENCODE_CHUNK) -> PairEncoding:
    """Run the frozen part of the generator on a pair, ``chunk`` batch items (slices) at a time.

    ``backward_items`` are the batch indices whose backward features are kept (default: all; see
    :func:`tuned_items` for those finetuning uses). ``progress(fraction)`` follows the chunks.
    """
    generator = model.generator
    generator.check_input(reference, floating)  # the whole pair, before any chunk is encoded
    count = reference.shape[0]
    backward_items = torch.arange(count) if backward_items is None else torch.as_tensor(backward_items).long()
    parts, backward = [], {}
    for start in range(0, count, chunk):
        if cancel is not None and cancel():
            raise RegistrationCancelled("Registration cancelled; nothing was written.")
        reference_features, floating_features = generator.encode(reference[start:start + chunk],
                                                                 floating[start:start + chunk])
        parts.append((generator.penultimate(reference_features, floating_features),
                      generator.fused_map(reference_features), generator.fused_map(floating_features)))
        wanted = [int(i) for i in backward_items if start <= i < start + chunk]
        if wanted:
            local = [i - start for i in wanted]
            features = generator.penultimate([f[local] for f in floating_features],
                                             [f[local] for f in reference_features])
            backward.update(zip(wanted, features))
        if progress is not None:
            progress(min(start + chunk, count) / count)
    forward, reference_map, floating_map = (torch.cat(tensors) for tensors in zip(*parts))
    backward_features = torch.stack([backward[int(i)] for i in backward_items]) if len(backward_items) \
        else forward[:0]
    return PairEncoding(forward, reference_map, floating_map, backward_features, backward_items)


def tuned_items(count: int, settings: "FinetuneSettings") -> torch.Tensor:
    """The batch items (slices) finetuning tunes on: at most ``settings.max_slices``, evenly spaced."""
    if count <= settings.max_slices:
        return torch.arange(count)
    return torch.linspace(0, count - 1, settings.max_slices).round().long()


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
    optimiser = Adam(head.parameters(), lr=settings.learning_rate)  # not torch.optim: see optimisers.py
    tuned_on = tuned_items(reference.shape[0], settings)
    subset = {"forward": encoding.forward[tuned_on], "reference_map": encoding.reference_map[tuned_on],
              "floating_map": encoding.floating_map[tuned_on]}
    if settings.weights.cycle:
        position = {int(item): k for k, item in enumerate(encoding.backward_items)}
        missing = [int(item) for item in tuned_on if int(item) not in position]
        if missing:
            raise ValueError(f"the pair was encoded without the backward features of items {missing}; "
                             "pass backward_items=tuned_items(...) to encode_pair")
        subset["backward"] = encoding.backward[[position[int(item)] for item in tuned_on]]
    loss_shape = _loss_grid(reference.shape[2:], settings.max_loss_voxels)
    # Everything but the field is fixed while the last layer is tuned: prepare it once.
    fixed = {
        "reference": downsample(reference[tuned_on], loss_shape),
        "floating": downsample(floating[tuned_on], loss_shape),
        "reference_mask": downsample(soft_otsu_mask(subset["reference_map"]), loss_shape),
        "floating_mask": downsample(soft_otsu_mask(subset["floating_map"]), loss_shape),
        "discriminator": model.discriminator, "feature_extractor": model.feature_extractor}
    if ignore_mask is not None:
        fixed["ignore_mask"] = downsample(ignore_mask[tuned_on], loss_shape)
    with torch.no_grad():
        if settings.weights.features:
            fixed["reference_feature_maps"] = model.feature_extractor(fixed["reference"])
        if settings.weights.proximity:
            fixed["prior_field"] = downsample_displacement(generator.field(subset["forward"]), loss_shape)

    def loss_of_head() -> tuple[torch.Tensor, float]:
        """The total loss of the head as it is now, and its image term (NaN when NMI is off)."""
        forward_field = downsample_displacement(generator.field(subset["forward"], head), loss_shape)
        backward_field = downsample_displacement(generator.field(subset["backward"], head), loss_shape) \
            if settings.weights.cycle else None
        terms = registration_terms(settings.weights, forward_field=forward_field, backward_field=backward_field,
                                   **fixed)
        return total_loss(settings.weights, terms), float(terms["nmi"].detach()) if "nmi" in terms else float("nan")

    history, converged = [], False
    network_state = copy.deepcopy(head.state_dict())
    # The last layer to return. A NaN loss is never lower, so the network's own is the fallback.
    kept = {"step": 0, "loss": float("inf"), "similarity": float("nan"), "state": network_state}

    def consider(loss: float, similarity: float, step: int) -> None:
        """Keep the head as it is now (after ``step`` steps) if its ``loss`` is the lowest yet."""
        if loss < kept["loss"] or not settings.keep_lowest_loss:
            kept.update(step=step, loss=loss, similarity=similarity, state=copy.deepcopy(head.state_dict()))

    for iteration in range(settings.max_iterations):
        if cancel is not None and cancel():
            raise RegistrationCancelled("Registration cancelled during finetuning; nothing was written.")
        optimiser.zero_grad()
        loss, similarity = loss_of_head()
        history.append(float(loss.detach()))
        if iteration == 0:
            kept_by_network = {"loss": history[0], "similarity": similarity}
        consider(history[-1], similarity, iteration)
        # Gradients flow through the frozen networks to the field but are kept for the head alone.
        loss.backward(inputs=list(head.parameters()))
        optimiser.step()
        if progress is not None:
            progress((iteration + 1) / settings.max_iterations, f"finetuning: iteration {iteration + 1}, loss {history[-1]:.4f}")
        if len(history) > 1 and abs(history[-1] - history[-2]) < settings.tolerance:
            converged = True
            break
    with torch.no_grad():  # the last step's result has not been scored yet
        loss, similarity = loss_of_head()
        consider(float(loss), similarity, len(history))
        # NaN similarities (NMI off) never compare, so nothing is declined then.
        declined = settings.require_similarity_gain and kept["step"] > 0 and \
            kept["similarity"] >= kept_by_network["similarity"]
        if declined:
            kept.update(step=0, state=network_state, **kept_by_network)
        head.load_state_dict(kept["state"])
        displacement = generator.field(encoding.forward, head)
    return FinetuneResult(displacement, head.requires_grad_(False), history, converged, kept["step"], kept["loss"],
                          declined)


def _loss_grid(shape, max_voxels: int) -> tuple:
    """``shape`` divided by the smallest integer factor that brings its voxel count to ``max_voxels``."""
    factor = 1
    while np.prod([-(-n // factor) for n in shape]) > max_voxels:
        factor += 1
    return tuple(-(-n // factor) for n in shape)
