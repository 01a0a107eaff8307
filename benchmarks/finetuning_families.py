"""Does the paper's finetuning stay no worse than the network alone beyond small B-splines? (issue 12)

    python benchmarks/finetuning_families.py [--pairs 3] [--synthetic 4] [--brain-pairs 5] [--threads 1] \
        [--output benchmarks/results/finetuning_families.md]

``finetuning_ablation.py`` chose finetuning's loss on 6 mm B-splines, the deformations the network
was trained on. The brain benchmark's large deformations (rotation, shift, 20 mm B-spline) and
velocity fields are where finetuning still fell below the network alone. This script measures
that on non-brain pairs with known fields: the rat lung and abdominal MR slices of
``Testing/Data`` and ``--synthetic`` synthetic 128² slices with a structure mask, each moved
``--pairs`` times by each family of ``deformation_families.py`` (the 6 mm B-spline too, as a
check), in the same contrast and with a random contrast remapping (the pairs of
``tune_instance_optimisation.py``).

Variants (instance optimisation off, so finetuning is measured alone): the network alone;
finetuning at training's smoothness weight (0.5) returning the lowest-loss iterate, then with the
guard that returns the network's own last layer unless that iterate also lowers the NMI term
(``FinetuneSettings.require_similarity_gain``); the guard with smaller smoothness weights, the
default's 0.05 among them (``LossWeights.for_finetuning``); the default without the guard.
Per family and contrast: mean field error (mm),
mean Dice of the synthetic slices' structures, pairs made worse than the network alone, and how
many pairs the guard turned down. Then the same variants on the 2D brain groups (Dice of the
ventricles per pair), which choose nothing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make SARRegistrationLib and benchmarks importable
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402

from SARRegistrationLib import grids, imageio, metrics, registration  # noqa: E402
from SARRegistrationLib.deformations import foreground_mask  # noqa: E402
from SARRegistrationLib.model import load_model  # noqa: E402

from benchmarks import baselines, command_line  # noqa: E402
from benchmarks.brain_benchmark import GROUPS, group_pairs, measure  # noqa: E402
from benchmarks.finetuning_ablation import (DICE_TOLERANCE, FIELD_TOLERANCE_MM, REAL_IMAGES, WEIGHTS,  # noqa: E402
                                            finetuning_with, one_image_set)
from benchmarks.tune_instance_optimisation import FAMILIES, known_pairs  # noqa: E402

ALONE = "network alone"
DEFAULT = "**finetuning, smoothness 0.05, NMI must improve (default)**"
# The default and what it replaced: training's smoothness weight (0.5) without the guard, then
# with it; the default's smoothness without the guard; and the other smoothness weights tried.
VARIANTS = {ALONE: None,
            "smoothness 0.5, lowest-loss iterate (session 5)": {"smoothness": 0.5, "require_similarity_gain": False},
            "smoothness 0.5, NMI must improve (session 6)": {"smoothness": 0.5},
            "smoothness 0.25, NMI must improve": {"smoothness": 0.25},
            "smoothness 0.1, NMI must improve": {"smoothness": 0.1},
            DEFAULT: {},
            "smoothness 0, NMI must improve": {"smoothness": 0.0},
            "smoothness 0.05, lowest-loss iterate": {"require_similarity_gain": False}}


def run_pairs(pairs: list[dict], changes: dict | None, model) -> list[dict]:
    """Field error (mm), Dice (synthetic structures only) and whether finetuning was declined, per pair."""
    record, rows = [], []
    with finetuning_with(changes or {}, record):
        for pair in pairs:
            result = registration.register(pair["reference"], pair["floating"], model, device="cpu",
                                           finetune=changes is not None, instance_optimisation=False)
            error = float(np.linalg.norm(imageio.array_of(result.displacement) - pair["applied"], axis=-1).mean())
            dice = None
            if pair["structure"]:
                warped = grids.resample_to(pair["floating_mask"], pair["reference"], label=True,
                                           transform=result.transform())
                dice = metrics.dice(imageio.array_of(pair["reference_mask"]), imageio.array_of(warped))
            rows.append({"error": error, "dice": dice, "declined": bool(record and record[-1].declined)})
    return rows


def family_line(name: str, rows: list[dict], alone: list[dict]) -> str:
    errors = np.array([row["error"] for row in rows])
    rise = errors - np.array([row["error"] for row in alone])
    dice = np.array([row["dice"] for row in rows if row["dice"] is not None])
    fall = np.array([row["dice"] for row in alone if row["dice"] is not None]) - dice
    declined = "—" if name == ALONE else str(sum(row["declined"] for row in rows))
    return (f"| {name} | {errors.mean():.3f} | {dice.mean():.3f} | {int((rise > FIELD_TOLERANCE_MM).sum())} | "
            f"{rise.max():+.3f} | {int((fall > DICE_TOLERANCE).sum())} | {-fall.max():+.3f} | {declined} |")


def brain_check(pairs_per_group: int, seed: int) -> list[str]:
    """Dice of the ventricles per 2D brain pair and variant, a table per group."""
    lines = []
    for group in (group for group in GROUPS if group.ndims == 2):
        pairs = group_pairs(group, pairs_per_group, seed)
        dice = {}
        for name, changes in VARIANTS.items():
            method = baselines.SARMethod("sar", name, WEIGHTS, 2, finetune=changes is not None,
                                         instance_optimisation=False, device="cpu")
            method.prepare()
            with finetuning_with(changes or {}):
                dice[name] = np.array([measure(method, pair)["dice"] for pair in pairs])
        lines += ["", f"**{group.name}** (Dice of the ventricles)", "",
                  "| variant | " + " | ".join(f"pair {k}" for k in range(len(pairs)))
                  + f" | mean | pairs worse than the network (by > {DICE_TOLERANCE}) | worst change |",
                  "|---" * (len(pairs) + 4) + "|"]
        for name, values in dice.items():
            change = values - dice[ALONE]
            worse = "—" if name == ALONE else f"{int((change < -DICE_TOLERANCE).sum())} of {len(pairs)}"
            worst = "—" if name == ALONE else f"{change.min():+.3f}"
            lines.append(f"| {name} | " + " | ".join(f"{d:.3f}" for d in values) + f" | {values.mean():.3f} | "
                         f"{worse} | {worst} |")
        print("\n".join(lines[-len(dice) - 3:]), flush=True)
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=3, help="deformations per image, family and contrast setting")
    parser.add_argument("--synthetic", type=int, default=4, help="synthetic 128² slices with a structure mask")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--seed", type=int, default=5, help="seed of the deformations")
    parser.add_argument("--brain-pairs", type=int, default=5, help="pairs of each 2D brain group (the check)")
    parser.add_argument("--brain-seed", type=int, default=0, help="seed of the brain pairs (0: the README's)")
    parser.add_argument("--threads", type=int, default=1, help="torch and SimpleITK threads")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "finetuning_families.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    started = time.perf_counter()
    model = load_model(WEIGHTS, 2, torch.device("cpu"))
    header = ["| variant | field error (mm) | Dice (synthetic) | pairs worse (error) | worst error change (mm) | "
              "pairs worse (Dice) | worst Dice change | declined |", "|---" * 8 + "|"]
    lines, totals = [], {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as folder:
        paths, mask_paths = one_image_set(Path(folder), args.synthetic)
        images = []
        for path, mask_path in zip(paths, mask_paths):
            image = sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkFloat32)
            images.append((image, foreground_mask(image) if mask_path is None else sitk.ReadImage(str(mask_path))))
        structure = [mask_path is not None for mask_path in mask_paths]
        for family in args.families:
            for contrast_change in (False, True):
                pairs = known_pairs(images, family, contrast_change, args.pairs, args.seed)
                for index, pair in enumerate(pairs):
                    pair["structure"] = structure[index // args.pairs]
                rows = {name: run_pairs(pairs, changes, model) for name, changes in VARIANTS.items()}
                for name in VARIANTS:
                    totals[name] += rows[name]
                lines += ["", f"**{family}, {'contrast change' if contrast_change else 'same contrast'}** "
                          f"({len(pairs)} pairs)", ""] + header
                lines += [family_line(name, rows[name], rows[ALONE]) for name in VARIANTS]
                print("\n".join(lines[-len(VARIANTS) - 5:]), flush=True)
    lines += ["", f"**all families** ({len(totals[ALONE])} pairs)", ""] + header
    lines += [family_line(name, totals[name], totals[ALONE]) for name in VARIANTS]
    brain = brain_check(args.brain_pairs, args.brain_seed)

    command = command_line(__file__, argv)
    report = ["# Finetuning beyond small B-splines (issue 12: finetuning that never hurts)", "",
              f"Command: `{command}` ({time.perf_counter() - started:.0f} s on {args.threads} thread; weights "
              "`Resources/Weights/sar_2d.pt`; instance optimisation off).", "",
              f"Pairs: {', '.join(REAL_IMAGES)} and {args.synthetic} synthetic 128² slices with a structure mask, "
              f"each moved {args.pairs} times by each family, the moved copy the reference, as it is or "
              "through a random contrast remapping. A pair counts as worse when its field error exceeds the "
              f"network alone's by more than {FIELD_TOLERANCE_MM} mm, or its Dice falls by more than "
              f"{DICE_TOLERANCE}. *Declined*: pairs on which the guard returned the network's own last layer.",
              *lines, "", f"## Brain check (2D groups of `brain_benchmark.py`, seed {args.brain_seed}; never "
              "used to choose)", *brain]
    text = "\n".join(report) + "\n"
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
