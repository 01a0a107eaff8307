"""Instance optimisation: a residual field on top of the network's, optimised for one pair.

The network gives a fast first estimate; this stage gives the accuracy, as uniGradICON's instance
optimisation and ConvexAdam's Adam stage do. The residual lives on a control grid (linear
interpolation between control points, a diffusion penalty between them), optimised with Adam from
coarse to fine on ``2 - NMI`` plus the mean squared difference of MIND-SSC descriptors (both hold
when the contrasts differ: NMI through the joint histogram of the whole image, MIND through local
self-similarity, which also survives bias fields), optionally with the log-Dice of SAR's own
masks. NMI does not survive a bias field, the smooth intensity gain of MR coils: one tissue then
has several intensities across the image, and the field bends to explain them. So a smooth gain
of the floating image (its intensities times ``1 + g``, ``g`` on a 4-point-per-axis grid,
:data:`BIAS_FIELD_POINTS`) is optimised with the residual and applied before the histogram.
Nor does NMI see CT's soft tissues, which lie within a few of its bins between air and bone: two
CT images are compared equalised (:func:`equalised`, ``OptimisationSettings.equalise``).
Each iteration compares at most ``samples`` voxels (half as many at the coarser levels), drawn at
random (as Elastix's random sampler does), so its cost does not grow with the image: a 3D volume
costs about what a 2D image does. The draws fall anywhere, not on voxel centres: at voxel centres
the reference is not interpolated while the warped floating image is, which biases mutual
information towards whole-voxel shifts (the interpolation artefact Elastix's random-coordinate
sampler avoids; voxel centres were tried, see ``benchmarks/results/instance_optimisation_tuning.md``).
Draws come from a seeded generator, so a run is deterministic on the CPU. The field returned is
the mean of the finest level's last iterates (``averaged_fraction``), which averages out the
noise of the draws that the last step would end on.

A floating image on a grid of its own (another spacing or origin, or behind an affine
pre-alignment) is read on its own voxels through an affine map of the coordinates
(``floating_map``), not first resampled onto the reference's grid: every linear resampling blurs,
and the samples then interpolated that blur again (a 2D floating image half a voxel off the
reference's grid had 40 % more field error so; ``benchmarks/results/robustness.md``).

Steps are in millimetres, because anatomy moves by millimetres whatever the voxel size, but never
longer than one voxel of the level along any axis (Elastix's default largest step): on a grid of
0.1 mm voxels 0.6 mm steps would be six voxels long, and the optimisation diverged there.

Tensors are ``(1, C, *spatial)`` on the optimisation grid, fields in voxels of that grid, channel
``i`` along array axis ``i`` (see :mod:`spatial`), pull-back: ``warped(x) = floating(x + u(x))``.
Inside the loop, positions and fields run in ``grid_sample``'s order instead (x first, so channel
``i`` along array axis ``ndims - 1 - i``) and fields in its normalised units: every sampled
position then goes to ``grid_sample`` as it is, where reordering and rescaling each iteration's
samples took a tenth of an iteration's time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import losses
from .errors import RegistrationCancelled, SettingsError
from .optimisers import Adam
from .spatial import downsample

ProgressCallback = Callable[[float, str], None]
# How the images can be compared (OptimisationSettings.similarity).
SIMILARITIES = ("nmi", "nmi+mind", "mind")
# The settings whose default depends on the images' dimension (a None in OptimisationSettings),
# chosen on the tuning pairs (benchmarks/results/instance_optimisation_tuning.md):
# - similarity: NMI plus MIND-SSC had a lower field error than NMI alone on 9 of the 12 tuning
#   sets and was within 0.003 mm on the other 3; in 2D up to half the error went (velocity fields,
#   large deformations, contrast changes), in 3D up to 15 % with a contrast change. But in 3D it
#   doubled the time of a 128^3 volume (the descriptors of the whole volume, 12 channels a
#   sample), which broke the 5x-Elastix target: 3D keeps NMI alone by default, and "nmi+mind" is
#   the user's choice (with the bias field it lowered the 3D errors by at most 10 % more);
# - iterations: a volume's cost about what an image's do (the samples are capped), and in 3D 80
#   lowered the field error by a further 3-8 %, where in 2D the time target leaves no room;
# - mind_weight: 0.5 was best on all six 2D sets; 1 in 3D (lower errors than 0.5 with a contrast
#   change, within 0.002 mm without);
# - mind_samples: in 3D each sample reads 12 descriptor channels, and 2048 were as accurate as
#   4096 in about 0.5 s less a pair; in 2D (4 channels) 2048 cost accuracy.
DIMENSION_DEFAULTS = {2: {"similarity": "nmi+mind", "iterations": 40, "mind_weight": 0.5, "mind_samples": 4096},
                      3: {"similarity": "nmi", "iterations": 80, "mind_weight": 1.0, "mind_samples": 2048}}
# The bias field's grid (control points per axis, linear in between) and its step (relative gain per
# step at the finest level, growing with the level's factor as the residual's does). 6 points per
# axis or steps of 0.05 were no better in 3D, and 3 points lost most of the gain in 2D.
BIAS_FIELD_POINTS = 4
BIAS_FIELD_STEP = 0.02


@dataclass
class OptimisationSettings:
    """How the residual field is optimised. Defaults chosen on non-brain and synthetic pairs."""

    levels: int = 3  # resolution levels, coarsest first: images shrunk by 2**(levels-1), ..., 1
    iterations: int | None = None  # Adam iterations per level (None: see DIMENSION_DEFAULTS)
    samples: int = 16384  # voxels compared per iteration; every voxel when a level has fewer
    control_spacing: int = 8  # voxels of a level between control points (see _control_shape for thick slices)
    learning_rate: float = 0.6  # mm per step at the finest level, at most one voxel (a level k times coarser: k times more)
    smoothness: float = 0.5  # weight of the diffusion penalty on the control grid
    mask_weight: float = 0.0  # weight of the log-Dice of SAR's own masks
    bins: int = 32  # NMI histogram bins
    nmi_kernel: str = "linear"  # Parzen window of the NMI histograms: "linear" (fast) or "gaussian"
    # What compares the images: "nmi" (2 - NMI of the sampled intensities), "mind" (mean squared
    # difference of MIND-SSC descriptors, losses.mind_ssc, computed once per level; it lost on 11
    # of the 12 tuning sets) or "nmi+mind", both summed. None: see DIMENSION_DEFAULTS.
    similarity: str | None = None
    mind_weight: float | None = None  # of the MIND term in "nmi+mind" (None: see DIMENSION_DEFAULTS)
    mind_samples: int | None = None  # of the samples, how many the MIND term compares (None: see DIMENSION_DEFAULTS)
    # Optimise a smooth intensity gain of the floating image with the field, for NMI (the bias field
    # of MR coils; see BIAS_FIELD_POINTS). On the tuning sets with a contrast change (whose
    # remapping includes a bias field) it lowered the field error by 22-45 % in 2D and 3D; on those
    # without one it changed it by -2 to +5 % (benchmarks/results/bias_field_tuning.md).
    bias_field: bool = True
    # Return the mean of the finest level's last iterates, this fraction of them, rather than the
    # last one (Polyak-Ruppert averaging): each step follows the gradient of one random draw of
    # samples, so the last iterate ends on that draw's noise, and the mean averages it out. Half
    # lowered the field error on 8 of the 12 tuning sets (2D small B-splines 0.083 -> 0.071 mm, 3D
    # 0.278 -> 0.265) and raised it by at most 1 % on the other 4, the velocity fields, which are
    # still moving at the finest level (benchmarks/results/instance_optimisation_tuning.md).
    averaged_fraction: float = 0.5
    # Equalise the histograms of the images NMI compares (each voxel to its mid-rank, :func:`equalised`;
    # MIND-SSC keeps the images as they are). CT puts every soft tissue within about 200 HU between
    # air and bone, so after the 1-99 % normalisation most voxels and every boundary inside the body
    # fall into two or three of the 32 bins; equalised, each band gets bins in proportion to its
    # voxels. On CT-like synthetic volumes it lowered the error in the mask from 0.380 / 1.062 /
    # 1.751 mm to 0.310 / 0.374 / 0.723 (B-splines, large deformations, velocity fields; Greedy's
    # NCC 0.241 / 0.722 / 1.056), but on MR it cost up to 90 % in 2D and 13 % in 3D
    # (benchmarks/results/instance_optimisation_tuning.md, session 14). None: on when both images are
    # CT (imageio.in_hounsfield_units; register decides, optimise_residual alone takes None as off).
    equalise: bool | None = None
    seed: int = 0

    def for_dimension(self, ndims: int) -> "OptimisationSettings":
        """These settings for images of ``ndims`` dimensions: every None replaced by its default there."""
        chosen = {name: value for name, value in DIMENSION_DEFAULTS[ndims].items() if getattr(self, name) is None}
        return replace(self, **chosen)

    def check(self) -> None:
        for name in ("levels", "iterations", "samples", "mind_samples", "control_spacing", "bins"):
            value = getattr(self, name)
            if value is None and name in DIMENSION_DEFAULTS[2]:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SettingsError(f"The instance optimisation's {name.replace('_', ' ')} must be a whole number "
                                    f"of at least 1, not {value!r}.")
        if not (isinstance(self.averaged_fraction, (int, float)) and not isinstance(self.averaged_fraction, bool)
                and 0 <= self.averaged_fraction <= 1):
            raise SettingsError(f"The instance optimisation's averaged fraction must be a number from 0 to 1, "
                                f"not {self.averaged_fraction!r}.")
        for name in ("learning_rate", "smoothness", "mask_weight", "mind_weight"):
            value = getattr(self, name)
            if value is None and name in DIMENSION_DEFAULTS[2]:
                continue
            if not (isinstance(value, (int, float)) and value >= 0 and value < float("inf")):
                raise SettingsError(f"The instance optimisation's {name.replace('_', ' ')} must be a finite "
                                    f"number of at least 0, not {value!r}.")
        for name in ("bias_field", "equalise"):
            value = getattr(self, name)
            if not isinstance(value, bool) and not (name == "equalise" and value is None):
                raise SettingsError(f"The instance optimisation's {name.replace('_', ' ')} setting must be True or "
                                    f"False, not {value!r}.")
        if self.similarity is not None and self.similarity not in SIMILARITIES:
            raise SettingsError(f"The instance optimisation's similarity must be one of {', '.join(SIMILARITIES)}, "
                                f"not {self.similarity!r}.")
        if self.nmi_kernel not in ("linear", "gaussian"):
            raise SettingsError(f"The instance optimisation's NMI kernel must be 'linear' or 'gaussian', "
                                f"not {self.nmi_kernel!r}.")


@dataclass
class OptimisationResult:
    displacement: torch.Tensor  # (1, ndims, *spatial) voxels: the initial field plus the residual
    iterations: int
    start_loss: float  # the objective on the evaluation voxels, of the start and of the returned field
    final_loss: float
    kept_initial: bool  # the residual did not lower the objective, so the initial field was kept
    losses: list = field(default_factory=list)  # the objective of every iteration, on its samples


def optimise_residual(reference: torch.Tensor, floating: torch.Tensor, initial: torch.Tensor | None = None,
                      settings: OptimisationSettings | None = None, *, reference_mask: torch.Tensor | None = None,
                      floating_mask: torch.Tensor | None = None, ignore_mask: torch.Tensor | None = None,
                      floating_map=None, floating_on_reference: torch.Tensor | None = None, skip_outside: bool = False,
                      spacing=None, floating_spacing=None, progress: ProgressCallback | None = None,
                      cancel: Callable[[], bool] | None = None) -> OptimisationResult:
    """Optimise ``initial + residual`` so that ``floating`` warped by it matches ``reference``.

    Args:
        reference, floating: ``(1, 1, *spatial)`` images in [0, 1] on one grid; with
            ``floating_map``, ``floating`` is on a grid of its own (any shape).
        initial: ``(1, ndims, *spatial)`` voxel field to start from (the network's); zero if None.
        floating_map: ``(L, b)``, tensors ``(ndims, ndims)`` and ``(ndims,)``: where a point ``p`` of the
            reference's grid lies on ``floating``'s, ``L p + b``, both in normalised coordinates
            (:func:`grids.normalised_map`). The floating image is then read on its own voxels,
            interpolated once, instead of first resampled onto the reference's grid and then
            interpolated again (see the module's docstring). Outside its extent it reads 0.
        skip_outside: with ``floating_map``, leave out of NMI the samples that land outside the
            floating image's extent, as Elastix does, rather than compare them with 0: for a
            floating image that covers only part of the reference (see
            ``registration.PARTIAL_COVERAGE``).
        floating_on_reference: with ``floating_map`` and a MIND-SSC similarity, the floating image
            resampled onto the reference's grid: MIND-SSC compares neighbours along the grid's
            axes, so both images' descriptors are computed on one grid.
        reference_mask, floating_mask: SAR's soft masks ``(1, 1, *spatial)``, for ``mask_weight``.
        ignore_mask: ``(1, 1, *spatial)`` in [0, 1], 1 where the images are not compared.
        spacing: the grid's voxel size in mm per array axis (1 mm if None), which turns
            ``learning_rate`` into voxels per step along each axis (at most one) and sets how much
            each level shrinks each axis and where the control points lie (:func:`level_factors`).
        floating_spacing: with ``floating_map``, the floating image's own voxel size in mm per
            array axis, for its levels (None: shrunk alike along every axis).

    The objective is measured on one fixed set of voxels before and after; if the residual did not
    lower it, the initial field is returned unchanged, so this stage never ends worse (by its own
    measure) than where it started.
    """
    settings = settings or OptimisationSettings()
    settings.check()
    shape = tuple(reference.shape[2:])
    ndims = len(shape)
    settings = settings.for_dimension(ndims)
    initial = None if initial is None else initial.detach()  # None: the identity, never sampled
    # MIND-SSC compares local structure and keeps the images as they are; NMI may see them equalised.
    structure = {"reference": reference, "floating": floating}
    if settings.equalise:
        reference, floating = equalised(reference), equalised(floating)
    if floating_map is not None and "mind" in settings.similarity and floating_on_reference is None:
        raise ValueError("a floating image on its own grid needs floating_on_reference for MIND-SSC")
    if floating_map is not None:  # in grid_sample's order, as the positions it maps
        floating_map = (floating_map[0].flip(0).flip(1), floating_map[1].flip(0))
    use_masks = settings.mask_weight > 0 and reference_mask is not None and floating_mask is not None
    # numpy's PCG64, not torch's Mersenne twister: the draws of an iteration took half as long.
    generator = np.random.default_rng(settings.seed)

    def images_at(factor: int) -> dict:
        level_shape = tuple(-(-n // f) for n, f in zip(shape, level_factors(factor, spacing)))
        floating_shape = tuple(-(-n // f) for n, f in zip(floating.shape[2:], level_factors(factor, floating_spacing)))
        images = {"reference": downsample(reference, level_shape), "floating": downsample(floating, floating_shape)}
        if floating_map is not None:
            images["floating_map"], images["skip_outside"] = floating_map, skip_outside
        if "mind" in settings.similarity:
            images["reference_descriptors"] = losses.mind_ssc(downsample(structure["reference"], level_shape))
            images["floating_descriptors"] = losses.mind_ssc(downsample(
                structure["floating"] if floating_map is None else floating_on_reference, level_shape))
        if ignore_mask is not None:
            images["ignore"] = downsample(ignore_mask, level_shape)
        if use_masks:
            images["reference_mask"] = downsample(reference_mask, level_shape)
            images["floating_mask"] = downsample(floating_mask, level_shape)
        return images

    spacing = (1.0,) * ndims if spacing is None else tuple(float(size) for size in spacing)
    floating_spacing = (spacing if floating_map is None else (1.0,) * ndims) if floating_spacing is None \
        else tuple(float(size) for size in floating_spacing)
    finest = images_at(1)
    evaluation_points = _points(shape, settings.samples * 4, np.random.default_rng(settings.seed + 1), reference)

    def per_axis(values) -> torch.Tensor:  # (1, ndims, 1, ...) from values in array axis order, x first
        return torch.tensor(values[::-1], dtype=reference.dtype, device=reference.device).view(
            1, ndims, *([1] * ndims))

    # The residual is optimised in units of one full-resolution step per axis, so that Adam's
    # step (at most its rate) has the same length in mm along every axis; step_voxels turns it into voxels.
    step_voxels = per_axis([min(settings.learning_rate / size, 1.0) for size in spacing])
    to_normalised = per_axis([2.0 / max(n - 1, 1) for n in shape])
    # The start, sampled every iteration, in grid_sample's order and units once (see the module's docstring).
    start = None if initial is None else initial.flip(1) * to_normalised
    residual = None
    gain = None  # the floating image's relative intensity gain g (bias_field: times 1 + g), in units of BIAS_FIELD_STEP
    with torch.no_grad():
        start_loss = float(_objective(finest, start, None, evaluation_points, settings, use_masks, shape, to_normalised))

    iterations = settings.iterations
    total = settings.levels * iterations
    done, history = 0, []
    for level in range(settings.levels):
        factor = 2 ** (settings.levels - 1 - level)
        images = finest if factor == 1 else images_at(factor)
        level_shape = tuple(images["reference"].shape[2:])
        control_shape = _control_shape(level_shape, spacing, factor, settings.control_spacing)
        residual = torch.zeros(1, ndims, *control_shape, dtype=reference.dtype, device=reference.device) \
            if residual is None else _resize(residual.detach(), control_shape)
        residual.requires_grad_(True)
        parameters = [residual]
        if settings.bias_field:
            gain_shape = tuple(1 if n == 1 else min(BIAS_FIELD_POINTS, n) for n in level_shape)
            gain = torch.zeros(1, 1, *gain_shape, dtype=reference.dtype, device=reference.device) \
                if gain is None else _resize(gain.detach(), gain_shape)
            parameters.append(gain.requires_grad_(True))
        adam = Adam(parameters, lr=1.0)
        # The finest level's last `averaged_count` iterates are averaged into the field returned.
        averaged_count = max(1, round(settings.averaged_fraction * iterations))
        averaged = [torch.zeros_like(parameter) for parameter in parameters]
        # Coarse levels need fewer samples (their steps are long and their images smooth): half as
        # many there lowered the error on 5 of 6 2D tuning sets, and saved time.
        samples = settings.samples if factor == 1 else max(1, settings.samples // 2)
        every_voxel = _points(level_shape, samples, generator, reference) \
            if math.prod(level_shape) <= samples else None  # the same points every iteration: made once
        for iteration in range(iterations):
            # Steps grow with the level's factor, so coarse levels travel far (capture range: on 15 mm
            # deformations the field error was 1.25 mm with full-resolution steps, 0.26 mm so; on
            # 20 mm ones 0.6 mm steps halved the error of 0.2 mm ones), and shrink linearly to a
            # tenth within each level: the random samples make the gradient noisy, and smaller final
            # steps average that noise out instead of ending on it.
            adam.lr = factor * (1 - 0.9 * iteration / iterations)
            if cancel is not None and cancel():
                raise RegistrationCancelled("Registration cancelled during instance optimisation; nothing was written.")
            points = every_voxel if every_voxel is not None else _points(level_shape, samples, generator, reference)
            adam.zero_grad()
            loss = _objective(images, start, residual * step_voxels, points, settings, use_masks, shape, to_normalised,
                              None if gain is None else gain * BIAS_FIELD_STEP, spacing)
            loss.backward()
            adam.step()
            if factor == 1 and iteration >= iterations - averaged_count:
                for running, parameter in zip(averaged, parameters):
                    running.add_(parameter.detach())
            done += 1
            history.append(float(loss.detach()))
            if progress is not None:
                progress(done / total, f"instance optimisation: level {level + 1} of {settings.levels}, "
                                       f"iteration {done}, loss {history[-1]:.4f}")

    residual = averaged[0] / averaged_count
    gain = averaged[1] / averaged_count if settings.bias_field else None
    with torch.no_grad():
        residual = residual * step_voxels
        final_loss = float(_objective(finest, start, residual, evaluation_points, settings, use_masks, shape, to_normalised,
                                      None if gain is None else gain * BIAS_FIELD_STEP, spacing))
        if initial is None:
            initial = torch.zeros(1, ndims, *shape, dtype=reference.dtype, device=reference.device)
        if final_loss >= start_loss:
            return OptimisationResult(initial, done, start_loss, start_loss, True, history)
        displacement = initial + _resize(residual, shape).flip(1)
    return OptimisationResult(displacement, done, start_loss, final_loss, False, history)


def equalised(image: torch.Tensor, samples: int = 65536, levels: int = 4096) -> torch.Tensor:
    """``image`` (intensities in [0, 1]) remapped by its own cumulative histogram into [0, 1]: each
    intensity to the mid-rank of its value among an evenly strided subset of at most ``samples`` of
    the voxels. Monotonic, so it keeps every boundary; a value many voxels share (air, a padded
    border) maps to the middle of its ranks rather than swallowing the range above it. The curve
    is tabulated at ``levels`` even steps and read linearly, not searched for every voxel: on a
    volume's 4 M voxels the search took about 0.5 s an image."""
    flat = image.detach().flatten()
    subset = flat[::max(1, flat.numel() // samples)].sort().values
    if subset[0] == subset[-1]:
        return image
    steps = torch.linspace(0, 1, levels, dtype=image.dtype, device=image.device)
    below, up_to = (torch.searchsorted(subset, steps, right=right) for right in (False, True))
    curve = (below + up_to).to(image.dtype) / (2 * subset.numel())
    position = image.clamp(0, 1) * (levels - 1)
    lower = position.floor().clamp_(max=levels - 2)
    index = lower.long()
    return torch.lerp(curve[index], curve[index + 1], position - lower)


def _points(shape, samples: int, generator: np.random.Generator, like: torch.Tensor) -> torch.Tensor:
    """Where to compare: ``(1, N, ndims)`` positions in ``grid_sample``'s normalised ``[-1, 1]`` and
    order (x first), with ``like``'s dtype and device.

    Every voxel centre when the grid has at most ``samples`` voxels, else ``samples`` uniform draws.
    """
    ndims = len(shape)
    if math.prod(shape) <= samples:
        axes = [torch.linspace(-1, 1, n) for n in shape]
        points = torch.stack(torch.meshgrid(*axes, indexing="ij")[::-1], dim=-1).reshape(1, -1, ndims)
    else:
        points = torch.from_numpy(generator.random((1, samples, ndims), dtype=np.float32)) * 2 - 1
    return points.to(like)


def _grid(points: torch.Tensor) -> torch.Tensor:
    """``(1, N, ndims)`` positions as ``grid_sample``'s grid, a view."""
    ndims = points.shape[-1]
    return points.view(1, -1, *([1] * (ndims - 1)), ndims)


def _sample(volume: torch.Tensor, grid: torch.Tensor, padding: str = "border") -> torch.Tensor:
    """``volume`` ``(1, C, *spatial)`` at the ``N`` positions of a :func:`_grid`, linearly: ``(1, C, N)``."""
    return F.grid_sample(volume, grid, mode="bilinear", padding_mode=padding, align_corners=True).flatten(2)


def _objective(images: dict, start: torch.Tensor | None, residual: torch.Tensor | None, points: torch.Tensor,
               settings: OptimisationSettings, use_masks: bool, full_shape, to_normalised: torch.Tensor,
               gain: torch.Tensor | None = None, spacing=None) -> torch.Tensor:
    """The similarity (``2 - NMI``, the MIND-SSC difference or both; + log-Dice of the masks, + diffusion
    of the residual) at ``points`` (:func:`_points`).

    ``start`` (the initial field, in ``grid_sample``'s order and normalised units) and ``residual``
    (a control grid, in voxels of the optimisation grid of shape ``full_shape``, x first) may be
    None: zero. ``to_normalised`` ``(1, ndims, 1, ...)`` turns those voxels into normalised units.
    ``gain`` ``(1, 1, *coarse)``, if given, is the floating image's relative intensity gain ``g``
    over its extent: NMI compares the floating image times ``1 + g``.
    """
    at_points = _grid(points)
    # The residual turned into normalised units on its control grid, not at every sample: fewer values.
    sampled = [_sample(volume, at_points) for volume in (start, None if residual is None else residual * to_normalised)
               if volume is not None]  # (1, ndims, N)
    if sampled:
        moved = points + sum(sampled[1:], sampled[0]).transpose(1, 2)
        at_moved = _grid(moved)
    else:  # the identity
        moved, at_moved = points, at_points
    weights = None if "ignore" not in images else 1 - _sample(images["ignore"], at_points)
    loss = 0.0
    if "nmi" in settings.similarity:
        if "floating_map" in images:  # the floating image on its own grid, which ends at its extent
            linear, offset = images["floating_map"]
            on_floating = torch.addmm(offset, moved[0], linear.T)[None]
            warped = _sample(images["floating"], _grid(on_floating), "zeros")
            if images.get("skip_outside"):  # no gradient through which samples count
                inside = (on_floating.detach().abs() <= 1).all(dim=-1).to(warped.dtype)[:, None]
                weights = inside if weights is None else weights * inside
        else:
            warped = _sample(images["floating"], at_moved)
        if gain is not None:  # the gain belongs to the floating image: sampled where it is read
            # warped * (1 + g) in one op, not warped * exp(g): as accurate on the tuning sets, and
            # faster. Values pushed past 1 fall in the histogram's last bin (losses clamps them).
            warped = torch.addcmul(warped, warped, _sample(gain, at_moved))
        fixed = _sample(images["reference"], at_points)
        loss = 2.0 - losses.normalised_mutual_information(warped, fixed, bins=settings.bins, mask=weights,
                                                       kernel=settings.nmi_kernel)
    if "mind" in settings.similarity:
        count = settings.mind_samples  # the first of the random samples: MIND's channels make each dear
        difference = _sample(images["floating_descriptors"], at_moved[:, :count]) - \
            _sample(images["reference_descriptors"], at_points[:, :count])
        squared = (difference * difference).mean(dim=1, keepdim=True)
        mind = squared.mean() if weights is None else \
            (squared * weights[..., :count]).sum() / (weights[..., :count].sum() + 1e-7)
        loss = loss + (settings.mind_weight if "nmi" in settings.similarity else 1.0) * mind
    if use_masks:
        loss = loss + settings.mask_weight * losses.log_dice_loss(
            _sample(images["floating_mask"], at_moved), _sample(images["reference_mask"], at_points))
    if residual is not None and settings.smoothness:
        loss = loss + settings.smoothness * _diffusion(residual, full_shape, spacing)
    return loss


def _diffusion(control: torch.Tensor, full_shape, grid_spacing=None) -> torch.Tensor:
    """Mean squared difference of neighbouring control points, per voxel of their spacing along the
    finest axis of the optimisation grid (``grid_spacing``, mm per array axis; None: all alike), so
    that a difference across thick slices counts by its length in mm."""
    total = 0.0
    relative = (1.0,) * len(full_shape) if grid_spacing is None else [size / min(grid_spacing) for size in grid_spacing]
    for axis in range(control.dim() - 2):
        count = control.shape[axis + 2]
        if count < 2:
            continue
        # The finest axis's voxels of the optimisation grid between control points.
        spacing = (full_shape[axis] - 1) / (count - 1) * relative[axis]
        step = torch.diff(control, dim=axis + 2) / spacing
        total = total + (step * step).mean()  # not pow(): see optimisers.Adam on threaded unary ops
    return total


def level_factors(factor: int, spacing) -> tuple[int, ...]:
    """How many voxels of each axis (``spacing``: mm per array axis) a level ``factor`` times coarser
    than the finest merges into one: ``factor`` along the finest axes, fewer along coarser ones, so
    that no axis of the level is coarser than ``factor`` times the finest spacing. Thick slices
    (1 x 1 x 4 mm) are kept until the level's in-plane voxels are as thick; shrunk alike, they were
    16 mm thick at the coarsest level, where the in-plane voxels were 4 mm."""
    finest = min(spacing)
    return tuple(max(1, int(factor * finest / size + 1e-6)) for size in spacing)


def _control_shape(level_shape, spacing, factor: int, control_spacing: int) -> tuple[int, ...]:
    """Control points along each axis of a level: one every ``control_spacing * factor`` voxels of
    the full-resolution grid, as on cubic voxels, but at most twice as far apart in mm as along the
    finest axes. On thick slices (1 x 1 x 4 mm) a point every 8 slices was 32 mm apart across them
    and 8 mm within them; so capped, 16 mm. Two points at least, one along a single-voxel axis (a
    slice: no motion there)."""
    finest = min(spacing)
    counts = []
    for n, size, shrunk in zip(level_shape, spacing, level_factors(factor, spacing)):
        voxels = min(control_spacing * factor, 2 * control_spacing * factor * finest / size) / shrunk  # of this level
        counts.append(1 if n == 1 else max(2, math.ceil((n - 1) / voxels - 1e-9) + 1))
    return tuple(counts)


def _resize(field: torch.Tensor, shape) -> torch.Tensor:
    """A control grid (or field) on a grid of ``shape`` over the same extent (corners aligned)."""
    if tuple(field.shape[2:]) == tuple(shape):
        return field
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    return F.interpolate(field, size=tuple(shape), mode=mode, align_corners=True)
