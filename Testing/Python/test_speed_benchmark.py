"""benchmarks/speed_benchmark.py on tiny images: every case timed or said not run, the table and plot written."""

import json

from benchmarks import speed_benchmark as speed


def test_speed_benchmark_writes_its_table(tmp_path):
    output = tmp_path / "speed"
    speed.main(["--size-2d", "32", "--size-3d", "16", "--repeats", "1", "--max-iterations", "3", "--threads", "1",
                "--device", "cpu", "--output-dir", str(output)])
    markdown = (output / "speed.md").read_text()
    saved = json.loads((output / "speed.json").read_text())
    expected = [f"{image}, {pipeline}" for ndims, image in ((2, "2D 32×32"), (3, "3D 16×16×16"))
                for pipeline in (*speed.PIPELINES, speed.FRESH_PROCESS, speed.NO_BIAS_FIELD[0], speed.ELASTIX)]
    assert [row["case"] for row in saved["rows"]] == expected
    assert all(f"| {case} |" in markdown for case in expected)
    timed = [row for row in saved["rows"] if row["pipeline"] != speed.ELASTIX]
    assert all(row["mean_s"] > 0 and len(row["seconds"]) == 1 for row in timed)
    fresh = [row for row in timed if "fresh command-line process" in row["pipeline"]]
    assert len(fresh) == 4
    assert all(row["process_wall_s"][0] > row["mean_s"] for row in fresh)  # a process also starts Python and torch
    # Elastix is timed where itk-elastix is installed (the benchmark environment), else said not run.
    assert all(("mean_s" in row) != ("not_run" in row) for row in saved["rows"] if row["pipeline"] == speed.ELASTIX)
    assert [row["target_s"] for row in timed] == [0.3] * 6 + [10.0] * 6
    assert "(1 threads)" in markdown
    assert (output / "speed.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
