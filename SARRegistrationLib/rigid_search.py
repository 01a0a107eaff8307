"""Whether a pair needs pre-alignment, and where the affine pre-alignment should start: a rigid search.

The deformable stages capture rotations up to about 20 degrees and shifts up to about 20 mm
(``benchmarks/results/robustness.md``); beyond that they fail, and SimpleITK's affine registration
from the images' centres fails too on large shifts (3D volumes shifted by 30 mm per axis stayed
23 mm off). So before anything else the pair is compared on coarse copies (at most
:data:`SEARCH_VOXELS` voxels along the longest axis) under a grid of rigid motions about the
reference's centre: translations first, then rotations, each with the best translation and its
neighbours on the grid (a search like ANTs' ``antsAI`` or Elastix's exhaustive optimiser). Where some
motion matches better (NMI) than the images as they lie, the pair is misaligned and the affine
pre-alignment starts from the best one.

Written with torch rather than SimpleITK's exhaustive optimiser, which evaluates candidates one at
a time: all the candidates of a stage are sampled in one ``grid_sample`` and scored by one batched
histogram (2D 112 candidates in about 5 ms, 3D 1072 in about 0.25 s; SimpleITK took 13 ms for 343
in 2D on the same copies).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from . import grids, imageio, losses

# The coarse copies' voxels along the longest axis: 2D 24 (the full 343-candidate grid found every
# 2D pair of robustness.py that needed aligning at 24 as at 32, in 12 ms against 20); 3D 16, which
# keeps the 1072 candidates at a quarter of a second (benchmarks/results/prealignment_tuning.md).
SEARCH_VOXELS = {2: 24, 3: 16}
# Translations: this fraction of the reference's longest extent a step, SHIFT_STEPS steps each way
# along every axis (so up to 19 % of the extent). Rotations: ANGLE_STEP degrees, ANGLE_STEPS steps
# each way about every axis (2D: up to 30 degrees; 3D: 20, each of the 27 combinations).
SHIFT_FRACTION = 1 / 16
SHIFT_STEPS = 3
ANGLE_STEP = {2: 10.0, 3: 20.0}
ANGLE_STEPS = {2: 3, 3: 1}
BINS = 16  # NMI histogram bins: a coarse copy has a few hundred to a few thousand voxels


@dataclass
class RigidSearch:
    transform: sitk.AffineTransform  # the best rigid motion (ITK convention: reference point -> floating point)
    gain: float  # its NMI minus the NMI of the images as they lie (0 when nothing matched better)
    rotation_degrees: tuple  # 2D: one angle; 3D: about x, y, z
    shift_mm: tuple

    @property
    def misaligned(self) -> bool:
        return self.gain > 0


def _rotation(angles) -> np.ndarray:
    """The rotation matrix (physical x, y[, z] axes) of one angle in 2D, or of angles about x, then y, then z."""
    cos, sin = np.cos(angles), np.sin(angles)
    if len(angles) == 1:
        return np.array([[cos[0], -sin[0]], [sin[0], cos[0]]])
    about_x = np.array([[1, 0, 0], [0, cos[0], -sin[0]], [0, sin[0], cos[0]]])
    about_y = np.array([[cos[1], 0, sin[1]], [0, 1, 0], [-sin[1], 0, cos[1]]])
    about_z = np.array([[cos[2], -sin[2], 0], [sin[2], cos[2], 0], [0, 0, 1]])
    return about_z @ about_y @ about_x


def _rigid(centre: np.ndarray, angles, shift) -> sitk.AffineTransform:
    transform = sitk.AffineTransform(len(centre))
    transform.SetCenter(centre.tolist())
    transform.SetMatrix(_rotation(np.asarray(angles, dtype=float)).ravel().tolist())
    transform.SetTranslation([float(s) for s in shift])
    return transform


def _normalised_to_physical(grid: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """``(A, a)``: the physical point ``A p + a`` of ``grid``'s normalised coordinates ``p`` (array
    order; see :func:`grids.normalised_map`, whose maps these compose to)."""
    ndims = grid.GetDimension()
    half = np.maximum(np.array(grid.GetSize(), dtype=float)[::-1] - 1, 1) / 2  # array order, as normalised_map
    to_xyz = np.eye(ndims)[::-1]
    scaled = np.array(grid.GetDirection()).reshape(ndims, ndims) @ np.diag(grid.GetSpacing()) @ to_xyz
    return scaled @ np.diag(half), np.array(grid.GetOrigin()) + scaled @ half


def _coarse(image: sitk.Image) -> tuple[sitk.Image, torch.Tensor]:
    """A coarse grid over ``image`` and the image on it, ``(1, 1, *spatial)`` in [0, 1]."""
    grid = grids.working_grid(image, SEARCH_VOXELS[image.GetDimension()], multiple=1)
    array = imageio.normalise_intensity(imageio.array_of(grids.averaged_resample(image, grid)))
    return grid, torch.from_numpy(array)[None, None]


def search_rigid(reference: sitk.Image, floating: sitk.Image, with_centres: bool = False) -> RigidSearch:
    """The rigid motion of the search grid under which ``floating`` best matches ``reference`` (NMI
    of coarse copies), and how much better than none it matches.

    ``with_centres`` also tries the shift that brings the images' centres together (the affine's
    start without a search), for images whose origins differ by more than the grid reaches. Not
    to decide whether a pair is misaligned: where the floating image's grid is a fraction of a
    voxel off the reference's, that shift lines the coarse copies' voxels up, which spares the
    interpolation and so "matched better" (by up to 0.031 on the 2D pairs of
    ``benchmarks/robustness.py`` on another grid, which need no alignment;
    ``benchmarks/results/prealignment_tuning.md``).
    """
    ndims = reference.GetDimension()
    reference_grid, reference_values = _coarse(reference)
    floating_grid, floating_values = _coarse(floating)
    count = reference_values.numel()
    fixed = reference_values.reshape(1, 1, count)
    centre = np.array(reference.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in reference.GetSize()]))
    step = SHIFT_FRACTION * max(n * s for n, s in zip(reference.GetSize(), reference.GetSpacing()))
    # The coarse reference's voxel centres in normalised coordinates (array order), as rows.
    axes = [torch.linspace(-1, 1, n) for n in reference_values.shape[2:]]
    points = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(count, ndims)

    from_reference, reference_offset = _normalised_to_physical(reference_grid)
    to_floating, floating_offset = _normalised_to_physical(floating_grid)
    to_floating = np.linalg.inv(to_floating)

    def scores(candidates):
        """NMI of the pair under each (angles, shift) candidate: ``(K,)``."""
        # q = F^-1 (R (A p + a - c) + c + t - f): grids.normalised_map of each rigid motion, composed at once.
        rotations = np.stack([_rotation(np.asarray(angles)) for angles, _ in candidates])
        shifts = np.array([shift for _, shift in candidates])
        linear = torch.tensor(to_floating @ rotations @ from_reference, dtype=torch.float32)
        offset = torch.tensor(np.einsum("ij,kj->ki", to_floating, np.einsum("kij,j->ki", rotations, reference_offset - centre)
                                        + centre + shifts - floating_offset), dtype=torch.float32)
        moved = torch.matmul(points, linear.transpose(1, 2)) + offset[:, None]  # (K, N, ndims), array order
        grid = moved.flip(-1).view(1, len(candidates), count, *([1] * (ndims - 2)), ndims)
        sampled = F.grid_sample(floating_values, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        # Samples outside the floating image read 0: a shift that leaves the anatomy outside matches worse.
        return losses.normalised_mutual_information(sampled.reshape(len(candidates), 1, count),
                                                    fixed.expand(len(candidates), 1, count), bins=BINS,
                                                    kernel="linear", reduction="none")

    no_rotation = (0.0,) * (1 if ndims == 2 else 3)
    shifts = [tuple(step * k for k in offsets)
              for offsets in itertools.product(range(-SHIFT_STEPS, SHIFT_STEPS + 1), repeat=ndims)]
    translations = [(no_rotation, shift) for shift in shifts]
    if with_centres:
        floating_centre = floating.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in floating.GetSize()])
        translations.append((no_rotation, tuple(np.array(floating_centre) - centre)))
    translation_scores = scores(translations)
    as_they_lie = float(translation_scores[len(shifts) // 2])  # the grid's middle shift is zero
    best_shift = np.array(translations[int(torch.argmax(translation_scores))][1])
    angles = [math.radians(ANGLE_STEP[ndims] * k) for k in range(-ANGLE_STEPS[ndims], ANGLE_STEPS[ndims] + 1)]
    rotations = [(rotation, tuple(best_shift + step * np.array(offsets)))
                 for rotation in itertools.product(angles, repeat=len(no_rotation))
                 for offsets in itertools.product((-1, 0, 1), repeat=ndims)]
    candidates = translations + rotations
    all_scores = torch.cat([translation_scores, scores(rotations)])
    best = int(torch.argmax(all_scores))
    rotation, shift = candidates[best]
    return RigidSearch(transform=_rigid(centre, rotation, shift), gain=float(all_scores[best]) - as_they_lie,
                       rotation_degrees=tuple(round(math.degrees(a), 1) for a in rotation),
                       shift_mm=tuple(round(float(s), 2) for s in shift))
