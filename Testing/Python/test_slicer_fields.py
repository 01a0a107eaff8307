"""What the Slicer module makes of a field (SARRegistration/SARRegistrationFields.py), on known fields.

Composition with a linear map, the inverse, the Jacobian determinant and the landmark error, each
against an answer known in closed form. The same outputs made from a registration in the scene are
tested in test_slicer_module.py.
"""

from __future__ import annotations


import numpy as np
import pytest
import SimpleITK as sitk

from helpers import rotation_3d, slicer_module_file

@pytest.fixture(scope="module")
def fields():
    with slicer_module_file("SARRegistrationFields") as module:
        yield module


def oblique_grid(size=(24, 20, 16)) -> sitk.Image:
    image = sitk.Image(list(size), sitk.sitkFloat32)
    image.SetSpacing((1.5, 1.2, 2.0))
    image.SetDirection(rotation_3d(25.0, 10.0))
    image.SetOrigin((5.0, -3.0, 2.0))
    return image


def physical_points(image: sitk.Image) -> np.ndarray:
    """``z, y, x, 3`` physical positions of the voxel centres."""
    size = image.GetSize()
    k, j, i = np.meshgrid(*[np.arange(n, dtype=float) for n in size[::-1]], indexing="ij")
    index = np.stack([i, j, k], axis=-1)
    matrix = np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    return index @ matrix.T + np.array(image.GetOrigin())


def field_image(vectors: np.ndarray, grid: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(vectors.astype(np.float64), isVector=True)
    image.CopyInformation(grid)
    return image


def smooth_field(grid: sitk.Image) -> np.ndarray:
    """A smooth non-linear field of a few mm, with gradient well below 1."""
    p = physical_points(grid)
    return np.stack([2.5 * np.sin(p[..., 0] / 9.0), 2.0 * np.cos(p[..., 1] / 8.0),
                     1.5 * np.sin(p[..., 2] / 7.0 + p[..., 0] / 11.0)], axis=-1)


def test_composing_a_field_with_a_linear_map_matches_the_formula(fields):
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = np.array(rotation_3d(10.0, 20.0)).reshape(3, 3) @ np.diag([2.0, 1.5, 3.0])
    ijk_to_ras[:3, 3] = (-20.0, 5.0, 12.0)
    shape = (4, 5, 6)
    rng = np.random.default_rng(0)
    field = rng.normal(size=(*shape, 3))
    matrix = np.eye(4)
    matrix[:3, :3] = np.array(rotation_3d(5.0, -8.0)).reshape(3, 3) * 1.1
    matrix[:3, 3] = (3.0, -2.0, 7.5)
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    positions = (np.stack([i, j, k, np.ones_like(i)], -1) @ ijk_to_ras.T)[..., :3]

    composed = fields.composeLinearAfter(field.copy(), ijk_to_ras, matrix)
    np.testing.assert_allclose(composed, (positions + field) @ matrix[:3, :3].T + matrix[:3, 3] - positions,
                               atol=1e-12)
    added = fields.addLinearDisplacement(field.copy(), ijk_to_ras, matrix)
    np.testing.assert_allclose(added, field + positions @ matrix[:3, :3].T + matrix[:3, 3] - positions, atol=1e-12)
    assert fields.composeLinearAfter(field, ijk_to_ras, np.eye(4)) is field  # the identity changes nothing


def test_the_inverse_undoes_the_field(fields):
    grid = oblique_grid()
    forward = field_image(smooth_field(grid), grid)
    inverse = fields.invertDisplacement(forward)
    forward_transform = sitk.DisplacementFieldTransform(sitk.Image(forward))
    inverse_transform = sitk.DisplacementFieldTransform(sitk.Image(inverse))
    errors = []
    for index in np.ndindex(*(n - 8 for n in grid.GetSize())):  # voxels 4 or more from the border
        x = grid.TransformIndexToPhysicalPoint(tuple(int(v) + 4 for v in index))
        there = inverse_transform.TransformPoint(x)
        errors.append(np.linalg.norm(np.subtract(forward_transform.TransformPoint(there), x)))
    assert np.max(errors) < 1e-3  # mm; the field moves up to 2.5 mm
    assert np.abs(sitk.GetArrayViewFromImage(inverse)).max() > 1.0


def test_inverting_stops_when_cancelled(fields):
    grid = oblique_grid()
    steps = []
    inverse = fields.invertDisplacement(field_image(smooth_field(grid), grid), steps.append,
                                        cancelled=lambda: len(steps) >= 1)
    assert len(steps) == 1 and inverse.GetSize() == grid.GetSize()


def test_jacobian_of_a_linear_field_on_an_oblique_grid(fields):
    """``d(x) = A x`` has the determinant ``det(I + A)`` everywhere; SimpleITK's own filter, which
    ignores the grid's direction, does not give it, so the module does not use it."""
    grid = oblique_grid()
    linear = np.array([[0.1, 0.2, 0.0], [0.0, 0.0, 0.05], [0.1, 0.0, -0.1]])
    field = field_image(physical_points(grid) @ linear.T, grid)
    expected = np.linalg.det(np.eye(3) + linear)
    determinant = fields.jacobianDeterminant(field, linearDeterminant=2.0, slabRows=5)
    assert determinant.shape == grid.GetSize()[::-1] and determinant.dtype == np.float32
    np.testing.assert_allclose(determinant, 2.0 * expected, rtol=1e-5)
    assert abs(sitk.GetArrayViewFromImage(sitk.DisplacementFieldJacobianDeterminant(field))[8, 10, 12]
               - expected) > 0.05


def test_target_registration_error_on_a_known_transform(fields):
    """Floating landmarks where a known map puts the reference ones: before is the distance, after zero."""
    reference = np.array([[0.0, 0.0, 0.0], [10.0, 5.0, -3.0], [-4.0, 8.0, 2.0]])
    shift = np.array([3.0, 4.0, 0.0])
    floating = reference + shift
    tre = fields.targetRegistrationErrors(reference, floating, lambda points: points + shift)
    assert tre["points"] == 3
    assert tre["before"]["mean_mm"] == pytest.approx(5.0) and tre["before"]["max_mm"] == pytest.approx(5.0)
    assert tre["after"]["max_mm"] == pytest.approx(0.0, abs=1e-12)
    # A map that gets one landmark 2 mm wrong.
    wrong = fields.targetRegistrationErrors(reference, floating,
                                            lambda points: points + shift + [[0, 0, 0], [0, 0, 2.0], [0, 0, 0]])
    assert wrong["after"]["per_point_mm"] == [0.0, 2.0, 0.0] and wrong["after"]["mean_mm"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="Landmarks come in pairs: 3 reference and 2 floating"):
        fields.targetRegistrationErrors(reference, floating[:2], lambda points: points)
