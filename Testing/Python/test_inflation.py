"""Tests of 2D -> 3D inflation (SARRegistrationLib.inflation) and of training that starts from weights."""

import json

import pytest
import torch

from helpers import TINY, one_torch_thread, tiny_model  # noqa: F401  (autouse fixture)
from SARRegistrationLib import training
from SARRegistrationLib.datasets import SyntheticPairDataset
from SARRegistrationLib.errors import WeightsError
from SARRegistrationLib.inflation import inflate_to_3d
from SARRegistrationLib.model import load_model, save_model, sha256_of
from SARRegistrationLib.training import TrainingSettings

DEPTH = 48  # deep enough that the middle slice does not see the zero padding at the ends in z


def _trained_looking_2d_model():
    """A tiny 2D model with random (not near-zero) last layer and non-trivial batch-norm statistics."""
    model = tiny_model(2, seed=4)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.generator.flow_head.weight.copy_(torch.randn(model.generator.flow_head.weight.shape, generator=generator))
        for module in model.generator.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1, generator=generator)
                module.running_var.uniform_(0.5, 1.5, generator=generator)
    return model


def _stack(image_2d):
    return image_2d[:, :, None].expand(-1, -1, DEPTH, -1, -1).contiguous()


def test_inflated_model_computes_the_2d_model_on_each_slice():
    """On a volume constant along z, the inflated generator gives the 2D field in-plane, zero along z,
    and the same fused segmentation map: the 3D model starts from what the 2D one learnt."""
    planar = _trained_looking_2d_model()
    volumetric = inflate_to_3d(planar).eval()
    torch.manual_seed(0)
    reference, floating = torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 16)
    with torch.no_grad():
        out_2d = planar.generator(reference, floating)
        out_3d = volumetric.generator(_stack(reference), _stack(floating))
        features_2d, _ = planar.generator.encode(reference, floating)
        features_3d, _ = volumetric.generator.encode(_stack(reference), _stack(floating))
    middle = DEPTH // 2
    assert out_2d.displacement.abs().max() > 0.1  # a field that is not trivially zero
    torch.testing.assert_close(out_3d.displacement[:, 1:, middle], out_2d.displacement, atol=1e-4, rtol=1e-4)
    assert torch.all(out_3d.displacement[:, 0] == 0)
    torch.testing.assert_close(features_3d[0][:, :, middle], features_2d[0], atol=1e-4, rtol=1e-4)
    assert volumetric.ndims == 3 and volumetric.working_size == planar.working_size
    assert volumetric.generator.flow_head.weight.shape[:2] == (3, TINY["generator_channels"][0])


def test_inflated_model_saves_loads_and_registers_volumes(tmp_path):
    path = save_model(inflate_to_3d(_trained_looking_2d_model(), working_size=24), tmp_path / "inflated.pt")
    model = load_model(path, ndims=3)
    assert model.ndims == 3 and model.working_size == 24
    with torch.no_grad():
        field = model.generator(torch.rand(1, 1, 8, 8, 8), torch.rand(1, 1, 8, 8, 8)).displacement
    assert field.shape == (1, 3, 8, 8, 8) and torch.isfinite(field).all()


def test_only_2d_models_with_their_own_feature_extractor_inflate():
    with pytest.raises(WeightsError, match="Only a 2D model"):
        inflate_to_3d(tiny_model(3))


def _tiny_settings(**changes):
    return TrainingSettings(**{"ndims": 3, "shape": (16, 16, 16), "batch_size": 2, "feature_steps": 3,
                               "pretrain_steps": 1, "gan_steps": 1, "generator_channels": TINY["generator_channels"],
                               "discriminator_width": TINY["discriminator_width"],
                               "feature_channels": TINY["feature_channels"], "checkpoint_every": 1, **changes})


def test_3d_training_starts_from_inflated_2d_weights(tmp_path):
    planar_path = save_model(_trained_looking_2d_model(), tmp_path / "planar.pt")
    settings = _tiny_settings(init_from=str(planar_path), pretrain_steps=0, gan_steps=0)
    model = training.train(settings, SyntheticPairDataset((16, 16, 16), 2), tmp_path / "sar_3d.pt", show_progress=False)
    expected = inflate_to_3d(load_model(planar_path), working_size=16)
    for name, network in model.networks.items():  # zero steps: exactly the inflated model
        reference = expected.networks[name].state_dict()
        assert all(torch.equal(value, reference[key]) for key, value in network.state_dict().items()), name
    card = json.loads((tmp_path / "sar_3d.json").read_text())
    assert card["initialised_from"] == {"file": "planar.pt", "sha256": sha256_of(planar_path)}
    assert card["steps"]["feature"] == 0  # the inflated feature extractor is not trained again

    trained = training.train(_tiny_settings(init_from=str(planar_path)), SyntheticPairDataset((16, 16, 16), 2),
                             tmp_path / "sar_3d_trained.pt", show_progress=False)
    assert trained.ndims == 3
    assert not torch.equal(trained.generator.flow_head.weight, model.generator.flow_head.weight)


def test_training_refuses_weights_that_cannot_start_it(tmp_path):
    volumetric_path = save_model(tiny_model(3), tmp_path / "volumetric.pt")
    with pytest.raises(WeightsError, match="3D model; a 2D model can start only"):
        training.initial_model(_tiny_settings(ndims=2, shape=(8, 8), init_from=str(volumetric_path)))
    planar_path = save_model(tiny_model(2), tmp_path / "planar.pt")
    with pytest.raises(WeightsError, match="generator channels"):
        training.initial_model(_tiny_settings(init_from=str(planar_path), generator_channels=(4, 8)))
    with pytest.raises(WeightsError, match="does not exist"):
        training.initial_model(_tiny_settings(init_from=str(tmp_path / "missing.pt")))
