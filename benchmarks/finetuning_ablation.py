"""Which part of the per-pair finetuning loss helps and which pulls the field off the anatomy (issue 12).

    python benchmarks/finetuning_ablation.py [--pairs-per-image 3] [--synthetic 4] [--two-contrast 16] \
        [--brain-pairs 5] [--threads 1] [--output benchmarks/results/finetuning_ablation.md]

Tuning set (non-brain, see DATA.md), every pair with a known field:

- *one image*: the rat lung slices and the abdominal MR slice of ``Testing/Data`` and
  ``--synthetic`` SynthMorph-style slices with a structure mask, each registered to seeded random
  B-spline deformations of itself (``evaluation.evaluate_known_deformations``), once in the same
  contrast and once with a random intensity curve applied to the deformed copy;
- *two contrasts*: ``--two-contrast`` synthetic label maps rendered twice with independent random
  intensities per label (two "sequences" of one anatomy, related through the labels rather than
  by a curve), one rendering deformed by a random B-spline, with the mask of one label.

The scores are the mean end-point error of the recovered field (mm) and, where a mask exists, the
Dice of the warped mask. Every variant is today's :class:`FinetuneSettings` with one change, run
through :func:`register` with instance optimisation off, so what is measured is finetuning alone.

Then, per pair, whether the loss tracks the field error along the iterations: the iterates after
0, 5, 10, 20, 40 and 100 steps, their losses and errors, and the Spearman correlation of the two.

Brain check (never used to choose anything): the 2D groups of ``brain_benchmark.py``, Dice of the
ventricles per pair. ``2D T1->PD`` with seed 0 gives the pairs of the README's brain table.

``register`` takes no finetuning settings, so this script swaps ``registration.FinetuneSettings``
(and, for the NMI-bins rows, the bins of ``losses.normalised_mutual_information``) for the run of
one variant. Writes the markdown report to ``--output`` and prints it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make SARRegistrationLib and benchmarks importable
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from SARRegistrationLib import imageio, losses, registration  # noqa: E402
from SARRegistrationLib.deformations import random_bspline_transform  # noqa: E402
from SARRegistrationLib.evaluation import evaluate_known_deformations  # noqa: E402
from SARRegistrationLib.finetuning import FinetuneSettings  # noqa: E402
from SARRegistrationLib.model import load_model  # noqa: E402
from SARRegistrationLib.synthetic import synthetic_image, synthetic_label_map, synthetic_sample  # noqa: E402

from benchmarks import baselines, command_line  # noqa: E402
from benchmarks.brain_benchmark import GROUPS, group_pairs, measure  # noqa: E402

DATA_DIR = REPO / "Testing" / "Data"
REAL_IMAGES = ("rat_lung_1.nrrd", "rat_lung_2.nrrd", "fat_mri.nrrd")
WEIGHTS = REPO / "Resources" / "Weights" / "sar_2d.pt"
MAX_DISPLACEMENT_MM = 6.0
TWO_CONTRAST_SHAPE = (160, 160)
# A pair counts as made worse when its field error rises by more than FIELD_TOLERANCE_MM (about
# a fiftieth of the mean error) or its Dice falls by more than DICE_TOLERANCE.
FIELD_TOLERANCE_MM = 0.02
DICE_TOLERANCE = 0.005
TRACKED_STEPS = (0, 5, 10, 20, 40, 100)

ALONE = "network alone"
PREVIOUS = "previous default (adversarial 0.05, no proximity, last iterate)"
DEFAULT = "**default** (adversarial 0, proximity 0.1, lowest-loss iterate)"
# name -> changes to today's FinetuneSettings (a LossWeights field, a FinetuneSettings field, or
# "nmi_bins" for the NMI's histogram); None is the network alone.
VARIANTS = {
    ALONE: None,
    PREVIOUS: {"adversarial": 0.05, "proximity": 0.0, "keep_lowest_loss": False},
    "adversarial off only (no proximity, last iterate)": {"proximity": 0.0, "keep_lowest_loss": False},
    DEFAULT: {},
    "default, last iterate": {"keep_lowest_loss": False},
    "proximity 0": {"proximity": 0.0},
    "proximity 0.01": {"proximity": 0.01},
    "proximity 0.03": {"proximity": 0.03},
    "proximity 0.3": {"proximity": 0.3},
    "adversarial 0.05 (the paper's)": {"adversarial": 0.05},
    "adversarial 0.01": {"adversarial": 0.01},
    "no cycle term": {"cycle": 0.0},
    "no segmentation term": {"segmentation": 0.0},
    "smoothness 0": {"smoothness": 0.0},
    "smoothness 2": {"smoothness": 2.0},
    "learning rate 5e-4": {"learning_rate": 5e-4},
    "learning rate 1e-2": {"learning_rate": 1e-2},
    "NMI bins 16": {"nmi_bins": 16},
    "NMI bins 64": {"nmi_bins": 64},
    "loss grid 4,096 voxels (64², coarser)": {"max_loss_voxels": 4096},
    "10 iterations at most": {"max_iterations": 10},
}
BRAIN_VARIANTS = (ALONE, PREVIOUS, "adversarial off only (no proximity, last iterate)", DEFAULT,
                  "default, last iterate")
TRACKED_VARIANTS = (PREVIOUS, "adversarial off only (no proximity, last iterate)", DEFAULT)


def settings_with(changes: dict) -> tuple[FinetuneSettings, int | None]:
    """Today's settings with ``changes``, and the NMI bins asked for (None: the default)."""
    changes = dict(changes)
    bins = changes.pop("nmi_bins", None)
    settings = FinetuneSettings()
    weight_names = {f.name for f in dataclasses.fields(settings.weights)}
    for name, value in changes.items():
        setattr(settings.weights if name in weight_names else settings, name, value)
    return settings, bins


@contextlib.contextmanager
def finetuning_with(changes: dict, record: list | None = None):
    """Within the block, ``register`` finetunes with today's settings changed by ``changes``.

    ``register`` still sets the tolerance it is given, and an iteration limit below the
    variant's. Each :class:`FinetuneResult` is appended to ``record`` when one is given.
    """
    settings, bins = settings_with(changes)

    def settings_factory(max_iterations, tolerance):
        chosen = copy.deepcopy(settings)
        chosen.max_iterations = min(max_iterations, settings.max_iterations)
        chosen.tolerance = tolerance
        return chosen

    def recorded(*args, **kwargs):
        result = finetune(*args, **kwargs)
        if record is not None:
            record.append(result)
        return result

    finetune = registration.finetune_last_layer
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(registration, "FinetuneSettings", settings_factory))
        stack.enter_context(mock.patch.object(registration, "finetune_last_layer", recorded))
        if bins is not None:
            nmi = functools.partial(losses.normalised_mutual_information, bins=bins)
            stack.enter_context(mock.patch.object(losses, "normalised_mutual_information", nmi))
        yield


# ---------------------------------------------------------------------------------------------
# Tuning set


@dataclasses.dataclass
class TuningSet:
    images: list  # paths of the one-image set
    masks: list  # its masks (None for the real images)
    pairs_per_image: int
    two_contrast: list  # (reference, floating, reference mask, floating mask, applied field mm)


def one_image_set(folder: Path, synthetic: int) -> tuple[list, list]:
    """The real non-brain images (no mask) and ``synthetic`` 128² synthetic slices written to ``folder``."""
    images, masks = [DATA_DIR / name for name in REAL_IMAGES], [None] * len(REAL_IMAGES)
    for index in range(synthetic):
        image, mask = synthetic_sample((128, 128), np.random.default_rng((99, index)))
        images.append(folder / f"synthetic_{index}.nrrd")
        masks.append(folder / f"synthetic_{index}_mask.nrrd")
        sitk.WriteImage(image, str(images[-1]))
        sitk.WriteImage(mask, str(masks[-1]))
    return images, masks


def two_contrast_pairs(count: int, seed: int = 7) -> list[tuple]:
    """``count`` pairs of two renderings of one synthetic label map, the reference deformed.

    The reference is rendering B pulled through a random B-spline ``T`` (with the label's mask),
    the floating image is rendering A, so the field registering them is ``T(x) - x`` (mm).
    """
    pairs = []
    for index in range(count):
        rng = np.random.default_rng((seed, index))
        labels = synthetic_label_map(TWO_CONTRAST_SHAPE, rng)
        structure = rng.integers(int(labels.max()) + 1)
        floating, reference = (sitk.GetImageFromArray(synthetic_image(labels, rng).astype(np.float32))
                               for _ in range(2))
        floating_mask = sitk.GetImageFromArray((labels == structure).astype(np.uint8))
        transform = random_bspline_transform(reference, rng, MAX_DISPLACEMENT_MM)
        reference = sitk.Resample(reference, reference, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        reference_mask = sitk.Resample(floating_mask, floating_mask, transform, sitk.sitkNearestNeighbor, 0)
        applied = imageio.array_of(sitk.TransformToDisplacementField(
            transform, sitk.sitkVectorFloat64, reference.GetSize(), reference.GetOrigin(), reference.GetSpacing(),
            reference.GetDirection()))
        pairs.append((reference, floating, reference_mask, floating_mask, applied))
    return pairs


def tuning_rows(tuning: TuningSet, changes: dict | None, model, max_iterations: int = 100, tolerance: float = 1e-4,
                record: list | None = None) -> list[dict]:
    """One row per pair for one variant: the one-image set in the same contrast, then with a
    contrast change, then the two-contrast set. ``changes`` None is the network alone."""
    options = {"finetune": changes is not None, "max_iterations": max_iterations, "tolerance": tolerance,
               "instance_optimisation": False}
    rows = []
    with finetuning_with(changes or {}, record):
        for contrast_change, group in ((False, "same contrast"), (True, "contrast curve")):
            found = evaluate_known_deformations(
                tuning.images, tuning.masks, pairs_per_image=tuning.pairs_per_image, max_displacement_mm=MAX_DISPLACEMENT_MM,
                contrast_change=contrast_change, seed=0, weights=WEIGHTS, device="cpu", **options)
            rows += [{"pair": f"{Path(row['image']).stem} #{row['pair']}", "group": group,
                      "field_error_mm": row["field_error_mm"]["after"], "before_mm": row["field_error_mm"]["before"],
                      "dice": row["after"]["dice"] if "after" in row else None} for row in found]
        for index, (reference, floating, reference_mask, floating_mask, applied) in enumerate(tuning.two_contrast):
            result = registration.register(reference, floating, model, reference_mask=reference_mask,
                                           floating_mask=floating_mask, device="cpu", **options)
            error = np.linalg.norm(imageio.array_of(result.displacement) - applied, axis=-1).mean()
            rows.append({"pair": f"two-contrast #{index}", "group": "two contrasts", "field_error_mm": float(error),
                         "before_mm": float(np.linalg.norm(applied, axis=-1).mean()),
                         "dice": result.metrics["after"]["dice"]})
    return rows


GROUP_ORDER = ("same contrast", "contrast curve", "two contrasts")


def summary_line(name: str, rows: list[dict], alone: list[dict]) -> str:
    """Mean error per group, mean Dice of the masked pairs, and the pairs made worse."""
    errors = np.array([row["field_error_mm"] for row in rows])
    error_rise = errors - np.array([row["field_error_mm"] for row in alone])
    groups = np.array([row["group"] for row in rows])
    masked = np.array([row["dice"] is not None for row in rows])
    dice = np.array([row["dice"] for row in rows if row["dice"] is not None])
    dice_fall = np.array([row["dice"] for row in alone if row["dice"] is not None]) - dice
    two = groups[masked] == "two contrasts"
    worse = int((error_rise > FIELD_TOLERANCE_MM).sum())
    worse_dice = int((dice_fall > DICE_TOLERANCE).sum())
    cells = [f"{errors[groups == group].mean():.3f}" for group in GROUP_ORDER]
    return (f"| {name} | " + " | ".join(cells) + f" | {errors.mean():.3f} | {dice[~two].mean():.3f} | "
            f"{dice[two].mean():.3f} | {worse} | {error_rise.max():+.2f} | {worse_dice} | {-dice_fall.max():+.3f} |")


def per_pair_table(results: dict, names) -> list[str]:
    lines = ["| pair | group | before (mm) | " + " | ".join(names) + " |", "|---|---|---" + "|---" * len(names) + "|"]
    for index, row in enumerate(results[names[0]]):
        cells = []
        for name in names:
            other = results[name][index]
            dice = "" if other["dice"] is None else f" ({other['dice']:.3f})"
            cells.append(f"{other['field_error_mm']:.3f}{dice}")
        lines.append(f"| {row['pair']} | {row['group']} | {row['before_mm']:.3f} | " + " | ".join(cells) + " |")
    return lines


def tracking(tuning: TuningSet, changes: dict, model) -> list[dict]:
    """Per pair, the loss and the field error of the iterates after :data:`TRACKED_STEPS` steps.

    Each iterate is its own run of that many steps (tolerance 0, last iterate kept), whose final
    evaluation gives its loss; step 0 is the network alone, whose loss is the first of any run.
    """
    changes = {**changes, "keep_lowest_loss": False}
    per_step = {}
    for steps in TRACKED_STEPS[1:]:
        record = []
        rows = tuning_rows(tuning, changes, model, steps, 0.0, record)
        per_step[steps] = [(result.kept_loss, row["field_error_mm"]) for result, row in zip(record, rows)]
        if steps == TRACKED_STEPS[1]:
            alone = tuning_rows(tuning, None, model)
            per_step[0] = [(result.losses[0], row["field_error_mm"]) for result, row in zip(record, alone)]
    tracked = []
    for index in range(len(per_step[0])):
        loss, error = zip(*(per_step[steps][index] for steps in TRACKED_STEPS))
        tracked.append({"group": rows[index]["group"], "loss": loss, "error": error,
                        "spearman": float(spearmanr(loss, error).statistic)})
    return tracked


def tracking_line(name: str, tracked: list[dict]) -> str:
    cells = []
    for group in GROUP_ORDER:
        rho = np.array([pair["spearman"] for pair in tracked if pair["group"] == group])
        cells.append(f"{np.nanmean(rho):+.2f} (min {np.nanmin(rho):+.2f})")
    agree = sum((pair["loss"][-1] < pair["loss"][0]) == (pair["error"][-1] < pair["error"][0]) for pair in tracked)
    best = [int(np.argmin(pair["error"])) for pair in tracked]
    return (f"| {name} | " + " | ".join(cells) + f" | {agree} of {len(tracked)} | "
            + ", ".join(f"{TRACKED_STEPS[k]}: {best.count(k)}" for k in range(len(TRACKED_STEPS))) + " |")


# ---------------------------------------------------------------------------------------------
# Brain check


def brain_rows(pairs_per_group: int, seed: int) -> dict:
    """Dice per 2D brain pair: ``{group name: {variant: [Dice of each pair]}}``."""
    results = {}
    for group in (group for group in GROUPS if group.ndims == 2):
        pairs = group_pairs(group, pairs_per_group, seed)
        results[group.name] = {}
        for name in BRAIN_VARIANTS:
            changes = VARIANTS[name]
            method = baselines.SARMethod("sar", name, WEIGHTS, 2, finetune=changes is not None,
                                         instance_optimisation=False, device="cpu")
            method.prepare()
            with finetuning_with(changes or {}):
                results[group.name][name] = [measure(method, pair)["dice"] for pair in pairs]
    return results


def brain_tables(results: dict) -> list[str]:
    lines = []
    for group, by_variant in results.items():
        count = len(by_variant[ALONE])
        lines += ["", f"**{group}** (Dice of the ventricles)", "",
                  "| finetuning | " + " | ".join(f"pair {k}" for k in range(count))
                  + f" | mean | pairs worse than the network (by > {DICE_TOLERANCE}) | worst change |",
                  "|---" * (count + 4) + "|"]
        alone = np.array(by_variant[ALONE])
        for name, dice in by_variant.items():
            dice = np.array(dice)
            worse = "—" if name == ALONE else f"{int((dice < alone - DICE_TOLERANCE).sum())} of {count}"
            fall = "—" if name == ALONE else f"{(dice - alone).min():+.3f}"
            lines.append(f"| {name} | " + " | ".join(f"{d:.3f}" for d in dice) + f" | {dice.mean():.3f} | {worse} | "
                         f"{fall} |")
    return lines


# ---------------------------------------------------------------------------------------------
# Command line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs-per-image", type=int, default=3, help="deformations of each one-image tuning image")
    parser.add_argument("--synthetic", type=int, default=4, help="synthetic slices in the one-image set")
    parser.add_argument("--two-contrast", type=int, default=16, help="pairs of the two-contrast set")
    parser.add_argument("--brain-pairs", type=int, default=5, help="pairs of each 2D brain group (the check)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the brain pairs")
    parser.add_argument("--threads", type=int, default=1, help="torch and SimpleITK threads")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "finetuning_ablation.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    started = time.perf_counter()
    model = load_model(WEIGHTS, 2, torch.device("cpu"))

    with tempfile.TemporaryDirectory() as folder:
        images, masks = one_image_set(Path(folder), args.synthetic)
        tuning = TuningSet(images, masks, args.pairs_per_image, two_contrast_pairs(args.two_contrast))
        results = {}
        for name, changes in VARIANTS.items():
            results[name] = tuning_rows(tuning, changes, model)
            print(summary_line(name, results[name], results[ALONE]), flush=True)
        tracked = {name: tracking(tuning, VARIANTS[name], model) for name in TRACKED_VARIANTS}
    brain = brain_rows(args.brain_pairs, args.seed)

    alone = results[ALONE]
    counts = {group: sum(row["group"] == group for row in alone) for group in GROUP_ORDER}
    lines = ["# Finetuning ablation (issue 12: finetuning that never hurts)", "",
             f"Command: `{command_line(__file__, argv)}` "
             f"({time.perf_counter() - started:.0f} s on {args.threads} thread of a shared 2-core CPU; weights "
             "`Resources/Weights/sar_2d.pt`; instance optimisation off, so finetuning is measured alone).", "",
             f"## Tuning set: {len(alone)} non-brain pairs with known fields", "",
             f"- same contrast ({counts['same contrast']}) and contrast curve ({counts['contrast curve']}): "
             f"{', '.join(REAL_IMAGES)} and {args.synthetic} synthetic 128² slices with a structure mask, each "
             f"moved by {args.pairs_per_image} random {MAX_DISPLACEMENT_MM:g} mm B-splines, the moved copy "
             "as it is or through a random intensity curve;",
             f"- two contrasts ({counts['two contrasts']}): synthetic {TWO_CONTRAST_SHAPE[0]}² label maps rendered "
             "twice with independent intensities per label, one rendering moved, with one label's mask.", "",
             "Field error: mean end-point error of the recovered field on the reference grid (mm). A pair counts "
             f"as worse when its error exceeds the network alone's by more than {FIELD_TOLERANCE_MM} mm, or its "
             f"Dice falls below it by more than {DICE_TOLERANCE}. Every row changes one thing in today's default.",
             "",
             "| finetuning | error: same contrast | contrast curve | two contrasts | all | Dice: synthetic, one "
             "image | two contrasts | pairs worse (error) | worst error change (mm) | pairs worse (Dice) | "
             "worst Dice change |", "|---" * 11 + "|"]
    lines += [summary_line(name, rows, alone) for name, rows in results.items()]
    lines += ["", "Per pair: field error in mm (Dice):", ""]
    lines += per_pair_table(results, list(BRAIN_VARIANTS))
    lines += ["", "## Does the loss track the field error?", "",
              f"Per pair, the iterates after {', '.join(map(str, TRACKED_STEPS))} steps (tolerance 0, last iterate): "
              "Spearman correlation of their losses and their field errors per group (1: a lower loss always "
              "meant a smaller error); on how many pairs loss and error agree on whether 100 steps beat the network; "
              "and after how many steps the error was smallest.", "",
              "| loss | same contrast | contrast curve | two contrasts | agree, 0 vs 100 steps | "
              "smallest error at step (pairs) |", "|---|---|---|---|---|---|"]
    lines += [tracking_line(name, pairs) for name, pairs in tracked.items()]
    lines += ["", f"## Brain check (2D groups of `brain_benchmark.py`, seed {args.seed}; never used to choose)"]
    lines += brain_tables(brain)
    report = "\n".join(lines) + "\n"
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
