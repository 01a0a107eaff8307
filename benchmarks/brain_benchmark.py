"""Brain benchmark (issue #4): SAR against Elastix, ANTs and VoxelMorph on known deformations.

    python benchmarks/brain_benchmark.py [--pairs N] [--seed S] [--quick] [--dims 2 3] \
        [--output-dir benchmarks/results]

Each pair has a known answer. 2D: the BrainWeb PD slice is the reference and the T1 slice, moved
(with its ventricle mask) by a seeded random cubic B-spline, is the floating image, so the pair is
multimodal and the ventricle masks overlap imperfectly until registration restores them. 3D: the T1
volume is the reference, and the floating volume is that volume moved by a seeded random B-spline
and given a random intensity remapping (``deformations.augment_intensity`` with a non-monotonic
curve always on), so the pair is not trivially mono-modal.

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
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make SARRegistrationLib and benchmarks importable
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

from SARRegistrationLib import imageio, metrics  # noqa: E402
from SARRegistrationLib.deformations import known_deformation  # noqa: E402
from SARRegistrationLib.fields import transform_to_displacement  # noqa: E402

from benchmarks import baselines  # noqa: E402
from benchmarks.baselines import NotRun, Pair  # noqa: E402

DATA_DIR = REPO / "Testing" / "Data"
WEIGHTS_DIR = REPO / "Resources" / "Weights"
BENCHMARK_WEIGHTS_DIR = REPO / "benchmarks" / "weights"
METRICS = (("dice", "Dice"), ("hd95_mm", "HD95 (mm)"), ("mad_mm", "MAD (mm)"), ("folded_percent", "folded (%)"),
           ("seconds", "seconds"))
QUICK = {"pairs": 1, "dims": [2], "sar_max_iterations": 10, "elastix_iterations": 32, "elastix_resolutions": 2,
         "ants_iterations": [10, 5, 0]}
FULL = {"pairs": 5, "dims": [2, 3], "sar_max_iterations": 100, "elastix_iterations": 256, "elastix_resolutions": 4,
        "ants_iterations": [40, 20, 0]}
# The SAR rows of one dataset: (key suffix, label prefix, network mode). 3D has the volume rows
# (3D weights) and the slice-wise rows (2D weights, one batch of slices per volume).
SAR_VARIANTS = {2: (("", "SAR", "volume"),),
                3: (("", "SAR 3D volume", "volume"), ("_slicewise", "SAR slice-wise", "slicewise"))}
OPTIONAL_PACKAGES = ("torch", "numpy", "scipy", "SimpleITK", "itk-elastix", "itk", "antspyx", "voxelmorph")


# ---------------------------------------------------------------------------------------------
# Pairs


def _read(name: str, label: bool = False) -> sitk.Image:
    image = sitk.ReadImage(str(DATA_DIR / name))
    return sitk.Cast(image != 0, sitk.sitkUInt8) if label else sitk.Cast(image, sitk.sitkFloat32)


def brain_pairs(ndims: int, count: int, seed: int = 0, max_displacement_mm: float = 6.0, shrink: int = 1,
                intensity_remap: bool = True) -> list[Pair]:
    """``count`` seeded pairs whose floating image (and mask) is moved by a known random B-spline.

    2D: reference = PD slice, floating = T1 slice moved (the ventricle mask belongs to both).
    3D: reference = the T1 volume, floating = the volume moved and, with ``intensity_remap``,
    randomly remapped in intensity. Pair ``k`` draws from ``np.random.default_rng((seed, ndims, k))``.
    ``shrink`` > 1 shrinks the images first (for fast tests).
    """
    if ndims == 2:
        reference, base, mask = _read("brain_pd.nrrd"), _read("brain_t1.nrrd"), _read("brain_ventricles.nrrd", True)
    elif ndims == 3:
        base, mask = _read("brain3d_t1.nii.gz"), _read("brain3d_ventricles.nii.gz", True)
        reference = base
    else:
        raise ValueError(f"ndims must be 2 or 3, got {ndims}")
    if shrink > 1:
        reference, base, mask = (sitk.Shrink(image, [shrink] * ndims) for image in (reference, base, mask))
    pairs = []
    for index in range(count):
        rng = np.random.default_rng((seed, ndims, index))
        floating, floating_mask, _ = known_deformation(base, mask, rng, max_displacement_mm,
                                                       remap_intensity=ndims == 3 and intensity_remap)
        pairs.append(Pair(f"{ndims}D", index, reference, floating, mask, floating_mask))
    return pairs


def shrunk_pair(pair: Pair, factor: int = 2) -> Pair:
    """A smaller copy of a pair, for untimed warm-up runs."""
    shrink = lambda image: sitk.Shrink(image, [factor] * image.GetDimension())  # noqa: E731
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
    warped_mask = imageio.resample_to(pair.floating_mask, pair.reference, label=True, transform=transform)
    reference_mask = imageio.array_of(imageio.resample_to(pair.reference_mask, pair.reference, label=True))
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


def comparisons(rows: list[dict], summary: list[dict]) -> list[dict]:
    """The figures issue #4 asks for, per dataset, computed from this run's rows.

    For each SAR variant of the dataset (2D: SAR; 3D: SAR 3D volume and SAR slice-wise): time
    ratio = mean seconds of Elastix over mean seconds of that SAR (finetuned); Dice differences =
    that SAR (finetuned) minus Elastix, ANTs, the same network without finetuning (what finetuning
    adds) and SAR-NoSeg of the same mode (what the segmentation terms add), paired by pair, mean ±
    sd over the pairs both ran.
    """
    by_key = {(s["dataset"], s["method"]): s for s in summary}
    results = []
    for dataset in dict.fromkeys(s["dataset"] for s in summary):
        for suffix, name, _ in SAR_VARIANTS[int(dataset.rstrip("D"))]:
            sar_key, sar_name = f"sar{suffix}", f"{name} (finetuned)"
            if (dataset, sar_key) not in by_key:
                continue
            others = [("elastix", "Elastix"), ("ants", "ANTs"), (f"sar_noft{suffix}", f"{name} (no finetuning)"),
                      (f"sar_noseg{suffix}", name.replace("SAR", "SAR-NoSeg"))]
            sar = by_key[(dataset, sar_key)]
            elastix = by_key.get((dataset, "elastix"))
            entry = {"dataset": dataset, "name": f"time(Elastix) / time({sar_name})", "kind": "ratio"}
            if _ran(sar) and _ran(elastix) and sar["seconds"]["mean"]:
                entry.update(value=elastix["seconds"]["mean"] / sar["seconds"]["mean"])
            else:
                entry.update(value=None, note=_why_not(sar, sar_name, elastix, "Elastix"))
            results.append(entry)
            for other_key, other_name in others:
                entry = {"dataset": dataset, "name": f"Dice({sar_name}) − Dice({other_name})", "kind": "difference"}
                differences = _paired(rows, dataset, sar_key, other_key)
                if differences:
                    entry.update(_mean_sd(differences), value=float(np.mean(differences)))
                else:
                    entry.update(value=None, note=_why_not(sar, sar_name, by_key.get((dataset, other_key)), other_name))
                results.append(entry)
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


def markdown_comparisons(entries: list[dict], dataset: str) -> str:
    lines = ["| comparison | value |", "|---|---|"]
    for entry in entries:
        if entry["dataset"] != dataset:
            continue
        if entry["value"] is None:
            value = f"n/a ({entry.get('note', '')})"
        elif entry["kind"] == "ratio":
            value = f"{entry['value']:.2f}×"
        else:
            value = f"{entry['mean']:+.3f} ± {entry['sd']:.3f} (n = {entry['n']})"
        lines.append(f"| {entry['name']} | {value} |")
    return "\n".join(lines)


DATASET_TITLES = {
    "2D": "2D: BrainWeb PD slice (reference) and T1 slice moved by a random known B-spline (floating)",
    "3D": "3D: T1 volume (reference) and the volume moved by a random known B-spline, intensity-remapped (floating)",
}


def render_markdown(results: dict) -> str:
    machine = results["machine"]
    packages = ", ".join(f"{name} {version}" for name, version in machine["packages"].items())
    lines = ["# SARRegistration brain benchmark", "",
             f"Command: `{results['command']}`", "",
             f"Machine: {machine['cpu']} — {machine['cpu_count']} CPU cores, {machine['platform']}, "
             f"Python {machine['python']}; torch {machine['torch']} ({machine['torch_threads']} threads), "
             f"device {machine['device']}; ITK/ANTs threads {machine['itk_threads']}.", "",
             f"Packages: {packages}.", "",
             f"Date: {results['date']}. Settings: " + ", ".join(f"{k} = {v}" for k, v in results["settings"].items())
             + ".", "",
             "Dice, HD95 and MAD compare the reference mask with the floating mask warped (nearest neighbour) "
             "through each method's field on the reference grid; folded (%) is the share of reference voxels "
             "with a non-positive Jacobian determinant; seconds are each method's registration call only. "
             "mean ± sample sd over pairs."]
    for dataset in dict.fromkeys(s["dataset"] for s in results["summary"]):
        pairs = max((s["pairs"] for s in results["summary"] if s["dataset"] == dataset), default=0)
        lines += ["", f"## {DATASET_TITLES.get(dataset, dataset)} — {results['settings'].get('pairs', pairs)} pairs",
                  "", markdown_table(results["summary"], dataset), "", "### Comparisons", "",
                  markdown_comparisons(results["comparisons"], dataset)]
    lines += ["", "Method settings:", ""]
    for dataset, methods in results["methods"].items():
        for key, settings in methods.items():
            lines.append(f"- {dataset} `{key}`: " + json.dumps(settings, default=str))
    return "\n".join(lines) + "\n"


def plot(summary: list[dict], path) -> Path:
    """Grouped bars per method (one colour per dataset): Dice, HD95 with sd error bars; seconds on a log axis."""
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
    axes[0].legend(title="dataset")
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


def build_methods(ndims: int, args) -> list[baselines.Method]:
    """The rows of one dataset, in table order."""
    weights = {2: (args.weights_2d, args.noseg_weights_2d, args.voxelmorph_weights_2d),
               3: (args.weights_3d, args.noseg_weights_3d, args.voxelmorph_weights_3d)}
    common = {"max_iterations": args.sar_max_iterations, "device": args.device}
    methods = [baselines.Before()]
    for suffix, name, mode in SAR_VARIANTS[ndims]:
        network_ndims = 2 if mode == "slicewise" else ndims
        sar_weights, noseg_weights, _ = weights[network_ndims]
        methods += [
            baselines.SARMethod(f"sar_noft{suffix}", f"{name} (no finetuning)", sar_weights, network_ndims,
                                finetune=False, mode=mode, **common),
            baselines.SARMethod(f"sar{suffix}", f"{name} (finetuned)", sar_weights, network_ndims, finetune=True,
                                mode=mode, **common),
            baselines.SARMethod(f"sar_noseg{suffix}", f"{name.replace('SAR', 'SAR-NoSeg')} (finetuned)",
                                noseg_weights, network_ndims, finetune=True, mode=mode, **common),
        ]
    methods += [
        baselines.ElastixBSpline(grid_spacing_mm=args.elastix_grid_spacing, resolutions=args.elastix_resolutions,
                                 iterations=args.elastix_iterations, threads=args.threads, seed=args.seed),
        baselines.AntsSyN(reg_iterations=args.ants_iterations, seed=args.seed),
    ]
    for suffix, name, mode in SAR_VARIANTS[ndims]:
        network_ndims = 2 if mode == "slicewise" else ndims
        label = name.replace("SAR", "VoxelMorph")
        methods.append(baselines.VoxelMorphMethod(weights[network_ndims][2], network_ndims, device=args.device,
                                                  mode=mode, key=f"voxelmorph{suffix}", label=label))
    if args.methods:
        methods = [m for m in methods if m.key in args.methods]
    return methods


METHOD_KEYS = ("before", "sar_noft", "sar", "sar_noseg", "sar_noft_slicewise", "sar_slicewise", "sar_noseg_slicewise",
               "elastix", "ants", "voxelmorph", "voxelmorph_slicewise")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--pairs", type=int, help=f"pairs per dataset (default {FULL['pairs']}, --quick {QUICK['pairs']})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random deformations (and of Elastix/ANTs sampling)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 pair, 2D only, few iterations for SAR finetuning, Elastix and ANTs")
    parser.add_argument("--dims", type=int, nargs="+", choices=(2, 3), help="datasets (default 2 3, --quick 2)")
    parser.add_argument("--output-dir", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--max-displacement-mm", type=float, default=6.0,
                        help="bound of each component of the random B-spline displacement")
    parser.add_argument("--no-intensity-remap", action="store_true", help="3D: keep the floating volume's intensities")
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
    parser.add_argument("--elastix-grid-spacing", type=float, default=10.0, help="final B-spline grid spacing, mm")
    parser.add_argument("--elastix-resolutions", type=int,
                        help=f"default {FULL['elastix_resolutions']}, --quick {QUICK['elastix_resolutions']}")
    parser.add_argument("--elastix-iterations", type=int, help=f"per resolution (default {FULL['elastix_iterations']}, "
                        f"--quick {QUICK['elastix_iterations']})")
    parser.add_argument("--ants-iterations", type=int, nargs="+",
                        help=f"SyN iterations per level (default {FULL['ants_iterations']}, --quick {QUICK['ants_iterations']})")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="threads for torch, SimpleITK, Elastix and ANTs alike")
    parser.add_argument("--device", default="auto", help="torch device of SAR and VoxelMorph: auto, cpu or cuda")
    parser.add_argument("--no-warmup", action="store_true",
                        help="skip the untimed warm-up run of each method on a half-size copy of the first pair")
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def set_threads(threads: int) -> None:
    """Give every toolkit the same number of threads (ITK reads the variable when first loaded)."""
    import torch

    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def run(args, log=print) -> dict:
    set_threads(args.threads)
    rows, settings_by_dataset = [], {}
    for ndims in args.dims:
        pairs = brain_pairs(ndims, args.pairs, args.seed, args.max_displacement_mm,
                            intensity_remap=not args.no_intensity_remap)
        dataset = f"{ndims}D"
        settings_by_dataset[dataset] = {}
        for method in build_methods(ndims, args):
            log(f"{dataset} {method.label} …")
            rows += evaluate_method(method, pairs, warm_up=not args.no_warmup, log=log)
            settings_by_dataset[dataset][method.key] = method.settings()
    summary = summarise(rows)
    return {"command": "python " + shlex.join(sys.argv), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": machine_info(args.device, args.threads),
            "settings": {"pairs": args.pairs, "seed": args.seed, "dims": args.dims,
                         "max_displacement_mm": args.max_displacement_mm,
                         "3D_intensity_remap": not args.no_intensity_remap, "quick": args.quick,
                         "warm_up": not args.no_warmup},
            "methods": settings_by_dataset, "summary": summary, "comparisons": comparisons(rows, summary), "rows": rows}


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
