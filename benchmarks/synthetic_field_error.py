"""How well 3D weights predict known fields on held-out synthetic volumes, per field component.

    python benchmarks/synthetic_field_error.py WEIGHTS.pt [WEIGHTS.pt ...] [--pairs 16] [--seed 777] \
        [--shape 48 48 48] [--max-displacement-mm 8] [--threads 2] [--output FILE.md]

The pairs are those training draws (``datasets.SyntheticPairDataset``: synthetic label-map volumes,
affine + random B-spline field, intensity changes), from a seed that training does not use, so
no weights have seen them. Each network registers them as they are, without finetuning. The
score is the mean squared error of its field in working voxels², split into the z component and
the in-plane (y, x) components. A zero field is the reference row. This is the check used to
follow a 3D training run (README, "The shipped model"): inflated 2D weights move only in-plane,
and what a 3D run adds along z shows in the z column.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make SARRegistrationLib importable
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from SARRegistrationLib.datasets import SyntheticPairDataset  # noqa: E402
from SARRegistrationLib.model import load_model  # noqa: E402

BATCH = 4


def held_out_pairs(count: int, seed: int, shape, max_displacement_mm: float) -> dict:
    """``reference``, ``floating`` ``(count, 1, *shape)`` and the true ``displacement`` ``(count, 3, *shape)``."""
    dataset = SyntheticPairDataset(tuple(shape), count, seed=seed, max_displacement_mm=max_displacement_mm)
    items = [dataset[index] for index in range(count)]
    return {name: torch.stack([item[name] for item in items]) for name in ("reference", "floating", "displacement")}


def field_errors(predicted: torch.Tensor, true: torch.Tensor) -> dict:
    """Mean squared error (voxels²): all components, z alone, in-plane (y, x) alone."""
    squared = (predicted - true) ** 2
    return {"all": float(squared.mean()), "z": float(squared[:, 0].mean()), "in-plane": float(squared[:, 1:].mean())}


def predicted_field(weights, pairs: dict) -> torch.Tensor:
    generator = load_model(weights, ndims=3).generator
    with torch.no_grad():
        return torch.cat([generator(pairs["reference"][start:start + BATCH],
                                    pairs["floating"][start:start + BATCH]).displacement
                          for start in range(0, len(pairs["reference"]), BATCH)])


def table(pairs: dict, weights_files) -> str:
    rows = {"zero field": field_errors(torch.zeros_like(pairs["displacement"]), pairs["displacement"])}
    for weights in weights_files:
        rows[Path(weights).name] = field_errors(predicted_field(weights, pairs), pairs["displacement"])
    lines = ["| weights | field error, all (voxel²) | z | in-plane (y, x) |", "|---|---|---|---|"]
    lines += [f"| {name} | {row['all']:.3f} | {row['z']:.3f} | {row['in-plane']:.3f} |" for name, row in rows.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights", nargs="+", type=Path, help="3D weights files")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--seed", type=int, default=777, help="training seeds its synthetic pairs with --seed + 1")
    parser.add_argument("--shape", type=int, nargs=3, default=[48, 48, 48])
    parser.add_argument("--max-displacement-mm", type=float, default=8.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = table(held_out_pairs(args.pairs, args.seed, args.shape, args.max_displacement_mm), args.weights)
    print(result)
    if args.output:
        args.output.write_text(result + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
