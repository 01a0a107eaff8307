"""The panel's decisions (SARRegistration/SARRegistrationDecisions.py) as the plain functions they are."""

from __future__ import annotations

import inspect
from dataclasses import replace

import pytest

from helpers import slicer_module_file

import SARRegistrationLib as sar
from SARRegistrationLib.instance_optimisation import OptimisationSettings


@pytest.fixture(scope="module")
def decisions():
    with slicer_module_file("SARRegistrationDecisions") as module:
        yield module


@pytest.fixture
def ready(decisions):
    """Two 3D volumes, the defaults, nothing running: Register is enabled."""
    return decisions.InputFacts((12, 32, 32), (10, 30, 30))


def test_register_is_enabled_for_inputs_that_can_succeed(decisions, ready):
    assert decisions.registerButtonState(ready) == (True, "Register the floating volume onto the reference volume.")
    # Two single slices, a slice-wise run, a full-volume run with a weights file given, IO alone.
    for facts in (replace(ready, referenceShape=(1, 64, 64), floatingShape=(1, 60, 70), mode="volume"),
                  replace(ready, mode="slicewise"),
                  replace(ready, mode="volume", weightsPath="/data/sar_3d.pt"),
                  replace(ready, mode="volume", shipped3DWeights=True, network=True),
                  replace(ready, mode="volume"),  # the engine's default: no weights given, no network
                  replace(ready, network=False, mode="volume")):
        assert decisions.registerButtonState(facts)[0], facts


@pytest.mark.parametrize("change, reason", [
    ({"running": True}, "A registration is running"),
    ({"referenceShape": None}, "Select the reference and the floating volume"),
    ({"floatingShape": None}, "Select the reference and the floating volume"),
    ({"sameVolume": True}, "must be different volumes"),
    ({"floatingShape": (0, 0, 0)}, "has no voxels"),
    ({"referenceShape": (1, 1, 32)}, "a line or a point of voxels"),
    ({"floatingShape": (1, 30, 30)}, "One volume is a single slice and the other is 3D"),
    ({"network": False, "instanceOptimisation": False}, "Turn on the network or instance optimisation"),
    ({"weightsPath": "", "instanceOptimisation": False}, "Turn on the network or instance optimisation"),
    ({"weightsPath": "/gone/sar_3d.pt", "weightsPathExists": False}, "does not exist"),
    # The full-volume mode without 3D weights would fail in the engine: it is refused up front.
    ({"mode": "volume", "network": True}, "Full-volume registration needs a 3D weights file"),
])
def test_register_is_disabled_for_inputs_that_would_fail(decisions, ready, change, reason):
    enabled, tooltip = decisions.registerButtonState(replace(ready, **change))
    assert not enabled and reason in tooltip


def test_the_gpu_is_offered_only_when_pytorch_sees_one(decisions):
    for cuda, gpu_enabled, says in ((None, False, "Not known yet"), (False, False, "sees no CUDA GPU"),
                                    (True, True, "CUDA GPU")):
        choices = decisions.deviceChoices(cuda)
        assert [choice.device for choice in choices] == ["auto", "cuda", "cpu"]
        assert [choice.enabled for choice in choices] == [True, gpu_enabled, True]
        assert says in choices[1].tooltip
    assert decisions.deviceAfterProbe("cuda", False) == "auto"  # no GPU after all
    assert decisions.deviceAfterProbe("cuda", None) == "cuda"  # not known yet: the choice stays
    assert decisions.deviceAfterProbe("cpu", False) == "cpu"


def test_the_accurate_preset_is_the_engines_defaults(decisions):
    """The default preset must give what the command line gives with its defaults."""
    engine = inspect.signature(sar.register).parameters
    optimisation = OptimisationSettings()
    accurate = decisions.presetSettings("accurate")
    assert decisions.engineIterations(accurate.pop("optimisationIterations")) == optimisation.iterations
    assert accurate == {
        "finetune": engine["finetune"].default, "maxIterations": engine["max_iterations"].default,
        "instanceOptimisation": engine["instance_optimisation"].default, "optimisationLevels": optimisation.levels}


def test_presets_set_their_settings_and_hand_edits_make_them_custom(decisions):
    fast = decisions.presetSettings("fast")
    accurate = decisions.presetSettings("accurate")
    assert fast["maxIterations"] < accurate["maxIterations"]
    fewest_default = min(OptimisationSettings().for_dimension(ndims).iterations for ndims in (2, 3))
    assert decisions.engineIterations(accurate["optimisationIterations"]) is None  # the engine's default
    assert fast["optimisationIterations"] * fast["optimisationLevels"] < fewest_default * accurate["optimisationLevels"]
    assert decisions.matchingPreset(fast) == "fast" and decisions.matchingPreset(accurate) == "accurate"
    assert decisions.matchingPreset({**accurate, "maxIterations": 99}) == decisions.CUSTOM_PRESET
    assert decisions.presetSettings(decisions.CUSTOM_PRESET) == {}
    fast["maxIterations"] = 1  # a copy: the preset itself is unchanged
    assert decisions.presetSettings("fast")["maxIterations"] != 1


def test_memory_estimate_and_warning(decisions):
    voxels = 512 * 512 * 300
    plain = decisions.estimatedMemoryBytes(voxels, voxels, 2)
    # The engine's measured 80 bytes per reference voxel is the floor of the estimate.
    assert plain > decisions.ENGINE_BYTES_PER_VOXEL * voxels
    assert decisions.estimatedMemoryBytes(voxels, voxels, 2, inverse=True, jacobian=True) > plain
    gib = 2 ** 30
    assert decisions.memoryWarning(plain, 64 * gib) is None
    question = decisions.memoryWarning(plain, 8 * gib)
    assert question and f"{plain / gib:.1f} GiB" in question and "8.0 GiB" in question
    assert decisions.memoryWarning(plain, None) is None  # memory unknown: no question
