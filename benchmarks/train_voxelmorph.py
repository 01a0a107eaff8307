"""Train the VoxelMorph baseline on SAR's own training data and budget.

    python benchmarks/train_voxelmorph.py --ndims 2      # reads Resources/Weights/sar_2d.json
    python benchmarks/train_voxelmorph.py --ndims 3      # reads Resources/Weights/sar_3d.json

The SAR model card (written by ``python -m SARRegistrationLib train``) records the training
command and settings. This script parses them and builds the very same training pairs with
``SARRegistrationLib.cli.training_data``, the code of ``train`` itself (same images, masks
folder, training fold, synthetic count, working shape, epoch length, maximum displacement,
contrast remapping and seed), draws the batches in the same seeded order as SAR's trainer, and trains for the same number
of steps (feature + pre-training + GAN steps of the card) at the same batch size, so both networks
see the same pairs.

VoxelMorph is ``voxelmorph.nn.models.VxmPairwise`` (voxelmorph 0.3.x, PyTorch: a U-Net with
features (16, 16, 16, 16, 16) and a stationary velocity field integrated in 5 scaling-and-squaring
steps, the package defaults), trained unsupervised: image similarity between the warped floating
and the reference image plus ``λ ·`` VoxelMorph's diffusion regulariser (mean squared spatial
gradient, ``neurite.nn.modules.SpatialGradient("l2")``) of the velocity field.

Similarity: mutual information by default (``--similarity nmi``). SAR's training pairs get
independent random intensity changes, often through a non-monotonic curve, and the benchmark's
pairs are T1 against PD (3D: intensity-remapped), so the intensities of a pair are not related
linearly, which local NCC assumes; mutual information only assumes that they are statistically
dependent. VoxelMorph's PyTorch port ships no MI loss (its TensorFlow version had a Parzen-window
MI in neurite), so the differentiable Parzen-window normalised mutual information of
``SARRegistrationLib.losses`` is used (the loss is ``2 − NMI``, in [0, 1]). ``--similarity ncc``
trains with neurite's local squared NCC (window 9) instead, for comparison.

Writes ``benchmarks/weights/voxelmorph_{2,3}d.pt`` (``--output``) and a JSON card beside it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from SARRegistrationLib import cli  # noqa: E402
from SARRegistrationLib.devices import resolve_device  # noqa: E402
from SARRegistrationLib.losses import normalised_mutual_information  # noqa: E402
from SARRegistrationLib.training import _batch  # noqa: E402

from benchmarks.baselines import (build_voxelmorph, display_path, pad_multiple, require,  # noqa: E402
                                  save_voxelmorph, voxelmorph_forward)

WEIGHTS_DIR = REPO / "Resources" / "Weights"


def sar_training_recipe(card_path) -> dict:
    """What SAR was trained on, from its model card: data options from the command, budget from the settings."""
    card_path = Path(card_path)
    if not card_path.is_file():
        raise SystemExit(f"error: no SAR model card at {display_path(card_path)}: train SAR first "
                         "(python -m SARRegistrationLib train ...), or give --sar-card.")
    card = json.loads(card_path.read_text())
    settings, command = card.get("settings") or {}, card.get("command") or ""
    words = shlex.split(command)
    if "train" not in words:
        raise SystemExit(f"error: the card's command is not a 'SARRegistrationLib train' command: {command!r}")
    # The engine's own parser, so that every option and default is read exactly as training read it.
    parsed = cli._parser().parse_args(words[words.index("train"):])
    steps = card.get("steps") or {name: settings[f"{name}_steps"] for name in ("feature", "pretrain", "gan")}
    return {
        "card": display_path(card_path), "card_sha256": card.get("sha256"), "command": command,
        "images": [str(_resolve(p)) for p in parsed.images], "masks": str(_resolve(parsed.masks)) if parsed.masks else None,
        "split": bool(parsed.split), "synthetic": int(parsed.synthetic), "epoch_length": int(parsed.epoch_length),
        "max_displacement_mm": float(parsed.max_displacement_mm), "contrast_remap": float(parsed.contrast_remap),
        "ndims": int(settings.get("ndims", parsed.ndims)), "shape": [int(n) for n in settings.get("shape", parsed.shape)],
        "batch_size": int(settings.get("batch_size", parsed.batch_size)), "seed": int(settings.get("seed", parsed.seed)),
        "working_size": int(settings.get("working_size") or max(settings.get("shape", parsed.shape))),
        "steps": {name: int(value) for name, value in steps.items()},
    }


def _resolve(path) -> Path:
    """A path of the training command: as given if it exists here, else relative to the repository."""
    path = Path(path)
    return path if path.is_absolute() or path.exists() else REPO / path


def training_data(recipe: dict):
    """SAR's training pairs and their description, built by the engine's own ``train`` code."""
    return cli.training_data(SimpleNamespace(
        images=recipe["images"], masks=recipe["masks"], split=recipe["split"], shape=recipe["shape"],
        epoch_length=recipe["epoch_length"], synthetic=recipe["synthetic"], seed=recipe["seed"],
        max_displacement_mm=recipe["max_displacement_mm"], contrast_remap=recipe["contrast_remap"]))


def batch_for_step(dataset, step: int, batch_size: int, seed: int) -> dict:
    """The items SAR's trainer draws at ``step``, in the trainer's own seeded order."""
    return _batch(dataset, step, SimpleNamespace(batch_size=batch_size, seed=seed))


def similarity_loss(name: str):
    if name == "nmi":
        return lambda warped, reference: 2.0 - normalised_mutual_information(warped.clamp(0, 1), reference)
    neurite = require("neurite", "voxelmorph")  # neurite comes with voxelmorph
    ncc = neurite.nn.modules.NCC(window_size=9)
    # float64: neurite asserts every local coefficient lies in [0, 1], which float32 cancellation
    # in flat background windows breaks.
    return lambda warped, reference: 1.0 - ncc(warped.double(), reference.double()).mean().float()


def train(args) -> Path:
    recipe = sar_training_recipe(args.sar_card or WEIGHTS_DIR / f"sar_{args.ndims}d.json")
    if recipe["ndims"] != args.ndims:
        raise SystemExit(f"error: {recipe['card']} is for a {recipe['ndims']}D model, not {args.ndims}D")
    total_steps = args.steps if args.steps is not None else sum(recipe["steps"].values())
    batch_size = recipe["batch_size"]
    dataset, description = training_data(recipe)
    neurite = require("neurite", "voxelmorph")
    torch.manual_seed(recipe["seed"])
    device = resolve_device(args.device)
    config = {"ndims": args.ndims, "nb_features": [16, 16, 16, 16, 16], "integration_steps": 5,
              "working_size": recipe["working_size"], "similarity": args.similarity}
    model = build_voxelmorph(config).to(device).train()
    optimiser = torch.optim.Adam(model.parameters(), lr=args.learning_rate)
    similarity = similarity_loss(args.similarity)
    regulariser = neurite.nn.modules.SpatialGradient(penalty="l2")
    multiple = pad_multiple(config)
    history, started = [], time.perf_counter()
    print(f"VoxelMorph {args.ndims}D: {total_steps} steps x batch {batch_size} on {description} "
          f"(shape {recipe['shape']}, seed {recipe['seed']}), similarity {args.similarity}, λ {args.smoothness}",
          flush=True)
    for step in range(total_steps):
        batch = batch_for_step(dataset, step, batch_size, recipe["seed"])
        reference, floating = batch["reference"].to(device), batch["floating"].to(device)
        _, velocity, warped = voxelmorph_forward(model, floating, reference, multiple)
        image_term = similarity(warped, reference)
        smooth_term = regulariser(velocity)
        loss = image_term + args.smoothness * smooth_term
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        history.append({"step": step + 1, "loss": loss.item(), "similarity": image_term.item(),
                        "smoothness": smooth_term.item()})
        if (step + 1) % args.log_every == 0 or step + 1 == total_steps:
            recent = history[-args.log_every:]
            print(f"step {step + 1}/{total_steps}: loss {np.mean([h['loss'] for h in recent]):.4f} "
                  f"(similarity {np.mean([h['similarity'] for h in recent]):.4f}, "
                  f"smoothness {np.mean([h['smoothness'] for h in recent]):.4f}), "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
    seconds = time.perf_counter() - started
    from importlib import metadata

    card = {"model": "voxelmorph.nn.models.VxmPairwise", "voxelmorph_version": metadata.version("voxelmorph"),
            "config": config, "similarity": args.similarity, "smoothness_weight": args.smoothness,
            "learning_rate": args.learning_rate, "steps": total_steps, "batch_size": batch_size,
            "budget_note": ("same steps x batch size as the SAR card" if args.steps is None
                            else f"--steps {args.steps} given (SAR card: {sum(recipe['steps'].values())})"),
            "training_data": description, "trained_like": recipe,
            "command": "python " + shlex.join(sys.argv), "seconds": round(seconds, 1),
            "final_loss": {name: float(np.mean([h[name] for h in history[-50:]])) for name in ("loss", "similarity",
                                                                                           "smoothness")},
            "device": str(device), "date": datetime.date.today().isoformat()}
    model.eval()
    output = Path(args.output or REPO / "benchmarks" / "weights" / f"voxelmorph_{args.ndims}d.pt")
    save_voxelmorph(output, model, config, card)
    print(f"wrote {display_path(output)} and {display_path(output.with_suffix('.json'))} ({seconds:.0f} s)")
    return output


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--ndims", type=int, choices=(2, 3), default=2)
    parser.add_argument("--sar-card", type=Path, help="SAR model card to copy (default Resources/Weights/sar_{ndims}d.json)")
    parser.add_argument("--output", type=Path, help="weights file (default benchmarks/weights/voxelmorph_{ndims}d.pt)")
    parser.add_argument("--similarity", choices=("nmi", "ncc"), default="nmi",
                        help="image similarity: Parzen-window NMI (multimodal pairs) or local squared NCC")
    parser.add_argument("--smoothness", type=float, default=1.0,
                        help="λ, weight of the velocity field's squared-gradient penalty")
    parser.add_argument("--learning-rate", type=float, default=1e-3,
                        help="Adam; 1e-3 as SAR's generator pre-training (VoxelMorph's own default, 1e-4, "
                             "barely leaves the identity within SAR's small budget)")
    parser.add_argument("--steps", type=int, help="override the budget (default: the SAR card's total steps)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--log-every", type=int, default=50)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
