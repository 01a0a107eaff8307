"""The brain benchmark's own code (benchmarks/brain_benchmark.py) on tiny pairs.

Needs none of the peers' packages (itk-elastix, antspyx, picsl-greedy, convexadam, voxelmorph):
their absence is simulated, and must give a "not run: <package> not installed" row instead of an
error. The convention checks of the peers run where their package is installed (the benchmark's
environment) and are skipped, with the reason, where it is not (CI).
"""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from helpers import one_torch_thread, tiny_model  # noqa: F401 - one_torch_thread is an autouse fixture

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import baselines, brain_benchmark as bench, contrast_families, convention_check  # noqa: E402
from benchmarks import deformation_families  # noqa: E402
from SARRegistrationLib import metrics  # noqa: E402
from SARRegistrationLib.fields import transform_to_displacement  # noqa: E402
from SARRegistrationLib.model import save_model  # noqa: E402

ROW_KEYS = {"dataset", "pair", "method", "label", "status", "dice", "hd95_mm", "mad_mm", "folded_percent", "seconds"}
QUIET = {"log": lambda message: None}
PEER_MODULES = {"elastix": "itk", "ants": "ants", "greedy": "picsl_greedy", "convexadam": "convexAdam"}


@pytest.fixture(scope="module")
def tiny_pair():
    pairs = bench.group_pairs(bench.group_named("2d-pd"), 1, seed=0, max_displacement_mm=4.0, shrink=4)  # 45 x 54
    assert len(pairs) == 1
    return pairs


@pytest.fixture
def tiny_weights(tmp_path):
    return save_model(tiny_model(2, working_size=32), tmp_path / "tiny_2d.pt")


def _array(image):
    return sitk.GetArrayFromImage(image)


class StillPeer(baselines.Method):
    """A stand-in peer for the tuning script: it moves nothing, in 0.5 s."""

    def run(self, pair):
        return baselines.MethodOutput(baselines.identity_field(pair.reference), 0.5)


def test_pairs_are_known_deformations_of_the_floating_image(tiny_pair):
    pair = tiny_pair[0]
    assert pair.dataset == "2D T1->PD"
    assert pair.reference.GetSize() == pair.floating.GetSize() == pair.floating_mask.GetSize()
    reference_mask, floating_mask = _array(pair.reference_mask), _array(pair.floating_mask)
    assert reference_mask.any() and floating_mask.any()
    # Moved, so the masks overlap imperfectly before registration; seeded, so the same every time.
    assert not np.array_equal(reference_mask, floating_mask)
    again = bench.group_pairs(bench.group_named("2d-pd"), 1, seed=0, max_displacement_mm=4.0, shrink=4)[0]
    assert np.array_equal(_array(again.floating), _array(pair.floating))


@pytest.mark.parametrize("first, second", [("2d-same", "2d-pd"), ("3d-same", "3d-contrast")])
def test_groups_with_one_seed_key_share_deformations_not_contrast(first, second):
    """Same seed key: the same moved masks, so the two groups differ in contrast alone."""
    a, b = (bench.group_pairs(bench.group_named(key), 1, seed=3, shrink=4)[0] for key in (first, second))
    assert np.array_equal(_array(a.floating_mask), _array(b.floating_mask))
    assert np.array_equal(_array(a.reference_mask), _array(b.reference_mask))
    differs = (lambda x, y: not np.allclose(_array(x), _array(y)))
    assert differs(a.reference, b.reference) if first.startswith("2d") else differs(a.floating, b.floating)


@pytest.mark.parametrize("key", [group.key for group in bench.GROUPS])
def test_every_group_moves_its_mask_reproducibly(key):
    group = bench.group_named(key)
    shrink = 4 if group.ndims == 2 else 2  # 3D voxels of 8 x 8 x 12 mm would hide a 6 mm motion
    pairs, again, others = (bench.group_pairs(group, 2, seed=seed, shrink=shrink) for seed in (1, 1, 2))
    for pair, same, other in zip(pairs, again, others):
        assert pair.dataset == group.name and pair.reference.GetDimension() == group.ndims
        assert np.array_equal(_array(pair.floating), _array(same.floating))
        assert not np.array_equal(_array(pair.floating_mask), _array(other.floating_mask))
        assert not np.array_equal(_array(pair.reference_mask), _array(pair.floating_mask))


def test_velocity_field_is_smooth_diffeomorphic_and_not_a_bspline():
    image = sitk.Image([60, 50], sitk.sitkFloat32)
    image.SetSpacing((2.0, 1.5))
    transform = deformation_families.velocity_field_transform(image, np.random.default_rng(0))
    field_voxels = transform_to_displacement(transform, image)
    assert metrics.folding_fraction(field_voxels) == 0.0
    field_mm = field_voxels * np.array([1.5, 2.0])[:, None, None]  # channel 0 along y (1.5 mm), 1 along x
    largest = np.abs(field_mm).max()
    assert 2.0 < largest < 6 * deformation_families.VELOCITY_SD_MM[1]
    # Free everywhere: unlike the engine's B-splines, the border moves too.
    assert np.abs(field_mm[:, 0]).max() > 0.5


def test_large_deformation_has_rotation_shift_and_large_bspline():
    image = sitk.Image([80, 80], sitk.sitkFloat32)
    transform = deformation_families.large_deformation_transform(image, np.random.default_rng(0), 20.0)
    field_voxels = transform_to_displacement(transform, image)
    assert 5.0 < np.abs(field_voxels).max() < 20.0 + 4.0 + 80 * np.deg2rad(5.0)
    assert metrics.folding_fraction(field_voxels) == 0.0


def test_t2_like_contrast_inverts_the_tissue_order(read_test_image):
    t1 = sitk.Cast(read_test_image("brain3d_t1.nii.gz"), sitk.sitkFloat32)[:, :, 28:34]
    ventricles = _array(read_test_image("brain3d_ventricles.nii.gz")[:, :, 28:34]) > 0
    t2 = _array(contrast_families.t2_like(t1, np.random.default_rng(0)))
    t1_values = _array(t1)
    means = contrast_families.tissue_class_means(t1)
    white_matter = np.abs(t1_values - means[3]) < 5
    assert t2.min() >= 0.0 and t2.max() <= 1.0
    assert t1_values[ventricles].mean() < t1_values[white_matter].mean()  # T1: CSF dark, white matter bright
    assert t2[ventricles].mean() > t2[white_matter].mean() + 0.2  # T2-like: the other way round


def test_before_and_sar_rows(tiny_pair, tiny_weights):
    before = bench.evaluate_method(baselines.Before(), tiny_pair, **QUIET)
    sar = bench.evaluate_method(baselines.SARMethod("sar_full", "SAR", tiny_weights, 2, max_iterations=2,
                                                    optimisation_iterations=2, device="cpu"), tiny_pair, **QUIET)
    alone = bench.evaluate_method(baselines.SARMethod("sar", "IO alone", None, 2, network=False,
                                                      optimisation_iterations=2, device="cpu"), tiny_pair, **QUIET)
    for rows, key in ((before, "before"), (sar, "sar_full"), (alone, "sar")):
        assert len(rows) == 1
        row = rows[0]
        assert ROW_KEYS <= set(row) and row["status"] == "ok" and row["method"] == key and row["pair"] == 0
        assert 0.0 <= row["dice"] <= 1.0 and row["hd95_mm"] >= 0.0 and row["mad_mm"] >= 0.0
        assert 0.0 <= row["folded_percent"] <= 100.0
    # "before" is the identity: Dice of the moved mask itself, nothing folded, nothing timed.
    pair = tiny_pair[0]
    expected = metrics.dice(_array(pair.reference_mask), _array(pair.floating_mask))
    assert before[0]["dice"] == pytest.approx(expected)
    assert before[0]["folded_percent"] == 0.0 and before[0]["seconds"] is None
    assert sar[0]["seconds"] > 0 and sar[0]["extras"]["iterations"] >= 1
    assert sar[0]["extras"]["instance_optimisation"] and alone[0]["extras"]["iterations"] == 0


def test_missing_weights_packages_and_engine_keywords_give_not_run_rows(tiny_pair, tmp_path, monkeypatch):
    for module in ("itk", "ants", "voxelmorph", "picsl_greedy", "convexAdam", "convexAdam.convex_adam_MIND"):
        monkeypatch.setitem(sys.modules, module, None)  # "import itk" now raises ImportError
    missing = tmp_path / "absent.pt"
    rows = [bench.evaluate_method(method, tiny_pair, **QUIET)[0] for method in (
        baselines.SARMethod("sar_noseg", "SAR-NoSeg", missing, 2),
        baselines.ElastixBSpline(), baselines.AntsSyN(), baselines.GreedyMethod(), baselines.ConvexAdamMethod(),
        baselines.VoxelMorphMethod(missing, 2))]
    assert rows[0]["status"].startswith("not run: weights missing")
    assert [row["status"] for row in rows[1:]] == [
        "not run: itk-elastix not installed", "not run: antspyx not installed", "not run: picsl-greedy not installed",
        "not run: convexadam not installed", "not run: voxelmorph not installed"]
    # An engine whose register() predates a switch a row needs: that row is not run, and says why.
    from SARRegistrationLib import registration

    monkeypatch.setattr(registration, "register", lambda reference, floating, model=None, *, mode="volume",
                        device="auto", finetune=True, max_iterations=100: None)
    old = bench.evaluate_method(baselines.SARMethod("sar", "SAR", missing, 2), tiny_pair, **QUIET)[0]
    assert old["status"] == "not run: this engine's register() has no instance_optimisation, network keyword"
    assert all(row["pair"] is None and "dice" not in row for row in rows + [old])


def test_tables_plot_and_json_are_written(tiny_pair, tiny_weights, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "itk", None)
    rows = []
    common = {"device": "cpu", "max_iterations": 2, "optimisation_iterations": 2}
    for method in (baselines.Before(), baselines.SARMethod("sar", bench.DEFAULT_LABEL, None, 2, network=False, **common),
                   *bench.sar_rows("", "SAR", tiny_weights, tiny_weights, 2, "auto", **common),
                   baselines.ElastixBSpline()):
        rows += bench.evaluate_method(method, tiny_pair, warm_up=False, **QUIET)
    summary = bench.summarise(rows)
    results = {"command": "python benchmarks/brain_benchmark.py --test", "date": "today",
               "machine": bench.machine_info("cpu"), "settings": {"pairs": 1}, "methods": {"2D T1->PD": {}},
               "summary": summary, "comparisons": bench.comparisons(rows, summary), "rows": rows}
    paths = bench.write_outputs(results, tmp_path / "out")
    assert all(path.is_file() and path.stat().st_size > 0 for path in paths.values())
    markdown = paths["markdown"].read_text()
    assert f"| {bench.DEFAULT_LABEL} | ok | 1 |" in markdown
    assert "| SAR network + paper finetuning + instance optimisation | ok | 1 |" in markdown
    assert "not run: itk-elastix not installed" in markdown and "CPU cores" in markdown
    assert "| SAR default vs best peer | n/a (no peer ran) |" in markdown and "SAR: what the network adds" in markdown
    saved = json.loads(paths["json"].read_text())
    assert [entry["method"] for entry in saved["summary"]] == ["before", "sar", "sar_network", "sar_finetune",
                                                                "sar_full", "sar_noseg", "elastix"]
    dice = {entry["method"]: entry["dice"]["mean"] for entry in saved["summary"] if entry["pairs"]}
    seconds = {entry["method"]: entry["seconds"]["mean"] for entry in saved["summary"] if entry["pairs"]}
    network = next(c for c in saved["comparisons"] if c["name"] == "SAR: what the network adds")
    assert network["value"] == pytest.approx(dice["sar_full"] - dice["sar"])
    assert network["seconds_ratio"] == pytest.approx(seconds["sar"] / seconds["sar_full"])
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_comparisons_pick_the_best_peer():
    rows = [{"dataset": "2D T1->PD", "pair": p, "method": m, "label": m, "status": "ok", "dice": d, "hd95_mm": h,
             "mad_mm": 0.0, "folded_percent": 0.0, "seconds": s}
            for p in (0, 1) for m, d, h, s in (("sar", 0.90 + p / 100, 1.0, 1.0), ("elastix", 0.80, 2.0, 4.0),
                                               ("ants", 0.85 + p / 50, 1.5, 2.0))]
    summary = bench.summarise(rows)
    best = bench.comparisons(rows, summary)[0]
    assert best["name"] == "SAR default vs best peer (ants)" and best["second"] == "ants"
    assert best["dice_difference"]["mean"] == pytest.approx(0.05 - 0.005)
    assert best["hd95_difference"]["mean"] == pytest.approx(-0.5) and best["seconds_ratio"] == pytest.approx(2.0)


def test_quick_run_writes_every_output(tmp_path, monkeypatch):
    """``--quick``: one 2D T1->PD pair, every row ok or "not run" with a reason, outputs written."""
    for module in ("itk", "ants", "picsl_greedy", "convexAdam", "voxelmorph"):
        monkeypatch.setitem(sys.modules, module, None)  # CI has no peers; here they would only add time
    assert bench.main(["--quick", "--threads", "1", "--device", "cpu", "--no-warmup",
                       "--output-dir", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "results.json").read_text())
    statuses = {entry["method"]: entry["status"] for entry in saved["summary"]}
    assert {entry["dataset"] for entry in saved["summary"]} == {"2D T1->PD"}
    assert all(statuses[key] == "ok" for key in ("before", "sar", "sar_network", "sar_finetune", "sar_full",
                                                 "sar_noseg"))
    assert statuses["greedy"] == "not run: picsl-greedy not installed"
    assert (tmp_path / "results.md").is_file() and (tmp_path / "results.png").stat().st_size > 0


@pytest.mark.parametrize("motion", convention_check.MOTIONS)
@pytest.mark.parametrize("key, ndims", [("elastix", 2), ("elastix", 3), ("ants", 2), ("ants", 3), ("greedy", 2),
                                        ("greedy", 3), ("convexadam", 3)])
def test_peer_field_convention_undoes_a_known_motion(key, ndims, motion):
    """Each peer's converted field matches a known shift (and rotation) to within half a voxel."""
    if importlib.util.find_spec(PEER_MODULES[key]) is None:
        pytest.skip(f"{PEER_MODULES[key]} is not installed (it is in the benchmark's environment, "
                    "benchmarks/requirements.txt)")
    result = convention_check.check(convention_check.peers(threads=1)[key], ndims, motion)
    assert result["median_error_voxels"] < convention_check.MAX_ERROR_VOXELS, result
    assert result["residual"] < convention_check.MAX_RESIDUAL, result
    if motion == "translation":
        assert result["median_field_mm"] == pytest.approx(convention_check.SHIFT_MM[:ndims], abs=0.5), result


def test_large_volume_benchmark_measures_memory_time_and_cancel(tmp_path):
    """A tiny run of benchmarks/large_volume.py: each measurement in its own process."""
    from benchmarks import large_volume

    assert large_volume.main(["--sizes", "32x24x5", "--measurements", "default", "cancel",
                              "--output-dir", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "large_volume.json").read_text())
    assert [(row["measurement"], row["status"]) for row in rows] == [("default", "ok"), ("cancel", "ok")]
    registration, cancel = rows
    assert registration["voxels"] == 32 * 24 * 5
    assert registration["register_seconds"] > 0 and 0.05 < registration["peak_memory_gb"] < 24
    # The field: 3 float32 components a voxel and a header, uncompressed; all outputs more than that.
    assert 12 * 32 * 24 * 5 < registration["field_gb"] * 1e9 < 12 * 32 * 24 * 5 + 4096
    assert registration["output_gb"] > registration["field_gb"]
    assert 0 <= cancel["latency_seconds"] < 30
    table = (tmp_path / "large_volume.md").read_text()
    assert "| 32x24x5 (0.0 M) | default | ok |" in table
    assert (tmp_path / "large_volume.png").stat().st_size > 0


def test_warm_up_runs_few_iterations_and_restores_the_settings(tiny_pair, tiny_weights, monkeypatch):
    method = baselines.SARMethod("sar", "SAR", tiny_weights, 2, max_iterations=50, optimisation_iterations=30,
                                 device="cpu")
    method.prepare()
    seen = []
    monkeypatch.setattr(method, "run", lambda pair: seen.append((method.max_iterations, method.optimisation_iterations)))
    method.warm_up(tiny_pair[0])
    assert seen == [(2, 2)] and (method.max_iterations, method.optimisation_iterations) == (50, 30)


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


def test_summary_table_reads_the_default_row_and_the_best_peer():
    from benchmarks import summarise_results

    rows = [{"dataset": "2D T1->PD", "pair": p, "method": m, "label": m, "status": "ok", "dice": d, "hd95_mm": h,
             "mad_mm": 0.0, "folded_percent": 0.0, "seconds": s}
            for p in (0, 1) for m, d, h, s in (("before", 0.8, 3.0, None), ("sar", 0.95, 1.0, 0.5),
                                               ("sar_full", 0.94, 1.0, 1.0), ("elastix", 0.93, 1.1, 2.0))]
    summary = bench.summarise(rows)
    table = summarise_results.summary_table({"summary": summary, "comparisons": bench.comparisons(rows, summary)})
    assert table.splitlines()[2] == ("| 2D T1->PD | 0.800 | 0.950 | 1.00 | 0.000 | 0.50 | elastix | 0.930 | 1.10 | "
                                     "2.00 | 4.0× | — | — | 0.940 |")


def test_robustness_pairs_know_their_answer_and_score_only_what_the_floating_image_covers():
    """benchmarks/robustness.py: the applied field pulls the (cropped) floating image onto the
    reference, and the scored voxels are the reference's foreground that lands inside the crop."""
    from benchmarks import robustness
    from benchmarks.tune_instance_optimisation import IMAGES_2D

    image = sitk.Shrink(sitk.Cast(sitk.ReadImage(str(IMAGES_2D[0])), sitk.sitkFloat32), [2, 2])
    mask = robustness.foreground_mask(image)
    (pair,) = robustness.pairs_of([(image, mask)], (20, 0.1, 10), 0.3, 1, seed=0)
    assert pair["floating"].GetSize()[1] == round(image.GetSize()[1] * 0.7)
    field_image = sitk.GetImageFromArray(pair["applied"], isVector=True)
    field_image.CopyInformation(pair["reference"])
    warped = sitk.Resample(pair["floating"], pair["reference"], sitk.DisplacementFieldTransform(field_image),
                           sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    scored = pair["scored"]
    foreground = _array(pair["reference_mask"]) > 0
    assert 0.3 * foreground.sum() < scored.sum() < foreground.sum()  # the crop removed part of the answer
    assert not scored[~foreground].any()
    difference = np.abs(_array(warped) - _array(pair["reference"]))[scored]
    intensity_range = float(np.ptp(_array(image)))
    # Linear interpolation twice over agrees except where it reads past the crop's edge.
    assert np.mean(difference < 1e-3 * intensity_range) > 0.95  # 0.98 here; 0.005 with the field reversed


def test_noise_far_below_the_image_keeps_its_geometry_and_type_and_is_seeded():
    """contrast_families.with_noise, the perturbation of the noise-floor measurements."""
    image = sitk.Cast(sitk.ReadImage(str(REPO / "Testing" / "Data" / "brain_t1.nrrd")), sitk.sitkFloat32)
    image.SetOrigin((3.0, -2.0))
    noisy = contrast_families.with_noise(image, 1e-5, seed=1)
    assert noisy.GetPixelID() == image.GetPixelID() and noisy.GetOrigin() == image.GetOrigin()
    change = _array(noisy) - _array(image)
    assert 0.5e-5 < change.std() / _array(image).std() < 2e-5
    assert np.array_equal(_array(contrast_families.with_noise(image, 1e-5, seed=1)), _array(noisy))
    assert not np.array_equal(_array(contrast_families.with_noise(image, 1e-5, seed=2)), _array(noisy))


def test_ct_like_volumes_put_the_soft_tissues_into_a_few_of_nmis_bins():
    """contrast_families.ct_like_volume: HU intensities, a soft-tissue structure, and after the
    engine's normalisation most voxels within a few of 32 histogram bins (what the set tests)."""
    from SARRegistrationLib.imageio import normalise_intensity

    image, mask = contrast_families.ct_like_volume((24, 32, 32), np.random.default_rng(0), spacing=(2.0, 2.0, 3.0))
    values, structure = _array(image), _array(mask) > 0
    assert image.GetSpacing() == (2.0, 2.0, 3.0) and mask.GetSpacing() == image.GetSpacing()
    assert values.min() < -900 and values.max() > 500  # air and bone
    assert 0 < structure.mean() < 0.9
    assert abs(values[structure].mean()) < 150  # a soft tissue, between air and bone
    counts, _ = np.histogram(normalise_intensity(values), bins=32, range=(0, 1))
    assert np.sort(counts)[-3:].sum() > 0.5 * values.size
    again, _ = contrast_families.ct_like_volume((24, 32, 32), np.random.default_rng(0), spacing=(2.0, 2.0, 3.0))
    assert np.array_equal(_array(again), values)


def test_tuning_takes_ct_like_volumes_in_3d_and_in_one_contrast_only(capsys, monkeypatch, tmp_path):
    from benchmarks import tune_instance_optimisation as tune

    (image, mask), = tune.tuning_images(3, 1, seed=0, intensities="ct")
    assert _array(image).min() < -900 and image.GetSize() == (64, 64, 48)
    with pytest.raises(SystemExit):
        tune.main(["--dims", "2", "3", "--intensities", "ct"])
    assert "give it with --dims 3" in capsys.readouterr().err

    text = _tuning_table_of(image, mask, "ct", monkeypatch, tmp_path)
    assert "3D synthetic, CT-like, bspline, same contrast" in text and "contrast change" not in text


def _tuning_table_of(image, mask, intensities: str, monkeypatch, tmp_path) -> str:
    """The tuning script's table for ``image`` shrunk fourfold as its only volume, with
    ``--intensities``, one B-spline pair and a still peer (no model, no registration)."""
    from benchmarks import tune_instance_optimisation as tune

    small = [(sitk.Shrink(image, [4, 4, 4]), sitk.Shrink(mask, [4, 4, 4]))]
    monkeypatch.setattr(tune, "tuning_images", lambda *args: small)
    monkeypatch.setattr(tune, "load_model", lambda **kwargs: None)
    monkeypatch.setattr(tune, "peer_method", lambda *args: StillPeer())
    output = tmp_path / f"{intensities}.md"
    tune.main(["--dims", "3", "--intensities", intensities, "--families", "bspline", "--pairs", "1",
               "--variant", "still:peer=greedy", "--output", str(output)])
    return output.read_text()


def test_ct_like_volumes_without_air_are_stored_as_ct_is_and_stay_so_when_moved(monkeypatch, tmp_path):
    """--intensities ct-no-air: fat where air was (a volume cropped inside the body), the same label
    maps and soft tissues otherwise, in whole HU (int16), moved in int16 too: so the engine's CT
    test sees CT in both images of a pair, as it would in a scanner's cropped CT."""
    from benchmarks import tune_instance_optimisation as tune
    from SARRegistrationLib.imageio import in_hounsfield_units

    (with_air, mask), = tune.tuning_images(3, 1, seed=0, intensities="ct")
    (without, same_mask), = tune.tuning_images(3, 1, seed=0, intensities="ct-no-air")
    assert -200 < _array(without).min() < -50 and np.array_equal(_array(mask), _array(same_mask))
    assert without.GetPixelID() == sitk.sitkInt16 and np.abs(_array(without) - _array(with_air)).max() > 500
    pair, = tune.known_pairs([(without, mask)], "bspline", False, 1, seed=0)
    assert pair["reference"].GetPixelID() == sitk.sitkInt16
    assert in_hounsfield_units(pair["reference"]) and in_hounsfield_units(pair["floating"])

    text = _tuning_table_of(without, mask, "ct-no-air", monkeypatch, tmp_path)
    assert "3D synthetic, CT-like without air, bspline, same contrast" in text and "contrast change" not in text


def test_tuning_variants_take_the_noise_option():
    from benchmarks.tune_instance_optimisation import parse_variant

    name, options = parse_variant("noise 1e-5:noise=1e-5,iterations=20")
    assert name == "noise 1e-5" and options["noise"] == 1e-5
    assert options["instance_optimisation"].iterations == 20


def test_tuning_variants_take_a_peer_and_score_it_like_sar():
    """tune_instance_optimisation's peer=KEY: parsed, refused when unknown, and scored by the same
    field error as SAR's rows (a peer that returns no motion scores the applied field's size)."""
    from benchmarks import tune_instance_optimisation as tune

    name, options = tune.parse_variant("Elastix:peer=elastix")
    assert name == "Elastix" and options["peer"] == "elastix"
    with pytest.raises(SystemExit, match="unknown peer"):
        tune.parse_variant("x:peer=nope")
    with pytest.raises(baselines.NotRun, match="not a peer"):
        tune.peer_method("convexadam", 2, False, 1, None)  # ConvexAdam is a 3D peer only

    image = sitk.GetImageFromArray(np.random.default_rng(0).random((24, 20)).astype(np.float32))
    image.SetSpacing((1.5, 1.0))
    mask = sitk.Cast(sitk.GetImageFromArray(np.pad(np.ones((12, 10), np.uint8), ((6, 6), (5, 5)))), sitk.sitkUInt8)
    mask.CopyInformation(image)
    pairs = tune.known_pairs([(image, mask)], "bspline", False, 1, seed=3)
    row, errors = tune.score(pairs, {"peer": "still"}, None, masks=True, peer=StillPeer())
    applied = np.linalg.norm(pairs[0]["applied"], axis=-1)
    assert applied.mean() > 0.1
    assert row["field error (mm)"] == pytest.approx(applied.mean()) and errors[0] == pytest.approx(applied.mean())
    inside = sitk.GetArrayFromImage(pairs[0]["reference_mask"]) > 0
    assert row["in the mask (mm)"] == pytest.approx(applied[inside].mean())
    assert row["folded (%)"] == 0 and 0 < row["Dice"] < 1 and row["seconds"] == 0.5


def test_a_peer_that_fails_on_a_tuning_set_is_reported_and_the_run_goes_on(monkeypatch, tmp_path):
    from benchmarks import tune_instance_optimisation as tune

    image = sitk.GetImageFromArray(np.random.default_rng(0).random((24, 20)).astype(np.float32))
    mask = sitk.Cast(image > 0.5, sitk.sitkUInt8)

    class Broken(baselines.Method):
        def run(self, pair):
            raise RuntimeError("Registration failed with error code 1")

    monkeypatch.setattr(tune, "tuning_images", lambda *args: [(image, mask)])
    monkeypatch.setattr(tune, "load_model", lambda **kwargs: None)
    monkeypatch.setattr(tune, "peer_method", lambda key, *args: Broken() if key == "ants" else StillPeer())
    output = tmp_path / "tuning.md"
    tune.main(["--dims", "2", "--families", "bspline", "--pairs", "1", "--variant", "broken:peer=ants",
               "still:peer=elastix", "--output", str(output)])
    text = output.read_text()
    assert "| still |" in text and "| broken |" not in text
    assert "Not in the table: broken: failed on a pair (RuntimeError: Registration failed with error code 1)" in text
    tune.main(["--dims", "2", "--families", "bspline", "--pairs", "1", "--variant", "broken:peer=ants",
               "--output", str(output)])  # a set where every variant failed still gets its title and its reason
    assert output.read_text().count("Not in the table: broken: failed on a pair") == 2


def test_reports_give_the_command_as_a_shell_would_rerun_it(monkeypatch):
    """benchmarks.command_line: the script under benchmarks/, its arguments quoted; [] means none."""
    from benchmarks import command_line

    assert command_line("/anywhere/benchmarks/noise_floor.py", ["--variant", "SAR default:", "--pairs", "2"]) == \
        "python benchmarks/noise_floor.py --variant 'SAR default:' --pairs 2"
    monkeypatch.setattr(sys, "argv", ["robustness.py", "--threads", "1"])
    assert command_line("robustness.py", []) == "python benchmarks/robustness.py"
    assert command_line("robustness.py") == "python benchmarks/robustness.py --threads 1"


def test_noise_floor_table_reports_the_largest_changes():
    from benchmarks import noise_floor

    rows = [{"pair": pair, "sigma": sigma, "dice": dice, "hd95_mm": hd95}
            for pair, sigma, dice, hd95 in ((0, 0.0, 0.90, 1.0), (0, 1e-5, 0.95, 1.0),
                                            (1, 0.0, 0.80, 2.0), (1, 1e-5, 0.79, 1.0))]
    lines = noise_floor.table("2D same contrast, SAR", rows, [1e-5])
    assert "| mean | 0.850 | 0.870 | 1.50 | 1.00 |" in lines
    assert lines[-1].startswith("\nLargest change of a pair's Dice under noise: 0.050; of the group's mean Dice: 0.020; "
                                "of the group's mean HD95: 0.50 mm")
