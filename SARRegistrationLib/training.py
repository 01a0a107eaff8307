"""Training the SAR model (paper §3): feature extractor, MSE pre-training, then the GAN.

Stages, counted by one global step so that a checkpoint can resume anywhere:

1. ``feature`` — the feature extractor of the content loss learns to reconstruct training images
   (it stands in for ImageNet VGG, which cannot be downloaded here).
2. ``pretrain`` — the generator learns the applied field and the manual masks by MSE / log-Dice
   ("MSE based ResNet used to initialise G").
3. ``gan`` — generator and discriminator in turn, with the full SAR objective.

Batches are drawn in a seeded order from index-deterministic datasets, so a run is reproducible
from its seed and a resumed run sees the batches an uninterrupted one would have seen.

Under ``torchrun`` the same code trains with PyTorch DistributedDataParallel (gloo on CPU, NCCL on
GPU): every rank takes its own share of each step's items, gradients are averaged by DDP, and rank
0 alone writes checkpoints and weights. DDP synchronises through ``forward``, so each training pass
is one small module whose ``forward`` does exactly what the step needs.
"""

from __future__ import annotations

import datetime
import json
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import losses
from .distributed import join_process_group
from .errors import TrainingCancelled, WeightsError
from .finetuning import CancelCheck
from .inflation import inflate_to_3d
from .model import SARModel, model_from_state, read_checkpoint, save_model, sha256_of, write_model_card
from .objective import LossWeights, registration_terms, total_loss
from .spatial import warp


@dataclass
class TrainingSettings:
    ndims: int = 2
    shape: tuple = (128, 128)
    batch_size: int = 4
    feature_steps: int = 200
    pretrain_steps: int = 500
    gan_steps: int = 1000
    feature_learning_rate: float = 1e-3
    pretrain_learning_rate: float = 1e-3
    gan_learning_rate: float = 1e-4
    generator_channels: tuple = (16, 32, 32, 64)
    discriminator_width: int = 16
    feature_channels: tuple = (16, 32, 64)
    diffeomorphic: bool = False
    vgg16_weights: str | None = None  # a local torchvision VGG16 file; no feature stage then
    working_size: int | None = None  # largest axis of the grid registration will use; default max(shape)
    init_from: str | None = None  # weights to start from: same dimension, or 2D weights inflated to 3D
    seed: int = 0
    checkpoint_every: int = 100
    weights: LossWeights = field(default_factory=LossWeights)

    @property
    def total_steps(self) -> int:
        return self.feature_steps + self.pretrain_steps + self.gan_steps

    def stage(self, step: int) -> str:
        if step < self.feature_steps:
            return "feature"
        return "pretrain" if step < self.feature_steps + self.pretrain_steps else "gan"


def checkpoint_path_for(output_path) -> Path:
    """Where the resumable training state of ``output_path`` is kept while training runs."""
    output_path = Path(output_path)
    return output_path.with_name(output_path.stem + ".checkpoint.pt")


def train(settings: TrainingSettings, dataset, output_path, *, resume: bool = False, device="cpu",
          data_description: str = "", command: str = "", show_progress: bool = True,
          cancel: CancelCheck | None = None) -> SARModel:
    """Train a model on ``dataset`` (items as :class:`datasets.PairDataset`) and save it to ``output_path``.

    A checkpoint beside the output (``*.checkpoint.pt``) is written every ``checkpoint_every``
    steps; ``resume=True`` continues from it. The final weights get a JSON model card. Started by
    ``torchrun`` with several processes, it trains data-parallel (see the module docstring).
    """
    rank, world_size, device = join_process_group(torch.device(device))
    torch.manual_seed(settings.seed)  # the same initial weights on every rank
    if settings.vgg16_weights or settings.init_from:  # the feature extractor comes trained: no feature stage
        settings = replace(settings, feature_steps=0)
    model = initial_model(settings)
    history, start = [], 0
    checkpoint = checkpoint_path_for(output_path)
    resumed = read_checkpoint(checkpoint) if resume and checkpoint.is_file() else None
    if resumed is not None:
        model = model_from_state(resumed)
        history, start = list(resumed["training"]["history"]), int(resumed["training"]["step"])
        torch.set_rng_state(resumed["training"]["torch_rng"])
    model.to(device)
    optimisers = _optimisers(model, settings)
    if resumed is not None:
        for name, optimiser in optimisers.items():
            optimiser.load_state_dict(resumed["training"]["optimisers"][name])
    passes = _training_passes(model, world_size > 1)

    bar = tqdm(total=settings.total_steps, initial=start, disable=not show_progress or rank > 0, file=sys.stderr,
               desc="training SAR", unit="step")
    step = start
    while step < settings.total_steps:
        if cancel is not None and cancel():
            raise TrainingCancelled(f"Training cancelled at step {step}; the last checkpoint is {checkpoint}.")
        stage = settings.stage(step)
        batch = {name: value.to(device) for name, value in _batch(dataset, step, settings, rank, world_size).items()}
        if stage == "feature":
            losses_now = {"reconstruction": _feature_step(passes["reconstruction"], batch, optimisers["feature"])}
        elif stage == "pretrain":
            losses_now = _pretrain_step(passes["generator"], batch, optimisers["pretrain"], settings)
        else:
            losses_now = _gan_step(model, passes, batch, optimisers["generator"], optimisers["discriminator"], settings)
        step += 1
        history.append({"step": step, "stage": stage, **{k: round(v, 5) for k, v in losses_now.items()}})
        bar.set_postfix(stage=stage, **{k: f"{v:.3f}" for k, v in list(losses_now.items())[:3]})
        bar.update(1)
        if rank == 0 and (step % settings.checkpoint_every == 0 or step == settings.total_steps):
            _save_checkpoint(model, optimisers, history, step, checkpoint)
    bar.close()

    model.metadata.update(_model_card(settings, history, data_description, command))
    if world_size > 1:
        model.metadata["distributed"] = {"world_size": world_size, "backend": dist.get_backend(),
                                         "ranks_in_sync": _ranks_in_sync(model)}
    if rank == 0:
        save_model(model.eval(), output_path)
        write_model_card(output_path, model.metadata)
        checkpoint.unlink(missing_ok=True)
    if world_size > 1:
        dist.barrier()
    return model.eval()


def initial_model(settings: TrainingSettings) -> SARModel:
    """The model training starts from: new, or the weights of ``settings.init_from``.

    2D weights given for a 3D model are inflated (:mod:`inflation`), so the 3D model starts from
    what the 2D one learnt instead of from random weights.
    """
    working_size = settings.working_size or max(settings.shape)
    if not settings.init_from:
        return SARModel.create(settings.ndims, working_size, settings.generator_channels, settings.discriminator_width,
                               settings.feature_channels, settings.diffeomorphic, settings.vgg16_weights)
    model = model_from_state(read_checkpoint(settings.init_from))
    if model.ndims == 2 and settings.ndims == 3:
        model = inflate_to_3d(model, working_size)
    elif model.ndims != settings.ndims:
        raise WeightsError(f"{settings.init_from} holds a {model.ndims}D model; a {settings.ndims}D model can start "
                           "only from weights of its own dimension, or from 2D weights (inflated).")
    else:
        model.working_size = working_size
    if (list(model.generator.channels), model.generator.diffeomorphic) != \
            (list(settings.generator_channels), settings.diffeomorphic):
        raise WeightsError(f"{settings.init_from} has generator channels {list(model.generator.channels)} "
                           f"(diffeomorphic: {model.generator.diffeomorphic}); the settings ask for "
                           f"{list(settings.generator_channels)} (diffeomorphic: {settings.diffeomorphic}).")
    model.metadata = {}
    return model


class _GeneratorPass(nn.Module):
    """One generator forward with all a training step needs: fields both ways and both soft masks."""

    def __init__(self, generator):
        super().__init__()
        self.generator = generator

    def forward(self, reference, floating, with_backward: bool = True):
        return self.generator.fields_and_masks(reference, floating, with_backward)


class _Reconstruction(nn.Module):
    """The feature extractor's autoencoder pass, as a forward."""

    def __init__(self, extractor):
        super().__init__()
        self.extractor = extractor

    def forward(self, images):
        return self.extractor.reconstruct(images)


def _training_passes(model: SARModel, distributed: bool) -> dict:
    passes = {"generator": _GeneratorPass(model.generator), "discriminator": model.discriminator}
    if any(parameter.requires_grad for parameter in model.feature_extractor.parameters()):
        passes["reconstruction"] = _Reconstruction(model.feature_extractor)
    if distributed:
        passes = {name: DistributedDataParallel(module) for name, module in passes.items()}
    return passes


def _ranks_in_sync(model: SARModel) -> bool:
    """Whether every rank ends with the same weights (DDP's promise, checked rather than assumed)."""
    checksum = torch.stack([p.detach().double().sum() for network in model.networks.values()
                            for p in network.parameters()]).cpu()
    gathered = [torch.zeros_like(checksum) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, checksum)
    return all(torch.equal(gathered[0], other) for other in gathered[1:])


def _feature_step(reconstruction, batch, optimiser) -> float:
    images = torch.cat([batch["reference"], batch["floating"]])
    reconstruction.train()
    loss = F.mse_loss(reconstruction(images), images)
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    optimiser.step()
    return float(loss.detach())


def _pretrain_step(generator_pass, batch, optimiser, settings: TrainingSettings) -> dict:
    generator_pass.train()
    forward_field, _, reference_mask, floating_mask = generator_pass(batch["reference"], batch["floating"], False)
    # The image term compares with the floating image pulled through the applied field (the answer
    # in the floating image's own contrast): the reference may differ in contrast and would pull
    # the other way.
    floating = batch["floating"]
    terms = {"field_mse": F.mse_loss(forward_field, batch["displacement"]),
             "image_mse": F.mse_loss(warp(floating, forward_field), warp(floating, batch["displacement"]))}
    if settings.weights.segmentation:
        terms["segmentation"] = (losses.log_dice_loss(reference_mask, batch["reference_mask"])
                                 + losses.log_dice_loss(floating_mask, batch["floating_mask"]))
    loss = sum(terms.values())
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    optimiser.step()
    return {name: float(value.detach()) for name, value in terms.items()}


def _gan_step(model: SARModel, passes: dict, batch, generator_optimiser, discriminator_optimiser,
              settings: TrainingSettings) -> dict:
    passes["generator"].train()
    model.discriminator.train()
    model.feature_extractor.eval().requires_grad_(False)
    reference, floating = batch["reference"], batch["floating"]
    forward_field, backward_field, reference_mask, floating_mask = passes["generator"](reference, floating)

    # Discriminator: real references against registered images (Eqn. 3), as one forward for DDP.
    model.discriminator.requires_grad_(True)
    with torch.no_grad():
        warped = warp(floating, forward_field)
    verdicts = passes["discriminator"](torch.cat([reference, warped]))
    discriminator_loss = losses.discriminator_loss(*verdicts.chunk(2))
    discriminator_optimiser.zero_grad(set_to_none=True)
    discriminator_loss.backward()
    discriminator_optimiser.step()

    # Generator: the full SAR objective, the discriminator fixed (called unwrapped: nothing to sync).
    model.discriminator.requires_grad_(False)
    terms = registration_terms(
        settings.weights, reference, floating, forward_field, backward_field=backward_field,
        reference_mask=reference_mask, floating_mask=floating_mask,
        discriminator=model.discriminator, feature_extractor=model.feature_extractor,
        applied_field=batch["displacement"], true_reference_mask=batch["reference_mask"],
        true_floating_mask=batch["floating_mask"], content_target=warp(floating, batch["displacement"]))
    loss = total_loss(settings.weights, terms)
    generator_optimiser.zero_grad(set_to_none=True)
    loss.backward()
    generator_optimiser.step()
    return {"generator": float(loss.detach()), "discriminator": float(discriminator_loss.detach()),
            **{name: float(value.detach()) for name, value in terms.items()}}


def _optimisers(model: SARModel, settings: TrainingSettings) -> dict:
    adam = torch.optim.Adam
    optimisers = {
        "pretrain": adam(model.generator.parameters(), lr=settings.pretrain_learning_rate),
        "generator": adam(model.generator.parameters(), lr=settings.gan_learning_rate, betas=(0.5, 0.999)),
        "discriminator": adam(model.discriminator.parameters(), lr=settings.gan_learning_rate, betas=(0.5, 0.999))}
    if settings.feature_steps:
        optimisers["feature"] = adam(model.feature_extractor.parameters(), lr=settings.feature_learning_rate)
    return optimisers


def _batch(dataset, step: int, settings: TrainingSettings, rank: int = 0, world_size: int = 1) -> dict:
    """This rank's batch of ``step``: consecutive items of a per-epoch seeded permutation of the dataset.

    Each step consumes ``world_size * batch_size`` items; rank ``r`` takes the ``r``-th share.
    """
    size = len(dataset)
    items = []
    first = (step * world_size + rank) * settings.batch_size
    for position in range(first, first + settings.batch_size):
        epoch, offset = divmod(position, size)
        order = np.random.default_rng((settings.seed, epoch)).permutation(size)
        items.append(dataset[int(order[offset])])
    return {name: torch.stack([item[name] for item in items]) for name in items[0]}


def _save_checkpoint(model: SARModel, optimisers: dict, history: list, step: int, path: Path) -> None:
    save_model(model, path, extra={"step": step, "history": history, "torch_rng": torch.get_rng_state(),
                                   "optimisers": {name: o.state_dict() for name, o in optimisers.items()}})


def _model_card(settings: TrainingSettings, history: list, data_description: str, command: str) -> dict:
    final = {}
    for record in history:  # the last value of every logged loss, per stage
        final.setdefault(record["stage"], {}).update({k: v for k, v in record.items() if k not in ("step", "stage")})
    settings_dict = asdict(settings)
    start = {"initialised_from": {"file": Path(settings.init_from).name, "sha256": sha256_of(settings.init_from)}} \
        if settings.init_from else {}
    return {"training_data": data_description, "command": command, "seed": settings.seed, **start,
            "steps": {"feature": settings.feature_steps, "pretrain": settings.pretrain_steps, "gan": settings.gan_steps},
            "final_losses": final, "settings": json.loads(json.dumps(settings_dict, default=list)),
            "date": datetime.date.today().isoformat()}
