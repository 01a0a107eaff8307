"""How much of a difference in the brain benchmark is noise: SAR on each pair as it is and with its
floating image perturbed by Gaussian noise far below its own.

    python benchmarks/noise_floor.py [--groups 2d-same 2d-pd ...] [--methods sar sar_network sar_finetune] \
        [--sigmas 1e-5 2e-5] [--pairs 5] [--threads 1] [--output benchmarks/results/noise_floor.md]

Instance optimisation's path is a sensitive function of its inputs (see
``tune_instance_optimisation.py``): noise of 1e-5 of an image's intensity sd
(``contrast_families.with_noise``) changes no image measure a user could see, yet it can take the
optimisation along another path to another optimum. The change of a pair's Dice and HD95 under
such noise is the smallest difference between two engines, or two settings, that the benchmark
can tell from chance. The pairs are the brain benchmark's (``brain_benchmark.group_pairs``, same
seed), registered by its own rows of the keys asked for (``brain_benchmark.build_methods``;
``sar``: the default pipeline; ``sar_network``: the shipped network alone; ``sar_finetune``: the
network with the paper's finetuning) and measured by its ``measure``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make SARRegistrationLib and benchmarks importable
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from benchmarks import command_line  # noqa: E402
from benchmarks.brain_benchmark import DEFAULT_GROUPS, GROUP_KEYS, METHOD_KEYS, build_methods, group_named, \
    group_pairs, measure, parse_args, set_threads  # noqa: E402
from benchmarks.contrast_families import with_noise  # noqa: E402


SAR_KEYS = [key for key in METHOD_KEYS if key.startswith("sar")]  # the brain benchmark's SAR rows


def noise_rows(group_key: str, method_key: str, pairs: int, sigmas: list[float], seed: int = 0) -> list[dict]:
    """Each pair of the group registered by the method as it is (sigma 0) and under each noise."""
    group = group_named(group_key)
    (method,) = build_methods(group, parse_args(["--methods", method_key]))  # with the benchmark's own settings
    method.prepare()
    rows = []
    for pair in group_pairs(group, pairs, seed):
        for sigma in [0.0, *sigmas]:
            floating = with_noise(pair.floating, sigma, pair.index) if sigma else pair.floating
            row = measure(method, replace(pair, floating=floating))
            rows.append({**row, "sigma": sigma})
            print(f"  {group.name} {method_key} pair {pair.index} noise {sigma:g}: Dice {row['dice']:.3f}, "
                  f"HD95 {row['hd95_mm']:.2f} mm", flush=True)
    return rows


def table(title: str, rows: list[dict], sigmas: list[float]) -> list[str]:
    """Per pair, Dice and HD95 as it is and under each noise; then the means and largest changes."""
    columns = [0.0, *sigmas]
    lines = [f"\n**{title}**\n",
             "| pair | " + " | ".join(f"Dice, noise {s:g}" for s in columns) + " | "
             + " | ".join(f"HD95 (mm), noise {s:g}" for s in columns) + " |",
             "|---" * (2 * len(columns) + 1) + "|"]
    by = {(row["pair"], row["sigma"]): row for row in rows}
    indices = sorted({row["pair"] for row in rows})
    for index in indices:
        lines.append(f"| {index} | " + " | ".join(f"{by[index, s]['dice']:.3f}" for s in columns) + " | "
                     + " | ".join(f"{by[index, s]['hd95_mm']:.2f}" for s in columns) + " |")
    dice = np.array([[by[index, s]["dice"] for s in columns] for index in indices])
    hd95 = np.array([[by[index, s]["hd95_mm"] for s in columns] for index in indices])
    lines.append("| mean | " + " | ".join(f"{value:.3f}" for value in dice.mean(0)) + " | "
                 + " | ".join(f"{value:.2f}" for value in hd95.mean(0)) + " |")
    lines.append(f"\nLargest change of a pair's Dice under noise: {np.abs(dice[:, 1:] - dice[:, :1]).max():.3f}; "
                 f"of the group's mean Dice: {np.abs(dice.mean(0)[1:] - dice.mean(0)[0]).max():.3f}; "
                 f"of the group's mean HD95: {np.abs(hd95.mean(0)[1:] - hd95.mean(0)[0]).max():.2f} mm.")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", nargs="+", default=list(DEFAULT_GROUPS), choices=GROUP_KEYS)
    parser.add_argument("--methods", nargs="+", default=["sar"], choices=SAR_KEYS)
    parser.add_argument("--sigmas", type=float, nargs="+", default=[1e-5, 2e-5],
                        help="noise sd as a fraction of the floating image's intensity sd")
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, help="also write the tables to this markdown file")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    lines = []
    for key in args.groups:
        for method in args.methods:
            rows = noise_rows(key, method, args.pairs, args.sigmas)
            group_lines = table(f"{group_named(key).name}, {rows[0]['label']}", rows, args.sigmas)
            print("\n".join(group_lines), flush=True)
            lines += group_lines
    if args.output:
        command = command_line(__file__, argv)
        args.output.write_text(f"# The brain benchmark's noise floor\n\nCommand: `{command}`\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
