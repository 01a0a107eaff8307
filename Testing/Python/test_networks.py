"""Tests of the SAR generator and discriminator (SARRegistrationLib.networks)."""

import pytest
import SimpleITK as sitk
import torch
from torch import nn

from helpers import one_torch_thread  # noqa: F401  (autouse fixture)
from SARRegistrationLib.networks.discriminator import SARDiscriminator
from SARRegistrationLib.networks.generator import SARGenerator, otsu_mask, otsu_thresholds, soft_otsu_mask

CHANNELS = (8, 16, 16, 16)


def _pair(read_test_image, shape):
    """Real reference and floating images resampled to ``shape`` (array order), in [0, 1]."""
    images = []
    for name in ("brain_pd.nrrd", "sample_floating_t1.nrrd"):
        image = read_test_image(name)
        grid = sitk.Image(list(shape[::-1]), sitk.sitkFloat32)
        grid.SetSpacing([s * n / m for s, n, m in zip(image.GetSpacing(), image.GetSize(), shape[::-1])])
        array = sitk.GetArrayFromImage(sitk.Resample(image, grid, sitk.Transform(), sitk.sitkLinear, 0.0,
                                                     sitk.sitkFloat32))
        images.append(torch.from_numpy(array / array.max())[None, None])
    return images


@pytest.fixture
def generator_2d():
    torch.manual_seed(0)
    return SARGenerator(2, CHANNELS).eval()


def test_generator_outputs_2d(generator_2d, read_test_image):
    reference, floating = _pair(read_test_image, (40, 32))
    reference, floating = reference.repeat(2, 1, 1, 1), floating.repeat(2, 1, 1, 1)
    with torch.no_grad():
        output = generator_2d(reference, floating)
    assert output.displacement.shape == (2, 2, 40, 32)
    assert output.warped.shape == (2, 1, 40, 32)
    for mask in (output.reference_mask, output.floating_mask):
        assert mask.shape == (2, 1, 40, 32)
        assert mask.min() >= 0 and mask.max() <= 1
        assert mask.max() > 0.5 and mask.min() < 0.5  # not all inside nor all outside


def test_generator_outputs_3d():
    torch.manual_seed(0)
    generator = SARGenerator(3, CHANNELS).eval()
    reference, floating = torch.rand(1, 1, 8, 16, 24), torch.rand(1, 1, 8, 16, 24)
    with torch.no_grad():
        output = generator(reference, floating)
    assert output.displacement.shape == (1, 3, 8, 16, 24)
    assert output.warped.shape == (1, 1, 8, 16, 24)
    assert output.reference_mask.shape == output.floating_mask.shape == (1, 1, 8, 16, 24)
    assert 0 <= output.reference_mask.min() and output.reference_mask.max() <= 1


@pytest.mark.parametrize("shape", [(30, 32), (32, 36), (12, 32)])
def test_generator_rejects_shapes_not_multiple_of_8(generator_2d, shape):
    with pytest.raises(ValueError, match="not a multiple of 8"):
        generator_2d(torch.rand(1, 1, *shape), torch.rand(1, 1, *shape))


def test_generator_rejects_mismatched_or_wrong_dimension_inputs(generator_2d):
    with pytest.raises(ValueError, match="2D generator needs"):
        generator_2d(torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 40))
    with pytest.raises(ValueError, match="2D generator needs"):
        generator_2d(torch.rand(1, 1, 8, 32, 32), torch.rand(1, 1, 8, 32, 32))


def test_generator_is_near_identity_at_init(generator_2d, read_test_image):
    reference, floating = _pair(read_test_image, (48, 40))
    with torch.no_grad():
        output = generator_2d(reference, floating)
    assert output.displacement.abs().max() < 1e-2
    torch.testing.assert_close(output.warped, floating, atol=1e-2, rtol=0)


def test_generator_config_round_trip():
    generator = SARGenerator(3, CHANNELS, diffeomorphic=True, integration_steps=5)
    config = dict(generator.config)
    rebuilt = SARGenerator(config.pop("ndims"), **config)
    assert rebuilt.config == generator.config
    assert rebuilt.shape_multiple == 8
    assert [p.shape for p in rebuilt.parameters()] == [p.shape for p in generator.parameters()]


def test_diffeomorphic_generator_runs_and_integrates():
    torch.manual_seed(0)
    generator = SARGenerator(2, CHANNELS, diffeomorphic=True).eval()
    with torch.no_grad():
        generator.flow_head.bias.copy_(torch.tensor([1.5, -0.5]))
        output = generator(torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32))
    assert output.displacement.shape == (1, 2, 32, 32)
    assert torch.isfinite(output.displacement).all()
    # a (nearly) constant velocity integrates to (nearly) the same translation
    centre = output.displacement[..., 8:-8, 8:-8]
    torch.testing.assert_close(centre.mean(dim=(2, 3)), torch.tensor([[1.5, -0.5]]), atol=2e-2, rtol=0)


def test_fused_map_is_in_unit_range(generator_2d, read_test_image):
    reference, floating = _pair(read_test_image, (40, 32))
    with torch.no_grad():
        reference_features, _ = generator_2d.encode(reference, floating)
        fused = generator_2d.fused_map(reference_features)
    assert fused.shape == (1, 1, 40, 32)
    assert fused.min() >= 0 and fused.max() <= 1
    assert fused.max() - fused.min() > 0.1


def test_otsu_masks():
    torch.manual_seed(0)
    maps = torch.rand(3, 1, 16, 16)
    maps[1] = 0.25  # a constant map has no threshold to find
    hard = otsu_mask(maps)
    assert set(torch.unique(hard).tolist()) <= {0.0, 1.0}
    assert hard[0].sum() > 0 and hard[0].sum() < 256
    assert hard[1].sum() == 0
    thresholds = otsu_thresholds(maps)
    assert thresholds.shape == (3, 1, 1, 1)
    torch.testing.assert_close(hard, (maps > thresholds).float())
    soft = soft_otsu_mask(maps)
    assert soft.min() >= 0 and soft.max() <= 1
    assert ((soft > 0.5) == (hard > 0.5))[0].float().mean() > 0.99


def _conv_layers(discriminator):
    return [m for m in discriminator.features if isinstance(m, (nn.Conv2d, nn.Conv3d))]


@pytest.mark.parametrize("ndims", [2, 3])
def test_discriminator_layers(ndims):
    discriminator = SARDiscriminator(ndims, width=4)
    convs = _conv_layers(discriminator)
    assert len(convs) == 8
    assert [c.out_channels for c in convs] == [4, 4, 8, 8, 16, 16, 32, 32]
    assert [c.stride[0] for c in convs] == [1, 2] * 4
    assert all(type(c) is getattr(nn, f"Conv{ndims}d") for c in convs)
    assert discriminator.config == {"ndims": ndims, "width": 4, "input_size": 64}


@pytest.mark.parametrize("ndims, shape", [(2, (32, 40)), (2, (150, 90)), (3, (16, 16, 24)), (3, (20, 80, 72))])
def test_discriminator_output(ndims, shape):
    torch.manual_seed(0)
    discriminator = SARDiscriminator(ndims, width=4, input_size=32 if ndims == 3 else 64).eval()
    with torch.no_grad():
        verdict = discriminator(torch.rand(2, 1, *shape))
    assert verdict.shape == (2, 1)
    assert ((verdict > 0) & (verdict < 1)).all()


def test_discriminator_pools_large_inputs_to_input_size():
    discriminator = SARDiscriminator(2, width=4, input_size=16)
    seen = []
    discriminator.features.register_forward_hook(lambda module, args, out: seen.append(args[0].shape))
    with torch.no_grad():
        discriminator.eval()(torch.rand(1, 1, 64, 32))
    assert seen == [torch.Size([1, 1, 16, 8])]
