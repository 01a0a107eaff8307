"""The README's benchmark summary, one line per group, from a brain benchmark run's results.json.

    python benchmarks/summarise_results.py [benchmarks/results/results.json]

Per group: Dice before registration; the default pipeline's Dice, HD95, folding and seconds; the
best peer's (highest mean Dice) Dice, HD95 and seconds, and how many times slower it is; and the
Dice of SAR's network stages (network alone, + paper finetuning, + instance optimisation). Every
number is read from the file; the full tables are in results.md beside it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

DEFAULT_RESULTS = Path(__file__).resolve().parent / "results" / "results.json"
NETWORK_ROWS = ("sar_network", "sar_finetune", "sar_full")


def _mean(entry, metric, digits):
    value = (entry or {}).get(metric) or {}
    return "—" if value.get("mean") is None else f"{value['mean']:.{digits}f}"


def summary_table(results: dict) -> str:
    by_key = {(entry["dataset"], entry["method"]): entry for entry in results["summary"]}
    best = {comparison["dataset"]: comparison for comparison in results["comparisons"]
            if comparison["name"].startswith("SAR default vs best peer") and comparison.get("second")}
    lines = ["| group | before: Dice | default: Dice | HD95 (mm) | folded (%) | seconds | best peer | its Dice | "
             "HD95 (mm) | seconds | peer / default time | network alone | + finetuning | + instance optimisation |",
             "|---" * 14 + "|"]
    for dataset in dict.fromkeys(entry["dataset"] for entry in results["summary"]):
        default = by_key.get((dataset, "sar"))
        comparison = best.get(dataset)
        peer = by_key.get((dataset, comparison["second"])) if comparison else None
        ratio = "—" if not comparison or comparison.get("seconds_ratio") is None else f"{comparison['seconds_ratio']:.1f}×"
        cells = [dataset, _mean(by_key.get((dataset, "before")), "dice", 3), _mean(default, "dice", 3),
                 _mean(default, "hd95_mm", 2), _mean(default, "folded_percent", 3), _mean(default, "seconds", 2),
                 peer["label"] if peer else "—", _mean(peer, "dice", 3), _mean(peer, "hd95_mm", 2),
                 _mean(peer, "seconds", 2), ratio,
                 *(_mean(by_key.get((dataset, key)), "dice", 3) for key in NETWORK_ROWS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path = Path(argv[0]) if argv else DEFAULT_RESULTS
    print(summary_table(json.loads(path.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
