"""The rigid search that decides whether a pair is pre-aligned, and where the affine starts."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import SimpleITK as sitk

from helpers import one_torch_thread, rotation_3d, with_geometry  # noqa: F401 (autouse fixture)
from SARRegistrationLib import affine, cli, grids, register, registration
from SARRegistrationLib.deformations import known_deformation
from SARRegistrationLib.errors import InputImageError, SettingsError
from SARRegistrationLib.rigid_search import RigidSearch, _normalised_to_physical, _rigid, search_rigid


@contextlib.contextmanager
def sitk_threads(count: int):
    """ITK's default thread count set to ``count`` for the block (the tests may run on one)."""
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(count)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)


def _moved(image: sitk.Image, transform: sitk.Transform) -> sitk.Image:
    """``image`` resampled through ``transform`` (reference point -> point of ``image``) onto its own grid."""
    return sitk.Resample(image, image, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def _misalignment(image: sitk.Image, degrees: float, shift) -> sitk.Euler2DTransform:
    centre = image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()])
    return sitk.Euler2DTransform(centre, np.radians(degrees), shift)


@pytest.fixture(scope="module")
def lung(read_test_image):
    """A real non-brain 2D image: rat lung MR, 128 x 128 at 1 mm."""
    return sitk.Cast(read_test_image("rat_lung_1.nrrd"), sitk.sitkFloat32)


def test_the_composed_maps_are_the_grids_own(lung):
    """The search's maps, composed as matrices, are what ``grids.normalised_map`` reads off a
    rigid motion point by point, on oblique grids of different spacings."""
    volume = sitk.Image([20, 16, 9], sitk.sitkFloat32)
    reference = with_geometry(volume, (-20.0, 35.0, 10.0), (1.1, 0.9, 1.3), rotation_3d(25.0, -35.0))
    floating = with_geometry(sitk.Image([12, 18, 7], sitk.sitkFloat32), (-15.0, 30.0, 4.0), (1.5, 1.2, 2.0),
                             rotation_3d(-10.0, 20.0))
    centre = np.array([1.0, -2.0, 3.0])
    motion = _rigid(centre, np.radians([10.0, -20.0, 30.0]), (4.0, -5.0, 6.0))
    linear, offset = grids.normalised_map(reference, floating, motion)
    from_reference, reference_offset = _normalised_to_physical(reference)
    to_floating, floating_offset = _normalised_to_physical(floating)
    matrix = np.array(motion.GetMatrix()).reshape(3, 3)
    translation = matrix @ (reference_offset - centre) + centre + np.array(motion.GetTranslation()) - floating_offset
    np.testing.assert_allclose(np.linalg.inv(to_floating) @ matrix @ from_reference, linear, atol=1e-9)
    np.testing.assert_allclose(np.linalg.inv(to_floating) @ translation, offset, atol=1e-9)


def test_a_misaligned_pair_is_found_and_an_aligned_one_left_alone(lung):
    """Rotated by 25 degrees and shifted by (15, -10) mm, a real image is found misaligned, with the
    best motion of the search's grid within one step (10 degrees, 8 mm) of the truth; the image
    deformed by a 5 mm B-spline alone is not."""
    misalignment = _misalignment(lung, 25.0, (15.0, -10.0))
    found = search_rigid(_moved(lung, misalignment), lung)
    assert found.misaligned and found.gain > 0.05
    assert abs(found.rotation_degrees[0] - 25.0) <= 10.0
    assert np.all(np.abs(np.array(found.shift_mm) - (15.0, -10.0)) <= 8.0 + 1e-9), found.shift_mm
    deformed, _, _ = known_deformation(lung, None, np.random.default_rng(3), 5.0)
    assert not search_rigid(deformed, lung).misaligned
    # Nor is the image on a grid half a voxel off.
    half_off = sitk.Image(lung.GetSize(), sitk.sitkFloat32)
    half_off.SetSpacing(lung.GetSpacing())
    half_off.SetOrigin([o + 0.5 * s for o, s in zip(lung.GetOrigin(), lung.GetSpacing())])
    half_off = sitk.Resample(lung, half_off, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    assert not search_rigid(lung, half_off).misaligned


def test_the_default_registers_a_pair_too_misaligned_for_the_deformable_stages(lung):
    """Rotated by 35 degrees (beyond the 20 or so the deformable stages reach): by default the pair
    is pre-aligned and registered; without the pre-alignment it is not."""
    misalignment = _misalignment(lung, 35.0, (6.0, -4.0))
    reference = _moved(lung, misalignment)
    applied = sitk.GetArrayFromImage(sitk.TransformToDisplacementField(
        misalignment, sitk.sitkVectorFloat64, reference.GetSize(), reference.GetOrigin(), reference.GetSpacing(),
        reference.GetDirection()))
    foreground = sitk.GetArrayFromImage(reference) > np.percentile(sitk.GetArrayFromImage(reference), 60)

    def error(result):
        return np.linalg.norm(sitk.GetArrayFromImage(result.displacement) - applied, axis=-1)[foreground].mean()

    default = register(reference, lung, device="cpu")
    assert default.metrics["affine_prealignment"] is True and default.metrics["rigid_search"]["gain"] > 0
    assert error(default) < 1.0  # mm; the misalignment moves these voxels by 25 mm on average
    # Pre-aligned, the same inputs still give the same field bit for bit (ITK's affine on one thread).
    with sitk_threads(2):
        again = register(reference, lung, device="cpu")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(again.displacement),
                                  sitk.GetArrayFromImage(default.displacement))
    without = register(reference, lung, device="cpu", affine=False)
    assert without.metrics["affine_prealignment"] is False and without.metrics["rigid_search"] is None
    assert error(without) > 5 * error(default)


def test_an_aligned_pair_is_not_pre_aligned_and_thin_images_are_not_searched(lung, read_test_image):
    deformed, _, _ = known_deformation(lung, None, np.random.default_rng(3), 5.0)
    result = register(deformed, lung, device="cpu")
    assert result.metrics["affine_prealignment"] is False and result.metrics["rigid_search"]["gain"] == 0.0
    # A slab of 3 slices is too thin for ITK's affine: automatic skips it, "always" says why.
    slab = sitk.JoinSeries([lung] * 3)
    assert register(slab, slab, device="cpu", optimisation_iterations=2).metrics["rigid_search"] is None
    with pytest.raises(InputImageError, match="at least 4 voxels along every axis"):
        register(slab, slab, device="cpu", affine=True)
    with pytest.raises(SettingsError, match="'auto', True or False"):
        register(lung, lung, device="cpu", affine="yes")


def test_the_affine_is_kept_only_where_it_matches_better_than_none(lung, monkeypatch):
    """``affine.matches_better`` tells the motion that undoes a misalignment from one that makes it
    worse; under auto, an affine that matches worse than none is dropped (the pair registered as it
    lies, the search's find reported as declined), and ``always`` keeps it."""
    misalignment = _misalignment(lung, 25.0, (15.0, -10.0))
    reference = _moved(lung, misalignment)
    assert affine.matches_better(reference, lung, misalignment)
    assert not affine.matches_better(reference, lung, misalignment.GetInverse())
    wrong = sitk.TranslationTransform(2, (30.0, 25.0))
    assert not affine.matches_better(lung, lung, wrong)
    # Where ITK's metric refuses a motion (too little overlaps), it counts as the worse one.
    far = sitk.Image(lung)
    far.SetOrigin([origin + 500.0 for origin in lung.GetOrigin()])
    assert affine.matches_better(lung, far, sitk.TranslationTransform(2, (500.0, 500.0)))
    assert not affine.matches_better(lung, lung, sitk.TranslationTransform(2, (500.0, 500.0)))

    deformed, _, _ = known_deformation(lung, None, np.random.default_rng(3), 5.0)
    monkeypatch.setattr(registration, "search_rigid", lambda reference, floating, with_centres: RigidSearch(
        sitk.AffineTransform(2), 0.01, (0.0,), (0.0, 0.0)))  # a search fooled into "misaligned"
    monkeypatch.setattr(registration, "affine_align", lambda fixed, moving, initial: wrong)
    declined = register(deformed, lung, device="cpu")
    assert declined.metrics["affine_prealignment"] is False and declined.metrics["rigid_search"]["declined"]
    as_it_lies = register(deformed, lung, device="cpu", affine=False)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(declined.displacement),
                                  sitk.GetArrayFromImage(as_it_lies.displacement))
    kept = register(deformed, lung, device="cpu", affine=True)
    assert kept.metrics["affine_prealignment"] is True and not kept.metrics["rigid_search"]["declined"]


def test_the_command_line_affine_choices():
    parser = cli._parser()
    kwargs = {choice: cli._registration_kwargs(parser.parse_args(["register", "--sample", "--output-dir", "out", *choice.split()]))["affine"]
              for choice in ("", "--affine", "--affine always", "--affine never", "--affine auto")}
    assert kwargs == {"": "auto", "--affine": True, "--affine always": True, "--affine never": False,
                      "--affine auto": "auto"}


def test_a_misaligned_volume_is_pre_aligned_by_default():
    """In 3D (instance optimisation on the whole volume) as in 2D: a synthetic volume shifted by
    20 mm along each axis is pre-aligned, and matches its label mask far better than without."""
    from SARRegistrationLib import metrics
    from SARRegistrationLib.synthetic import synthetic_sample

    image, mask = synthetic_sample((24, 32, 32), np.random.default_rng(4), spacing=(2.0, 2.0, 2.0))
    shift = sitk.TranslationTransform(3, (20.0, -20.0, 20.0))
    reference = sitk.Resample(image, image, shift, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    reference_mask = sitk.Resample(mask, mask, shift, sitk.sitkNearestNeighbor, 0)

    def dice(result):
        warped = sitk.Resample(mask, reference, result.transform(), sitk.sitkNearestNeighbor, 0)
        return metrics.dice(sitk.GetArrayFromImage(reference_mask), sitk.GetArrayFromImage(warped))

    default = register(reference, image, device="cpu", optimisation_iterations=20)
    assert default.metrics["affine_prealignment"] is True
    without = register(reference, image, device="cpu", optimisation_iterations=20, affine=False)
    assert dice(default) > 0.8 > dice(without) + 0.2, (dice(default), dice(without))
