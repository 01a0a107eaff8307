"""Tests of batches (SARRegistrationLib.batch and ``python -m SARRegistrationLib batch``).

The pairs are small 2D BrainWeb slices (61 x 73) registered by a few iterations of instance
optimisation at one level, so each takes a fraction of a second.
"""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from helpers import one_torch_thread, small_label, small_pair_2d  # noqa: F401  (autouse fixture)
from SARRegistrationLib import batch, cli
from SARRegistrationLib.metrics import OVERLAP_MEASURES
from SARRegistrationLib.errors import RegistrationCancelled

REPO = Path(__file__).resolve().parents[2]
FAST = ["--device", "cpu", "--optimisation-iterations", "5", "--optimisation-levels", "1", "--no-qa"]
MANIFEST = ("id,reference,floating,reference_mask,floating_mask\n"
            "masked,ref.nrrd,flo.nrrd,ref_mask.nrrd,flo_mask.nrrd\n"
            "swapped,flo.nrrd,ref.nrrd,,\n"
            "bad,ref.nrrd,missing.nrrd,,\n")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory, read_test_image):
    """pairs.csv with two good pairs (one with masks) and one whose floating file is missing."""
    folder = tmp_path_factory.mktemp("batch_inputs")
    reference, floating = small_pair_2d(read_test_image, 3)
    sitk.WriteImage(reference, str(folder / "ref.nrrd"))
    sitk.WriteImage(floating, str(folder / "flo.nrrd"))
    sitk.WriteImage(small_label(read_test_image("brain_ventricles.nrrd"), 3), str(folder / "ref_mask.nrrd"))
    sitk.WriteImage(small_label(read_test_image("sample_floating_ventricles.nrrd"), 3), str(folder / "flo_mask.nrrd"))
    (folder / "pairs.csv").write_text(MANIFEST)
    return folder / "pairs.csv"


@pytest.fixture(scope="module")
def first_run(manifest, tmp_path_factory):
    """The batch of ``manifest`` run once: its exit status and output folder (tests copy it to change it)."""
    output = tmp_path_factory.mktemp("batch_first_run") / "out"
    return cli.main(["batch", "--pairs", str(manifest), "--output-dir", str(output), *FAST]), output


def report_rows(output: Path) -> list[dict]:
    with open(output / "report.csv", newline="") as stream:
        return list(csv.DictReader(stream))


def files_in(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def without_timings(metrics: dict) -> dict:
    metrics = {key: value for key, value in metrics.items() if key not in ("seconds", "stage_seconds", "batch")}
    metrics["instance_optimisation"] = {key: value for key, value in metrics["instance_optimisation"].items()
                                        if key != "seconds"}
    return metrics


def test_a_bad_pair_is_reported_and_the_others_are_registered_as_register_does(first_run, manifest, tmp_path):
    status, output = first_run
    assert status == 1  # not every pair succeeded
    assert files_in(output) == ["labels.csv", "masked", "report.csv", "report.json", "swapped"]
    assert files_in(output / "masked") == ["displacement.nrrd", "metrics.json", "warped.nrrd",
                                           "warped_floating_mask.nrrd"]
    assert files_in(output / "swapped") == ["displacement.nrrd", "metrics.json", "warped.nrrd"]

    rows = report_rows(output)
    assert [(row["id"], row["status"]) for row in rows] == [("masked", "registered"), ("swapped", "registered"),
                                                            ("bad", "failed")]
    assert rows[2]["error"] == f"The floating image file '{manifest.parent / 'missing.nrrd'}' does not exist."
    assert rows[0]["error"] == rows[1]["error"] == ""
    masked = json.loads((output / "masked" / "metrics.json").read_text())
    assert float(rows[0]["dice_before"]) == masked["before"]["dice"]
    assert float(rows[0]["mad_mm_after"]) == masked["after"]["mad_mm"]
    assert rows[1]["dice_before"] == rows[1]["hd95_mm_after"] == ""  # no masks, no measures
    for row in rows[:2]:
        assert int(row["optimisation_iterations"]) == 5 and row["device"] == "cpu" and row["rank"] == "0"
        assert float(row["seconds"]) > 0 and float(row["folding_fraction"]) >= 0
    report = json.loads((output / "report.json").read_text())
    assert report["counts"] == {"registered": 2, "failed": 1}
    assert [row["error"] for row in report["rows"]] == [None, None, rows[2]["error"]]
    assert [row["labels"] for row in report["rows"]] == [None, None, None]  # binary masks: one structure
    assert (output / "labels.csv").read_text().splitlines() == [",".join(batch.LABEL_COLUMNS)]

    # The pair's outputs are those `register` writes for it.
    folder = manifest.parent
    alone = tmp_path / "alone"
    assert cli.main(["register", "--reference", str(folder / "ref.nrrd"), "--floating", str(folder / "flo.nrrd"),
                     "--reference-mask", str(folder / "ref_mask.nrrd"),
                     "--floating-mask", str(folder / "flo_mask.nrrd"), "--output-dir", str(alone), *FAST]) == 0
    assert files_in(alone) == files_in(output / "masked")
    for name in ("warped.nrrd", "displacement.nrrd", "warped_floating_mask.nrrd"):
        np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(alone / name))),
                                      sitk.GetArrayFromImage(sitk.ReadImage(str(output / "masked" / name))))
    assert without_timings(json.loads((alone / "metrics.json").read_text())) == without_timings(masked)


def test_a_rerun_redoes_only_what_is_not_done(first_run, manifest, tmp_path, monkeypatch):
    """Complete pairs are skipped; an incomplete folder, or other options, are registered again."""
    output = tmp_path / "out"
    shutil.copytree(first_run[1], output)
    registered = []
    engine_register = batch.register
    monkeypatch.setattr(batch, "register", lambda reference, floating, *args, **kwargs: (
        registered.append(Path(floating).name), engine_register(reference, floating, *args, **kwargs))[1])
    command = ["batch", "--pairs", str(manifest), "--output-dir", str(output), *FAST]
    before = {path: path.stat().st_mtime_ns for path in output.glob("*/*")}

    assert cli.main(command) == 1
    assert registered == ["missing.nrrd"]  # only the bad pair is tried again
    rows = report_rows(output)
    assert [row["status"] for row in rows] == ["skipped", "skipped", "failed"]
    assert rows[0]["dice_after"] == report_rows(first_run[1])[0]["dice_after"]  # read back from the pair's folder
    assert {path: path.stat().st_mtime_ns for path in output.glob("*/*")} == before

    (output / "masked" / "warped.nrrd").unlink()
    registered.clear()
    assert cli.main(command) == 1
    assert registered == ["flo.nrrd", "missing.nrrd"]
    assert [row["status"] for row in report_rows(output)] == ["registered", "skipped", "failed"]
    assert (output / "masked" / "warped.nrrd").is_file()

    registered.clear()
    assert cli.main([*command, "--optimisation-iterations", "6"]) == 1
    assert registered == ["flo.nrrd", "ref.nrrd", "missing.nrrd"]


def test_label_maps_are_reported_label_by_label(read_test_image, tmp_path):
    """Masks with two labels (the ventricles split at a column): labels.csv has a row per label of
    each pair, with the measures of its metrics.json; report.json's rows hold them too."""
    reference, floating = small_pair_2d(read_test_image, 3)
    for name, image in (("ref.nrrd", reference), ("flo.nrrd", floating)):
        sitk.WriteImage(image, str(tmp_path / name))
    for name, source in (("ref_labels.nrrd", "brain_ventricles.nrrd"), ("flo_labels.nrrd", "sample_floating_ventricles.nrrd")):
        labels = sitk.GetArrayFromImage(small_label(read_test_image(source), 3)).astype(np.uint8)
        labels[:, 26:] *= 2
        image = sitk.GetImageFromArray(labels)
        image.CopyInformation(reference)
        sitk.WriteImage(image, str(tmp_path / name))
    (tmp_path / "pairs.csv").write_text("id,reference,floating,reference_mask,floating_mask\n"
                                        "a,ref.nrrd,flo.nrrd,ref_labels.nrrd,flo_labels.nrrd\n"
                                        "b,flo.nrrd,ref.nrrd,flo_labels.nrrd,ref_labels.nrrd\n")
    output = tmp_path / "out"
    assert cli.main(["batch", "--pairs", str(tmp_path / "pairs.csv"), "--output-dir", str(output), *FAST]) == 0
    with open(output / "labels.csv", newline="") as stream:
        table = list(csv.DictReader(stream))
    assert [(row["id"], row["label"]) for row in table] == [("a", "1"), ("a", "2"), ("b", "1"), ("b", "2")]
    report = json.loads((output / "report.json").read_text())["rows"]
    for row in table:
        metrics = json.loads((output / row["id"] / "metrics.json").read_text())
        for name in OVERLAP_MEASURES:
            for when in ("before", "after"):
                assert float(row[f"{name}_{when}"]) == metrics[when]["labels"][row["label"]][name]
        by_id = next(entry for entry in report if entry["id"] == row["id"])
        assert by_id["labels"][row["label"]]["dice_after"] == float(row["dice_after"])
    assert "labels" not in report_rows(output)[0]  # report.csv keeps one row per pair, the means


def test_ctrl_c_keeps_the_finished_pairs_and_a_rerun_does_the_rest(manifest, tmp_path, monkeypatch, capsys):
    output = tmp_path / "out"
    engine_register = batch.register

    def interrupted_on_the_second_pair(reference, floating, *args, **kwargs):
        if Path(reference).name == "flo.nrrd":
            raise KeyboardInterrupt
        return engine_register(reference, floating, *args, **kwargs)

    monkeypatch.setattr(batch, "register", interrupted_on_the_second_pair)
    command = ["batch", "--pairs", str(manifest), "--output-dir", str(output), *FAST]
    assert cli.main(command) == 130
    assert "interrupted: the pairs that finished are intact" in capsys.readouterr().err
    assert [row["status"] for row in report_rows(output)] == ["registered", "interrupted", "not started"]
    assert files_in(output) == ["labels.csv", "masked", "report.csv", "report.json"]

    monkeypatch.setattr(batch, "register", engine_register)
    assert cli.main(command) == 1
    assert [row["status"] for row in report_rows(output)] == ["skipped", "registered", "failed"]


def test_cancel_stops_the_batch_after_writing_the_report(manifest, tmp_path):
    output = tmp_path / "out"
    progress = []
    with pytest.raises(RegistrationCancelled, match="1 of 3 pairs are done"):
        batch.run_batch(batch.read_pairs(manifest), output, device="cpu", optimisation_iterations=5,
                        optimisation_levels=1, qa_figure=False, progress=lambda f, m: progress.append((f, m)),
                        cancel=lambda: bool(progress) and progress[-1][1].endswith("done"))
    assert [row["status"] for row in report_rows(output)] == ["registered", "not started", "not started"]
    fractions = [fraction for fraction, _ in progress]
    assert fractions == sorted(fractions) and progress[-1] == (1.0, "done")
    assert any(message.startswith("masked (1/3): instance optimisation") for _, message in progress)


def test_bad_images_fail_alone(manifest, tmp_path):
    folder = tmp_path / "inputs"
    folder.mkdir()
    nan = sitk.ReadImage(str(manifest.parent / "flo.nrrd"))
    nan[3, 4] = float("nan")
    sitk.WriteImage(nan, str(folder / "nan.nrrd"))
    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(0).random((8, 8, 8), np.float32)),
                    str(folder / "volume.nrrd"))
    reference = manifest.parent / "ref.nrrd"
    (folder / "pairs.csv").write_text(f"reference,floating\n{reference},nan.nrrd\n{reference},volume.nrrd\n")
    rows = batch.run_batch(batch.read_pairs(folder / "pairs.csv"), tmp_path / "out", device="cpu")
    assert [(row["id"], row["status"]) for row in rows] == [("nan", "failed"), ("volume", "failed")]
    assert rows[0]["error"] == "The floating image has 1 NaN or infinite voxels; fill or mask them before registering."
    assert rows[1]["error"] == "The reference is 2D but the floating image is 3D; both must be 2D or both 3D."
    assert not batch.succeeded(rows)
    assert files_in(tmp_path / "out") == ["labels.csv", "report.csv", "report.json"]


@pytest.mark.parametrize("manifest_text, message", [
    ("id,reference,floating\na,r.nrrd,f.nrrd\nA,r.nrrd,g.nrrd\n",
     "line 2 of pairs.csv and line 3 of pairs.csv both have the id 'A'"),
    ("reference,floating\nr.nrrd,one/t1.nii.gz\nr.nrrd,two/t1.nrrd\n",
     "line 2 of pairs.csv (its floating file's name, as it has no id) and line 3 of pairs.csv (its floating "
     "file's name, as it has no id) both have the id 't1'"),
    ("id,reference,floating\n../up,r.nrrd,f.nrrd\n", "The id '../up' of line 2 of pairs.csv cannot name an output"),
    ("id,reference,floating\nreport.csv,r.nrrd,f.nrrd\n", "cannot name an output folder"),
    ("reference,flaoting\nr.nrrd,f.nrrd\n", "pairs.csv has the unknown column(s) 'flaoting'"),
    ("id,reference\na,r.nrrd\n", "pairs.csv has no floating column"),
    ("reference,floating\nr.nrrd,\n", "line 2 of pairs.csv gives no floating image"),
    ("reference,floating\nr.nrrd,f.nrrd,extra\n", "line 2 of pairs.csv has 3 fields but the header names 2"),
    ("reference,floating\n,\n", "lists no pairs"),
    ("", "pairs.csv has no header line"),
])
def test_bad_manifests_are_refused_before_any_work(tmp_path, capsys, manifest_text, message):
    (tmp_path / "pairs.csv").write_text(manifest_text)
    assert cli.main(["batch", "--pairs", str(tmp_path / "pairs.csv"), "--output-dir", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_default_ids_and_relative_paths(tmp_path):
    # A byte-order mark and spaces around names, as spreadsheets write them; an empty last row.
    (tmp_path / "pairs.csv").write_text("\ufeffreference, floating ,id\n"
                                        "r.nrrd,scans/s1.nii.gz,\n/data/r.nrrd,s2.png,x\n,,\n")
    pairs = batch.read_pairs(tmp_path / "pairs.csv")
    assert [pair.id for pair in pairs] == ["s1", "x"]
    assert pairs[0].floating == tmp_path / "scans" / "s1.nii.gz" and pairs[1].reference == Path("/data/r.nrrd")
    assert pairs[0].reference_mask is None


@pytest.mark.parametrize("separator", [";", "\t"])
def test_semicolons_or_tabs_separate_columns_as_spreadsheets_write_them(tmp_path, separator):
    # A spreadsheet set to a decimal comma saves "CSV" with semicolons; a path may hold a comma.
    rows = ["\ufeffid", "reference", "floating"], ["a", "r.nrrd", "scans/s1, repeat.nii.gz"]
    (tmp_path / "pairs.csv").write_text("".join(separator.join(cells) + "\r\n" for cells in rows))
    (pair,) = batch.read_pairs(tmp_path / "pairs.csv")
    assert pair.id == "a" and pair.floating == tmp_path / "scans" / "s1, repeat.nii.gz"


def test_two_gloo_ranks_share_the_pairs_and_rank_0_writes_every_row(manifest, tmp_path):
    folder = manifest.parent
    pairs = tmp_path / "four.csv"
    pairs.write_text("id,reference,floating\n" + "".join(
        f"p{index},{folder / reference},{folder / floating}\n"
        for index, (reference, floating) in enumerate([("ref.nrrd", "flo.nrrd"), ("flo.nrrd", "ref.nrrd")] * 2)))
    output = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "SARRegistrationLib", "batch", "--pairs", str(pairs), "--output-dir", str(output), *FAST]
    finished = subprocess.run(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                              text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert finished.stdout.count("4 pairs: 4 registered") == 1  # rank 0 alone reports
    rows = report_rows(output)
    assert [(row["id"], row["status"], row["rank"]) for row in rows] == [
        ("p0", "registered", "0"), ("p1", "registered", "1"), ("p2", "registered", "0"), ("p3", "registered", "1")]
    for row in rows:
        assert files_in(output / row["id"]) == ["displacement.nrrd", "metrics.json", "warped.nrrd"]
    assert files_in(output) == ["labels.csv", "p0", "p1", "p2", "p3", "report.csv", "report.json"]
