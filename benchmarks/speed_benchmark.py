"""End-to-end speed of ``SARRegistrationLib.register`` against the issue's targets.

    python benchmarks/speed_benchmark.py [--threads 1] [--device cpu] [--repeats 3] \
        [--output-dir benchmarks/results]

Cases: a 2D 256×256 pair and a 3D 128³ pair slice by slice, both with the shipped 2D weights,
finetuned and not; and a 3D 128³ pair in volume mode with an UNTRAINED 3D model of the default
architecture (``SARModel.create(ndims=3, working_size=64)``, the working size of the 3D training
command in the README). No 3D weights are shipped, so those rows measure time only: their
registrations are meaningless, and finetuning an untrained head may run a different number of
iterations than trained weights would.

Images are the bundled brain data resampled to the case's size (2D: PD slice as reference, T1
slice as floating; 3D: the T1 volume as both), the floating image moved by a seeded random
B-spline (``deformations.known_deformation``). Seconds are the wall clock of the
``register`` call (working-grid resampling, network, finetuning, field and warp on the image
grid, output masks and metrics); each case runs once untimed first (warm-up), then ``--repeats``
times; mean ± sample sd. Loading the shipped weights is timed once on its own.

Writes ``speed.md`` (table, targets, machine), ``speed.json`` and ``speed.png`` into ``--output-dir``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make SARRegistrationLib and benchmarks importable
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

from SARRegistrationLib import imageio  # noqa: E402
from SARRegistrationLib.deformations import known_deformation  # noqa: E402

from benchmarks.brain_benchmark import DATA_DIR, WEIGHTS_DIR, machine_info, set_threads  # noqa: E402

TARGET_SECONDS = {2: 1.0, 3: 10.0}  # the issue: 2D 256² < 1 s, 3D 128³ < 10 s end to end on CPU
UNTRAINED = "untrained 3D model (timing only, untrained weights)"


def resized(name: str, size: int) -> sitk.Image:
    """A bundled image resampled to ``size`` voxels per axis over its own physical extent."""
    image = sitk.Cast(sitk.ReadImage(str(DATA_DIR / name)), sitk.sitkFloat32)
    return imageio.resample_to(image, imageio.grid_with_shape(image, [size] * image.GetDimension()))


def speed_pair(ndims: int, size: int, seed: int = 0, max_displacement_mm: float = 6.0):
    """``(reference, floating)``: the floating image moved by a seeded random B-spline."""
    if ndims == 2:
        reference, base = resized("brain_pd.nrrd", size), resized("brain_t1.nrrd", size)
    else:
        reference = base = resized("brain3d_t1.nii.gz", size)
    floating, _, _ = known_deformation(base, None, np.random.default_rng((seed, ndims)), max_displacement_mm)
    return reference, floating


def cases(args) -> list[dict]:
    """The rows of the table: image, mode, model and finetuning."""
    rows = []
    for ndims, size, mode, model in ((2, args.size_2d, "image", "shipped 2D weights"),
                                     (3, args.size_3d, "slicewise", "shipped 2D weights"),
                                     (3, args.size_3d, "volume", UNTRAINED)):
        for finetune in (False, True):
            image = f"{ndims}D {'×'.join([str(size)] * ndims)}"
            rows.append({"case": f"{image} {mode}, {'finetuned' if finetune else 'no finetuning'}",
                         "ndims": ndims, "size": size, "image": image, "mode": mode, "model": model,
                         "finetune": finetune, "target_s": TARGET_SECONDS[ndims]})
    return rows


def time_register(reference, floating, model, mode: str, finetune: bool, args) -> dict:
    """One untimed warm-up call, then ``args.repeats`` timed calls of ``register``."""
    from SARRegistrationLib.registration import register

    call = lambda: register(reference, floating, model, mode="slicewise" if mode == "slicewise" else "volume",  # noqa: E731
                            device=args.device, finetune=finetune, max_iterations=args.max_iterations)
    call()
    seconds, iterations = [], []
    for _ in range(args.repeats):
        started = time.perf_counter()
        result = call()
        seconds.append(time.perf_counter() - started)
        iterations.append(result.metrics["iterations"])
    return {"seconds": seconds, "mean_s": float(np.mean(seconds)),
            "sd_s": float(np.std(seconds, ddof=1)) if len(seconds) > 1 else 0.0, "iterations": iterations}


def run(args, log=print) -> dict:
    import torch

    from SARRegistrationLib.devices import resolve_device
    from SARRegistrationLib.model import SARModel, load_model

    set_threads(args.threads)
    device = resolve_device(args.device)
    started = time.perf_counter()
    shipped = load_model(args.weights_2d, 2, device)
    load_seconds = time.perf_counter() - started
    torch.manual_seed(args.seed)  # the untrained model's random weights, reproducibly
    untrained = SARModel.create(ndims=3, working_size=args.working_size_3d).eval()
    pairs, rows = {}, []
    for case in cases(args):
        key = (case["ndims"], case["size"])
        if key not in pairs:
            pairs[key] = speed_pair(case["ndims"], case["size"], args.seed, args.max_displacement_mm)
        model = untrained if case["model"] == UNTRAINED else shipped
        log(f"{case['case']} ({case['model']}) …")
        row = {**case, "working_size": model.working_size,
               **time_register(*pairs[key], model, case["mode"], case["finetune"], args)}
        row["meets_target"] = row["mean_s"] < row["target_s"]
        log(f"  {row['mean_s']:.2f} ± {row['sd_s']:.2f} s, iterations {row['iterations']}")
        rows.append(row)
    return {"command": "python " + shlex.join(sys.argv), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": machine_info(str(device), args.threads), "weights_2d": str(args.weights_2d),
            "load_seconds_2d": load_seconds, "settings": {"repeats": args.repeats, "seed": args.seed,
            "max_iterations": args.max_iterations, "working_size_3d": args.working_size_3d,
            "max_displacement_mm": args.max_displacement_mm}, "rows": rows}


def render_markdown(results: dict) -> str:
    machine = results["machine"]
    lines = ["# SARRegistration speed", "", f"Command: `{results['command']}`", "",
             f"Machine: {machine['cpu']} — {machine['cpu_count']} CPU cores, {machine['platform']}; "
             f"torch {machine['torch']} ({machine['torch_threads']} threads), device {machine['device']}. "
             f"Date: {results['date']}.", "",
             "Seconds: wall clock of one `SARRegistrationLib.register` call, end to end (resampling to the "
             "working grid, network, finetuning, field and warped image on the image grid, masks, metrics), "
             f"mean ± sample sd over {results['settings']['repeats']} runs after one untimed warm-up. "
             f"Finetuning stops at convergence or {results['settings']['max_iterations']} iterations. "
             f"Loading the shipped 2D weights, not included: {results['load_seconds_2d']:.2f} s.", "",
             "| case | model | working grid | finetuning iterations | seconds | target | met |",
             "|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        iterations = "—" if not row["finetune"] else ", ".join(str(n) for n in row["iterations"])
        lines.append(f"| {row['case']} | {row['model']} | ≤ {row['working_size']} per axis | {iterations} | "
                     f"{row['mean_s']:.2f} ± {row['sd_s']:.2f} | < {row['target_s']:g} s | "
                     f"{'yes' if row['meets_target'] else 'no'} |")
    lines += ["", "Targets (issue): 2D 256² under 1 s and 3D 128³ under 10 s end to end on CPU. The volume-mode rows "
              "use an untrained 3D model created in-process, because no 3D weights are shipped: timing only."]
    return "\n".join(lines) + "\n"


def plot(results: dict, path) -> Path:
    """Horizontal bars of mean seconds (sd error bars, log axis) with each row's target marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    y = np.arange(len(rows))
    figure, axis = plt.subplots(figsize=(9, 0.6 * len(rows) + 1.5))
    colours = ["tab:green" if row["meets_target"] else "tab:red" for row in rows]
    axis.barh(y, [row["mean_s"] for row in rows], xerr=[row["sd_s"] for row in rows], color=colours, capsize=3)
    axis.scatter([row["target_s"] for row in rows], y, marker="|", s=400, color="black", zorder=3)
    axis.set_yticks(y, [row["case"] + (" *" if row["model"] == UNTRAINED else "") for row in rows], fontsize=8)
    axis.invert_yaxis()
    axis.set_xscale("log")
    axis.set_xlabel(f"seconds per register call (torch threads {results['machine']['torch_threads']}, "
                    f"{results['machine']['device']})")
    axis.set_title("black tick: target; green: meets it, red: misses it; * untrained 3D model, timing only", fontsize=9)
    axis.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch and SimpleITK threads")
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda or auto")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case, after one untimed warm-up")
    parser.add_argument("--size-2d", type=int, default=256, help="2D image size per axis")
    parser.add_argument("--size-3d", type=int, default=128, help="3D image size per axis")
    parser.add_argument("--working-size-3d", type=int, default=64, help="working size of the untrained 3D model")
    parser.add_argument("--max-iterations", type=int, default=100, help="finetuning iterations at most")
    parser.add_argument("--max-displacement-mm", type=float, default=6.0, help="bound of the random B-spline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights-2d", type=Path, default=WEIGHTS_DIR / "sar_2d.pt")
    parser.add_argument("--output-dir", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    results = run(args)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    markdown = render_markdown(results)
    (args.output_dir / "speed.md").write_text(markdown)
    (args.output_dir / "speed.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    plot(results, args.output_dir / "speed.png")
    print()
    print(markdown)
    print(f"wrote {args.output_dir / 'speed.md'}, speed.json, speed.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
