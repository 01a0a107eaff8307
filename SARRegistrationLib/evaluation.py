"""Accuracy on known deformations: each image is registered to random B-spline deformations of itself.

The applied field is known, so besides Dice, HD95 and MAD of the structure mask the error of the
recovered field is measured directly (mean end-point error in mm).
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from . import imageio
from .deformations import known_deformation
from .devices import resolve_device
from .metrics import OVERLAP_MEASURES
from .model import load_model
from .registration import network_dimension, register, uses_network


def evaluate_known_deformations(images, masks=None, *, pairs_per_image: int = 3, max_displacement_mm: float = 6.0,
                                contrast_change: bool = False, seed: int = 0, weights=None, mode: str = "auto",
                                device="auto", **register_options) -> list[dict]:
    """Register every image to ``pairs_per_image`` seeded random deformations of itself.

    With ``contrast_change`` the deformed copy also gets a random intensity remapping, so the pair
    differs in contrast as two MR sequences do.

    Returns one dict per pair: image name, Dice/HD95/MAD before and after, folding fraction,
    iterations, seconds, and ``field_error_mm`` (mean end-point error) before (zero field) and after.
    """
    masks = list(masks) if masks else [None] * len(images)
    if len(masks) != len(images):
        raise ValueError(f"{len(images)} images but {len(masks)} masks: give one mask per image.")
    torch_device = resolve_device(device)
    models = {}
    rows = []
    for index, (image_path, mask_path) in enumerate(zip(images, masks)):
        floating = imageio.read_image(image_path, "image")
        floating_mask = None if mask_path is None else imageio.read_image(mask_path, "mask", allow_constant=True)
        ndims = network_dimension(floating.GetDimension(), mode)
        if ndims not in models:  # without the network (instance optimisation alone) no model is needed
            models[ndims] = load_model(weights, ndims, torch_device) \
                if uses_network(register_options.get("network"), weights=weights) else None
        for pair in range(pairs_per_image):
            rng = np.random.default_rng((seed, index, pair))
            reference, reference_mask, transform = known_deformation(floating, floating_mask, rng, max_displacement_mm,
                                                                     remap_intensity=contrast_change)
            result = register(reference, floating, models[ndims], reference_mask=reference_mask,
                              floating_mask=floating_mask, mode=mode, device=torch_device, **register_options)
            applied = imageio.array_of(sitk.TransformToDisplacementField(
                transform, sitk.sitkVectorFloat64, reference.GetSize(), reference.GetOrigin(),
                reference.GetSpacing(), reference.GetDirection()))
            recovered = imageio.array_of(result.displacement)
            rows.append({"image": str(image_path), "pair": pair, **result.metrics,
                         "field_error_mm": {"before": float(np.linalg.norm(applied, axis=-1).mean()),
                                            "after": float(np.linalg.norm(recovered - applied, axis=-1).mean())}})
    return rows


def summarise(rows: list[dict]) -> str:
    """A markdown table of mean ± standard deviation over the pairs."""
    columns = {"field error (mm)": lambda r, when: r["field_error_mm"][when]}
    if rows and "after" in rows[0]:
        columns.update({name: (lambda r, when, key=key: r[when][key]) for key, name in OVERLAP_MEASURES.items()})
    # What ran, after registration only: the paper's finetuning and instance optimisation apart.
    ran = {"folded (%)": lambda r: 100 * r["folding_fraction"], "finetuning iterations": lambda r: r["iterations"],
           "optimisation iterations": lambda r: (r["instance_optimisation"] or {}).get("iterations", 0),
           "seconds": lambda r: r["seconds"]}
    lines = ["| | " + " | ".join([*columns, *ran]) + " |", "|---" * (len(columns) + len(ran) + 1) + "|"]
    for when in ("before", "after"):
        cells = [_mean_sd([get(r, when) for r in rows]) for get in columns.values()]
        extra = [_mean_sd([get(r) for r in rows]) for get in ran.values()] if when == "after" else [""] * len(ran)
        lines.append(f"| {when} | " + " | ".join(cells + extra) + " |")
    return "\n".join(lines)


def _mean_sd(values) -> str:
    values = np.asarray(values, dtype=float)
    return f"{values.mean():.3f} ± {values.std():.3f}"
