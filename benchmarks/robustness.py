"""How far the default pipeline reaches: pairs not aligned, a floating image that covers less or lies on another grid.

    python benchmarks/robustness.py [--dims 2 3] [--pairs 2] [--threads 1] [--output FILE.md]

The benchmark's deformations start from aligned images on one grid (the largest: a 5 degree
rotation and a 4 mm shift). Pairs a user brings may not be aligned: two subjects, or two sessions
of one, differ by a rigid motion and a scale. A floating image may cover less than the reference
(a scan of a shorter range). And it lies on a grid of its own (another spacing, another origin).
These are measured here on the tuning pairs (never on the brain): the 2D real non-brain slices
and the 3D synthetic volumes of ``tune_instance_optimisation.py``.

- **Misalignment**: a random affine about the image centre (rotation angles uniform in
  +-degrees, scale factors in 1 +- scale per axis, shifts in +-mm per axis), then the engine's 6 mm
  B-spline. Rows: the default pipeline (``affine="auto"``: the affine pre-alignment when the rigid
  search finds the pair misaligned), without pre-alignment (``--affine never``, the default before)
  and with it always (``--affine``).
- **Field of view**: the 6 mm B-spline, with the floating image cropped along its second axis
  (``y``) to a fraction of its extent. Rows: the default, and without the bias field.
- **Fine images** (2D only): the 2D images upsampled to 2048 x 2048 (linearly, over the same
  extent) with Gaussian noise of 5 % of their spread, then the 6 mm B-spline: an X-ray's size,
  eight times the working grid's. Rows: the default, which averages blocks of voxels before it
  resamples onto its 256 x 256 grid, and the same pair with both images first resampled linearly
  onto that grid by this script (what the engine did before), the field then brought back to the
  reference's grid linearly.
- **Another grid**: the 6 mm B-spline, with the floating image resampled (linearly) onto a grid of
  another spacing whose origin is a fraction of a voxel off. Rows: the default, which reads the
  floating image on its own voxels, and the same pair with the floating image first resampled
  onto the reference's grid by this script (what the engine did before it read it natively).

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
from SARRegistrationLib.registration import OPTIMISATION_GRID_SIZE  # noqa: E402
from SARRegistrationLib.deformations import foreground_mask, random_affine_transform, random_bspline_transform  # noqa: E402

from benchmarks import command_line  # noqa: E402
from benchmarks.deformation_families import move  # noqa: E402
from benchmarks.tune_instance_optimisation import tuning_images  # noqa: E402

# (rotation degrees, scale, shift mm) of the misalignment cases
MISALIGNMENTS = {2: [(0, 0, 0), (10, 0, 0), (20, 0, 0), (30, 0, 0), (0, 0, 10), (0, 0, 20), (0, 0, 30),
                     (0, 0.1, 0), (0, 0.2, 0), (15, 0.1, 10), (30, 0.15, 20)],
                 3: [(0, 0, 0), (15, 0.1, 10), (30, 0, 0), (0, 0, 30), (30, 0.15, 20)]}
CROPS = {2: [0.0, 0.15, 0.3], 3: [0.0, 0.3]}  # fraction of the floating image's y extent removed
GRIDS = [(1.0, 0.0), (1.0, 0.5), (1.25, 0.3), (0.8, 0.3)]  # the floating image's spacing factor, origin offset (voxels)
BSPLINE_MM = 6.0
RESAMPLE_FIRST = "resample_first"  # a variant's flag: the floating image onto the reference's grid before register
DECIMATE_FIRST = "decimate_first"  # a variant's flag: both images linearly onto the working grid before register
FINE_SIZE, FINE_NOISE = 2048, 0.05  # the fine images' size and noise (a fraction of their standard deviation)


def fine_images(images, seed: int):
    """Each 2D image upsampled to FINE_SIZE along its longest axis over the same extent, with noise."""
    fine = []
    for index, (image, _) in enumerate(images):
        factor = FINE_SIZE // max(image.GetSize())
        grid = sitk.Image([n * factor for n in image.GetSize()], sitk.sitkFloat32)
        grid.SetSpacing([size / factor for size in image.GetSpacing()])
        grid.SetOrigin([o - size / 2 + size / factor / 2 for o, size in zip(image.GetOrigin(), image.GetSpacing())])
        array = imageio.array_of(grids.resample_to(image, grid))
        noisy = array + np.random.default_rng((seed, index)).normal(0, FINE_NOISE * array.std(), array.shape)
        upsampled = imageio.image_like(noisy.astype(np.float32), grid)
        fine.append((upsampled, foreground_mask(upsampled)))
    return fine


def crop(image: sitk.Image, fraction: float) -> sitk.Image:
    """``image`` without the last ``fraction`` of its y extent (its geometry otherwise unchanged)."""
    if fraction <= 0:
        return image
    size = list(image.GetSize())
    size[1] = int(round(size[1] * (1 - fraction)))
    return sitk.RegionOfInterest(image, size, [0] * image.GetDimension())


def on_other_grid(image: sitk.Image, spacing_factor: float, origin_voxels: float, label: bool = False) -> sitk.Image:
    """``image`` resampled onto a grid over its extent with ``spacing_factor`` times its spacing and
    the origin moved by ``origin_voxels`` of its voxels along every axis."""
    if spacing_factor == 1 and origin_voxels == 0:
        return image
    grid = sitk.Image([int(round(n / spacing_factor)) for n in image.GetSize()], sitk.sitkFloat32)
    grid.SetSpacing([size * spacing_factor for size in image.GetSpacing()])
    grid.SetDirection(image.GetDirection())
    grid.SetOrigin([o + origin_voxels * size for o, size in zip(image.GetOrigin(), image.GetSpacing())])
    return grids.resample_to(image, grid, label=label)


def pairs_of(images, misalignment=(0, 0, 0), fraction: float = 0.0, count: int = 2, seed: int = 0,
             floating_grid=(1.0, 0.0)) -> list[dict]:
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
            floating = on_other_grid(crop(image, fraction), *floating_grid)
            floating_mask = on_other_grid(crop(mask, fraction), *floating_grid, label=True)
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
    options = dict(options)
    resample_first, decimate_first = options.pop(RESAMPLE_FIRST, False), options.pop(DECIMATE_FIRST, False)
    for pair in pairs:
        reference, floating = pair["reference"], pair["floating"]
        if resample_first:
            floating = grids.resample_to(floating, reference)
        if decimate_first:
            size = OPTIMISATION_GRID_SIZE[reference.GetDimension()]
            reference, floating = (grids.resample_to(image, grids.working_grid(image, size, multiple=1))
                                   for image in (reference, floating))
        result = register(reference, floating, device="cpu", **options)
        displacement = sitk.Resample(result.displacement, pair["reference"], sitk.Transform(), sitk.sitkLinear, 0.0,
                                     sitk.sitkVectorFloat64) if decimate_first else result.displacement
        error = np.linalg.norm(imageio.array_of(displacement) - pair["applied"], axis=-1)
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
    lines = []
    for ndims in args.dims:
        images = tuning_images(ndims, args.volumes, args.seed)
        cases = {
            "misalignment": ({"default": {}, "--affine never": {"affine": False}, "--affine": {"affine": True}},
                             [({"misalignment": m}, f"rotation {m[0]}°, scale ±{m[1]:.0%}, shift {m[2]} mm")
                              for m in MISALIGNMENTS[ndims]]),
            "field of view": ({"default": {}, "no bias field": {"optimisation_bias_field": False}},
                              [({"fraction": f}, f"{f:.0%} of the floating image cropped") for f in CROPS[ndims]]),
            "another grid": ({"default": {}, "resampled onto the reference's grid first": {RESAMPLE_FIRST: True}},
                             [({"floating_grid": g}, f"spacing × {g[0]}, origin + {g[1]} voxel") for g in GRIDS])}
        if ndims == 2:
            cases["fine images"] = ({"default": {}, "both decimated onto the working grid first": {DECIMATE_FIRST: True}},
                                    [({"images": fine_images(images, args.seed)}, f"{FINE_SIZE}², noise {FINE_NOISE:.0%}")])
        for case, (variants, rows) in cases.items():
            title = f"{ndims}D {'real non-brain' if ndims == 2 else 'synthetic'}, {case}"
            header = None
            for construction, description in rows:
                construction = {"images": images, **construction}
                pairs = pairs_of(count=args.pairs, seed=args.seed, **construction)
                if header is None:
                    score(pairs[:1], {}, False)  # warm-up: no row pays the process's first-call costs
                for name, options in variants.items():
                    row = score(pairs, options, masks=ndims == 3)
                    if header is None:
                        header = f"| pairs | pipeline | {' | '.join(row)} |"
                        lines += [f"\n{title} ({len(pairs)} pairs a row)\n", header, "|---" * (len(row) + 2) + "|"]
                    lines.append(f"| {description} | {name} | " + " | ".join(f"{value:.3f}" for value in row.values())
                                 + " |")
                    print(lines[-1], flush=True)
    if args.output:
        command = command_line(__file__, argv)
        args.output.write_text(f"`{command}`\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
