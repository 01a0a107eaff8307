"""How far the default pipeline reaches: pairs that are not aligned, and a floating image that covers less.

    python benchmarks/robustness.py [--dims 2 3] [--pairs 2] [--threads 1] [--output FILE.md]

The benchmark's deformations start from aligned images (the largest: a 5 degree rotation and a
4 mm shift). Pairs a user brings may not be aligned: two subjects, or two sessions of one, differ
by a rigid motion and a scale. And a floating image may cover less than the reference (a scan of
a shorter range). Both are measured here on the tuning pairs (never on the brain): the 2D real
non-brain slices and the 3D synthetic volumes of ``tune_instance_optimisation.py``.

- **Misalignment**: a random affine about the image centre (rotation angles uniform in
  +-degrees, scale factors in 1 +- scale per axis, shifts in +-mm per axis), then the engine's 6 mm
  B-spline. Rows: the default pipeline, and with ``affine=True`` (``--affine``: SimpleITK's affine
  pre-alignment first).
- **Field of view**: the 6 mm B-spline, with the floating image cropped along its second axis
  (``y``) to a fraction of its extent. Rows: the default, and without the bias field.

Scored by the mean end-point error (mm) of the field against the applied one, over the
reference's foreground where the applied field lands inside the floating image (its largest pair
too), Dice in 3D (the synthetic volumes' label masks), and seconds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make SARRegistrationLib importable
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402

from SARRegistrationLib import grids, imageio, metrics, register  # noqa: E402
from SARRegistrationLib.deformations import foreground_mask, random_affine_transform, random_bspline_transform  # noqa: E402

from benchmarks.deformation_families import move  # noqa: E402
from benchmarks.tune_instance_optimisation import IMAGES_2D, synthetic_volumes  # noqa: E402

# (rotation degrees, scale, shift mm) of the misalignment cases
MISALIGNMENTS = {2: [(0, 0, 0), (10, 0, 0), (20, 0, 0), (30, 0, 0), (0, 0, 10), (0, 0, 20), (0, 0, 30),
                     (0, 0.1, 0), (0, 0.2, 0), (15, 0.1, 10), (30, 0.15, 20)],
                 3: [(0, 0, 0), (15, 0.1, 10), (30, 0, 0), (0, 0, 30), (30, 0.15, 20)]}
CROPS = {2: [0.0, 0.15, 0.3], 3: [0.0, 0.3]}  # fraction of the floating image's y extent removed
BSPLINE_MM = 6.0


def images_of(ndims: int, volumes: int, seed: int):
    if ndims == 2:
        return [(image, foreground_mask(image)) for image in
                (sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkFloat32) for path in IMAGES_2D)]
    return synthetic_volumes(volumes, seed)


def crop(image: sitk.Image, fraction: float) -> sitk.Image:
    """``image`` without the last ``fraction`` of its y extent (its geometry otherwise unchanged)."""
    if fraction <= 0:
        return image
    size = list(image.GetSize())
    size[1] = int(round(size[1] * (1 - fraction)))
    return sitk.RegionOfInterest(image, size, [0] * image.GetDimension())


def pairs_of(images, misalignment, fraction: float, count: int, seed: int) -> list[dict]:
    rotation, scale, shift = misalignment
    pairs = []
    for index, (image, mask) in enumerate(images):
        for pair in range(count):
            rng = np.random.default_rng((seed, index, pair))
            transform = sitk.CompositeTransform([
                random_affine_transform(image, rng, rotation, scale, shift),
                random_bspline_transform(image, rng, BSPLINE_MM)])  # the last-listed applies first
            reference, reference_mask = move(image, mask, transform)
            applied = sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, reference.GetSize(),
                                                        reference.GetOrigin(), reference.GetSpacing(),
                                                        reference.GetDirection())
            floating, floating_mask = crop(image, fraction), crop(mask, fraction)
            # Where the applied field lands inside the floating image: only there is an answer to find.
            covered = sitk.Cast(floating_mask * 0 + 1, sitk.sitkUInt8)
            inside = grids.resample_to(covered, reference, label=True,
                                       transform=sitk.DisplacementFieldTransform(sitk.Image(applied)))
            pairs.append({"reference": reference, "floating": floating, "reference_mask": reference_mask,
                          "floating_mask": floating_mask, "applied": imageio.array_of(applied),
                          "scored": (imageio.array_of(reference_mask) > 0) & (imageio.array_of(inside) > 0)})
    return pairs


def score(pairs: list[dict], options: dict, masks: bool) -> dict:
    errors, dice, seconds = [], [], []
    for pair in pairs:
        result = register(pair["reference"], pair["floating"], device="cpu", **options)
        error = np.linalg.norm(imageio.array_of(result.displacement) - pair["applied"], axis=-1)
        errors.append(error[pair["scored"]].mean())
        if masks:
            warped = grids.resample_to(pair["floating_mask"], pair["reference"], label=True,
                                       transform=result.transform())
            dice.append(metrics.dice(imageio.array_of(pair["reference_mask"]), imageio.array_of(warped)))
        seconds.append(result.metrics["seconds"])
    row = {"field error (mm)": np.mean(errors), "largest pair (mm)": np.max(errors), "seconds": np.mean(seconds)}
    return {**row, "Dice": np.mean(dice)} if masks else row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 3], choices=(2, 3))
    parser.add_argument("--pairs", type=int, default=2, help="deformations per image and case")
    parser.add_argument("--volumes", type=int, default=3, help="synthetic 3D volumes")
    parser.add_argument("--seed", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, help="also write the tables to this markdown file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    cases = {"misalignment": ({"default": {}, "--affine": {"affine": True}},
                              lambda ndims: [(m, 0.0) for m in MISALIGNMENTS[ndims]]),
             "field of view": ({"default": {}, "no bias field": {"optimisation_bias_field": False}},
                               lambda ndims: [((0, 0, 0), f) for f in CROPS[ndims]])}
    lines = []
    for ndims in args.dims:
        images = images_of(ndims, args.volumes, args.seed)
        for case, (variants, settings) in cases.items():
            columns = None
            for misalignment, fraction in settings(ndims):
                pairs = pairs_of(images, misalignment, fraction, args.pairs, args.seed)
                if columns is None:
                    score(pairs[:1], {}, False)  # warm-up: no row pays the process's first-call costs
                for name, options in variants.items():
                    row = score(pairs, options, masks=ndims == 3)
                    if columns is None:
                        columns = list(row)
                        title = f"{ndims}D {'real non-brain' if ndims == 2 else 'synthetic'}, {case} ({len(pairs)} pairs a row)"
                        lines += [f"\n{title}\n", "| rotation (°) | scale | shift (mm) | floating cropped | pipeline | " +
                                  " | ".join(columns) + " |", "|---" * (len(columns) + 5) + "|"]
                    rotation, scale, shift = misalignment
                    lines.append(f"| {rotation} | ±{scale:.0%} | {shift} | {fraction:.0%} | {name} | " +
                                 " | ".join(f"{value:.3f}" for value in row.values()) + " |")
                    print(lines[-1], flush=True)
    if args.output:
        command = "python benchmarks/robustness.py " + " ".join(argv or sys.argv[1:])
        args.output.write_text(f"`{command}`\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
