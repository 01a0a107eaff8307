"""The SAR objective (paper Eqn. 1–6): one set of loss terms for training and per-pair finetuning.

Content (Eqn. 2): NMI, SSIM and the multi-scale feature-map distance between the registered and
the reference image. Adversarial (Eqn. 3–5): the discriminator's verdict on the registered image,
cycle consistency of the forward and backward fields, the log-Dice of the reference mask and the
warped floating mask, and, only while training, where the applied field is known, the normalised
field error. Every term is a loss (lower is better) so they can be weighted and summed.

A smoothness term (not in the paper) is added: it is the user's handle on how regular the field
is during finetuning, where only the last layer moves and the image terms alone can make it spiky.
So is a proximity term, for finetuning only: the mean squared distance from the field it starts
from, the network's own, which stops the field from drifting where NMI barely changes (see
:meth:`LossWeights.for_finetuning`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from . import losses
from .spatial import warp


@dataclass
class LossWeights:
    """Weight of each term in the total loss; a weight of 0 switches a term off (and skips its cost)."""

    nmi: float = 1.0
    ssim: float = 1.0
    features: float = 1.0
    adversarial: float = 0.05
    cycle: float = 0.01
    segmentation: float = 0.5
    field: float = 1.0
    smoothness: float = 0.5
    proximity: float = 0.0

    def without_segmentation(self) -> "LossWeights":
        """The paper's SAR-NoSeg ablation."""
        return LossWeights(**{**asdict(self), "segmentation": 0.0})

    def for_finetuning(self) -> "LossWeights":
        """The weights of per-pair finetuning.

        There is no applied field to compare with (paper §2.3). Nor is there an image in the
        floating image's contrast at the reference's geometry, which training has (the floating
        image through the applied field): SSIM and the feature distance would compare the images
        of a T1/PD pair as if they shared a contrast, and pull the field the wrong way. So the
        images are compared by NMI alone. On non-brain validation pairs this was as good as all
        three terms when both images shared a contrast, and better when they did not.

        Two changes make finetuning never worse than the network alone (measured on 58 non-brain
        pairs with known fields, ``benchmarks/finetuning_ablation.py``; the table is in
        ``benchmarks/results/finetuning_ablation.md``):

        - The adversarial term is off. The discriminator sees one image, never the pair: trained
          to tell training references from warped floating images, it scores how an image looks,
          not whether it lies on the reference, and finetuning lowered it by bending the field
          away from the anatomy. At the paper's 0.05 it left 5 pairs with a larger field error
          than the network alone (by up to 0.38 mm, all with a contrast change); at 0 none.
        - A proximity term, 0.1 × the mean squared distance (voxels²) from the network's own
          field. Where the two images show one anatomy in two contrasts (synthetic label maps
          rendered twice), NMI barely changes while the last layer moves the field a long way:
          along the iterations the loss hardly tracked the error (Spearman 0.30, against 0.89 in
          one contrast), and 6 of the 16 pairs ended with a lower Dice than the network alone (by
          up to 0.029). The proximity term makes those cheap moves cost something. 0.1 is the
          smallest of 0, 0.01, 0.03, 0.1 and 0.3 that left no pair worse than the network alone
          (error up by over 0.02 mm or Dice down by over 0.005). It keeps two thirds of the gain
          in mean error: 1.28 mm for the network alone, 1.05 mm with no proximity, 1.12 mm with
          0.1, 1.21 mm with 0.3.

        - The smoothness weight is a tenth of training's, 0.05. On large deformations and velocity
          fields nearly all of the loss drop at training's 0.5 came from the smoothness term
          flattening the network's field, away from the anatomy. Over the 126 non-brain pairs of
          ``benchmarks/finetuning_families.py`` (three deformation families, same and changed
          contrast), of 0.5, 0.25, 0.1, 0.05 and 0 only 0.1 and 0.05 left no pair worse than the
          network alone (field error up by over 0.02 mm or Dice down by over 0.005; at 0.5: 1 and
          2 pairs, even with the similarity guard), 0.05 with the smaller worst changes
          (+0.014 mm, -0.002), and it kept the mean error (3.051 mm; 3.048 at 0.5, network alone
          3.111).

        The cycle and segmentation terms, the learning rate and the NMI bins changed the mean error
        by 0.05 mm at most and stay as they were.
        """
        return LossWeights(**{**asdict(self), "field": 0.0, "ssim": 0.0, "features": 0.0, "adversarial": 0.0,
                              "proximity": 0.1, "smoothness": 0.05})

def registration_terms(weights: LossWeights, reference, floating, forward_field, *, backward_field=None,
                       reference_mask=None, floating_mask=None, discriminator=None, feature_extractor=None,
                       applied_field=None, true_reference_mask=None, true_floating_mask=None,
                       reference_feature_maps=None, content_target=None, ignore_mask=None, prior_field=None) -> dict:
    """Each weighted-in term of the objective as a scalar tensor.

    Args:
        reference, floating: ``(B, 1, *spatial)`` images in [0, 1].
        forward_field: ``(B, ndims, *spatial)`` voxel displacement registering floating to reference.
        backward_field: the field registering reference to floating (for the cycle term).
        reference_mask, floating_mask: the generator's soft masks, ``(B, 1, *spatial)``.
        applied_field: the known field of a training pair; true_*_mask: manual masks, when known.
        reference_feature_maps: ``feature_extractor(content_target)``, when already computed.
        content_target: what SSIM and the feature distance compare the registered image with. Both
            assume one contrast, so training passes the floating image pulled through the applied
            field (the answer, in the floating image's contrast); by default the reference.
        ignore_mask: ``(B, 1, *spatial)`` in [0, 1], 1 where the images should not be compared
            (implants, electrodes). There the registered image and mask are replaced by the
            reference's, so every term agrees and no gradient comes from the region: the field
            there follows the smoothness term alone.
        prior_field: the field finetuning starts from (the network's own); the proximity term is
            the mean squared distance from it, in voxels².
    """
    warped = warp(floating, forward_field)
    target = reference if content_target is None else content_target
    if ignore_mask is not None:
        warped = torch.lerp(warped, target, ignore_mask)
    terms = {}
    if weights.nmi:  # NMI needs no shared contrast: it always compares with the reference
        terms["nmi"] = 2.0 - losses.normalised_mutual_information(warped, reference)
    if weights.ssim:
        terms["ssim"] = 1.0 - losses.ssim(warped, target)
    if weights.features and feature_extractor is not None:
        terms["features"] = losses.feature_distance(warped, target, feature_extractor, reference_feature_maps)
    if weights.adversarial and discriminator is not None:
        terms["adversarial"] = losses.generator_adversarial_loss(discriminator(warped))
    if weights.cycle and backward_field is not None:
        terms["cycle"] = losses.cycle_consistency(forward_field, backward_field)
    if weights.segmentation and reference_mask is not None and floating_mask is not None:
        warped_mask = warp(floating_mask, forward_field)
        if ignore_mask is not None:
            warped_mask = torch.lerp(warped_mask, reference_mask, ignore_mask)
        segmentation = losses.log_dice_loss(warped_mask, reference_mask)
        for generated, manual in ((reference_mask, true_reference_mask), (floating_mask, true_floating_mask)):
            if manual is not None:
                segmentation = segmentation + losses.log_dice_loss(generated, manual)
        terms["segmentation"] = segmentation
    if weights.field and applied_field is not None:
        terms["field"] = losses.normalised_field_error(forward_field, applied_field)
    if weights.smoothness:
        terms["smoothness"] = losses.smoothness(forward_field)
    if weights.proximity and prior_field is not None:
        terms["proximity"] = F.mse_loss(forward_field, prior_field)
    return terms


def total_loss(weights: LossWeights, terms: dict) -> torch.Tensor:
    return sum(getattr(weights, name) * value for name, value in terms.items())
