"""The SAR objective: which terms a weighting switches on, and what an ignore mask does."""

import torch

from helpers import one_torch_thread, tiny_model  # noqa: F401  (autouse fixture)
from SARRegistrationLib.networks.generator import soft_otsu_mask
from SARRegistrationLib.objective import LossWeights, registration_terms, total_loss


def _pair(seed=0):
    generator = torch.Generator().manual_seed(seed)
    reference = torch.rand(1, 1, 32, 32, generator=generator)
    floating = torch.roll(reference, shifts=2, dims=3)
    return reference, floating


def _field():
    return torch.full((1, 2, 32, 32), 0.5, requires_grad=True)


def test_weights_switch_terms_on_and_off():
    model = tiny_model(2)
    reference, floating = _pair()
    masks = {"reference_mask": soft_otsu_mask(reference), "floating_mask": soft_otsu_mask(floating)}
    everything = registration_terms(LossWeights(), reference, floating, _field(), backward_field=_field(),
                                    discriminator=model.discriminator, feature_extractor=model.feature_extractor,
                                    applied_field=torch.zeros(1, 2, 32, 32), **masks)
    assert set(everything) == {"nmi", "ssim", "features", "adversarial", "cycle", "segmentation", "field", "smoothness"}
    noseg = registration_terms(LossWeights().without_segmentation().for_finetuning(), reference, floating, _field(),
                               **masks)
    assert "segmentation" not in noseg and "field" not in noseg


def test_ignored_region_gives_no_image_gradient():
    """Where the ignore mask is 1 the image terms do not depend on the field; outside they do."""
    model = tiny_model(2)
    reference, floating = _pair()
    weights = LossWeights(adversarial=0.0, cycle=0.0, segmentation=0.0, field=0.0, smoothness=0.0)
    ignore = torch.zeros(1, 1, 32, 32)
    ignore[..., 8:24, 8:24] = 1.0
    field = _field()
    loss = total_loss(weights, registration_terms(weights, reference, floating, field, ignore_mask=ignore,
                                                  feature_extractor=model.feature_extractor))
    (gradient,) = torch.autograd.grad(loss, field)
    inside = gradient[..., 10:22, 10:22].abs().max()
    outside = gradient[..., :6, :].abs().max()
    assert inside == 0.0
    assert outside > 0.0
