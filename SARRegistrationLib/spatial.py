"""Spatial transforms on tensors: warping, field integration and composition.

Conventions used everywhere in the engine:

- An image batch is ``(B, C, *spatial)`` with ``spatial = (H, W)`` in 2D or ``(D, H, W)`` in 3D, in
  the same axis order as the numpy arrays SimpleITK returns (``z, y, x``).
- A displacement field is ``(B, ndims, *spatial)`` in **voxel units of its grid**; channel ``i`` is
  the displacement along spatial axis ``i`` (array order, so channel 0 is ``z`` in 3D).
- Warping pulls back: ``warped(x) = moving(x + u(x))``. This is the convention of ITK's
  ``DisplacementFieldTransform`` (fixed point -> moving point), so a field converted to millimetres
  can be handed to SimpleITK, Elastix or ANTs unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def spatial_ndims(tensor: torch.Tensor) -> int:
    """Number of spatial dimensions of a ``(B, C, *spatial)`` tensor (2 or 3)."""
    ndims = tensor.dim() - 2
    if ndims not in (2, 3):
        raise ValueError(f"expected a (B, C, H, W) or (B, C, D, H, W) tensor, got shape {tuple(tensor.shape)}")
    return ndims


def identity_grid(shape, device=None, dtype=torch.float32) -> torch.Tensor:
    """Voxel coordinates of a grid: ``(ndims, *shape)``, channel ``i`` holding the index along axis ``i``."""
    axes = [torch.arange(n, device=device, dtype=dtype) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


def _sampling_grid(displacement: torch.Tensor) -> torch.Tensor:
    """Turn a voxel displacement into the normalised, last-axis-first grid that ``grid_sample`` reads."""
    shape = displacement.shape[2:]
    positions = identity_grid(shape, displacement.device, displacement.dtype).unsqueeze(0) + displacement
    # align_corners=True maps index 0 to -1 and index n-1 to +1; a size-1 axis has no extent to scale.
    scale = torch.tensor([2.0 / max(n - 1, 1) for n in shape], device=displacement.device, dtype=displacement.dtype)
    normalised = positions * scale.view(1, -1, *([1] * len(shape))) - 1.0
    # grid_sample wants (B, *spatial, ndims) with the last spatial axis (x) first.
    return normalised.movedim(1, -1).flip(-1)


def warp(moving: torch.Tensor, displacement: torch.Tensor, mode: str = "bilinear",
         padding_mode: str = "border") -> torch.Tensor:
    """Resample ``moving`` at ``x + displacement(x)``.

    Args:
        moving: ``(B, C, *spatial)`` image, mask or field to warp.
        displacement: ``(B, ndims, *spatial)`` in voxels, on the same grid as ``moving``.
        mode: ``"bilinear"`` (linear in 3D too) for images and soft masks, ``"nearest"`` for labels.
        padding_mode: what lies outside the grid; ``"border"`` repeats the edge, ``"zeros"`` is empty.
    """
    if moving.shape[2:] != displacement.shape[2:] or displacement.shape[1] != spatial_ndims(moving):
        raise ValueError(f"cannot warp a {tuple(moving.shape)} image with a {tuple(displacement.shape)} field")
    grid = _sampling_grid(displacement)
    return F.grid_sample(moving, grid, mode=mode, padding_mode=padding_mode, align_corners=True)


def compose(inner: torch.Tensor, outer: torch.Tensor) -> torch.Tensor:
    """Displacement of ``outer ∘ inner``: ``x -> x + inner(x) + outer(x + inner(x))``."""
    return inner + warp(outer, inner)


def integrate_velocity(velocity: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """Displacement of the exponential of a stationary velocity field, by scaling and squaring.

    The result is a diffeomorphism when the scaled field is small enough; ``steps`` halvings of
    the velocity followed by ``steps`` self-compositions (Arsigny et al. 2006).
    """
    displacement = velocity / (2 ** steps)
    for _ in range(steps):
        displacement = compose(displacement, displacement)
    return displacement



def downsample(images: torch.Tensor, shape) -> torch.Tensor:
    """Average ``(B, C, *spatial)`` images onto a coarser grid of the same extent (area pooling)."""
    if tuple(images.shape[2:]) == tuple(shape):
        return images
    return F.interpolate(images, size=tuple(shape), mode="area")


def downsample_displacement(displacement: torch.Tensor, shape) -> torch.Tensor:
    """:func:`downsample` a voxel displacement, converting it to voxels of the coarser grid."""
    old_shape = displacement.shape[2:]
    if tuple(old_shape) == tuple(shape):
        return displacement
    scale = torch.tensor([new / old for new, old in zip(shape, old_shape)], dtype=displacement.dtype,
                         device=displacement.device)
    return downsample(displacement, shape) * scale.view(1, -1, *([1] * len(shape)))
