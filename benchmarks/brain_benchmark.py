"""Brain benchmark (issues #4 and #12): SAR against Elastix, ANTs, Greedy, ConvexAdam and VoxelMorph.

    python benchmarks/brain_benchmark.py [--pairs N] [--seed S] [--quick] [--groups 2d-pd 3d-contrast ...] \
        [--dims 2 3] [--threads 1] [--output-dir benchmarks/results]

Every pair has a known answer: the floating image (and its ventricle mask) is a brain image moved
by a seeded random deformation, and the registration must bring the masks back into overlap. The
groups (``GROUPS``) differ in contrast (same contrast; T1 against the PD slice; T1 against a
T2-like remap of itself) and in deformation family (the engine's small B-splines; large B-splines
after a rotation and a shift; the exponential of a random stationary velocity field), each with
``--pairs`` pairs. Groups with the same ``seed_key`` share their deformations, so comparing them
isolates the contrast.

Every method yields a displacement field on the reference grid (mm, ITK convention); the floating
mask is warped through it by SimpleITK with nearest-neighbour interpolation and compared with the
reference mask by ``SARRegistrationLib.metrics.overlap_metrics`` (Dice, HD95, MAD, spacing-aware),
and folding is ``metrics.folding_fraction`` of the field in voxels
(``fields.transform_to_displacement``). So all rows are measured by the same code. Seconds are the
wall clock of each method's registration call only (see ``baselines.py``), in this one process.

Writes ``results.md`` (tables, comparisons, the command and the machine), ``results.png`` (Dice
and HD95 per method with error bars, seconds on a log axis) and ``results.json`` (every pair's
numbers) into ``--output-dir``, and prints the tables.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make SARRegistrationLib and benchmarks importable
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

from SARRegistrationLib import grids, imageio, metrics  # noqa: E402
from SARRegistrationLib.deformations import known_deformation  # noqa: E402
from SARRegistrationLib.fields import transform_to_displacement  # noqa: E402

from benchmarks import baselines, contrast_families, deformation_families  # noqa: E402
from benchmarks.baselines import NotRun, Pair  # noqa: E402

DATA_DIR = REPO / "Testing" / "Data"
WEIGHTS_DIR = REPO / "Resources" / "Weights"
BENCHMARK_WEIGHTS_DIR = REPO / "benchmarks" / "weights"
METRICS = (("dice", "Dice"), ("hd95_mm", "HD95 (mm)"), ("mad_mm", "MAD (mm)"), ("folded_percent", "folded (%)"),
           ("seconds", "seconds"))
QUICK = {"pairs": 1, "groups": ["2d-pd"], "sar_max_iterations": 10, "sar_optimisation_iterations": 10,
         "elastix_iterations": 32, "elastix_resolutions": 2, "ants_iterations": [10, 5, 0], "greedy_iterations": "20x10x0",
         "convexadam_iterations": 10}
FULL = {"pairs": 5, "sar_max_iterations": 100, "sar_optimisation_iterations": None, "elastix_iterations": 256,
        "elastix_resolutions": 4, "ants_iterations": [40, 20, 0], "greedy_iterations": "100x50x10",
        "convexadam_iterations": 80}
OPTIONAL_PACKAGES = ("torch", "numpy", "scipy", "SimpleITK", "itk-elastix", "itk", "antspyx", "voxelmorph",
                     "picsl-greedy", "convexAdam")

# The SAR rows of a group: (key suffix, label, network dimension, mode). 2D: the 2D network. 3D:
# mode "auto" with the 2D weights (the network slice-wise, instance optimisation in full 3D), and
# the 3D network on the whole volume when 3D weights exist.
DEFAULT_LABEL = "SARRegistration default: instance optimisation (no network)"
# The default with one setting changed (OptimisationSettings.similarity, whose default depends on
# the dimension, and .bias_field), to show what each choice gives: (key, label, SARMethod switches).
NO_BIAS_FIELD = ("sar_nobias", "no bias field", {"bias_field": False})
OTHER_CHOICES = {2: (("sar_nmi", "NMI alone", {"similarity": "nmi"}), NO_BIAS_FIELD),
                 3: (("sar_mind", "NMI + MIND-SSC", {"similarity": "nmi+mind"}), NO_BIAS_FIELD)}
SAR_VARIANTS = {2: (("", "SAR", 2, "auto"),),
                3: (("", "SAR", 2, "auto"), ("_volume", "SAR 3D volume", 3, "volume"))}
# VoxelMorph rows: (key, label, network dimension, mode); 2D weights on a volume run slice-wise.
VOXELMORPH_VARIANTS = {2: (("voxelmorph", "VoxelMorph", 2, "volume"),),
                       3: (("voxelmorph", "VoxelMorph slice-wise", 2, "slicewise"),
                           ("voxelmorph_volume", "VoxelMorph 3D volume", 3, "volume"))}


# ---------------------------------------------------------------------------------------------
# Groups and pairs


@dataclass(frozen=True)
class Group:
    """One dataset of the benchmark: which images, which contrast, which deformation family."""

    key: str  # for --groups
    name: str  # in the tables
    ndims: int
    contrast: str  # "same" (T1 vs T1), "pd" (PD reference, T1 floating; 2D), "t2-like" (T1 vs T2-like remap)
    deformation: str  # "bspline" (engine, ≤ --max-displacement-mm), "large", "velocity"
    seed_key: int  # pair k draws from default_rng((seed, seed_key, k)): same key, same deformations
    title: str


GROUPS = (
    Group("2d-same", "2D same contrast", 2, "same", "bspline", 2,
          "T1 slice (reference) and the T1 slice moved by a random B-spline (floating)"),
    Group("2d-pd", "2D T1->PD", 2, "pd", "bspline", 2,
          "BrainWeb PD slice (reference) and the T1 slice moved by the same B-splines (floating)"),
    Group("2d-large", "2D large deformation", 2, "pd", "large", 20,
          "PD slice (reference) and the T1 slice moved by a rotation, a shift and a large B-spline (floating)"),
    Group("2d-velocity", "2D velocity field", 2, "pd", "velocity", 21,
          "PD slice (reference) and the T1 slice moved by the exponential of a random velocity field (floating)"),
    Group("3d-same", "3D same contrast", 3, "same", "bspline", 3,
          "T1 volume (reference) and the volume moved by a random B-spline (floating)"),
    Group("3d-contrast", "3D contrast change", 3, "t2-like", "bspline", 3,
          "T1 volume (reference) and the volume moved by the same B-splines, remapped to a T2-like contrast "
          "with a mild bias field and noise (floating)"),
    Group("3d-large", "3D large deformation", 3, "same", "large", 30,
          "T1 volume (reference) and the volume moved by a rotation, a shift and a large B-spline (floating)"),
)
GROUP_KEYS = tuple(group.key for group in GROUPS)
# The default run: every group but 3D large deformation, which would add about 8 minutes (README).
DEFAULT_GROUPS = tuple(key for key in GROUP_KEYS if key != "3d-large")


def group_named(name: str) -> Group:
    return next(group for group in GROUPS if name in (group.name, group.key))


def _read(name: str, label: bool = False) -> sitk.Image:
    image = sitk.ReadImage(str(DATA_DIR / name))
    return sitk.Cast(image != 0, sitk.sitkUInt8) if label else sitk.Cast(image, sitk.sitkFloat32)


def _images(group: Group) -> tuple[sitk.Image, sitk.Image, sitk.Image]:
    """``(reference, base, mask)``: the floating image is ``base`` moved; ``mask`` fits both unmoved."""
    if group.ndims == 2:
        base, mask = _read("brain_t1.nrrd"), _read("brain_ventricles.nrrd", True)
        return (_read("brain_pd.nrrd") if group.contrast == "pd" else base), base, mask
    base, mask = _read("brain3d_t1.nii.gz"), _read("brain3d_ventricles.nii.gz", True)
    return base, base, mask


def group_pairs(group: Group, count: int, seed: int = 0, max_displacement_mm: float = 6.0,
                large_displacement_mm: float = 20.0, shrink: int = 1) -> list[Pair]:
    """``count`` seeded pairs of ``group``; pair ``k`` draws from ``default_rng((seed, group.seed_key, k))``.

    The deformation is drawn first, so groups with one ``seed_key`` share it whatever their
    contrast. ``shrink`` > 1 shrinks the images first (for fast tests).
    """
    reference, base, mask = _images(group)
    if shrink > 1:
        reference, base, mask = (sitk.Shrink(image, [shrink] * group.ndims) for image in (reference, base, mask))
    pairs = []
    for index in range(count):
        rng = np.random.default_rng((seed, group.seed_key, index))
        if group.deformation == "bspline":
            floating, floating_mask, _ = known_deformation(base, mask, rng, max_displacement_mm)
        elif group.deformation == "large":
            transform = deformation_families.large_deformation_transform(base, rng, large_displacement_mm)
            floating, floating_mask = deformation_families.move(base, mask, transform)
        elif group.deformation == "velocity":
            floating, floating_mask = deformation_families.move(
                base, mask, deformation_families.velocity_field_transform(base, rng))
        else:
            raise ValueError(f"unknown deformation family {group.deformation!r}")
        if group.contrast == "t2-like":
            floating = contrast_families.t2_like(floating, rng)
        pairs.append(Pair(group.name, index, reference, floating, mask, floating_mask))
    return pairs


def shrunk_pair(pair: Pair, factor: int = 2) -> Pair:
    """A smaller copy of a pair, for untimed warm-up runs. An axis of fewer than 32 voxels (thick
    slices) is kept: Greedy's pyramid needs 4 voxels along every axis at its coarsest level."""
    shrink = lambda image: sitk.Shrink(image, [factor if n >= 32 else 1 for n in image.GetSize()])  # noqa: E731
    return Pair(pair.dataset, -1, shrink(pair.reference), shrink(pair.floating), shrink(pair.reference_mask),
                shrink(pair.floating_mask))


# ---------------------------------------------------------------------------------------------
# Measuring


def measure(method: baselines.Method, pair: Pair) -> dict:
    """Register one pair with ``method`` and measure it; the same code for every method.

    Returns a row: dataset, pair, method key and label, ``status`` "ok", Dice, HD95 and MAD (mm)
    of the reference mask against the floating mask warped (nearest neighbour, SimpleITK) through
    the method's field, the folded-voxel percentage of that field, seconds, and method extras.
    """
    output = method.run(pair)
    transform = sitk.DisplacementFieldTransform(sitk.Image(output.displacement))  # the transform takes the buffer
    warped_mask = grids.resample_to(pair.floating_mask, pair.reference, label=True, transform=transform)
    reference_mask = imageio.array_of(grids.resample_to(pair.reference_mask, pair.reference, label=True))
    warped = imageio.array_of(warped_mask)
    overlap = metrics.overlap_metrics(reference_mask, warped, pair.reference.GetSpacing()[::-1])
    folded = metrics.folding_fraction(transform_to_displacement(transform, pair.reference))
    row = {"dataset": pair.dataset, "pair": pair.index, "method": method.key, "label": method.label, "status": "ok",
           **overlap, "folded_percent": 100.0 * folded,
           "seconds": None if output.seconds is None else float(output.seconds)}
    extras = dict(output.extras)
    native = extras.pop("native_mask", None)
    if native is not None:  # the method's own nearest-neighbour warp of the mask, against ours
        extras["native_mask_dice"] = metrics.dice(imageio.array_of(native), warped)
    if extras:
        row["extras"] = extras
    return row


def evaluate_method(method: baselines.Method, pairs: list[Pair], warm_up: bool = True, log=print) -> list[dict]:
    """One row per pair; a single "not run: …" or "failed: …" row if the method cannot start."""
    dataset = pairs[0].dataset if pairs else "?"
    try:
        method.prepare()
    except NotRun as reason:
        return [_status_row(method, dataset, f"not run: {reason}")]
    except Exception as error:  # noqa: BLE001 - any failure becomes a row, the benchmark goes on
        return [_status_row(method, dataset, f"failed: {type(error).__name__}: {error}")]
    if warm_up and pairs:
        try:
            method.warm_up(shrunk_pair(pairs[0]))
        except Exception as error:  # noqa: BLE001 - a failed warm-up only means the first pair pays it
            log(f"  ({method.key}: warm-up failed: {type(error).__name__}: {error})")
    rows = []
    for pair in pairs:
        try:
            row = measure(method, pair)
        except NotRun as reason:
            return [_status_row(method, dataset, f"not run: {reason}")]
        except Exception as error:  # noqa: BLE001
            row = {**_status_row(method, dataset, f"failed: {type(error).__name__}: {error}"), "pair": pair.index}
        rows.append(row)
        log(f"  {dataset} pair {pair.index} {method.key}: {_row_line(row)}")
    return rows


def _row_line(row: dict) -> str:
    if row["status"] != "ok":
        return row["status"]
    seconds = "—" if row["seconds"] is None else f"{row['seconds']:.2f} s"
    return f"Dice {row['dice']:.3f}, HD95 {row['hd95_mm']:.2f} mm, folded {row['folded_percent']:.2f} %, {seconds}"


def _status_row(method, dataset: str, status: str) -> dict:
    return {"dataset": dataset, "pair": None, "method": method.key, "label": method.label, "status": status}


# ---------------------------------------------------------------------------------------------
# Summaries


def _mean_sd(values) -> dict:
    values = np.asarray([v for v in values if v is not None], dtype=float)
    if values.size == 0:
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": float(values.mean()), "sd": float(values.std(ddof=1)) if values.size > 1 else 0.0,
            "n": int(values.size)}


def summarise(rows: list[dict]) -> list[dict]:
    """Mean ± sample standard deviation over pairs, per dataset and method, in row order."""
    order, groups = [], {}
    for row in rows:
        key = (row["dataset"], row["method"])
        if key not in groups:
            order.append(key)
            groups[key] = []
        groups[key].append(row)
    summary = []
    for key in order:
        group = groups[key]
        ok = [r for r in group if r["status"] == "ok"]
        failed = [r for r in group if r["status"] != "ok"]
        if not ok:
            status = failed[0]["status"]
        elif failed:
            status = f"ok on {len(ok)} of {len(group)} pairs ({failed[0]['status']})"
        else:
            status = "ok"
        entry = {"dataset": key[0], "method": key[1], "label": group[-1]["label"], "status": status,
                 "pairs": len(ok)}
        if ok:
            entry.update({name: _mean_sd([r[name] for r in ok]) for name, _ in METRICS})
        summary.append(entry)
    return summary


def _paired(rows, dataset, first, second, name="dice"):
    values = {(r["method"], r["pair"]): r[name] for r in rows if r["dataset"] == dataset and r["status"] == "ok"}
    pairs = sorted({p for (m, p) in values if m == first} & {p for (m, p) in values if m == second})
    return [values[(first, p)] - values[(second, p)] for p in pairs]


def _mean(entry, name):
    return entry[name]["mean"] if _ran(entry) else None


def _comparison(rows, by_key, dataset, name, first, second) -> dict:
    """``first`` against ``second`` on the pairs both ran: Dice of each, paired Dice and HD95
    differences (first − second, mean ± sd), mean seconds of each and their ratio second / first."""
    a, b = by_key.get((dataset, first)), by_key.get((dataset, second))
    entry = {"dataset": dataset, "name": name, "first": first, "second": second,
             "first_label": a["label"] if a else first, "second_label": b["label"] if b else second}
    dice = _paired(rows, dataset, first, second)
    if not dice:
        entry.update(value=None, note=_why_not(a, entry["first_label"], b, entry["second_label"]))
        return entry
    seconds_a, seconds_b = _mean(a, "seconds"), _mean(b, "seconds")
    entry.update(value=float(np.mean(dice)), dice_first=_mean(a, "dice"), dice_second=_mean(b, "dice"),
                 dice_difference=_mean_sd(dice), hd95_difference=_mean_sd(_paired(rows, dataset, first, second,
                                                                                     "hd95_mm")),
                 seconds_first=seconds_a, seconds_second=seconds_b,
                 seconds_ratio=seconds_b / seconds_a if seconds_a and seconds_b is not None else None)
    return entry


PEER_KEYS = ("elastix", "ants", "greedy", "convexadam", "voxelmorph", "voxelmorph_volume")


def comparisons(rows: list[dict], summary: list[dict]) -> list[dict]:
    """The figures issue #12 asks for, per group, computed from this run's rows.

    SAR is the default pipeline's row (``sar``: instance optimisation, no network). Against the
    best peer of the group (highest mean Dice among Elastix, ANTs, Greedy, ConvexAdam, VoxelMorph)
    and against every peer that ran: Dice of each, paired Dice and HD95 differences (SAR − peer)
    and seconds ratio peer / SAR. Then, per network variant, the ablations, each "with − without":
    what the network adds (network + finetuning + instance optimisation vs instance optimisation
    alone), what instance optimisation adds (vs network + paper finetuning), what finetuning adds
    (vs the network alone) and what the segmentation terms add (vs SAR-NoSeg, same stages).
    """
    by_key = {(s["dataset"], s["method"]): s for s in summary}
    results = []
    for dataset in dict.fromkeys(s["dataset"] for s in summary):
        group = group_named(dataset)
        peers = [s for s in summary if s["dataset"] == dataset and s["method"] in PEER_KEYS and _ran(s)]
        best = max(peers, key=lambda s: s["dice"]["mean"], default=None)
        if _ran(by_key.get((dataset, "sar"))):
            if best is None:
                results.append({"dataset": dataset, "name": "SAR default vs best peer", "first": "sar",
                                "second": None, "value": None, "note": "no peer ran"})
            else:
                results.append(_comparison(rows, by_key, dataset, f"SAR default vs best peer ({best['label']})",
                                           "sar", best["method"]))
            for peer in peers:
                results.append(_comparison(rows, by_key, dataset, f"SAR default vs {peer['label']}", "sar",
                                           peer["method"]))
        for suffix, name, _, _ in SAR_VARIANTS[group.ndims]:
            full = f"sar_full{suffix}"
            if (dataset, full) not in by_key:
                continue
            if not _ran(by_key[(dataset, full)]):  # one line for the variant, not one per comparison
                results.append({"dataset": dataset, "name": f"{name} (all ablations)", "first": full, "second": None,
                                "value": None, "note": f"{by_key[(dataset, full)]['label']}: "
                                                       f"{by_key[(dataset, full)]['status']}"})
                continue
            for label, first, second in (("what the network adds", full, "sar"),
                                         ("what instance optimisation adds", full, f"sar_finetune{suffix}"),
                                         ("what finetuning adds", f"sar_finetune{suffix}", f"sar_network{suffix}"),
                                         ("what the segmentation terms add", full, f"sar_noseg{suffix}")):
                results.append(_comparison(rows, by_key, dataset, f"{name}: {label}", first, second))
    return results


def _ran(entry) -> bool:
    return entry is not None and entry.get("pairs", 0) > 0


def _why_not(a, a_name, b, b_name) -> str:
    reasons = [f"{name}: {entry['status'] if entry else 'not in this run'}" for entry, name in ((a, a_name), (b, b_name))
               if not _ran(entry)]
    return "; ".join(reasons) or "no pair where both ran"


# ---------------------------------------------------------------------------------------------
# Output


def _cell(stat, digits: int = 3) -> str:
    if not stat or stat.get("mean") is None:
        return "—"
    return f"{stat['mean']:.{digits}f} ± {stat['sd']:.{digits}f}"


def markdown_table(summary: list[dict], dataset: str) -> str:
    lines = ["| method | status | pairs | " + " | ".join(title for _, title in METRICS) + " |",
             "|---|---|---" + "|---" * len(METRICS) + "|"]
    for entry in summary:
        if entry["dataset"] != dataset:
            continue
        digits = {"dice": 3, "hd95_mm": 2, "mad_mm": 2, "folded_percent": 3, "seconds": 2}
        cells = [_cell(entry.get(name), digits[name]) for name, _ in METRICS]
        lines.append(f"| {entry['label']} | {entry['status']} | {entry['pairs']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _signed(stat, digits: int) -> str:
    if not stat or stat.get("mean") is None:
        return "—"
    return f"{stat['mean']:+.{digits}f} ± {stat['sd']:.{digits}f} (n = {stat['n']})"


def _number(value, digits: int, unit: str = "") -> str:
    return "—" if value is None else f"{value:.{digits}f}{unit}"


def markdown_comparisons(entries: list[dict], dataset: str) -> str:
    lines = ["| comparison (first vs second) | Dice first / second | ΔDice (first − second) | ΔHD95 mm (first − second) "
             "| seconds first / second | seconds second / first |", "|---|---|---|---|---|---|"]
    for entry in entries:
        if entry["dataset"] != dataset:
            continue
        if entry["value"] is None:
            lines.append(f"| {entry['name']} | n/a ({entry.get('note', '')}) | | | | |")
            continue
        lines.append(f"| {entry['name']} | {_number(entry['dice_first'], 3)} / {_number(entry['dice_second'], 3)} | "
                     f"{_signed(entry['dice_difference'], 3)} | {_signed(entry['hd95_difference'], 2)} | "
                     f"{_number(entry['seconds_first'], 2)} / {_number(entry['seconds_second'], 2)} | "
                     f"{_number(entry['seconds_ratio'], 2, '×')} |")
    return "\n".join(lines)


def render_markdown(results: dict) -> str:
    machine = results["machine"]
    packages = ", ".join(f"{name} {version}" for name, version in machine["packages"].items())
    lines = ["# SARRegistration brain benchmark", "",
             f"Command: `{results['command']}`", "",
             f"Machine: {machine['cpu']} — {machine['cpu_count']} CPU cores, {machine['platform']}, "
             f"Python {machine['python']}; torch {machine['torch']} ({machine['torch_threads']} threads), "
             f"device {machine['device']}; ITK/ANTs/Greedy threads {machine['itk_threads']}.", "",
             f"Packages: {packages}.", "",
             f"Date: {results['date']}. Settings: " + ", ".join(f"{k} = {v}" for k, v in results["settings"].items())
             + ".", "",
             "Dice, HD95 and MAD compare the reference mask with the floating mask warped (nearest neighbour) "
             "through each method's field on the reference grid; folded (%) is the share of reference voxels "
             "with a non-positive Jacobian determinant; seconds are each method's registration call only. "
             "mean ± sample sd over pairs. Comparisons: paired differences over the pairs both rows ran; "
             "\"SAR default\" is the default pipeline's row (instance optimisation, no network)."]
    for dataset in dict.fromkeys(s["dataset"] for s in results["summary"]):
        pairs = max((s["pairs"] for s in results["summary"] if s["dataset"] == dataset), default=0)
        lines += ["", f"## {dataset}: {group_named(dataset).title} — {results['settings'].get('pairs', pairs)} pairs",
                  "", markdown_table(results["summary"], dataset), "", "### Comparisons", "",
                  markdown_comparisons(results["comparisons"], dataset)]
    lines += ["", "Method settings:", ""]
    for dataset, methods in results["methods"].items():
        for key, settings in methods.items():
            lines.append(f"- {dataset} `{key}`: " + json.dumps(settings, default=str))
    return "\n".join(lines) + "\n"


def plot(summary: list[dict], path) -> Path:
    """Grouped bars per method (one colour per group): Dice, HD95 with sd error bars; seconds on a log axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(s["method"] for s in summary))
    labels = {}  # a key may carry different labels per dataset ("SAR" in 2D, "SAR 3D volume" in 3D): show each
    for s in summary:
        labels.setdefault(s["method"], {})[s["label"]] = None
    datasets = list(dict.fromkeys(s["dataset"] for s in summary))
    by_key = {(s["dataset"], s["method"]): s for s in summary}
    panels = (("dice", "Dice", False), ("hd95_mm", "HD95 (mm)", False), ("seconds", "seconds (log)", True))
    figure, axes = plt.subplots(3, 1, figsize=(max(8.0, 1.3 * len(methods)), 12), sharex=True)
    width = 0.8 / max(1, len(datasets))
    x = np.arange(len(methods))
    for axis, (name, title, log) in zip(axes, panels):
        for d, dataset in enumerate(datasets):
            means, sds, missing = [], [], []
            for m, method in enumerate(methods):
                stat = (by_key.get((dataset, method)) or {}).get(name)
                ok = stat is not None and stat.get("mean") is not None and np.isfinite(stat["mean"]) \
                    and not (log and stat["mean"] <= 0)
                means.append(stat["mean"] if ok else np.nan)
                sds.append(stat["sd"] if ok else 0.0)
                if not ok and (dataset, method) in by_key and not (name == "seconds" and method == "before"):
                    missing.append(m)
            positions = x - 0.4 + width * (d + 0.5)
            axis.bar(positions, means, width, yerr=sds, capsize=3, label=dataset)
            for m in missing:
                axis.text(positions[m], 0.03, "not run", rotation=90, ha="center", va="bottom", fontsize=8,
                          color="grey", transform=axis.get_xaxis_transform())
        axis.set_ylabel(title)
        if log:
            axis.set_yscale("log")
        axis.grid(axis="y", alpha=0.3)
    axes[-1].set_xticks(x, [" /\n".join(labels[m]) for m in methods], rotation=30, ha="right", fontsize=9)
    axes[0].set_ylim(0, 1)
    axes[0].legend(title="group", fontsize=8)
    axes[0].set_title("mean ± sd over pairs; not run = package or weights missing, or failed (see results.md)")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def write_outputs(results: dict, output_dir) -> dict:
    """Write results.json, results.md and results.png into ``output_dir``; return their paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": output_dir / "results.json", "markdown": output_dir / "results.md",
             "plot": output_dir / "results.png"}
    paths["json"].write_text(json.dumps(results, indent=2, default=str) + "\n")
    paths["markdown"].write_text(render_markdown(results))
    plot(results["summary"], paths["plot"])
    return paths


def machine_info(device: str = "auto", itk_threads=None) -> dict:
    import torch

    from SARRegistrationLib.devices import resolve_device

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    torch_device = resolve_device(device)
    packages = {}
    for name in OPTIONAL_PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = "not installed"
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "device": str(torch_device) + (f" ({torch.cuda.get_device_name(torch_device)})"
                                           if torch_device.type == "cuda" else ""),
            "itk_threads": itk_threads or os.environ.get("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "default"),
            "packages": packages}


# ---------------------------------------------------------------------------------------------
# Command line


def sar_rows(suffix: str, name: str, weights, noseg_weights, network_ndims: int, mode: str, **common) -> list:
    """The ablation rows of one SAR variant: one :class:`baselines.SARMethod`, other switches."""
    row = lambda key, label, path=weights, **switches: baselines.SARMethod(  # noqa: E731
        f"{key}{suffix}", label, path, network_ndims, mode=mode, **switches, **common)
    return [row("sar_network", f"{name} network alone", finetune=False, instance_optimisation=False),
            row("sar_finetune", f"{name} network + paper finetuning", finetune=True, instance_optimisation=False),
            row("sar_full", f"{name} network + paper finetuning + instance optimisation"),
            row("sar_noseg", f"{name.replace('SAR', 'SAR-NoSeg')} network + finetuning + instance optimisation",
                noseg_weights)]


def build_methods(group: Group, args) -> list[baselines.Method]:
    """The rows of one group, in table order. Greedy's metric follows the group's contrast (NCC within
    one contrast, NMI across), as its documentation advises; the others use one setting for all."""
    ndims = group.ndims
    weights = {2: (args.weights_2d, args.noseg_weights_2d, args.voxelmorph_weights_2d),
               3: (args.weights_3d, args.noseg_weights_3d, args.voxelmorph_weights_3d)}
    common = {"max_iterations": args.sar_max_iterations, "optimisation_iterations": args.sar_optimisation_iterations,
              "device": args.device}
    # The default pipeline first: register() with its defaults runs instance optimisation alone.
    methods = [baselines.Before(), baselines.SARMethod("sar", DEFAULT_LABEL, None, ndims, network=False, **common)]
    methods += [baselines.SARMethod(key, f"SAR instance optimisation alone, {label}", None, ndims, network=False,
                                    **switches, **common) for key, label, switches in OTHER_CHOICES[ndims]]
    for suffix, name, network_ndims, mode in SAR_VARIANTS[ndims]:
        methods += sar_rows(suffix, name, weights[network_ndims][0], weights[network_ndims][1], network_ndims, mode,
                            **common)
    methods += [
        baselines.ElastixBSpline(grid_spacing_mm=args.elastix_grid_spacing, resolutions=args.elastix_resolutions,
                                 iterations=args.elastix_iterations, threads=args.threads, seed=args.seed),
        baselines.AntsSyN(reg_iterations=args.ants_iterations, seed=args.seed),
        baselines.GreedyMethod(metric="NCC" if group.contrast == "same" else "NMI", iterations=args.greedy_iterations,
                               threads=args.threads, seed=args.seed),
    ]
    if ndims == 3:
        methods.append(baselines.ConvexAdamMethod(iterations=args.convexadam_iterations, device=args.device))
    for key, label, network_ndims, mode in VOXELMORPH_VARIANTS[ndims]:
        methods.append(baselines.VoxelMorphMethod(weights[network_ndims][2], network_ndims, device=args.device,
                                                  mode=mode, key=key, label=label))
    if args.methods:
        methods = [m for m in methods if m.key in args.methods]
    return methods


METHOD_KEYS = ("before", "sar", "sar_nmi", "sar_mind", "sar_nobias", "sar_network", "sar_finetune", "sar_full", "sar_noseg", "sar_network_volume",
               "sar_finetune_volume", "sar_full_volume", "sar_noseg_volume", "elastix", "ants", "greedy", "convexadam",
               "voxelmorph", "voxelmorph_volume")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--pairs", type=int, help=f"pairs per group (default {FULL['pairs']}, --quick {QUICK['pairs']})")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the random deformations and contrasts (and of Elastix/ANTs/Greedy sampling)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 pair of 2D T1->PD, few iterations for SAR, Elastix, ANTs, Greedy, ConvexAdam")
    parser.add_argument("--groups", nargs="+", choices=GROUP_KEYS,
                        help=f"groups (default {' '.join(DEFAULT_GROUPS)}; --quick {' '.join(QUICK['groups'])})")
    parser.add_argument("--dims", type=int, nargs="+", choices=(2, 3), help="only the groups of these dimensions")
    parser.add_argument("--output-dir", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--max-displacement-mm", type=float, default=6.0,
                        help="B-spline groups: bound of each control point's displacement component")
    parser.add_argument("--large-displacement-mm", type=float, default=20.0,
                        help="large-deformation groups: the same bound (plus ≤ 5° rotation and ≤ 4 mm shift)")
    parser.add_argument("--methods", nargs="+",
                        choices=METHOD_KEYS, help="only these rows (default: all)")
    parser.add_argument("--weights-2d", type=Path, default=WEIGHTS_DIR / "sar_2d.pt")
    parser.add_argument("--weights-3d", type=Path, default=WEIGHTS_DIR / "sar_3d.pt")
    parser.add_argument("--noseg-weights-2d", type=Path, default=BENCHMARK_WEIGHTS_DIR / "sar_noseg_2d.pt")
    parser.add_argument("--noseg-weights-3d", type=Path, default=BENCHMARK_WEIGHTS_DIR / "sar_noseg_3d.pt")
    parser.add_argument("--voxelmorph-weights-2d", type=Path, default=BENCHMARK_WEIGHTS_DIR / "voxelmorph_2d.pt")
    parser.add_argument("--voxelmorph-weights-3d", type=Path, default=BENCHMARK_WEIGHTS_DIR / "voxelmorph_3d.pt")
    parser.add_argument("--sar-max-iterations", type=int, help=f"SAR finetuning iterations at most "
                        f"(default {FULL['sar_max_iterations']}, --quick {QUICK['sar_max_iterations']})")
    parser.add_argument("--sar-optimisation-iterations", type=int, help="SAR instance optimisation iterations per "
                        f"level (default: the engine's; --quick {QUICK['sar_optimisation_iterations']})")
    parser.add_argument("--elastix-grid-spacing", type=float, default=10.0, help="final B-spline grid spacing, mm")
    parser.add_argument("--elastix-resolutions", type=int,
                        help=f"default {FULL['elastix_resolutions']}, --quick {QUICK['elastix_resolutions']}")
    parser.add_argument("--elastix-iterations", type=int, help=f"per resolution (default {FULL['elastix_iterations']}, "
                        f"--quick {QUICK['elastix_iterations']})")
    parser.add_argument("--ants-iterations", type=int, nargs="+",
                        help=f"SyN iterations per level (default {FULL['ants_iterations']}, --quick {QUICK['ants_iterations']})")
    parser.add_argument("--greedy-iterations", help=f"Greedy iterations per level, affine and deformable "
                        f"(default {FULL['greedy_iterations']}, --quick {QUICK['greedy_iterations']})")
    parser.add_argument("--convexadam-iterations", type=int, help="ConvexAdam's Adam iterations "
                        f"(default {FULL['convexadam_iterations']}, --quick {QUICK['convexadam_iterations']})")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="threads for torch, SimpleITK, Elastix, ANTs and Greedy alike")
    parser.add_argument("--device", default="auto", help="torch device of SAR, ConvexAdam and VoxelMorph: auto, cpu "
                        "or cuda")
    parser.add_argument("--no-warmup", action="store_true",
                        help="skip the untimed warm-up run of each method on a half-size copy of the first pair")
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for name, value in defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if args.groups is None:
        args.groups = list(DEFAULT_GROUPS)
    if args.dims:
        args.groups = [key for key in args.groups if group_named(key).ndims in args.dims]
    return args


def set_threads(threads: int) -> None:
    """Give every toolkit the same number of threads (ITK reads the variable when first loaded)."""
    import torch

    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def run(args, log=print) -> dict:
    set_threads(args.threads)
    rows, settings_by_group = [], {}
    for group in (group_named(key) for key in args.groups):
        pairs = group_pairs(group, args.pairs, args.seed, args.max_displacement_mm, args.large_displacement_mm)
        settings_by_group[group.name] = {}
        for method in build_methods(group, args):
            log(f"{group.name} {method.label} …")
            rows += evaluate_method(method, pairs, warm_up=not args.no_warmup, log=log)
            settings_by_group[group.name][method.key] = method.settings()
    summary = summarise(rows)
    return {"command": "python " + shlex.join(sys.argv), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": machine_info(args.device, args.threads),
            "settings": {"pairs": args.pairs, "seed": args.seed, "groups": args.groups,
                         "max_displacement_mm": args.max_displacement_mm,
                         "large_displacement_mm": args.large_displacement_mm, "quick": args.quick,
                         "warm_up": not args.no_warmup},
            "methods": settings_by_group, "summary": summary, "comparisons": comparisons(rows, summary), "rows": rows}


def main(argv=None) -> int:
    args = parse_args(argv)
    results = run(args)
    paths = write_outputs(results, args.output_dir)
    print()
    print(render_markdown(results))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
