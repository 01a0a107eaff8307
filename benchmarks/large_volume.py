"""Large volumes (issue #5): peak memory, time, and how fast a cancel or Ctrl-C stops a run.

    python benchmarks/large_volume.py [--sizes 256x256x100 512x512x300] [--measurements default network ...] \
        [--threads 1] [--output-dir benchmarks/results]

For each size, a CT-like pair is written to a temporary folder (int16, the floating volume the
reference shifted by a few voxels), and each measurement runs in its own fresh Python process, so
that its peak resident memory (``ru_maxrss``) is that of one user job: reading the files,
registering, and saving every output with the QA figure.

- ``default``: ``register`` with its defaults (instance optimisation from the identity, in 3D).
- ``network``: the shipped 2D network slice by slice, finetuned, then instance optimisation.
- ``cancel``: a default registration whose cancel flag is raised 0.5 s into instance optimisation;
  the latency is from raising the flag to ``RegistrationCancelled`` reaching the caller.
- ``ctrl-c``: the command line with its defaults, sent SIGINT 0.5 s after it reports instance
  optimisation; the latency is from the signal to the process having exited.

Writes ``large_volume.md``, ``large_volume.json`` and ``large_volume.png`` into ``--output-dir``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make SARRegistrationLib importable
    sys.path.insert(0, str(REPO))

from benchmarks import command_line  # noqa: E402

MEASUREMENTS = ("default", "network", "cancel", "ctrl-c")
STAGE = "instance optimisation"  # the progress message of the stage that cancel and Ctrl-C interrupt
SHIFT_VOXELS = 3


def parse_size(text: str) -> tuple[int, int, int]:
    size = tuple(int(value) for value in text.lower().split("x"))
    if len(size) != 3 or min(size) < 4:
        raise argparse.ArgumentTypeError(f"sizes are X x Y x Z voxels of at least 4, like 512x512x300; got {text!r}")
    return size


# ----------------------------------------------------------------------------------------- the pair

def write_pair(size, folder: Path) -> tuple[Path, Path]:
    """A CT-like int16 volume (body, lungs, spine, noise) of ``size`` (x, y, z), 0.7 x 0.7 x 1 mm,
    and the same volume shifted by a few voxels along x. Built slab by slab to keep memory low."""
    import numpy as np
    import SimpleITK as sitk

    nx, ny, nz = size
    y, x = np.meshgrid(np.linspace(-1, 1, ny, dtype=np.float32), np.linspace(-1, 1, nx, dtype=np.float32),
                       indexing="ij")
    body = (x / 0.9) ** 2 + (y / 0.7) ** 2 < 1
    lungs = ((np.abs(x) - 0.4) / 0.28) ** 2 + (y / 0.45) ** 2 < 1
    spine = x ** 2 + (y - 0.5) ** 2 < 0.012
    rng = np.random.default_rng(0)
    volume = np.empty((nz, ny, nx), np.int16)
    for k in range(nz):
        wobble = 0.1 * np.sin(2 * np.pi * k / max(nz, 1))
        slice_ = np.where(body, 40.0, -1000.0) + np.where(lungs & body, -840.0 * (1 + wobble), 0.0) \
            + np.where(spine, 700.0, 0.0) + rng.normal(0.0, 20.0, (ny, nx))
        volume[k] = np.clip(slice_, -1024, 3000).astype(np.int16)
    paths = folder / "reference.nrrd", folder / "floating.nrrd"
    for path, array in zip(paths, (volume, np.roll(volume, SHIFT_VOXELS, axis=2))):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((0.7, 0.7, 1.0))
        sitk.WriteImage(image, str(path))
    return paths


# ----------------------------------------------------------------------------- one measurement (child)

def peak_memory_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


def measure_registration(reference: Path, floating: Path, measurement: str, output: Path, device: str) -> dict:
    """Register and save, as a user's job does; seconds and the process's peak memory."""
    import SARRegistrationLib as sar

    model = sar.load_model(ndims=2) if measurement == "network" else None
    started = time.perf_counter()
    result = sar.register(reference, floating, model, device=device)
    registered = time.perf_counter()
    written = result.save(output)
    return {"register_seconds": registered - started, "save_seconds": time.perf_counter() - registered,
            "output_gb": sum(path.stat().st_size for path in written) / 1e9,
            "field_gb": (Path(output) / "displacement.nrrd").stat().st_size / 1e9,
            "iterations": result.metrics["iterations"], "folding_fraction": result.metrics["folding_fraction"],
            "peak_memory_gb": peak_memory_gb()}


def measure_cancel(reference: Path, floating: Path, device: str) -> dict:
    """Raise the cancel flag 0.5 s into instance optimisation; time until register() gives up."""
    import SARRegistrationLib as sar

    flag, raised_at, timers = threading.Event(), [], []

    def raise_flag():
        raised_at.append(time.perf_counter())
        flag.set()

    def progress(fraction, message):
        if message.startswith(STAGE) and not timers:
            timers.append(threading.Timer(0.5, raise_flag))
            timers[0].start()

    try:
        sar.register(reference, floating, device=device, optimisation_iterations=100000, progress=progress,
                     cancel=flag.is_set)
    except sar.RegistrationCancelled:
        return {"latency_seconds": time.perf_counter() - raised_at[0], "peak_memory_gb": peak_memory_gb()}
    raise RuntimeError("the registration ended before it was cancelled")


def measure_ctrl_c(reference: Path, floating: Path, output: Path, device: str, threads: int) -> dict:
    """Run the command line, press Ctrl-C 0.5 s into instance optimisation; time until the process has exited."""
    command = [sys.executable, "-m", "SARRegistrationLib", "register", "--reference", str(reference),
               "--floating", str(floating), "--output-dir", str(output), "--device", device,
               "--optimisation-iterations", "100000"]
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    # As from a terminal: a job started in the background of a script inherits SIGINT ignored.
    process = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, env=environment,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = b""
    while STAGE.encode() not in seen:
        chunk = process.stderr.read1(4096)
        if not chunk:
            raise RuntimeError(f"the command ended before {STAGE}: {seen.decode(errors='replace')[-500:]}")
        seen += chunk
    time.sleep(0.5)
    interrupted = time.perf_counter()
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=600)
    latency = time.perf_counter() - interrupted
    if process.returncode != 130:
        raise RuntimeError(f"the command exited with {process.returncode}, not 130 (interrupted)")
    if output.exists():
        raise RuntimeError(f"the interrupted command left {sorted(p.name for p in output.iterdir())} in {output}")
    return {"latency_seconds": latency}


def child_main(argv) -> None:
    """Entry point of the measuring process: one measurement, printed as JSON on the last line."""
    import torch

    measurement, reference, floating, output, device, threads = argv
    torch.set_num_threads(int(threads))
    reference, floating, output = Path(reference), Path(floating), Path(output)
    if measurement in ("default", "network"):
        result = measure_registration(reference, floating, measurement, output, device)
    elif measurement == "cancel":
        result = measure_cancel(reference, floating, device)
    else:
        result = measure_ctrl_c(reference, floating, output, device, int(threads))
    print(json.dumps(result))


# ----------------------------------------------------------------------------------------- the table

def run_child(measurement: str, reference: Path, floating: Path, output: Path, device: str, threads: int) -> dict:
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    completed = subprocess.run([sys.executable, __file__, "--child", measurement, str(reference), str(floating),
                                str(output), device, str(threads)], capture_output=True, text=True, env=environment)
    if completed.returncode != 0:
        return {"status": f"failed: {completed.stderr.strip().splitlines()[-1] if completed.stderr.strip() else completed.returncode}"}
    return {"status": "ok", **json.loads(completed.stdout.strip().splitlines()[-1])}


def _cell(row: dict, key: str, digits: int = 1) -> str:
    return f"{row[key]:.{digits}f}" if key in row else "—"


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "| size (voxels) | measurement | status | register (s) | save (s) | outputs (GB) | "
             "of which the field (GB) | peak memory (GB) | stops after (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['size']} ({row['voxels'] / 1e6:.1f} M) | {row['measurement']} | {row['status']} | "
                     f"{_cell(row, 'register_seconds')} | {_cell(row, 'save_seconds')} | "
                     f"{_cell(row, 'output_gb', 2)} | {_cell(row, 'field_gb', 2)} | {_cell(row, 'peak_memory_gb', 2)} | "
                     f"{_cell(row, 'latency_seconds', 2)} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    jobs = [row for row in rows if "peak_memory_gb" in row and "register_seconds" in row]
    if not jobs:
        return
    labels = [f"{row['size']}\n{row['measurement']}" for row in jobs]
    figure = Figure(figsize=(2.2 * len(jobs) + 3, 4.0), layout="constrained")
    memory_axis, time_axis = figure.subplots(1, 2)
    memory_axis.bar(labels, [row["peak_memory_gb"] for row in jobs], color="tab:blue")
    memory_axis.set_ylabel("peak resident memory (GB)")
    time_axis.bar(labels, [row["register_seconds"] + row["save_seconds"] for row in jobs], color="tab:orange")
    time_axis.set_ylabel("register + save (s)")
    figure.savefig(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=parse_size, nargs="+", default=[(256, 256, 100), (512, 512, 300)],
                        help="volumes as XxYxZ voxels")
    parser.add_argument("--measurements", nargs="+", choices=MEASUREMENTS, default=list(MEASUREMENTS))
    parser.add_argument("--threads", type=int, default=1, help="torch and ITK threads of each measuring process")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output-dir", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory(prefix="sar-large-") as scratch:
        scratch = Path(scratch)
        for size in args.sizes:
            name = "x".join(map(str, size))
            reference, floating = write_pair(size, scratch)
            for measurement in args.measurements:
                output = scratch / f"out-{name}-{measurement}"
                row = {"size": name, "voxels": size[0] * size[1] * size[2], "measurement": measurement,
                       **run_child(measurement, reference, floating, output, args.device, args.threads)}
                print(markdown([row], "").splitlines()[-1], flush=True)
                rows.append(row)

    args.output_dir.mkdir(parents=True, exist_ok=True)
    import torch

    header = "\n".join([
        "# SARRegistration: large volumes", "",
        f"Command: `{command_line(__file__, argv)}`", "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"{platform.platform()}, Python {platform.python_version()}, torch {torch.__version__}, "
        f"{args.threads} thread(s) per process, device {args.device}. "
        f"Date: {datetime.datetime.now().isoformat(timespec='seconds')}.", "",
        "Each row is one fresh process. default: register with its defaults (instance optimisation from the "
        "identity), register + save with the QA figure. network: the shipped 2D network slice by slice, "
        "finetuned, then instance optimisation. cancel: cancel flag raised 0.5 s into instance optimisation. "
        "ctrl-c: the command line with its defaults sent SIGINT 0.5 s into instance optimisation. Peak memory "
        "is the process's maximum resident set."])
    table = markdown(rows, header)
    (args.output_dir / "large_volume.md").write_text(table)
    (args.output_dir / "large_volume.json").write_text(json.dumps(rows, indent=2) + "\n")
    plot(rows, args.output_dir / "large_volume.png")
    print(table)
    return 0 if all(row["status"] == "ok" for row in rows) else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(sys.argv[2:])
    else:
        sys.exit(main())
