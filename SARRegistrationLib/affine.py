"""Affine pre-alignment of a pair: the deterministic SimpleITK registration run before the network."""

from __future__ import annotations

import math
from contextlib import contextmanager

import SimpleITK as sitk


# The coarsest level of the pyramid keeps at least this many voxels along the longest axis.
COARSEST_VOXELS = 16
# The finest level keeps at most this many voxels along the longest axis (2D: the rat lung slices'
# size; 3D: the synthetic tuning volumes'), so that its time stops growing with the image. On the
# 2D tuning pairs upsampled to 256 x 256 (a one-off script), the affine at
# full resolution took 0.97 s and diverged on one pair of the large deformations (24.9 mm off after
# the deformable stages); with its finest level at 128 x 128, 0.24 s and 0.135 mm
# (benchmarks/results/prealignment_tuning.md).
FINEST_VOXELS = {2: 128, 3: 64}
# ITK's Gaussian smoothing of the pyramid needs this many voxels along every axis.
MINIMUM_VOXELS = 4


def can_align(image: sitk.Image) -> bool:
    """Whether :func:`affine_align` can take ``image`` (a single slice or a thin slab it cannot)."""
    return min(image.GetSize()) >= MINIMUM_VOXELS


def affine_align(fixed: sitk.Image, moving: sitk.Image, initial: sitk.AffineTransform | None = None) -> sitk.Transform:
    """Affine pre-alignment of ``moving`` to ``fixed`` (paper §2.1), deterministic.

    Mattes mutual information on every voxel, on one thread (no random sampling and no threaded
    sums, so repeated runs agree bit for bit), regular-step gradient descent over a pyramid of shrink
    factors 4, 2, 1, with 8 first where that level still has :data:`COARSEST_VOXELS` voxels along
    the image's longest axis, all of them multiplied so that the finest level has at most
    :data:`FINEST_VOXELS`. It starts from ``initial``: the engine gives it the best rigid motion
    of :func:`rigid_search.search_rigid`; None starts from the affine that brings the images'
    centres together. On the 2D pairs of ``benchmarks/robustness.py`` rotated by up to 30 degrees
    (a one-off script scored the affine alone, from the centres), the level at 8 brought the
    largest error from 28 mm to 1.2 mm, the B-spline part that an affine cannot follow; on its
    64-voxel 3D volumes it helped one case (30 degrees, 15 %, 20 mm) and hurt another (30 mm
    shifts, unsolved from the centres either way; the rigid search's start solves them), and on
    128-voxel ones it changed nothing.

    Returns:
        The fixed-to-moving transform (ITK convention): ``sitk.Resample(moving, fixed, transform)``
        is ``moving`` aligned to ``fixed``.
    """
    fixed = sitk.Cast(fixed, sitk.sitkFloat32)
    moving = sitk.Cast(moving, sitk.sitkFloat32)
    if initial is None:
        initial = sitk.CenteredTransformInitializer(fixed, moving, sitk.AffineTransform(fixed.GetDimension()),
                                                    sitk.CenteredTransformInitializerFilter.GEOMETRY)
    registration = _mattes_registration()
    registration.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-3, numberOfIterations=100,
                                                          gradientMagnitudeTolerance=1e-6)
    # Matrix entries and translations move points by very different amounts; scale them alike.
    registration.SetOptimizerScalesFromPhysicalShift()
    finest = _finest_shrink(fixed)
    shrink = [factor * finest for factor in (8, 4, 2, 1)
              if factor < 8 or max(fixed.GetSize()) / (factor * finest) >= COARSEST_VOXELS]
    registration.SetShrinkFactorsPerLevel(shrink)
    registration.SetSmoothingSigmasPerLevel([factor // 2 for factor in shrink])
    registration.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    registration.SetInitialTransform(initial, inPlace=False)
    with _one_thread():
        return registration.Execute(fixed, moving)


def matches_better(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform) -> bool:
    """Whether ``moving`` through ``transform`` (fixed-to-moving) matches ``fixed`` better than as it
    lies, by the affine's own measure (Mattes mutual information on every voxel) on copies of its
    finest level, block-averaged.

    The engine's check, under ``affine="auto"``, on the affine that starts from the rigid search's
    motion. The search compares copies of 16-24 voxels; on 2D tuning pairs that needed no
    pre-alignment (20 mm B-splines, velocity fields, with and without a contrast change) it found
    a motion of one shift step (8-16 mm) better in 7 of 36, and on one of them (a velocity field
    and a contrast change) the affine from it matched the images worse than none here and left
    the registration 21 mm off, against 0.26 mm without it; this check turns that one down and
    keeps the affine of every pair of ``benchmarks/robustness.py`` that needed it
    (``benchmarks/results/prealignment_tuning.md``).
    """
    registration = _mattes_registration()
    shrink = [_finest_shrink(fixed)] * fixed.GetDimension()
    fixed = sitk.BinShrink(sitk.Cast(fixed, sitk.sitkFloat32), shrink)
    moving = sitk.BinShrink(sitk.Cast(moving, sitk.sitkFloat32), shrink)
    values = []
    with _one_thread():
        for candidate in (sitk.Transform(fixed.GetDimension(), sitk.sitkIdentity), transform):
            registration.SetInitialTransform(candidate)
            try:
                values.append(registration.MetricEvaluate(fixed, moving))
            except RuntimeError:  # ITK's metric refuses a motion under which too little overlaps
                values.append(math.inf)
    return values[1] < values[0]  # ITK's Mattes metric is the negative mutual information


def _mattes_registration() -> sitk.ImageRegistrationMethod:
    registration = sitk.ImageRegistrationMethod()
    registration.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    registration.SetMetricSamplingStrategy(registration.NONE)
    registration.SetInterpolator(sitk.sitkLinear)
    return registration


def _finest_shrink(fixed: sitk.Image) -> int:
    """The shrink factor of the affine pyramid's finest level (see :data:`FINEST_VOXELS`)."""
    return math.ceil(max(fixed.GetSize()) / FINEST_VOXELS[fixed.GetDimension()])


@contextmanager
def _one_thread():
    """ITK on one thread: it sums the metric over voxels in threads, in an order that changes from
    run to run, which moved the affine's parameters by up to 4e-4 between two runs on two threads."""
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
