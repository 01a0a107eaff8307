"""Choosing instance optimisation's defaults on non-brain and synthetic pairs (never on the brain).

    python benchmarks/tune_instance_optimisation.py [--dims 2 3] [--families bspline large velocity] \
        [--pairs 2] [--intensities mr|ct|ct-no-air] [--threads 1] [--variant NAME:key=value,key=value ...] \
        [--output FILE.md]

Pairs (known deformations): in 2D the rat lung MR slices and the abdominal MR slice of
``Testing/Data``, each registered to random deformations of itself, once in the same contrast and
once with a random contrast remapping (``deformations.augment_intensity``: a bias field, a gamma, a
non-monotonic intensity curve and noise); in 3D synthetic label-map volumes
(``synthetic.synthetic_sample``, 64 x 64 x 48 at 2 mm) with the mask of one or two labels, or with
``--intensities ct`` the same label maps with CT's intensities
(``contrast_families.ct_like_volume``: air, bone and soft tissues a few tens of HU apart, which the
1-99 % normalisation puts into two or three of NMI's 32 bins; ``ct-no-air`` with fat where air
was, as in a volume cropped inside the body, in whole HU as int16, which is how the engine
recognises such a CT), CT to CT only: a random remapping of CT is no modality anyone registers,
and no method solved it. The deformation families are the
brain benchmark's (``benchmarks/deformation_families.py``): the engine's 6 mm B-spline, a large
deformation (rotation, shift and a 20 mm B-spline) and the exponential of a random velocity field.
Each variant is a set of :class:`OptimisationSettings` fields (and ``network=1`` to start from the
shipped network's field, ``finetune=0`` to skip the paper's finetuning then, ``io=0`` for no
instance optimisation, ``noise=S`` to add seeded Gaussian noise of ``S`` times its intensity sd to
each floating image, ``peer=KEY`` to register with a peer of the brain benchmark instead,
``elastix``, ``ants``, ``greedy`` or ``convexadam`` (3D), with that benchmark's settings) and is
scored by the mean end-point error of its field against the applied one (mm), over the image and
inside the reference's mask (the foreground in 2D, the structure in 3D: peers that leave the
background unmoved lose nothing there), Dice where a mask exists, folding and seconds, and by the
mean absolute change of the pairs' errors against the first variant. The default variants are the
defaults and one change of each setting.

The optimisation's path is a sensitive function of its inputs: a variant that only adds noise of
``1e-5`` sd (``noise=1e-5``), far below any image's own, changed single 2D pairs' errors by up to
nearly four times and the means of some 2D sets by up to 19 % (``results/instance_optimisation_tuning.md``,
session 12). That change is the noise floor against which a setting's effect must be read.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make SARRegistrationLib importable
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402

from SARRegistrationLib import grids, imageio, metrics, register  # noqa: E402
from SARRegistrationLib.deformations import augment_intensity, foreground_mask, random_bspline_transform  # noqa: E402
from SARRegistrationLib.fields import transform_to_displacement  # noqa: E402
from SARRegistrationLib.instance_optimisation import OptimisationSettings  # noqa: E402
from SARRegistrationLib.model import load_model  # noqa: E402
from SARRegistrationLib.synthetic import synthetic_sample  # noqa: E402

from benchmarks import baselines, command_line  # noqa: E402
from benchmarks.brain_benchmark import Group, build_methods, shrunk_pair  # noqa: E402
from benchmarks.brain_benchmark import parse_args as parse_benchmark_args  # noqa: E402
from benchmarks.contrast_families import ct_like_volume, with_noise  # noqa: E402
from benchmarks.deformation_families import large_deformation_transform, move, velocity_field_transform  # noqa: E402

DATA = REPO / "Testing" / "Data"
IMAGES_2D = [DATA / name for name in ("rat_lung_1.nrrd", "rat_lung_2.nrrd", "fat_mri.nrrd")]
DEFAULT_VARIANTS = ["defaults:", "network first:network=1,finetune=0", "network + finetuning first:network=1",
                    "network alone:network=1,finetune=0,io=0", "network + finetuning alone:network=1,io=0",
                    "mask term 0.2 (network + finetuning first):network=1,mask_weight=0.2",
                    "iterations 20:iterations=20", "iterations 40:iterations=40", "iterations 80:iterations=80",
                    "levels 2:levels=2", "levels 4:levels=4", "samples 8192:samples=8192",
                    "samples 32768:samples=32768", "smoothness 0.25:smoothness=0.25", "smoothness 1:smoothness=1",
                    "learning rate 0.2 mm:learning_rate=0.2", "learning rate 1 mm:learning_rate=1",
                    "control spacing 6:control_spacing=6", "control spacing 12:control_spacing=12",
                    "Gaussian NMI window:nmi_kernel=gaussian", "NMI alone:similarity=nmi",
                    "NMI + MIND-SSC:similarity=nmi+mind", "MIND-SSC alone:similarity=mind",
                    "NMI + 0.5 MIND-SSC:similarity=nmi+mind,mind_weight=0.5",
                    "NMI + 1 MIND-SSC:similarity=nmi+mind,mind_weight=1",
                    "NMI + 2 MIND-SSC:similarity=nmi+mind,mind_weight=2",
                    "NMI + MIND-SSC, 2048 MIND samples:similarity=nmi+mind,mind_samples=2048",
                    "NMI + MIND-SSC, 4096 MIND samples:similarity=nmi+mind,mind_samples=4096",
                    "no bias field:bias_field=0", "bias field:bias_field=1"]
STAGE_OPTIONS = {"network", "finetune", "io", "noise", "peer"}
PEERS = ("elastix", "ants", "greedy", "convexadam")
FAMILIES = {"bspline": lambda image, rng: random_bspline_transform(image, rng, 6.0),
            "large": large_deformation_transform, "velocity": velocity_field_transform}


def _flag(text: str) -> bool:
    return bool(int(text))


def parse_variant(text: str) -> tuple[str, dict]:
    """``NAME:key=value,...`` as the ``register`` options of that variant."""
    name, _, assignments = text.partition(":")
    known = {field.name: field.type for field in fields(OptimisationSettings)}
    settings, options = {}, {}
    for assignment in filter(None, assignments.split(",")):
        key, _, value = assignment.partition("=")
        if key in STAGE_OPTIONS:
            if key == "peer" and value not in PEERS:
                raise SystemExit(f"unknown peer {value!r} in variant {text!r}: one of {', '.join(PEERS)}")
            options[key] = float(value) if key == "noise" else value if key == "peer" else _flag(value)
        elif key in known:
            type_name = str(getattr(known[key], "__name__", known[key])).removesuffix(" | None")
            kind = {"float": float, "int": int, "str": str, "bool": _flag}[type_name]
            settings[key] = kind(value)
        else:
            raise SystemExit(f"unknown setting {key!r} in variant {text!r}")
    optimisation = replace(OptimisationSettings(), **settings) if options.pop("io", True) else False
    return name, {"instance_optimisation": optimisation, **options}


# How the synthetic 3D volumes get their intensities (--intensities).
VOLUME_KINDS = {"mr": lambda rng: synthetic_sample((48, 64, 64), rng, spacing=(2.0, 2.0, 2.0)),
                "mr-thick": lambda rng: synthetic_sample((24, 96, 96), rng, spacing=(1.0, 1.0, 4.0)),
                "mr-anisotropic": lambda rng: synthetic_sample((32, 64, 64), rng, spacing=(2.0, 2.0, 3.0)),
                "ct": lambda rng: ct_like_volume((48, 64, 64), rng),
                "ct-no-air": lambda rng: ct_like_volume((48, 64, 64), rng, air=False)}
# How each kind is named in a set's title; CT is registered in one contrast only.
KIND_TITLES = {"mr": "", "mr-thick": ", thick slices", "mr-anisotropic": ", 2 x 2 x 3 mm", "ct": ", CT-like", "ct-no-air": ", CT-like without air"}


def tuning_images(ndims: int, volumes: int, seed: int, intensities: str = "mr") -> list[tuple[sitk.Image, sitk.Image]]:
    """The tuning images with their masks: the 2D real non-brain slices (foreground masks), or
    ``volumes`` synthetic label-map volumes with ``intensities`` of :data:`VOLUME_KINDS`."""
    if ndims == 2:
        return [(image, foreground_mask(image)) for image in
                (sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkFloat32) for path in IMAGES_2D)]
    return [VOLUME_KINDS[intensities](np.random.default_rng((seed, index))) for index in range(volumes)]


def known_pairs(images, family: str, contrast_change: bool, count: int, seed: int) -> list[dict]:
    """Each image moved ``count`` times by the family's random transform: the moved copy is the
    reference, the image the floating one, and ``T(p) - p`` the field to recover."""
    pairs = []
    for index, (image, mask) in enumerate(images):
        for pair in range(count):
            rng = np.random.default_rng((seed, index, pair))
            transform = FAMILIES[family](image, rng)
            reference, reference_mask = move(image, mask, transform)
            if contrast_change:
                remapped = augment_intensity(imageio.normalise_intensity(imageio.array_of(reference)), rng, 1.0)
                reference = imageio.image_like(remapped.astype(np.float32), reference)
            applied = imageio.array_of(sitk.TransformToDisplacementField(
                transform, sitk.sitkVectorFloat64, reference.GetSize(), reference.GetOrigin(), reference.GetSpacing(),
                reference.GetDirection()))
            pairs.append({"reference": reference, "floating": image, "reference_mask": reference_mask,
                          "floating_mask": mask, "applied": applied})
    return pairs


def peer_method(key: str, ndims: int, contrast_change: bool, threads: int, first: dict) -> baselines.Method:
    """The brain benchmark's row ``key``, with that benchmark's settings, for one tuning set, warmed
    up on a small copy of the set's ``first`` pair. Greedy's metric follows the contrast there (NCC in
    one contrast, NMI across); so it does here."""
    group = Group("tuning", "tuning", ndims, "pd" if contrast_change else "same", "bspline", 0, "")
    methods = build_methods(group, parse_benchmark_args(["--methods", key, "--threads", str(threads)]))
    if not methods:
        raise baselines.NotRun(f"not a peer of the brain benchmark in {ndims}D")
    method, = methods
    method.prepare()  # raises baselines.NotRun when the peer's package is not installed
    method.warm_up(shrunk_pair(benchmark_pair(first, 0)))
    return method


def benchmark_pair(pair: dict, index: int, floating: sitk.Image | None = None) -> baselines.Pair:
    """A tuning pair as the brain benchmark's methods take it."""
    return baselines.Pair("tuning", index, pair["reference"], pair["floating"] if floating is None else floating,
                          pair["reference_mask"], pair["floating_mask"])


def score(pairs: list[dict], options: dict, model, masks: bool, peer: baselines.Method | None = None) -> tuple[dict, np.ndarray]:
    """Mean field error (mm) against the applied field, Dice (when the masks are a structure), folding,
    seconds; and each pair's field error. With ``peer``, the pairs are registered by it instead."""
    errors, inside, dice, folded, seconds = [], [], [], [], []
    options = {name: value for name, value in options.items() if name != "peer"}
    noise = options.pop("noise", 0.0)
    for index, pair in enumerate(pairs):
        floating = with_noise(pair["floating"], noise, index) if noise else pair["floating"]
        if peer is None:
            result = register(pair["reference"], floating, model if options.get("network") else None,
                              device="cpu", **options)
            field, elapsed, folding = result.displacement, result.metrics["seconds"], result.metrics["folding_fraction"]
        else:
            output = peer.run(benchmark_pair(pair, index, floating))
            field, elapsed = output.displacement, output.seconds
        error = np.linalg.norm(imageio.array_of(field) - pair["applied"], axis=-1)
        errors.append(error.mean())
        inside.append(error[imageio.array_of(pair["reference_mask"]) > 0].mean())
        transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
        if peer is not None:  # as the brain benchmark measures every row's folding
            folding = metrics.folding_fraction(transform_to_displacement(transform, pair["reference"]))
        if masks:
            warped = grids.resample_to(pair["floating_mask"], pair["reference"], label=True, transform=transform)
            dice.append(metrics.dice(imageio.array_of(pair["reference_mask"]), imageio.array_of(warped)))
        folded.append(100 * folding)
        seconds.append(elapsed)
    row = {"field error (mm)": np.mean(errors), "in the mask (mm)": np.mean(inside),
           "before (mm)": np.mean([np.linalg.norm(pair["applied"], axis=-1).mean() for pair in pairs]),
           "folded (%)": np.mean(folded), "seconds": np.mean(seconds)}
    return ({**row, "Dice": np.mean(dice)} if masks else row), np.array(errors)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 3], choices=(2, 3))
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--pairs", type=int, default=2, help="deformations per image, family and contrast setting")
    parser.add_argument("--volumes", type=int, default=3, help="synthetic 3D volumes")
    parser.add_argument("--intensities", choices=list(VOLUME_KINDS), default="mr",
                        help="the 3D volumes' intensities: MR-like (random per label) or CT-like (HU, "
                             "registered in the same contrast only; ct-no-air: fat where air was)")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variant", nargs="+", default=DEFAULT_VARIANTS)
    parser.add_argument("--output", type=Path, help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    if args.intensities != "mr" and 2 in args.dims:
        parser.error("--intensities chooses the synthetic 3D volumes' intensities; give it with --dims 3")
    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    variants = [parse_variant(text) for text in args.variant]
    model = load_model(ndims=2)
    images = {ndims: tuning_images(ndims, args.volumes, args.seed, args.intensities) for ndims in args.dims}
    lines = []
    for ndims in args.dims:
        for family in args.families:
            for contrast_change in (False,) if ndims == 3 and args.intensities.startswith("ct") else (False, True):
                pairs = known_pairs(images[ndims], family, contrast_change, args.pairs, args.seed)
                score(pairs[:1], {}, model, False)  # warm-up: no variant pays the process's first-call costs
                scores, first, absent = {}, None, []
                for name, options in variants:
                    peer = None
                    if "peer" in options:
                        try:
                            peer = peer_method(options["peer"], ndims, contrast_change, args.threads, pairs[0])
                        except baselines.NotRun as reason:
                            absent.append(f"{name}: not run ({reason})")
                            continue
                    try:
                        row, errors = score(pairs, options, model, masks=ndims == 3, peer=peer)
                    except Exception as error:  # noqa: BLE001 - a peer that fails on a pair is a result, not the end
                        if peer is None:
                            raise
                        absent.append(f"{name}: failed on a pair ({type(error).__name__}: {error})")
                        continue
                    first = errors if first is None else first
                    scores[name] = {**row, "mean abs change from the first (mm)": np.abs(errors - first).mean()}
                source = "real non-brain" if ndims == 2 else f"synthetic{KIND_TITLES[args.intensities]}"
                title = (f"{ndims}D {source}, {family}, "
                         f"{'contrast change' if contrast_change else 'same contrast'} ({len(pairs)} pairs)")
                start = len(lines)
                lines.append(f"\n{title}\n")
                if scores:  # none when every variant of the set was a peer that did not run or failed
                    columns = list(next(iter(scores.values())))
                    lines += ["| variant | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
                    lines += [f"| {name} | " + " | ".join(f"{value:.3f}" for value in row.values()) + " |"
                              for name, row in scores.items()]
                lines += [f"\nNot in the table: {reason}" for reason in absent]
                print("\n".join(lines[start:]), flush=True)
    if args.output:
        command = command_line(__file__, argv)
        args.output.write_text(f"`{command}`\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
