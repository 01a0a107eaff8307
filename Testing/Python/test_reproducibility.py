"""Same inputs, same result: twice in a row, from two threads at once, and on CPU and CUDA."""

import threading

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from helpers import one_torch_thread, perturb_head, small_pair_2d, tiny_model  # noqa: F401  (autouse fixture)
from SARRegistrationLib import load_model, register
from SARRegistrationLib.model import save_model

# CPU and CUDA kernels sum in different orders, so fields differ by rounding that finetuning can
# grow a little; this is the agreement promised in README.
CPU_CUDA_TOLERANCE_MM = 0.05


@pytest.fixture(scope="module")
def pairs(read_test_image):
    """Two different small real pairs: (PD, deformed T1) and (deformed T1, PD)."""
    reference, floating = small_pair_2d(read_test_image, 3)
    return [(reference, floating), (floating, reference)]


def _model():
    return perturb_head(tiny_model(2), bias=[0.5, -0.75], weight_std=0.02)


def _field(result) -> np.ndarray:
    return sitk.GetArrayFromImage(result.displacement)


def _register(pair, model, device="cpu"):
    return register(*pair, model, device=device, max_iterations=10, tolerance=0)


def test_same_inputs_give_the_same_field_twice(pairs, tmp_path):
    weights = save_model(_model(), tmp_path / "w.pt")
    first = _register(pairs[0], load_model(weights))
    second = _register(pairs[0], load_model(weights))
    assert first.metrics["iterations"] == second.metrics["iterations"] == 10
    np.testing.assert_array_equal(_field(first), _field(second))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(first.warped), sitk.GetArrayFromImage(second.warped))


def test_two_registrations_at_once_share_no_state(pairs):
    """A console batch may run registrations in threads with one loaded model: each must give what
    it gives alone, and the model must stay as it was."""
    model = _model()
    head_before = {name: value.clone() for name, value in model.generator.flow_head.state_dict().items()}
    alone = [_field(_register(pair, model)) for pair in pairs]

    results, errors = [None, None], []
    start = threading.Barrier(2)

    def run(index):
        try:
            start.wait()
            results[index] = _field(_register(pairs[index], model))
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert not errors
    for together, by_itself in zip(results, alone):
        np.testing.assert_allclose(together, by_itself, atol=1e-9)
    assert not np.allclose(alone[0], alone[1])  # different pairs, so a mix-up would show
    for name, value in model.generator.flow_head.state_dict().items():
        assert torch.equal(value, head_before[name])


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="no CUDA GPU on this machine: CPU/CUDA parity is checked where one is present")
def test_cpu_and_cuda_fields_agree(pairs):
    cpu = _field(_register(pairs[0], _model(), device="cpu"))
    cuda = _field(_register(pairs[0], _model(), device="cuda"))
    assert np.abs(cpu).max() > 0.1  # a real field, not zero on both
    assert np.abs(cpu - cuda).max() < CPU_CUDA_TOLERANCE_MM
