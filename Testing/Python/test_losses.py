"""Loss terms against reference implementations and their defining properties, in 2D and 3D."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from skimage.metrics import normalized_mutual_information as skimage_nmi
from skimage.metrics import structural_similarity

from SARRegistrationLib import losses
from SARRegistrationLib.networks.feature_extractor import FeatureExtractor


def _unit_range(image: sitk.Image) -> np.ndarray:
    array = sitk.GetArrayFromImage(image).astype(np.float64)
    return (array - array.min()) / (array.max() - array.min())


def _tensor(array: np.ndarray, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(array, dtype=dtype)[None, None]


@pytest.fixture(scope="module")
def pd_t1(read_test_image):
    return _unit_range(read_test_image("brain_pd.nrrd")), _unit_range(read_test_image("brain_t1.nrrd"))


@pytest.fixture(scope="module")
def volume(read_test_image):
    return _unit_range(read_test_image("brain3d_t1.nii.gz"))


# --- MIND-SSC ---------------------------------------------------------------------------------

def test_mind_ssc_has_the_self_similarity_context_channels_and_ignores_linear_contrast(pd_t1, volume):
    """4 neighbour pairs in 2D, 12 in 3D; values in (0, 1]; an offset changes nothing, nor does a
    gain but where all patch distances are near 0 (flat background: the variance floor binds)."""
    pd, _ = pd_t1
    for image, channels in ((pd, 4), (volume, 12)):
        tensor = _tensor(image, torch.float64)
        descriptors = losses.mind_ssc(tensor)
        assert descriptors.shape == (1, channels, *image.shape)
        assert descriptors.min() > 0 and descriptors.max() <= 1
        torch.testing.assert_close(losses.mind_ssc(tensor + 0.3), descriptors)
        changed = (losses.mind_ssc(0.4 * tensor) - descriptors).abs() > 1e-6
        assert changed.float().mean() < 1e-3


def test_mind_ssc_matches_a_direct_computation_at_one_voxel():
    """At an interior voxel, channel (north, east) is exp(-d / v): d the 3 x 3 box mean of the squared
    difference of the image shifted to those two neighbours, v the mean of d over the 4 channels."""
    image = torch.rand(1, 1, 9, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y, x = 4, 4
    pixel = lambda dy, dx: image[0, 0, y + dy, x + dx]  # noqa: E731

    def distance(a, b):  # a, b: neighbour offsets (dy, dx)
        return sum((pixel(a[0] + i, a[1] + j) - pixel(b[0] + i, b[1] + j)) ** 2
                   for i in (-1, 0, 1) for j in (-1, 0, 1)) / 9

    pairs = [((-1, 0), (0, -1)), ((-1, 0), (0, 1)), ((1, 0), (0, -1)), ((1, 0), (0, 1))]
    d = torch.stack([distance(a, b) for a, b in pairs])
    d = d - d.min()
    descriptors = losses.mind_ssc(image)[0, :, y, x]
    # The variance is clamped around the image's mean variance; at this voxel it is not reached.
    torch.testing.assert_close(descriptors, torch.exp(-d / d.mean()))


def test_mind_ssc_tells_aligned_from_shifted_across_contrasts(pd_t1):
    """PD against T1 of the same slice: the descriptors differ less than against a shifted T1."""
    pd, t1 = (losses.mind_ssc(_tensor(image)) for image in pd_t1)
    shifted = losses.mind_ssc(_tensor(np.roll(pd_t1[1], 3, axis=1)))
    assert ((pd - t1) ** 2).mean() < 0.8 * ((pd - shifted) ** 2).mean()


# --- normalised mutual information -----------------------------------------------------------

@pytest.mark.parametrize("bins", [16, 32, 64])
def test_nmi_matches_skimage_on_multimodal_brain(pd_t1, bins):
    pd, t1 = pd_t1
    expected = skimage_nmi(pd, t1, bins=bins)
    # The Parzen kernel (sigma = 1/2 bin) spreads each voxel over about three bins, which raises
    # the joint entropy more than the marginal ones: the soft NMI lies below the hard one, by
    # 0.062 / 0.018 / 0.007 at 16 / 32 / 64 bins here. The bounds allow that bias and no more.
    soft = losses.normalised_mutual_information(_tensor(pd), _tensor(t1), bins=bins).item()
    assert expected - 0.08 < soft < expected + 0.005
    # A narrow kernel must converge to the hard histogram (measured error 0.006 / 0.0015 / 0.0018).
    narrow = losses.normalised_mutual_information(_tensor(pd), _tensor(t1), bins=bins, sigma_ratio=0.25).item()
    assert narrow == pytest.approx(expected, abs=0.01)


def test_nmi_matches_skimage_in_3d(volume):
    noisy = np.clip(volume + np.random.default_rng(0).normal(0, 0.05, volume.shape), 0, 1)
    noisy = (noisy - noisy.min()) / (noisy.max() - noisy.min())  # skimage bins on each image's own range
    expected = skimage_nmi(volume, noisy, bins=32)
    soft = losses.normalised_mutual_information(_tensor(volume), _tensor(noisy), bins=32, sigma_ratio=0.25).item()
    assert soft == pytest.approx(expected, abs=0.01)


def test_nmi_orders_identical_related_and_shuffled_images(pd_t1):
    pd, t1 = pd_t1
    shuffled = np.random.default_rng(0).permutation(pd.ravel()).reshape(pd.shape)
    same = losses.normalised_mutual_information(_tensor(pd), _tensor(pd)).item()
    related = losses.normalised_mutual_information(_tensor(pd), _tensor(t1)).item()
    unrelated = losses.normalised_mutual_information(_tensor(pd), _tensor(shuffled)).item()
    assert 2.0 >= same > related > unrelated >= 1.0
    assert unrelated == pytest.approx(1.0, abs=0.01)


def test_nmi_mask_selects_voxels(pd_t1):
    pd, t1 = pd_t1
    mask = np.zeros_like(pd)
    inside = np.s_[60:160, 40:140]  # the brain without the background around it
    mask[inside] = 1
    masked = losses.normalised_mutual_information(_tensor(pd), _tensor(t1), mask=_tensor(mask)).item()
    cropped = losses.normalised_mutual_information(_tensor(pd[inside]), _tensor(t1[inside])).item()
    everything = losses.normalised_mutual_information(_tensor(pd), _tensor(t1)).item()
    assert masked == pytest.approx(cropped, abs=1e-5)
    assert abs(masked - everything) > 0.01


@pytest.mark.parametrize("kernel", ["gaussian", "linear"])
def test_nmi_counts_intensities_outside_the_unit_range_at_its_ends(pd_t1, kernel):
    """Instance optimisation's bias field can push intensities past 1 (times ``1 + g``): both
    Parzen windows must put them in the end bins, as if clipped, not lose or spread their mass."""
    pd, t1 = pd_t1
    pushed = t1 * 1.5 - 0.2  # past both ends
    nmi = losses.normalised_mutual_information(_tensor(pd), _tensor(pushed), kernel=kernel).item()
    clipped = losses.normalised_mutual_information(_tensor(pd), _tensor(np.clip(pushed, 0, 1)), kernel=kernel).item()
    assert nmi == pytest.approx(clipped, abs=1e-6)
    assert abs(clipped - losses.normalised_mutual_information(_tensor(pd), _tensor(t1), kernel=kernel).item()) > 0.01


# --- SSIM --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_ssim_matches_skimage_2d(pd_t1, dtype, tolerance):
    pd, t1 = pd_t1
    expected = structural_similarity(pd, t1, data_range=1)
    assert losses.ssim(_tensor(pd, dtype), _tensor(t1, dtype)).item() == pytest.approx(expected, abs=tolerance)


def test_ssim_matches_skimage_3d(volume):
    noisy = np.clip(volume + np.random.default_rng(1).normal(0, 0.05, volume.shape), 0, 1)
    expected = structural_similarity(volume, noisy, data_range=1)
    assert 0.2 < expected < 0.9
    assert losses.ssim(_tensor(volume), _tensor(noisy)).item() == pytest.approx(expected, abs=1e-4)


def test_ssim_of_identical_images_is_one(pd_t1, volume):
    assert losses.ssim(_tensor(pd_t1[0]), _tensor(pd_t1[0])).item() == pytest.approx(1.0, abs=1e-6)
    assert losses.ssim(_tensor(volume), _tensor(volume)).item() == pytest.approx(1.0, abs=1e-6)


def test_ssim_rejects_images_smaller_than_the_window():
    with pytest.raises(ValueError, match="window_size"):
        losses.ssim(torch.rand(1, 1, 5, 20), torch.rand(1, 1, 5, 20))


# --- Dice -------------------------------------------------------------------------------------

def test_soft_dice_on_known_masks():
    a = torch.zeros(2, 1, 10, 10)
    b = torch.zeros(2, 1, 10, 10)
    a[0, :, :, :5] = 1  # 50 voxels
    b[0, :, :, :5] = 1  # identical: Dice 1
    a[1, :, :, :4] = 1  # 40 voxels
    b[1, :, :, 2:8] = 1  # 60 voxels, 20 shared: Dice 2*20/100
    assert losses.soft_dice(a, b).item() == pytest.approx((1.0 + 0.4) / 2, abs=1e-6)
    assert losses.soft_dice(a[1:], 1 - a[1:]).item() == pytest.approx(0.0, abs=1e-6)
    half = torch.full((1, 1, 4, 4), 0.5)
    assert losses.soft_dice(half, half).item() == pytest.approx(0.5, abs=1e-6)


def test_log_dice_loss():
    a = torch.zeros(1, 1, 6, 6, 6)
    a[..., :3] = 1
    assert losses.log_dice_loss(a, a).item() == pytest.approx(0.0, abs=1e-5)
    b = torch.zeros_like(a)
    b[..., 1:4] = 1  # 2/3 of each mask shared
    assert losses.log_dice_loss(a, b).item() == pytest.approx(-np.log(2 / 3), abs=1e-5)
    assert losses.log_dice_loss(a, 1 - a).item() > 10


# --- deformation fields -----------------------------------------------------------------------

def test_normalised_field_error_range():
    torch.manual_seed(0)
    applied = torch.randn(2, 3, 8, 9, 10)
    recovered = torch.randn(2, 3, 8, 9, 10)
    assert losses.normalised_field_error(applied, applied).item() == pytest.approx(0.0, abs=1e-7)
    assert losses.normalised_field_error(-applied, applied).item() == pytest.approx(1.0, abs=1e-6)
    assert losses.normalised_field_error(recovered, applied).item() == pytest.approx(0.5, abs=0.05)
    for scale in (1e-3, 1.0, 1e3):
        value = losses.normalised_field_error(scale * recovered[:, :2, 0], torch.zeros(2, 2, 9, 10)).item()
        assert 0.0 <= value <= 1.0
    assert losses.normalised_field_error(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 4)).item() == 0.0


@pytest.mark.parametrize("shape", [(1, 2, 16, 20), (1, 3, 8, 10, 12)])
def test_cycle_consistency(shape):
    translation = torch.zeros(shape)
    translation[:, 0] = 1.5
    translation[:, -1] = -0.5
    assert losses.cycle_consistency(translation, -translation).item() == pytest.approx(0.0, abs=1e-8)
    # Translating twice instead of back moves every voxel by 2u: squared norm 4 * (1.5^2 + 0.5^2).
    assert losses.cycle_consistency(translation, translation).item() == pytest.approx(10.0, rel=1e-5)


def test_smoothness():
    constant = torch.ones(1, 3, 5, 6, 7) * torch.tensor([1.0, -2.0, 3.0]).view(1, 3, 1, 1, 1)
    assert losses.smoothness(constant).item() == 0.0
    # A field growing by 0.5 per voxel along x: squared gradient 0.25 in one of its two channels.
    ramp = torch.zeros(1, 2, 6, 8)
    ramp[:, 1] = 0.5 * torch.arange(8.0)
    assert losses.smoothness(ramp).item() == pytest.approx(0.25 / 2, abs=1e-7)


# --- adversarial terms ------------------------------------------------------------------------

def test_adversarial_losses():
    half = torch.full((4, 1), 0.5)
    assert losses.discriminator_loss(half, half).item() == pytest.approx(2 * np.log(2), abs=1e-6)
    assert losses.generator_adversarial_loss(half).item() == pytest.approx(np.log(2), abs=1e-6)
    assert losses.discriminator_loss(torch.ones(4, 1), torch.zeros(4, 1)).item() < 1e-5
    saturated = losses.discriminator_loss(torch.zeros(4, 1), torch.ones(4, 1))
    assert torch.isfinite(saturated) and saturated.item() > 10


# --- gradients --------------------------------------------------------------------------------

def _image_pair(shape):
    return torch.rand(shape, requires_grad=True), torch.rand(shape)


_SHAPES = {2: (2, 1, 24, 20), 3: (2, 1, 12, 10, 9)}
_FIELD_SHAPES = {2: (2, 2, 24, 20), 3: (2, 3, 12, 10, 9)}


def _extractor(ndims):
    torch.manual_seed(0)
    return FeatureExtractor(ndims).requires_grad_(False).eval()


_LOSSES = {
    "nmi": lambda nd: (lambda x, y: losses.normalised_mutual_information(x, y), _SHAPES[nd]),
    "nmi_masked": lambda nd: (lambda x, y: losses.normalised_mutual_information(x, y, mask=(y > 0.3).float()),
                              _SHAPES[nd]),
    "ssim": lambda nd: (lambda x, y: losses.ssim(x, y), _SHAPES[nd]),
    "feature_distance": lambda nd: (lambda x, y, e=_extractor(nd): losses.feature_distance(x, y, e), _SHAPES[nd]),
    "soft_dice": lambda nd: (losses.soft_dice, _SHAPES[nd]),
    "log_dice": lambda nd: (losses.log_dice_loss, _SHAPES[nd]),
    "field_error": lambda nd: (losses.normalised_field_error, _FIELD_SHAPES[nd]),
    "cycle": lambda nd: (lambda u, v: losses.cycle_consistency(2 * u, -3 * v), _FIELD_SHAPES[nd]),
    "smoothness": lambda nd: (lambda u, v: losses.smoothness(u), _FIELD_SHAPES[nd]),
    "discriminator": lambda nd: (losses.discriminator_loss, _SHAPES[nd]),
    "generator": lambda nd: (lambda p, q: losses.generator_adversarial_loss(p), _SHAPES[nd]),
}


@pytest.mark.parametrize("ndims", [2, 3])
@pytest.mark.parametrize("name", sorted(_LOSSES))
def test_gradients_flow(name, ndims):
    torch.manual_seed(ndims)
    loss_fn, shape = _LOSSES[name](ndims)
    x, y = _image_pair(shape)
    loss = loss_fn(x, y)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0
