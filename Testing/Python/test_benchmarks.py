"""The brain benchmark's own measuring code on one tiny 2D pair (benchmarks/brain_benchmark.py).

Needs neither itk-elastix, antspyx nor voxelmorph: their absence is simulated, and must give a
"not run: <package> not installed" row instead of an error.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import one_torch_thread, tiny_model  # noqa: F401 - one_torch_thread is an autouse fixture

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import baselines, brain_benchmark as bench  # noqa: E402
from SARRegistrationLib.model import save_model  # noqa: E402

ROW_KEYS = {"dataset", "pair", "method", "label", "status", "dice", "hd95_mm", "mad_mm", "folded_percent", "seconds"}


@pytest.fixture(scope="module")
def tiny_pair():
    pairs = bench.brain_pairs(2, 1, seed=0, max_displacement_mm=4.0, shrink=4)  # 45 x 54 voxels
    assert len(pairs) == 1
    return pairs


@pytest.fixture
def tiny_weights(tmp_path):
    return save_model(tiny_model(2, working_size=32), tmp_path / "tiny_2d.pt")


def test_pairs_are_known_deformations_of_the_floating_image(tiny_pair):
    pair = tiny_pair[0]
    assert pair.reference.GetSize() == pair.floating.GetSize() == pair.floating_mask.GetSize()
    reference_mask = bench.imageio.array_of(pair.reference_mask)
    floating_mask = bench.imageio.array_of(pair.floating_mask)
    assert reference_mask.any() and floating_mask.any()
    # Moved, so the masks overlap imperfectly before registration; seeded, so the same every time.
    assert not np.array_equal(reference_mask, floating_mask)
    again = bench.brain_pairs(2, 1, seed=0, max_displacement_mm=4.0, shrink=4)[0]
    assert np.array_equal(bench.imageio.array_of(again.floating), bench.imageio.array_of(pair.floating))


def test_before_and_sar_rows(tiny_pair, tiny_weights):
    before = bench.evaluate_method(baselines.Before(), tiny_pair, log=lambda message: None)
    sar = bench.evaluate_method(baselines.SARMethod("sar", "SAR (finetuned)", tiny_weights, 2, max_iterations=2,
                                                    device="cpu"), tiny_pair, log=lambda message: None)
    for rows, key in ((before, "before"), (sar, "sar")):
        assert len(rows) == 1
        row = rows[0]
        assert ROW_KEYS <= set(row) and row["status"] == "ok" and row["method"] == key and row["pair"] == 0
        assert 0.0 <= row["dice"] <= 1.0 and row["hd95_mm"] >= 0.0 and row["mad_mm"] >= 0.0
        assert 0.0 <= row["folded_percent"] <= 100.0
    # "before" is the identity: Dice of the moved mask itself, nothing folded, nothing timed.
    pair = tiny_pair[0]
    expected = bench.metrics.dice(bench.imageio.array_of(pair.reference_mask), bench.imageio.array_of(pair.floating_mask))
    assert before[0]["dice"] == pytest.approx(expected)
    assert before[0]["folded_percent"] == 0.0 and before[0]["seconds"] is None
    assert sar[0]["seconds"] > 0 and sar[0]["extras"]["iterations"] >= 1


def test_missing_weights_and_packages_give_not_run_rows(tiny_pair, tmp_path, monkeypatch):
    for module in ("itk", "ants", "voxelmorph"):
        monkeypatch.setitem(sys.modules, module, None)  # "import itk" now raises ImportError
    quiet = {"log": lambda message: None}
    missing = tmp_path / "absent.pt"
    rows = [bench.evaluate_method(method, tiny_pair, **quiet)[0] for method in (
        baselines.SARMethod("sar_noseg", "SAR-NoSeg", missing, 2),
        baselines.ElastixBSpline(), baselines.AntsSyN(), baselines.VoxelMorphMethod(missing, 2))]
    assert rows[0]["status"].startswith("not run: weights missing")
    assert [row["status"] for row in rows[1:]] == ["not run: itk-elastix not installed", "not run: antspyx not installed",
                                                  "not run: voxelmorph not installed"]
    assert all(row["pair"] is None and "dice" not in row for row in rows)


def test_tables_plot_and_json_are_written(tiny_pair, tiny_weights, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "itk", None)
    quiet = {"log": lambda message: None}
    rows = []
    for method in (baselines.Before(),
                   baselines.SARMethod("sar_noft", "SAR (no finetuning)", tiny_weights, 2, finetune=False, device="cpu"),
                   baselines.SARMethod("sar", "SAR (finetuned)", tiny_weights, 2, max_iterations=2, device="cpu"),
                   baselines.ElastixBSpline()):
        rows += bench.evaluate_method(method, tiny_pair, warm_up=False, **quiet)
    summary = bench.summarise(rows)
    results = {"command": "python benchmarks/brain_benchmark.py --test", "date": "today",
               "machine": bench.machine_info("cpu"), "settings": {"pairs": 1}, "methods": {"2D": {}},
               "summary": summary, "comparisons": bench.comparisons(rows, summary), "rows": rows}
    paths = bench.write_outputs(results, tmp_path / "out")
    assert all(path.is_file() and path.stat().st_size > 0 for path in paths.values())
    markdown = paths["markdown"].read_text()
    assert "| SAR (finetuned) | ok | 1 |" in markdown and "not run: itk-elastix not installed" in markdown
    assert "Dice(SAR (finetuned)) − Dice(SAR (no finetuning))" in markdown
    assert "time(Elastix) / time(SAR (finetuned))" in markdown and "CPU cores" in markdown
    saved = json.loads(paths["json"].read_text())
    assert [entry["method"] for entry in saved["summary"]] == ["before", "sar_noft", "sar", "elastix"]
    dice = {entry["method"]: entry["dice"]["mean"] for entry in saved["summary"] if entry["pairs"]}
    difference = next(c for c in saved["comparisons"] if c["name"].endswith("Dice(SAR (no finetuning))"))
    assert difference["value"] == pytest.approx(dice["sar"] - dice["sar_noft"])
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_large_volume_benchmark_measures_memory_time_and_cancel(tmp_path):
    """A tiny run of benchmarks/large_volume.py: each measurement in its own process."""
    from benchmarks import large_volume

    assert large_volume.main(["--sizes", "32x24x5", "--measurements", "slicewise", "cancel",
                              "--output-dir", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "large_volume.json").read_text())
    assert [(row["measurement"], row["status"]) for row in rows] == [("slicewise", "ok"), ("cancel", "ok")]
    registration, cancel = rows
    assert registration["voxels"] == 32 * 24 * 5
    assert registration["register_seconds"] > 0 and 0.05 < registration["peak_memory_gb"] < 24
    assert 0 <= cancel["latency_seconds"] < 30
    table = (tmp_path / "large_volume.md").read_text()
    assert "| 32x24x5 (0.0 M) | slicewise | ok |" in table
    assert (tmp_path / "large_volume.png").stat().st_size > 0


def test_warm_up_runs_few_iterations_and_restores_the_setting(tiny_pair, tiny_weights, monkeypatch):
    method = baselines.SARMethod("sar", "SAR", tiny_weights, 2, max_iterations=50, device="cpu")
    method.prepare()
    seen = []
    monkeypatch.setattr(method, "run", lambda pair: seen.append(method.max_iterations))
    method.warm_up(tiny_pair[0])
    assert seen == [2] and method.max_iterations == 50


def test_synthetic_field_error_scores_zero_field_and_weights(tmp_path):
    """The 3D training check: a zero field is scored against the true fields, per component."""
    from benchmarks import synthetic_field_error

    weights = save_model(tiny_model(3, working_size=16), tmp_path / "tiny_3d.pt")
    output = tmp_path / "table.md"
    assert synthetic_field_error.main([str(weights), "--pairs", "2", "--shape", "16", "16", "16", "--threads", "1",
                                       "--output", str(output)]) == 0
    lines = output.read_text().splitlines()
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["zero field", "tiny_3d.pt"]
    pairs = synthetic_field_error.held_out_pairs(2, 777, (16, 16, 16), 8.0)
    zero = synthetic_field_error.field_errors(torch.zeros_like(pairs["displacement"]), pairs["displacement"])
    assert zero["all"] > 0 and f"{zero['all']:.3f}" in lines[2]
    perfect = synthetic_field_error.field_errors(pairs["displacement"], pairs["displacement"])
    assert perfect == {"all": 0.0, "z": 0.0, "in-plane": 0.0}
