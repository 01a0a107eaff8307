"""The feature extractors behind the content loss: shapes, autoencoder training, VGG16 loading."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SARRegistrationLib import losses
from SARRegistrationLib.networks.feature_extractor import VGG16_CONFIG, FeatureExtractor, VGG16Features, vgg_layers
from SARRegistrationLib.training import _feature_step, _Reconstruction


@pytest.mark.parametrize("shape", [(2, 1, 33, 40), (1, 1, 9, 16, 21)])
def test_feature_extractor_shapes(shape):
    ndims = len(shape) - 2
    extractor = FeatureExtractor(ndims, channels=(4, 8, 12))
    image = torch.rand(shape)
    maps = extractor(image)
    expected = [(shape[0], channels, *(-(-n // 2 ** scale) for n in shape[2:]))
                for scale, channels in enumerate((4, 8, 12))]
    assert [tuple(m.shape) for m in maps] == expected
    reconstruction = extractor.reconstruct(image)
    assert reconstruction.shape == image.shape
    assert 0 <= reconstruction.min() and reconstruction.max() <= 1


def test_training_reduces_reconstruction_loss(read_test_image):
    """The feature stage of training (one autoencoder step per batch) learns the image."""
    image = read_test_image("brain_t1.nrrd")
    # Half resolution keeps the test fast; the anatomy is still there.
    array = sitk.GetArrayFromImage(image)[::2, ::2].astype(np.float32)
    batch = torch.tensor((array - array.min()) / (array.max() - array.min()))[None, None]
    torch.manual_seed(0)
    extractor = FeatureExtractor(2)
    optimiser = torch.optim.Adam(extractor.parameters(), lr=1e-2)
    history = [_feature_step(_Reconstruction(extractor), {"reference": batch, "floating": batch}, optimiser)
               for _ in range(20)]
    assert np.mean(history[-3:]) < 0.5 * history[0]


@pytest.fixture(scope="module")
def vgg_weights(tmp_path_factory):
    """A torchvision-format VGG16 file with random weights: all of ``features`` plus a classifier key."""
    torch.manual_seed(0)
    state = {f"features.{key}": value for key, value in vgg_layers(VGG16_CONFIG).state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(4, 4)
    path = tmp_path_factory.mktemp("vgg") / "vgg16-397923af.pth"
    torch.save(state, path)
    return path, state


def test_vgg16_loads_weights_and_freezes(vgg_weights):
    path, state = vgg_weights
    vgg = VGG16Features(path)
    assert torch.equal(vgg.features[0].weight, state["features.0.weight"])
    assert torch.equal(vgg.features[21].bias, state["features.21.bias"])
    assert not any(p.requires_grad for p in vgg.parameters())


def test_vgg16_maps_2d_and_3d(vgg_weights):
    vgg = VGG16Features(vgg_weights[0])
    channels = [64, 128, 256, 512]
    image = torch.rand(2, 1, 32, 48)
    maps = vgg(image)
    assert [tuple(m.shape) for m in maps] == [(2, c, 32 // 2 ** s, 48 // 2 ** s) for s, c in enumerate(channels)]
    volume = torch.rand(2, 1, 3, 16, 24)
    maps3d = vgg(volume)
    assert [tuple(m.shape) for m in maps3d] == [(2, c, 3, 16 // 2 ** s, 24 // 2 ** s) for s, c in enumerate(channels)]
    # Each axial slice is processed as a 2D image.
    for sliced, whole in zip(vgg(volume[:, :, 1]), maps3d):
        torch.testing.assert_close(whole[:, :, 1], sliced)


def test_vgg16_feature_distance_is_differentiable(vgg_weights):
    vgg = VGG16Features(vgg_weights[0])
    a = torch.rand(1, 1, 32, 32, requires_grad=True)
    distance = losses.feature_distance(a, torch.rand(1, 1, 32, 32), vgg)
    distance.backward()
    assert 0 < distance.item() < 1
    assert torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0


def test_vgg16_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth"):
        VGG16Features(tmp_path / "absent.pth")


def test_vgg16_file_without_features(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="no 'features"):
        VGG16Features(path)


def test_vgg16_truncated_file(tmp_path, vgg_weights):
    path = tmp_path / "truncated.pth"
    torch.save({k: v for k, v in vgg_weights[1].items() if k != "features.19.weight"}, path)
    with pytest.raises(ValueError, match="features.19.weight"):
        VGG16Features(path)
