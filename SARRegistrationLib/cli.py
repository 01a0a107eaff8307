"""Command line: ``python -m SARRegistrationLib register | batch | train | evaluate``."""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

from tqdm import tqdm

from .devices import DEVICE_CHOICES, resolve_device
from .errors import SARError
from .imageio import SUPPORTED_SUFFIXES
from .instance_optimisation import SIMILARITIES
from .metrics import OVERLAP_MEASURES
from .registration import MODES
from .sample import SAMPLE

REFRESH_SECONDS = 0.1  # how often the progress bar is redrawn at most


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except SARError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: nothing was written.", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m SARRegistrationLib",
                                     description="SAR deformable registration (segmentation augmented GAN).")
    commands = parser.add_subparsers(required=True, metavar="{register,batch,train,evaluate}")

    register = commands.add_parser("register", help="register a floating image to a reference image")
    register.add_argument("--reference", type=Path,
                          help="reference (fixed) image file, or a DICOM series: its folder or one of its files")
    register.add_argument("--floating", type=Path,
                          help="floating (moving) image file, or a DICOM series: its folder or one of its files")
    register.add_argument("--sample", action="store_true",
                          help="register the bundled sample pair (BrainWeb PD reference, deformed T1, ventricles)")
    register.add_argument("--output-dir", type=Path, required=True)
    register.add_argument("--reference-mask", type=Path,
                          help="structure mask or label map of the reference: with --floating-mask, Dice/HD95/MAD "
                               "before and after (label by label when both hold several labels)")
    register.add_argument("--floating-mask", type=Path,
                          help="structure mask or label map of the floating image: warped onto the reference "
                               "(warped_floating_mask.nrrd, its labels kept)")
    register.add_argument("--ignore-mask", type=Path,
                          help="mask of regions not to compare (implants, electrodes); the field there stays smooth")
    _add_registration_options(register)
    register.add_argument("--no-qa", action="store_true", help="do not write the QA figure qa.png")
    register.set_defaults(run=_run_register)

    batch = commands.add_parser(
        "batch", help="register every pair of a CSV manifest into a folder each, with a report; resumable, and "
                      "shared out over the processes of torchrun")
    batch.add_argument("--pairs", type=Path, required=True,
                       help="CSV file with a header: reference, floating and optionally reference_mask, "
                            "floating_mask, ignore_mask, id; relative paths are relative to its folder")
    batch.add_argument("--output-dir", type=Path, required=True,
                       help="pair ID's outputs go to OUTPUT_DIR/ID/, the report to OUTPUT_DIR/report.csv and .json, "
                            "the measures of each label of label maps to OUTPUT_DIR/labels.csv")
    _add_registration_options(batch)
    batch.add_argument("--no-qa", action="store_true", help="do not write the QA figures qa.png")
    batch.set_defaults(run=_run_batch)

    train = commands.add_parser("train", help="train a SAR model on images with optional masks")
    train.add_argument("--images", nargs="+", type=Path, default=[],
                       help="image files or folders (folders: every image in them: "
                            f"{', '.join('*' + suffix for suffix in SUPPORTED_SUFFIXES)}; "
                            "a folder of none of these: the DICOM series it holds, as one image)")
    train.add_argument("--masks", type=Path, help="folder of masks named like their images")
    train.add_argument("--split", action="store_true",
                       help="train on the training fold of a patient-level 70/10/20 split (ChestX-ray14 names)")
    train.add_argument("--synthetic", type=int, default=0,
                       help="add this many synthetic label-map pairs per epoch (SynthMorph-style)")
    train.add_argument("--output", type=Path, required=True, help="weights file to write (.pt)")
    train.add_argument("--ndims", type=int, choices=(2, 3), default=2)
    train.add_argument("--shape", type=int, nargs="+", default=[128, 128], help="working shape of training pairs")
    train.add_argument("--working-size", type=int,
                       help="voxels along the largest axis of the grid registration uses (default: max of --shape)")
    train.add_argument("--epoch-length", type=int, default=1000, help="pairs drawn per epoch from the real images")
    train.add_argument("--max-displacement-mm", type=float, default=8.0)
    train.add_argument("--contrast-remap", type=float, default=0.2,
                       help="probability that each training image's contrast is remapped by a random curve")
    train.add_argument("--batch-size", type=int, default=4)
    train.add_argument("--feature-steps", type=int, default=200)
    train.add_argument("--pretrain-steps", type=int, default=500)
    train.add_argument("--gan-steps", type=int, default=1000)
    train.add_argument("--pretrain-learning-rate", type=float, default=1e-3)
    train.add_argument("--gan-learning-rate", type=float, default=1e-4)
    train.add_argument("--checkpoint-every", type=int, default=100, help="steps between resumable checkpoints")
    train.add_argument("--no-segmentation", action="store_true", help="SAR-NoSeg: no segmentation loss terms")
    train.add_argument("--diffeomorphic", action="store_true", help="velocity field integrated by scaling and squaring")
    train.add_argument("--vgg16-weights", type=Path,
                       help="local torchvision VGG16 weights (vgg16-397923af.pth) for the feature-map distance "
                            "instead of the project's own feature extractor")
    train.add_argument("--init-from", type=Path,
                       help="weights to start from: a model of the same dimension, or 2D weights that a 3D model "
                            "starts from by inflating their kernels (no feature stage then)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--resume", action="store_true", help="continue from the checkpoint beside --output")
    train.add_argument("--device", choices=DEVICE_CHOICES, default="auto")
    train.set_defaults(run=_run_train)

    evaluate = commands.add_parser(
        "evaluate", help="register images to random known deformations of themselves and report accuracy")
    evaluate.add_argument("--images", nargs="+", type=Path, required=True)
    evaluate.add_argument("--masks", nargs="+", type=Path, help="one structure mask per image, same order")
    evaluate.add_argument("--pairs-per-image", type=int, default=3)
    evaluate.add_argument("--max-displacement-mm", type=float, default=6.0)
    evaluate.add_argument("--contrast-change", action="store_true",
                          help="also remap the deformed copy's contrast randomly (a multimodal pair)")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--output", type=Path, help="also write the per-pair results as JSON")
    _add_registration_options(evaluate)
    evaluate.set_defaults(run=_run_evaluate)
    return parser


# The --affine choices as register()'s affine argument.
AFFINE_CHOICES = {"auto": "auto", "always": True, "never": False}


def _add_registration_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", choices=MODES, default="auto",
                        help="3D only: the 3D model on the whole volume, or the 2D model slice by slice as the "
                             "first estimate; auto: the 3D model when one is given or shipped, else slice-wise")
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto")
    parser.add_argument("--affine", nargs="?", choices=tuple(AFFINE_CHOICES), default="auto", const="always",
                        help="align the floating image affinely first: auto (the default) when a rigid search of "
                             "coarse copies finds the pair misaligned, always (also --affine alone), or never "
                             "(the deformable stages alone recover rotations up to about 20 degrees and shifts up "
                             "to about 20 mm: benchmarks/results/robustness.md)")
    parser.add_argument("--no-finetune", action="store_true", help="use the trained network as it is")
    parser.add_argument("--max-iterations", type=int, default=100)
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--smoothness", type=float, help="weight of field smoothness during finetuning (default 0.05)")
    parser.add_argument("--weights", type=Path, help="weights file (default: the shipped model)")
    parser.add_argument("--no-instance-optimisation", action="store_true",
                        help="keep the network's (finetuned) field: no per-pair optimisation of a residual field")
    parser.add_argument("--optimisation-iterations", type=int, help="instance optimisation: iterations per level (default 40 in 2D, 80 in 3D)")
    parser.add_argument("--optimisation-levels", type=int, help="instance optimisation: resolution levels")
    parser.add_argument("--optimisation-similarity", choices=SIMILARITIES,
                        help="instance optimisation: how the images are compared (default: nmi+mind, NMI plus "
                             "MIND-SSC descriptors, in 2D; nmi in 3D, where nmi+mind took about twice the time "
                             "for at most 10%% lower error on the tuning pairs)")
    parser.add_argument("--optimisation-bias-field", action=argparse.BooleanOptionalAction,
                        help="instance optimisation: optimise a smooth intensity gain of the floating image with "
                             "the field, so that NMI holds under an MR bias field (default: on)")
    parser.add_argument("--optimisation-equalise", action=argparse.BooleanOptionalAction,
                        help="instance optimisation: let NMI compare the images with equalised histograms, which "
                             "spreads CT's soft tissues over its bins (default: when both images are CT, their "
                             "lowest value air or padding, -3100 to -500 HU, or fat, -500 to -50 HU in whole HU: an "
                             "integer image, or floats that are whole numbers)")
    parser.add_argument("--network", action=argparse.BooleanOptionalAction,
                        help="start from the network's (finetuned) field and write SAR's masks (default: only "
                             "when --weights is given: instance optimisation from the identity was as accurate "
                             "or better)")


def _registration_kwargs(args) -> dict:
    return {"mode": args.mode, "device": args.device, "affine": AFFINE_CHOICES[args.affine], "finetune": not args.no_finetune,
            "max_iterations": args.max_iterations, "tolerance": args.tolerance,
            "smoothness": args.smoothness, "weights": args.weights,
            "instance_optimisation": not args.no_instance_optimisation,
            "optimisation_iterations": args.optimisation_iterations, "optimisation_levels": args.optimisation_levels,
            "optimisation_similarity": args.optimisation_similarity,
            "optimisation_bias_field": args.optimisation_bias_field,
            "optimisation_equalise": args.optimisation_equalise, "network": args.network}


def _run_register(args) -> int:
    from .registration import register

    if args.sample:
        inputs = dict(SAMPLE)
    elif args.reference and args.floating:
        inputs = {"reference": args.reference, "floating": args.floating, "reference_mask": args.reference_mask,
                  "floating_mask": args.floating_mask}
    else:
        raise SARError("Give --reference and --floating, or --sample for the bundled sample pair.")
    inputs["ignore_mask"] = args.ignore_mask
    with _ProgressBar("registering") as bar:
        result = register(**inputs, **_registration_kwargs(args), progress=bar.update)
    written = result.save(args.output_dir, qa_figure=not args.no_qa)
    print("\n".join(summary_lines(result.metrics)))
    print("wrote " + ", ".join(str(path) for path in written) + " (metrics.json holds the whole record)")
    return 0


LABELS_LISTED = 10  # a label map with more labels has only its lowest Dice after registration listed


def summary_lines(metrics: dict) -> list[str]:
    """What ``register`` prints: what ran, the field's folding and reach, and the masks' overlap
    before and after (each label's, for label maps of at most LABELS_LISTED labels). metrics.json
    holds everything, the loss of every iteration included."""
    stages = []
    if metrics["affine_prealignment"]:
        stages.append("affine pre-alignment")
    if metrics["network"]:
        tuned = (f"finetuned ({metrics['iterations']} iterations)" if metrics["finetuned"] and not metrics["finetuning_declined"]
                 else "finetuning declined (it matched worse)" if metrics["finetuning_declined"] else "not finetuned")
        stages.append(f"network, {tuned}")
    optimisation = metrics.get("instance_optimisation")
    if optimisation:
        settings = [f"{optimisation['levels']} levels", f"{optimisation['iterations']} iterations",
                    optimisation["similarity"].upper().replace("MIND", "MIND-SSC")]
        settings += [name for name, on in (("bias field", optimisation["bias_field"]),
                                           ("equalised", optimisation["equalised"])) if on]
        kept = ", first estimate kept (it matched better)" if optimisation["kept_first_estimate"] else ""
        stages.append(f"instance optimisation ({', '.join(settings)}){kept}")
    slicewise = " slice by slice" if metrics["mode"] == "slicewise" else ""
    lines = [f"registered{slicewise} in {metrics['seconds']:.2f} s: {'; '.join(stages) or 'identity'}",
             f"folded voxels {100 * metrics['folding_fraction']:.3f} %, largest displacement "
             f"{metrics['max_displacement_mm']:.2f} mm"]
    if "after" not in metrics:
        return lines
    before, after = metrics["before"], metrics["after"]
    labels = after.get("labels", {})
    lines.append(f"{'masks' if not labels else f'mean over {len(labels)} labels':<24}{'before':>8}{'after':>8}")
    lines += [f"  {name:<22}{before[key]:>8.3f}{after[key]:>8.3f}" if key == "dice" else
              f"  {name:<22}{before[key]:>8.2f}{after[key]:>8.2f}"
              for key, name in OVERLAP_MEASURES.items()]
    if labels:
        listed = labels if len(labels) <= LABELS_LISTED else dict(sorted(labels.items(), key=lambda item: item[1]["dice"])[:3])
        lines.append("each label, before -> after" if len(listed) == len(labels) else
                     f"the {len(listed)} labels of lowest Dice after registration, before -> after (every label's in metrics.json)")
        lines += [f"  label {value}: Dice {before['labels'][value]['dice']:.3f} -> {measures['dice']:.3f}, "
                  f"HD95 {before['labels'][value]['hd95_mm']:.2f} -> {measures['hd95_mm']:.2f} mm, "
                  f"MAD {before['labels'][value]['mad_mm']:.2f} -> {measures['mad_mm']:.2f} mm"
                  for value, measures in listed.items()]
    return lines


def _run_batch(args) -> int:
    """Exit status 0 when every pair is registered, 1 when some failed, 130 when interrupted."""
    from .batch import FAILED, REGISTERED, SKIPPED, read_pairs, run_batch, succeeded
    from .distributed import launched_rank

    pairs = read_pairs(args.pairs)
    report = args.output_dir / "report.csv"
    first_rank = launched_rank()[0] == 0
    try:
        with _ProgressBar("batch", disable=not first_rank) as bar:
            rows = run_batch(pairs, args.output_dir, qa_figure=not args.no_qa, progress=bar.update,
                             **_registration_kwargs(args))
    except KeyboardInterrupt:
        print(f"\ninterrupted: the pairs that finished are intact; {report} lists them.", file=sys.stderr)
        return 130
    if first_rank:
        statuses = [row["status"] for row in rows]
        print(f"{len(rows)} pairs: {statuses.count(REGISTERED)} registered, {statuses.count(SKIPPED)} done before, "
              f"{statuses.count(FAILED)} failed")
        for row in rows:
            if row["status"] == FAILED:
                print(f"  {row['id']}: {row['error']}")
        labelled = " and labels.csv (each label of the label maps)" if any(row.get("labels") for row in rows) else ""
        print(f"wrote {report} and {report.with_suffix('.json')}{labelled}")
    if succeeded(rows):
        return 0
    return 1 if all(row["status"] in (REGISTERED, SKIPPED, FAILED) for row in rows) else 130


def _run_train(args) -> int:
    from .objective import LossWeights
    from .training import TrainingSettings, train

    if not args.images and not args.synthetic:
        raise SARError("Give training images with --images, or synthetic pairs with --synthetic N (or both).")
    if len(args.shape) != args.ndims:
        raise SARError(f"--shape needs {args.ndims} numbers for --ndims {args.ndims}.")
    dataset, description = training_data(args)
    weights = LossWeights().without_segmentation() if args.no_segmentation else LossWeights()
    settings = TrainingSettings(ndims=args.ndims, shape=tuple(args.shape), batch_size=args.batch_size,
                                feature_steps=args.feature_steps, pretrain_steps=args.pretrain_steps,
                                gan_steps=args.gan_steps, pretrain_learning_rate=args.pretrain_learning_rate,
                                gan_learning_rate=args.gan_learning_rate, diffeomorphic=args.diffeomorphic, seed=args.seed,
                                checkpoint_every=args.checkpoint_every, weights=weights, working_size=args.working_size,
                                init_from=str(args.init_from) if args.init_from else None,
                                vgg16_weights=str(args.vgg16_weights) if args.vgg16_weights else None)
    command = "python -m SARRegistrationLib " + shlex.join(sys.argv[1:])
    train(settings, dataset, args.output, resume=args.resume, device=resolve_device(args.device),
          data_description=description,
          command=command)
    print(f"wrote {args.output} and {args.output.with_suffix('.json')}")
    return 0


def training_data(args):
    """The training pairs that ``train`` arguments ask for, and their one-line description for the
    model card. The VoxelMorph baseline rebuilds SAR's pairs from its card's command with it."""
    from . import datasets

    sources, description = datasets.training_sources(args.images, args.masks, use_training_fold=args.split)
    dataset = datasets.training_dataset(sources, tuple(args.shape), args.epoch_length, args.synthetic,
                                        seed=args.seed, max_displacement_mm=args.max_displacement_mm,
                                        contrast_remap=args.contrast_remap)
    if args.synthetic:
        description += f"; {args.synthetic} synthetic label-map pairs per epoch"
    return dataset, description


def _run_evaluate(args) -> int:
    from .evaluation import evaluate_known_deformations, summarise

    rows = evaluate_known_deformations(args.images, args.masks, pairs_per_image=args.pairs_per_image,
                                       max_displacement_mm=args.max_displacement_mm,
                                       contrast_change=args.contrast_change, seed=args.seed,
                                       **_registration_kwargs(args))
    print(summarise(rows))
    if args.output:
        args.output.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


class _ProgressBar:
    """A tqdm bar driven by the engine's ``progress(fraction, message)`` callback."""

    def __init__(self, description: str, disable: bool = False):
        self.bar = tqdm(total=100, desc=description, file=sys.stderr, disable=disable,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}")
        self.shown = -math.inf

    def update(self, fraction: float, message: str) -> None:
        self.bar.n = round(100 * fraction)
        self.bar.set_postfix_str(message, refresh=False)
        # Redrawn at most every REFRESH_SECONDS: a 2D registration reports 120 iterations in 0.3 s,
        # and drawing every one of them took about 20 ms of that.
        if time.monotonic() - self.shown >= REFRESH_SECONDS or fraction >= 1:
            self.bar.refresh()
            self.shown = time.monotonic()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()
