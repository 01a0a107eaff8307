"""Choosing instance optimisation's defaults on non-brain and synthetic pairs (never on the brain).

    python benchmarks/tune_instance_optimisation.py [--dims 2 3] [--pairs 2] [--threads 1] \
        [--variant NAME:key=value,key=value ...] [--output FILE.md]

Pairs (known deformations, ``evaluation.evaluate_known_deformations``): in 2D the rat lung MR
slices and the abdominal MR slice of ``Testing/Data``, each registered to random B-spline
deformations of itself, once in the same contrast and once with a random contrast remapping; in
3D synthetic label-map volumes (``deformations.synthetic_sample``, 64 x 64 x 48 at 2 mm) with the
mask of one or two labels. Each variant is a set of :class:`OptimisationSettings` fields (or
``network=0`` for instance optimisation alone, ``finetune=0``, ``io=0`` for no instance
optimisation) and is scored by the mean end-point error of its field against the applied one
(mm), Dice where a mask exists, folding and seconds. The default variants are the defaults and
one change of each setting.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import fields, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make SARRegistrationLib importable
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402

from SARRegistrationLib.deformations import synthetic_sample  # noqa: E402
from SARRegistrationLib.evaluation import evaluate_known_deformations  # noqa: E402
from SARRegistrationLib.instance_optimisation import OptimisationSettings  # noqa: E402

DATA = REPO / "Testing" / "Data"
IMAGES_2D = [DATA / name for name in ("rat_lung_1.nrrd", "rat_lung_2.nrrd", "fat_mri.nrrd")]
DEFAULT_VARIANTS = ["defaults:", "no network:network=0", "network, no IO:io=0", "no finetuning:finetune=0",
                    "iterations 20:iterations=20", "iterations 80:iterations=80", "levels 2:levels=2",
                    "samples 2048:samples=2048", "smoothness 0.3:smoothness=0.3", "smoothness 3:smoothness=3",
                    "learning rate 0.1:learning_rate=0.1", "control spacing 8:control_spacing=8",
                    "mask term 0.2:mask_weight=0.2"]
STAGE_OPTIONS = {"network", "finetune", "io"}


def parse_variant(text: str) -> tuple[str, dict]:
    """``NAME:key=value,...`` as the ``register`` options of that variant."""
    name, _, assignments = text.partition(":")
    known = {field.name: field.type for field in fields(OptimisationSettings)}
    settings, options = {}, {}
    for assignment in filter(None, assignments.split(",")):
        key, _, value = assignment.partition("=")
        if key in STAGE_OPTIONS:
            options[key] = bool(int(value))
        elif key in known:
            kind = {"float": float, "int": int, "str": str}[getattr(known[key], "__name__", known[key])]
            settings[key] = kind(value)
        else:
            raise SystemExit(f"unknown setting {key!r} in variant {text!r}")
    optimisation = replace(OptimisationSettings(), **settings) if options.pop("io", True) else False
    return name, {"instance_optimisation": optimisation, **options}


def synthetic_volumes(folder: Path, count: int, seed: int) -> tuple[list[Path], list[Path]]:
    images, masks = [], []
    for index in range(count):
        image, mask = synthetic_sample((48, 64, 64), np.random.default_rng((seed, index)), spacing=(2.0, 2.0, 2.0))
        images.append(folder / f"synthetic_{index}.nrrd")
        masks.append(folder / f"synthetic_{index}_mask.nrrd")
        sitk.WriteImage(image, str(images[-1]))
        sitk.WriteImage(mask, str(masks[-1]))
    return images, masks


def score(rows: list[dict]) -> dict:
    result = {"field error (mm)": np.mean([row["field_error_mm"]["after"] for row in rows]),
              "before (mm)": np.mean([row["field_error_mm"]["before"] for row in rows]),
              "folded (%)": 100 * np.mean([row["folding_fraction"] for row in rows]),
              "seconds": np.mean([row["seconds"] for row in rows])}
    if "after" in rows[0]:
        result["Dice"] = np.mean([row["after"]["dice"] for row in rows])
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 3], choices=(2, 3))
    parser.add_argument("--pairs", type=int, default=2, help="deformations per image and contrast setting")
    parser.add_argument("--volumes", type=int, default=3, help="synthetic 3D volumes")
    parser.add_argument("--max-displacement-mm", type=float, default=6.0)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variant", nargs="+", default=DEFAULT_VARIANTS)
    parser.add_argument("--output", type=Path, help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = [parse_variant(text) for text in args.variant]
    lines = []
    with tempfile.TemporaryDirectory() as folder:
        datasets = {}
        if 2 in args.dims:
            datasets["2D, same contrast"] = (IMAGES_2D, None, False)
            datasets["2D, contrast change"] = (IMAGES_2D, None, True)
        if 3 in args.dims:
            images, masks = synthetic_volumes(Path(folder), args.volumes, args.seed)
            datasets["3D synthetic, same contrast"] = (images, masks, False)
            datasets["3D synthetic, contrast change"] = (images, masks, True)
        for dataset, (images, masks, contrast_change) in datasets.items():
            # One warm-up registration, so that no variant pays the process's first-call costs.
            evaluate_known_deformations(images[:1], masks[:1] if masks else None, pairs_per_image=1, seed=999)
            scores = {name: score(evaluate_known_deformations(
                images, masks, pairs_per_image=args.pairs, max_displacement_mm=args.max_displacement_mm,
                contrast_change=contrast_change, seed=args.seed, device="cpu", **options))
                for name, options in variants}
            columns = list(next(iter(scores.values())))
            lines += [f"\n{dataset} ({len(images) * args.pairs} pairs)\n",
                      "| variant | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
            lines += [f"| {name} | " + " | ".join(f"{value:.3f}" for value in row.values()) + " |"
                      for name, row in scores.items()]
            print("\n".join(lines[-len(scores) - 3:]), flush=True)
    if args.output:
        command = "python benchmarks/tune_instance_optimisation.py " + " ".join(argv or sys.argv[1:])
        args.output.write_text(f"`{command}`\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
