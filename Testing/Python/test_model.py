"""Tests of SARRegistrationLib.model: the weights file format, its safety checks and the model card."""

import json
import pickle

import numpy as np
import pytest
import torch

from helpers import RunsCodeOnLoad, one_torch_thread, perturb_head, tiny_model  # noqa: F401  (autouse fixture)
from SARRegistrationLib.errors import WeightsError
from SARRegistrationLib.model import CHECKPOINT_FORMAT, load_model, read_checkpoint, save_model, sha256_of


def _outputs(model, seed=1):
    generator = torch.Generator().manual_seed(seed)
    shape = (1, 1) + (16,) * model.ndims
    reference, floating = torch.rand(shape, generator=generator), torch.rand(shape, generator=generator)
    with torch.no_grad():
        out = model.generator(reference, floating)
        return (out.displacement, out.reference_mask, model.discriminator(reference),
                *model.feature_extractor(reference))


@pytest.mark.parametrize("ndims", [2, 3])
def test_save_load_round_trip_gives_identical_outputs(tmp_path, ndims):
    model = perturb_head(tiny_model(ndims, working_size=48), bias=[0.3] * ndims, weight_std=0.05)
    model.metadata["note"] = "round trip"
    path = save_model(model, tmp_path / "sub" / "w.pt")
    assert path.is_file() and sorted(p.name for p in path.parent.iterdir()) == ["w.pt"]  # no temporary left

    loaded = load_model(path, device="cpu")

    assert loaded.ndims == ndims and loaded.working_size == 48
    assert loaded.metadata["note"] == "round trip" and loaded.metadata["weights_path"] == str(path)
    for name, network in model.networks.items():
        assert network.config == loaded.networks[name].config
        expected, actual = network.state_dict(), loaded.networks[name].state_dict()
        assert expected.keys() == actual.keys()
        assert all(torch.equal(expected[key], actual[key]) for key in expected)
    for expected, actual in zip(_outputs(model), _outputs(loaded)):
        assert torch.equal(expected, actual)


def test_loaded_model_is_frozen_and_in_eval_mode(tmp_path):
    path = save_model(tiny_model(2), tmp_path / "w.pt")
    loaded = load_model(path)
    for network in loaded.networks.values():
        assert not network.training
        assert all(not p.requires_grad for p in network.parameters())


def test_missing_weights_file(tmp_path):
    path = tmp_path / "absent" / "sar_2d.pt"
    with pytest.raises(WeightsError, match=r"weights file .*absent.*sar_2d\.pt.* does not exist"):
        load_model(path)


def test_random_bytes_file_is_rejected(tmp_path):
    path = tmp_path / "random.pt"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(WeightsError, match=r"random\.pt.* is not a readable SAR weights file"):
        load_model(path)


@pytest.mark.parametrize("content", [b"", b"# not weights\n", b"garbage", b"PK\x03\x04broken zip", b"\x80\x02}q\x00."])
def test_small_non_torch_files_are_rejected(tmp_path, content):
    path = tmp_path / "w.pt"
    path.write_bytes(content)
    with pytest.raises(WeightsError, match="not a readable SAR weights file"):
        load_model(path)


@pytest.mark.parametrize("content", [b"hello, I am a text file\n", b"this is not a weights file\n"])
def test_text_files_are_weights_errors(tmp_path, content):
    path = tmp_path / "w.pt"
    path.write_bytes(content)
    with pytest.raises(WeightsError, match="not a readable SAR weights file"):
        load_model(path)


@pytest.mark.parametrize("content", [{"a": torch.zeros(2)}, [1, 2, 3], {"format": "something-else", "version": 1}])
def test_torch_files_without_our_format_are_rejected(tmp_path, content):
    path = tmp_path / "plain.pt"
    torch.save(content, path)
    with pytest.raises(WeightsError, match="is a PyTorch file but not a SAR weights file"):
        load_model(path)


def test_other_format_version_is_rejected(tmp_path):
    state = tiny_model(2).state()
    state["version"] = 99
    path = tmp_path / "future.pt"
    torch.save(state, path)
    with pytest.raises(WeightsError, match="format version 99"):
        load_model(path)


def test_weights_of_other_networks_are_rejected(tmp_path):
    state = tiny_model(2).state()
    state["configs"]["generator"]["channels"] = [16, 32, 32, 64]  # the weights are for (8, 16, 16, 16)
    path = tmp_path / "mismatch.pt"
    torch.save(state, path)
    with pytest.raises(WeightsError, match="do not fit this version's networks"):
        load_model(path)


def test_weights_with_unsupported_dimension_are_rejected(tmp_path):
    state = tiny_model(2).state()
    state["configs"]["generator"]["ndims"] = 4
    path = tmp_path / "four_d.pt"
    torch.save(state, path)
    with pytest.raises(WeightsError):
        load_model(path)


def test_pickle_that_runs_code_is_refused_and_not_run(tmp_path):
    side_effect = tmp_path / "pwned"
    payload = {"format": CHECKPOINT_FORMAT, "version": 1, "evil": RunsCodeOnLoad(f"touch '{side_effect}'")}
    path = tmp_path / "evil.pt"
    torch.save(payload, path)
    # Make sure the payload really works when unpickled unsafely (proof that the test can detect it).
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(RunsCodeOnLoad(f"touch '{probe}'")))
    assert probe.exists()

    with pytest.raises(WeightsError, match=r"evil\.pt.* is not a readable SAR weights file"):
        load_model(path)
    with pytest.raises(WeightsError):
        read_checkpoint(path)
    assert not side_effect.exists()


def test_model_card_with_wrong_sha256_is_rejected(tmp_path):
    path = save_model(tiny_model(2), tmp_path / "w.pt")
    card = tmp_path / "w.json"
    card.write_text(json.dumps({"sha256": "0" * 64, "weights_file": "w.pt"}))
    with pytest.raises(WeightsError, match=r"does not match its model card w\.json .*instead of 000000000000"):
        load_model(path)


def test_model_card_detects_a_modified_file(tmp_path):
    path = save_model(tiny_model(2), tmp_path / "w.pt")
    (tmp_path / "w.json").write_text(json.dumps({"sha256": sha256_of(path)}))
    load_model(path)  # matches
    save_model(perturb_head(tiny_model(2), bias=[1.0, 1.0]), path)  # replaced behind the card's back
    with pytest.raises(WeightsError, match="does not match its model card"):
        load_model(path)


def test_model_card_with_correct_sha256_loads(tmp_path):
    model = perturb_head(tiny_model(2), bias=[0.5, -0.5])
    path = save_model(model, tmp_path / "w.pt")
    (tmp_path / "w.json").write_text(json.dumps({"sha256": sha256_of(path), "steps": {"gan": 3}}))
    loaded = load_model(path)
    assert torch.equal(loaded.generator.flow_head.bias, model.generator.flow_head.bias)
    assert all(not p.requires_grad for network in loaded.networks.values() for p in network.parameters())


def test_sha256_of_matches_hashlib(tmp_path):
    import hashlib

    path = tmp_path / "blob.bin"
    data = np.random.default_rng(1).bytes(3 * (1 << 20) + 17)  # several read blocks
    path.write_bytes(data)
    assert sha256_of(path) == hashlib.sha256(data).hexdigest()


def test_corrupt_model_card_is_a_weights_error(tmp_path):
    path = save_model(tiny_model(2), tmp_path / "w.pt")
    (tmp_path / "w.json").write_text("{not json")
    with pytest.raises(WeightsError):
        load_model(path)
