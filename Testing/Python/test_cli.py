"""Tests of the command line (SARRegistrationLib.cli), run in-process, and of resumable training."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from helpers import one_torch_thread, small_label, small_pair_2d, tiny_model  # noqa: F401  (autouse fixture)
from SARRegistrationLib import cli, imageio, training
from SARRegistrationLib.datasets import SyntheticPairDataset
from SARRegistrationLib.errors import TrainingCancelled
from SARRegistrationLib.model import SARModel, load_model, read_checkpoint, save_model

REPO = Path(__file__).resolve().parents[2]
FIVE_OUTPUTS = ["displacement.nrrd", "floating_mask.nrrd", "metrics.json", "reference_mask.nrrd", "warped.nrrd"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, read_test_image):
    """A small 2D pair with masks as files, and tiny 2D weights."""
    folder = tmp_path_factory.mktemp("cli_inputs")
    reference, floating = small_pair_2d(read_test_image, 3)
    paths = {"reference": folder / "reference.nrrd", "floating": folder / "floating.nrrd",
             "reference_mask": folder / "reference_mask.nrrd", "floating_mask": folder / "floating_mask.nrrd",
             "weights": folder / "tiny_2d.pt"}
    sitk.WriteImage(reference, str(paths["reference"]))
    sitk.WriteImage(floating, str(paths["floating"]))
    sitk.WriteImage(small_label(read_test_image("brain_ventricles.nrrd"), 3), str(paths["reference_mask"]))
    sitk.WriteImage(small_label(read_test_image("sample_floating_ventricles.nrrd"), 3), str(paths["floating_mask"]))
    save_model(tiny_model(2), paths["weights"])
    return paths


def _register_args(inputs, output_dir, *extra):
    return ["register", "--reference", str(inputs["reference"]), "--floating", str(inputs["floating"]),
            "--output-dir", str(output_dir), "--weights", str(inputs["weights"]), "--device", "cpu",
            "--max-iterations", "2", *extra]


def test_register_writes_the_outputs(tmp_path, inputs, capsys):
    output = tmp_path / "result"
    assert cli.main(_register_args(inputs, output, "--no-qa")) == 0
    assert sorted(p.name for p in output.iterdir()) == FIVE_OUTPUTS
    stdout = capsys.readouterr().out
    assert "wrote" in stdout and str(output / "warped.nrrd") in stdout
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["iterations"] <= 2 and metrics["device"] == "cpu"
    assert metrics["weights"] == str(inputs["weights"])
    warped = sitk.ReadImage(str(output / "warped.nrrd"))
    assert warped.GetSize() == sitk.ReadImage(str(inputs["reference"])).GetSize()


def test_defaults_of_the_command_line_and_the_api_give_the_same_field(tmp_path, read_test_image):
    """Issue 13: a 3D pair with every default, through the command line and through register()."""
    from SARRegistrationLib import register

    volume = sitk.Cast(sitk.Shrink(read_test_image("brain3d_t1.nii.gz"), [4, 4, 2]), sitk.sitkFloat32)
    floating = sitk.Resample(volume, sitk.TranslationTransform(3, (2.0, 0.0, -3.0)), sitk.sitkLinear)
    for name, image in (("reference.nrrd", volume), ("floating.nrrd", floating)):
        sitk.WriteImage(image, str(tmp_path / name))
    assert cli.main(["register", "--reference", str(tmp_path / "reference.nrrd"), "--floating",
                     str(tmp_path / "floating.nrrd"), "--output-dir", str(tmp_path / "out"), "--no-qa"]) == 0
    by_api = register(str(tmp_path / "reference.nrrd"), str(tmp_path / "floating.nrrd"))
    by_cli = sitk.ReadImage(str(tmp_path / "out" / "displacement.nrrd"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(by_cli),
                                  sitk.GetArrayFromImage(by_api.displacement).astype(np.float32))
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["network"] is False and metrics["instance_optimisation"]["iterations"] > 0
    assert metrics == {**by_api.metrics, "seconds": metrics["seconds"], "stage_seconds": metrics["stage_seconds"],
                       "instance_optimisation": {**by_api.metrics["instance_optimisation"],
                                                 "seconds": metrics["instance_optimisation"]["seconds"]}}


def test_the_similarity_of_instance_optimisation_is_chosen_on_the_command_line(tmp_path, inputs):
    from SARRegistrationLib.instance_optimisation import SIMILARITIES

    for similarity in SIMILARITIES:
        output = tmp_path / similarity
        args = _register_args(inputs, output, "--no-qa", "--no-network", "--optimisation-similarity", similarity,
                              "--optimisation-iterations", "2")
        assert cli.main(args) == 0
        metrics = json.loads((output / "metrics.json").read_text())
        assert metrics["instance_optimisation"]["similarity"] == similarity
    with pytest.raises(SystemExit):
        cli.main(_register_args(inputs, tmp_path / "bad", "--optimisation-similarity", "ncc"))
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("option, key", [("bias-field", "bias_field"), ("equalise", "equalised")])
def test_a_switch_of_instance_optimisation_reaches_the_engine_from_the_command_line(tmp_path, inputs, option, key):
    """The bias field and the equalisation of NMI's images, each turned on and off (these MR-like
    images are not CT, so equalisation is off by default and on only when asked for)."""
    for flag, expected in ((f"--optimisation-{option}", True), (f"--no-optimisation-{option}", False)):
        output = tmp_path / flag
        args = _register_args(inputs, output, "--no-qa", "--no-network", flag, "--optimisation-iterations", "2")
        assert cli.main(args) == 0
        assert json.loads((output / "metrics.json").read_text())["instance_optimisation"][key] is expected


def test_register_with_masks_and_qa_figure(tmp_path, inputs, capsys):
    output = tmp_path / "result"
    args = _register_args(inputs, output, "--reference-mask", str(inputs["reference_mask"]),
                          "--floating-mask", str(inputs["floating_mask"]), "--no-finetune")
    assert cli.main(args) == 0
    assert sorted(p.name for p in output.iterdir()) == sorted(FIVE_OUTPUTS + ["qa.png", "warped_floating_mask.nrrd"])
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["iterations"] == 0 and set(metrics["after"]) == {"dice", "hd95_mm", "mad_mm"}
    # stdout: a summary of metrics.json, not the file again (its iterations' losses alone are hundreds of lines)
    stdout = capsys.readouterr().out.splitlines()
    assert stdout[0].startswith("registered in ") and "network, not finetuned; instance optimisation (3 levels" in stdout[0]
    dice = next(line.split() for line in stdout if line.split()[:1] == ["Dice"])
    assert dice[1:] == [f"{metrics['before']['dice']:.3f}", f"{metrics['after']['dice']:.3f}"]
    assert len(stdout) < 10


def test_the_printed_summary_lists_few_labels_and_the_worst_of_many():
    def measures(dice):
        return {"dice": dice, "hd95_mm": 1.0, "mad_mm": 0.5}

    def metrics(count):
        labels = {str(value): measures(0.5 + value / 100) for value in range(1, count + 1)}
        return {"mode": "image", "affine_prealignment": True, "network": True, "finetuned": True, "iterations": 7,
                "finetuning_declined": True, "seconds": 1.234, "folding_fraction": 0.0012, "max_displacement_mm": 9.5,
                "before": {**measures(0.4), "labels": {value: measures(0.1) for value in labels}},
                "after": {**measures(0.55), "labels": labels}}

    few = cli.summary_lines(metrics(cli.LABELS_LISTED))
    assert few[0] == "registered in 1.23 s: affine pre-alignment; network, finetuning declined (it matched worse)"
    assert few[1] == "folded voxels 0.120 %, largest displacement 9.50 mm"
    assert [line.split(":")[0].strip() for line in few if line.strip().startswith("label ")] == \
        [f"label {value}" for value in range(1, cli.LABELS_LISTED + 1)]
    many = cli.summary_lines(metrics(cli.LABELS_LISTED + 5))
    assert f"mean over {cli.LABELS_LISTED + 5} labels" in many[2]
    listed = [line for line in many if line.strip().startswith("label ")]
    assert [line.split(":")[0].strip() for line in listed] == ["label 1", "label 2", "label 3"]  # the lowest Dice
    assert listed[0].endswith("Dice 0.100 -> 0.510, HD95 1.00 -> 1.00 mm, MAD 0.50 -> 0.50 mm")


def test_a_floating_label_map_alone_is_warped_with_its_labels(tmp_path, inputs):
    floating_mask = sitk.ReadImage(str(inputs["floating_mask"]))
    labels = sitk.GetArrayFromImage(floating_mask).astype(np.uint16)
    labels[:, labels.shape[1] // 2:] *= 300  # labels 1 and 300: the warped map must keep both
    sitk.WriteImage(imageio.image_like(labels, floating_mask), str(tmp_path / "labels.nrrd"))
    output = tmp_path / "result"
    assert cli.main(["register", "--reference", str(inputs["reference"]), "--floating", str(inputs["floating"]),
                     "--floating-mask", str(tmp_path / "labels.nrrd"), "--output-dir", str(output), "--no-qa"]) == 0
    warped = sitk.ReadImage(str(output / "warped_floating_mask.nrrd"))
    assert warped.GetSize() == sitk.ReadImage(str(inputs["reference"])).GetSize()
    assert set(np.unique(sitk.GetArrayFromImage(warped)).tolist()) == {0, 1, 300}
    assert "after" not in json.loads((output / "metrics.json").read_text())  # nothing to compare it with


@pytest.mark.parametrize("stage", ["finetuning", "instance optimisation in 3D"])
def test_ctrl_c_during_a_stage_stops_at_once_and_leaves_the_outputs_as_they_were(tmp_path, inputs, stage,
                                                                                   read_test_image):
    """Ctrl-C on the command line, in the middle of a stage: exit 130 and old outputs untouched."""
    output = tmp_path / "result"
    output.mkdir()
    (output / "warped.nrrd").write_text("the previous run's output")
    if stage == "finetuning":
        args = _register_args(inputs, output, "--no-qa", "--tolerance", "0", "--no-instance-optimisation")
        args[args.index("--max-iterations") + 1] = "1000000"  # would run for minutes
        message = b"finetuning: iteration"
    else:  # the default pipeline on a volume
        volume = tmp_path / "volume.nrrd"
        sitk.WriteImage(sitk.Cast(sitk.Shrink(read_test_image("brain3d_t1.nii.gz"), [4, 4, 2]), sitk.sitkFloat32),
                        str(volume))
        args = ["register", "--reference", str(volume), "--floating", str(volume), "--output-dir", str(output),
                "--no-qa", "--optimisation-iterations", "1000000"]
        message = b"instance optimisation: level 1"
    process = subprocess.Popen([sys.executable, "-m", "SARRegistrationLib", *args],
                               cwd=REPO, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"},
                               # as from a terminal, even when the tests themselves run with SIGINT ignored
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = b""
    while message not in seen:
        chunk = process.stderr.read1(4096)
        assert chunk, f"the command ended before {stage}: {seen.decode(errors='replace')}"
        seen += chunk
    interrupted = time.perf_counter()
    process.send_signal(signal.SIGINT)
    rest = process.communicate(timeout=60)[1]
    stopped_after = time.perf_counter() - interrupted

    assert process.returncode == 130
    assert b"interrupted: nothing was written" in rest
    assert [path.name for path in output.iterdir()] == ["warped.nrrd"]
    assert (output / "warped.nrrd").read_text() == "the previous run's output"
    # The issue asks for "within a second"; benchmarks/large_volume.py measures it. A loaded CI
    # machine gets slack here, but not the minutes that the iterations left would take.
    assert stopped_after < 10.0


def test_register_needs_inputs(tmp_path, capsys):
    assert cli.main(["register", "--output-dir", str(tmp_path / "out")]) == 2
    assert "--reference and --floating" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_train_writes_weights_and_model_card(tmp_path, data_dir, capsys):
    output = tmp_path / "model" / "sar_test.pt"
    args = ["train", "--images", str(data_dir / "rat_lung_1.nrrd"), "--synthetic", "2", "--ndims", "2",
            "--shape", "32", "32", "--epoch-length", "2", "--batch-size", "2", "--feature-steps", "1",
            "--pretrain-steps", "1", "--gan-steps", "1", "--pretrain-learning-rate", "5e-4", "--device", "cpu",
            "--output", str(output)]
    assert cli.main(args) == 0
    assert "wrote" in capsys.readouterr().out
    card_path = output.with_suffix(".json")
    assert sorted(p.name for p in output.parent.iterdir()) == ["sar_test.json", "sar_test.pt"]  # checkpoint gone
    card = json.loads(card_path.read_text())
    assert card["sha256"] == hashlib.sha256(output.read_bytes()).hexdigest()
    assert card["weights_file"] == "sar_test.pt"
    assert card["steps"] == {"feature": 1, "pretrain": 1, "gan": 1}
    assert set(card["final_losses"]) == {"feature", "pretrain", "gan"}
    assert "rat_lung_1.nrrd" in card["training_data"]
    assert card["settings"]["pretrain_learning_rate"] == 5e-4
    assert "initialised_from" not in card
    model = load_model(output)  # passes the card's hash check
    assert model.ndims == 2 and model.working_size == 32


def test_train_3d_from_2d_weights(tmp_path, capsys):
    """--init-from with 2D weights trains a 3D model from their inflation; a 3D start for 2D is refused."""
    torch.manual_seed(0)
    planar = save_model(SARModel.create(2, 16), tmp_path / "planar.pt")
    output = tmp_path / "sar_3d.pt"
    common = ["--synthetic", "2", "--batch-size", "2", "--pretrain-steps", "1", "--gan-steps", "0", "--device", "cpu"]
    assert cli.main(["train", "--ndims", "3", "--shape", "16", "16", "16", "--init-from", str(planar), *common,
                     "--output", str(output)]) == 0
    card = json.loads(output.with_suffix(".json").read_text())
    assert card["initialised_from"]["file"] == "planar.pt" and card["steps"]["feature"] == 0
    assert load_model(output, ndims=3).ndims == 3
    assert cli.main(["train", "--ndims", "2", "--shape", "16", "16", "--init-from", str(output), *common,
                     "--output", str(tmp_path / "back.pt")]) == 2
    assert "3D model; a 2D model can start only" in capsys.readouterr().err
    assert not (tmp_path / "back.pt").exists()


def test_train_rejects_bad_arguments(tmp_path, capsys):
    assert cli.main(["train", "--output", str(tmp_path / "w.pt")]) == 2
    assert "error:" in capsys.readouterr().err
    assert cli.main(["train", "--synthetic", "2", "--shape", "32", "--output", str(tmp_path / "w.pt")]) == 2
    assert "--shape needs 2 numbers" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


TINY_TRAINING = dict(ndims=2, shape=(32, 32), batch_size=2, feature_steps=1, pretrain_steps=2, gan_steps=2,
                     generator_channels=(8, 16, 16, 16), discriminator_width=8, feature_channels=(8, 16),
                     checkpoint_every=1, seed=3)


def _cancel_after(steps):
    calls = []

    def cancel():
        calls.append(True)
        return len(calls) > steps

    return cancel


def test_training_resumes_where_it_was_cancelled(tmp_path, monkeypatch):
    settings = training.TrainingSettings(**TINY_TRAINING)
    dataset = SyntheticPairDataset((32, 32), 6, seed=0)
    output = tmp_path / "resumed.pt"
    checkpoint = training.checkpoint_path_for(output)

    with pytest.raises(TrainingCancelled, match="cancelled at step 3"):
        training.train(settings, dataset, output, device="cpu", show_progress=False, cancel=_cancel_after(3))
    assert not output.exists()
    state = read_checkpoint(checkpoint)
    assert state["training"]["step"] == 3
    assert [record["step"] for record in state["training"]["history"]] == [1, 2, 3]

    saved = []
    original = training._save_checkpoint

    def recording(model, optimisers, history, step, path):
        saved.append((step, [record["step"] for record in history], [record["stage"] for record in history]))
        return original(model, optimisers, history, step, path)

    monkeypatch.setattr(training, "_save_checkpoint", recording)
    resumed = training.train(settings, dataset, output, resume=True, device="cpu", show_progress=False)

    assert [step for step, _, _ in saved] == [4, 5]  # started after step 3, not from scratch
    final_step, steps, stages = saved[-1]
    assert final_step == settings.total_steps == 5
    assert steps == [1, 2, 3, 4, 5]
    assert stages == ["feature", "pretrain", "pretrain", "gan", "gan"]
    assert output.is_file() and output.with_suffix(".json").is_file() and not checkpoint.exists()

    # A resumed run ends where an uninterrupted one does.
    monkeypatch.setattr(training, "_save_checkpoint", original)
    straight = training.train(settings, dataset, tmp_path / "straight.pt", device="cpu", show_progress=False)
    for name, network in straight.networks.items():
        expected, actual = network.state_dict(), resumed.networks[name].state_dict()
        for key in expected:
            torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6, msg=f"{name}.{key}")


def test_cli_train_resume(tmp_path, monkeypatch, capsys):
    """--resume continues from the checkpoint beside --output."""
    output = tmp_path / "cli_resume.pt"
    settings = training.TrainingSettings(ndims=2, shape=(32, 32), batch_size=2, feature_steps=1, pretrain_steps=1,
                                         gan_steps=1, checkpoint_every=1, seed=0)
    from SARRegistrationLib.datasets import training_dataset

    dataset = training_dataset([], (32, 32), 2, synthetic=2, seed=0, max_displacement_mm=8.0)
    with pytest.raises(TrainingCancelled):
        training.train(settings, dataset, output, device="cpu", show_progress=False, cancel=_cancel_after(2))
    assert read_checkpoint(training.checkpoint_path_for(output))["training"]["step"] == 2

    saved = []
    original = training._save_checkpoint
    monkeypatch.setattr(training, "_save_checkpoint",
                        lambda model, optimisers, history, step, path: (saved.append((step, len(history))),
                                                                        original(model, optimisers, history, step, path)))
    args = ["train", "--synthetic", "2", "--shape", "32", "32", "--epoch-length", "2", "--batch-size", "2",
            "--feature-steps", "1", "--pretrain-steps", "1", "--gan-steps", "1", "--checkpoint-every", "1",
            "--device", "cpu", "--output", str(output), "--resume"]
    assert cli.main(args) == 0
    assert saved == [(3, 3)]
    assert not training.checkpoint_path_for(output).exists()
    load_model(output)


def test_evaluate_prints_before_and_after(tmp_path, inputs, capsys):
    rows_path = tmp_path / "rows.json"
    args = ["evaluate", "--images", str(inputs["reference"]), "--masks", str(inputs["reference_mask"]),
            "--pairs-per-image", "1", "--weights", str(inputs["weights"]), "--device", "cpu",
            "--max-iterations", "2", "--max-displacement-mm", "4", "--output", str(rows_path)]
    assert cli.main(args) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0].startswith("| |") and "Dice" in table[0] and "field error (mm)" in table[0]
    assert table[2].startswith("| before |") and table[3].startswith("| after |")
    assert len(table) == 4
    header, after = (line.strip("|").split("|") for line in (table[0], table[3]))
    columns = dict(zip((cell.strip() for cell in header), (cell.strip() for cell in after)))
    assert columns["finetuning iterations"].startswith("2.000")  # the network finetuned, at most 2
    assert columns["optimisation iterations"].startswith("120.000")  # then instance optimisation's 3 x 40
    rows = json.loads(rows_path.read_text())
    assert len(rows) == 1
    assert rows[0]["field_error_mm"]["before"] > 0
    assert np.isfinite(rows[0]["field_error_mm"]["after"])
    assert set(rows[0]["after"]) == {"dice", "hd95_mm", "mad_mm"}


def test_training_is_reproducible_from_its_seed(tmp_path):
    """Two runs with one seed give bit-identical weights; another seed gives others."""
    dataset = SyntheticPairDataset((32, 32), 6, seed=0)
    runs = [training.train(training.TrainingSettings(**{**TINY_TRAINING, "seed": seed}), dataset,
                           tmp_path / f"run{index}.pt", device="cpu", show_progress=False)
            for index, seed in enumerate((4, 4, 5))]
    first, again, other = (run.generator.state_dict() for run in runs)
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not all(torch.equal(first[key], other[key]) for key in first)


def test_progress_bar_redraws_at_most_every_refresh_interval_and_always_shows_the_end(capsys, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(cli.time, "monotonic", lambda: clock[0])
    with cli._ProgressBar("registering") as bar:
        for step in range(100):  # 100 reports within 0.099 s: one redraw, the first
            bar.update(step / 200, f"iteration {step}")
            clock[0] += 0.001
        clock[0] += cli.REFRESH_SECONDS
        bar.update(0.6, "iteration late")  # after the interval: redrawn
        bar.update(1.0, "done")  # the end: redrawn at once
        drawn = capsys.readouterr().err
    assert "iteration 0" in drawn and "iteration late" in drawn and "done" in drawn
    assert not any(f"iteration {step}" in drawn for step in range(1, 100))
