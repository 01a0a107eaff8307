"""Tests of the Slicer module SARRegistration/ outside the Slicer application.

MRML is real: the ``slicer-core`` wheel gives Slicer's scene, volume, transform and segmentation
nodes, its NRRD and ITK-transform readers, its transform logic (``hardenTransform``) and its
segmentations logic. What the wheel lacks is Slicer's Qt-based Python layer (``qt``,
``slicer.ScriptedLoadableModule``, ``slicer.parameterNodeWrapper``, ``slicer.i18n``), which only
the widget uses; :func:`_application_layer` stands in for it, so that the module file can be
imported and its logic tested. The panel's ``.ui`` file is loaded by real Qt (PyQt5, offscreen),
with placeholders for Slicer's and CTK's widget classes that declare those classes' properties.
"""

from __future__ import annotations

import ast
import importlib
import os
import re
import sys
import types
import typing
import unittest
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicer
import vtk
import vtk.util.numpy_support

from helpers import one_torch_thread, perturb_head, rotation_3d, tiny_model  # noqa: F401 (autouse fixture)
import SARRegistrationLib as sar
from SARRegistrationLib.errors import RegistrationCancelled, WeightsError
from SARRegistrationLib.model import save_model

MODULE_DIR = Path(__file__).resolve().parents[2] / "SARRegistration"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "SARRegistration.ui"

# Non-trivial geometries (RAS, as Slicer stores them): rotated axes, anisotropic voxels, origins
# far from zero. The floating volume is the same anatomy on a different grid.
REFERENCE_RAS = {"origin": (-31.0, 17.5, -12.0), "spacing": (4.1, 3.9, 5.6), "direction": rotation_3d(15.0, 8.0)}
FLOATING_RAS = {"origin": (-29.0, 16.0, -10.5), "spacing": (4.0, 4.2, 5.0), "direction": rotation_3d(12.0, 10.0)}


# ----------------------------------------------------------------------------------------------- the module

def _application_layer() -> dict:
    """Stand-ins for the parts of Slicer's Python layer that slicer-core does not ship.

    They carry no behaviour the logic depends on: base classes that store the module name (and a
    silent ``delayDisplay``), an identity ``@parameterNodeWrapper``, annotation classes that keep
    their arguments, and an identity ``tr``. ``qt`` is an empty module: only the widget uses it.
    """
    scripted = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            self.moduleName = type(self).__name__.removesuffix("Logic")

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, msec=None):  # shows a message in the application
            pass

    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                ScriptedLoadableModuleTest):
        setattr(scripted, cls.__name__, cls)

    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = lambda cls: cls

    class _Annotation:
        def __init__(self, *args):
            self.args = args

    for name in ("WithinRange", "Decimals", "SingleStep"):
        setattr(wrapper, name, type(name, (_Annotation,), {}))

    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    return {"slicer.ScriptedLoadableModule": scripted, "slicer.parameterNodeWrapper": wrapper,
            "slicer.i18n": i18n, "qt": types.ModuleType("qt")}


@pytest.fixture(scope="session")
def module():
    """The module file, imported as Slicer does: with its folder on the path."""
    added = {name: stand_in for name, stand_in in _application_layer().items() if name not in sys.modules}
    sys.modules.update(added)
    for name, stand_in in added.items():
        if name.startswith("slicer."):
            setattr(slicer, name.split(".", 1)[1], stand_in)
    sys.path.insert(0, str(MODULE_DIR))
    try:
        yield importlib.import_module("SARRegistration")
    finally:
        sys.path.remove(str(MODULE_DIR))
        sys.modules.pop("SARRegistration", None)
        for name in added:
            sys.modules.pop(name, None)
            if name.startswith("slicer."):
                delattr(slicer, name.split(".", 1)[1])


@pytest.fixture(scope="session", autouse=True)
def segmentation_converter_rules():
    """The conversion rules the Segmentations module registers when Slicer starts."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    for rule in (slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule,
                 slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule):
        factory.RegisterConverterRule(rule())


@pytest.fixture
def scene():
    """A fresh MRML scene, also as ``slicer.mrmlScene`` as in the application."""
    scene = slicer.vtkMRMLScene()
    previous = getattr(slicer, "mrmlScene", None)
    slicer.mrmlScene = scene
    yield scene
    scene.Clear(True)
    if previous is None:
        del slicer.mrmlScene
    else:
        slicer.mrmlScene = previous


@pytest.fixture
def logic(module):
    return module.SARRegistrationLogic()


# ----------------------------------------------------------------------------------------------- models and data

@pytest.fixture(scope="module")
def model_3d():
    """Untrained tiny 3D model whose field is several voxels and varies over the volume."""
    return perturb_head(tiny_model(3), bias=[0.8, -1.5, 2.0], weight_std=0.05, seed=1)


@pytest.fixture(scope="module")
def model_2d():
    return perturb_head(tiny_model(2), bias=[-1.5, 2.0], weight_std=0.05, seed=2)


@pytest.fixture(scope="module")
def brain_array(read_test_image):
    """brain3d_t1 shrunk to 32 x 32 x 12 voxels, as a ``k, j, i`` float32 array."""
    image = sitk.Shrink(read_test_image("brain3d_t1.nii.gz"), [4, 4, 5])
    array = sitk.GetArrayFromImage(sitk.Cast(image, sitk.sitkFloat32))
    assert array.shape == (12, 32, 32)
    return array


@pytest.fixture(scope="module")
def ventricles_array(read_test_image):
    image = sitk.Shrink(read_test_image("brain3d_ventricles.nii.gz"), [4, 4, 5])
    array = sitk.GetArrayFromImage(image).astype(np.uint8)
    assert array.any()
    return array


def ijk_to_ras(origin, spacing, direction) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3] = np.array(direction, dtype=float).reshape(3, 3) @ np.diag(spacing)
    matrix[:3, 3] = origin
    return matrix


def add_volume(scene, array, ijkToRAS, name="volume", class_name="vtkMRMLScalarVolumeNode"):
    """A volume node made with Slicer's own API (no module code)."""
    node = scene.AddNewNodeByClass(class_name, name)
    slicer.util.updateVolumeFromArray(node, array)
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ijkToRAS))
    node.CreateDefaultDisplayNodes()
    return node


def ijk_to_ras_of(node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def add_segmentation(scene, masks: dict, ijkToRAS, name="structure"):
    """A segmentation node with one segment per ``{name: k, j, i mask}``, made with Slicer's API."""
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    for index, (segment_name, mask) in enumerate(masks.items()):
        image = slicer.vtkOrientedImageData()
        image.SetDimensions(mask.shape[::-1])
        image.GetPointData().SetScalars(vtk.util.numpy_support.numpy_to_vtk(
            mask.astype(np.uint8).ravel(), deep=True, array_type=vtk.VTK_UNSIGNED_CHAR))
        image.SetImageToWorldMatrix(slicer.util.vtkMatrixFromArray(ijkToRAS))
        node.AddSegmentFromBinaryLabelmapRepresentation(image, segment_name, (1.0, 0.2 * index, 0.0))
    return node


@pytest.fixture
def pair_3d(scene, brain_array):
    """Reference and floating volumes: the same brain on two different, oblique grids."""
    reference = add_volume(scene, brain_array, ijk_to_ras(**REFERENCE_RAS), "reference")
    floating = add_volume(scene, brain_array, ijk_to_ras(**FLOATING_RAS), "floating")
    return reference, floating


def scene_state(scene) -> list:
    """Every node of the scene with its modification time: a run that changes nothing keeps it."""
    return [(scene.GetNthNode(i).GetID(), scene.GetNthNode(i).GetMTime()) for i in range(scene.GetNumberOfNodes())]


def sample_on_grid(node, grid_node, logic) -> np.ndarray:
    """The voxels of ``node`` at the voxel centres of ``grid_node`` (linear interpolation, world space)."""
    image = sitk.Cast(logic.sitkImageFromVolume(node), sitk.sitkFloat32)
    return sitk.GetArrayFromImage(sitk.Resample(image, logic.sitkImageFromVolume(grid_node), sitk.Transform(),
                                                sitk.sitkLinear, 0.0, sitk.sitkFloat32))


def harden_on_clone(scene, floating, transform_node, logic):
    """A copy of ``floating`` placed under ``transform_node`` and hardened by Slicer's transform logic."""
    clone = add_volume(scene, slicer.util.arrayFromVolume(floating).copy(), ijk_to_ras_of(floating), "hardened")
    clone.SetAndObserveTransformNodeID(transform_node.GetID())
    assert slicer.vtkSlicerTransformLogic.hardenTransform(clone)
    assert clone.GetParentTransformNode() is None
    return clone


def slicer_grid_transform_of(displacement: sitk.Image, scene, tmp_path):
    """The engine's displacement written as an ITK transform file and read by Slicer's own reader."""
    path = tmp_path / "displacement.h5"
    sitk.WriteTransform(sitk.DisplacementFieldTransform(sitk.Image(displacement)), str(path))
    node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "read by Slicer")
    storage = scene.AddNewNodeByClass("vtkMRMLTransformStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    return node


def grid_geometry(transform_node) -> tuple:
    grid_transform = transform_node.GetTransformFromParent()
    grid_transform.Update()
    grid = grid_transform.GetDisplacementGrid()
    return (np.array(grid.GetOrigin()), np.array(grid.GetSpacing()),
            slicer.util.arrayFromVTKMatrix(grid_transform.GetGridDirectionMatrix())[:3, :3])


def warp_through_transform_node(floating, reference, transform_node) -> tuple:
    """The floating voxels at the reference voxel centres moved by Slicer's evaluation of the node's
    transform from world (the resampling direction), interpolated linearly as ITK does.

    Returns the sampled array and a mask of the voxels whose moved centre falls between floating
    voxel centres on every axis (where ITK's and this interpolation are the same formula).
    """
    from scipy import ndimage

    shape = slicer.util.arrayFromVolume(reference).shape
    k, j, i = np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")
    ijk = np.stack([i.ravel(), j.ravel(), k.ravel(), np.ones(i.size)])
    points = vtk.vtkPoints()
    points.SetData(vtk.util.numpy_support.numpy_to_vtk((ijk_to_ras_of(reference) @ ijk)[:3].T.copy(), deep=True))
    from_world = vtk.vtkGeneralTransform()
    transform_node.GetTransformFromWorld(from_world)
    moved = vtk.vtkPoints()
    from_world.TransformPoints(points, moved)
    moved_ras = np.c_[vtk.util.numpy_support.vtk_to_numpy(moved.GetData()), np.ones(i.size)].T
    floating_ijk = (np.linalg.inv(ijk_to_ras_of(floating)) @ moved_ras)[:3]  # i, j, k
    floating_array = slicer.util.arrayFromVolume(floating).astype(np.float64)
    sampled = ndimage.map_coordinates(floating_array, floating_ijk[::-1], order=1, mode="nearest")
    limits = np.array(floating_array.shape[::-1])[:, None] - 1
    between_centres = np.all((floating_ijk >= -1e-6) & (floating_ijk <= limits + 1e-6), axis=0)
    return sampled.reshape(shape), between_centres.reshape(shape)


def assert_transform_node_warps_like_engine(logic, result, reference, floating):
    """Exact check: Slicer's transform evaluation sends each reference voxel where the engine sampled."""
    expected, inside = warp_through_transform_node(floating, reference, result.transform)
    warped = slicer.util.arrayFromVolume(result.warpedVolume)
    assert inside.mean() > 0.3
    scale = np.abs(expected[inside]).max()
    np.testing.assert_allclose(warped[inside], expected[inside], atol=1e-4 * scale)
    # ... and that says something: the registration moved the image by much more than that.
    unmoved = sample_on_grid(floating, reference, logic)
    assert np.abs(unmoved[inside] - warped[inside]).max() > 0.2 * scale


def assert_warped_matches_hardened(scene, logic, result, reference, floating, max_residual_ratio=0.15):
    """Slicer's own resampling of ``floating`` through the output transform gives the warped volume.

    hardenTransform resamples onto a grid of its own choosing (the floating grid, shifted to hold
    the warped volume); its result is read back at the reference voxel centres, which adds one
    linear interpolation. Its difference to the warped volume must therefore be small compared to
    the difference the registration made (warped vs. floating), not zero.
    """
    hardened = harden_on_clone(scene, floating, result.transform, logic)
    hardened_on_reference = sample_on_grid(hardened, reference, logic)
    warped = slicer.util.arrayFromVolume(result.warpedVolume)
    floating_on_reference = sample_on_grid(floating, reference, logic)
    inside = (hardened_on_reference != 0) & (warped != 0) & (floating_on_reference != 0)
    assert inside.mean() > 0.2
    residual = np.abs(hardened_on_reference - warped)[inside].mean()
    registration_change = np.abs(floating_on_reference - warped)[inside].mean()
    assert residual < max_residual_ratio * registration_change, (residual, registration_change)
    return residual, registration_change


# ----------------------------------------------------------------------------------------------- geometry

def test_volume_to_sitk_and_back_keeps_geometry_and_voxels(scene, logic, brain_array):
    ijkToRAS = ijk_to_ras(**REFERENCE_RAS)
    voxels = brain_array.astype(np.int16)
    volume = add_volume(scene, voxels, ijkToRAS)

    image = logic.sitkImageFromVolume(volume)
    lps = np.diag([-1.0, -1.0, 1.0])
    assert image.GetSize() == (32, 32, 12) and image.GetPixelID() == sitk.sitkInt16
    np.testing.assert_allclose(image.GetOrigin(), lps @ np.array(REFERENCE_RAS["origin"]), atol=1e-12)
    np.testing.assert_allclose(image.GetSpacing(), REFERENCE_RAS["spacing"], atol=1e-12)
    np.testing.assert_allclose(np.array(image.GetDirection()).reshape(3, 3),
                               lps @ np.array(REFERENCE_RAS["direction"]).reshape(3, 3), atol=1e-12)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), voxels)

    copy = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "copy")
    logic.updateVolumeFromSitkImage(copy, image)
    np.testing.assert_allclose(ijk_to_ras_of(copy), ijkToRAS, atol=1e-12)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(copy), voxels)


def test_sitk_geometry_agrees_with_slicers_own_file_reader(scene, logic, brain_array, tmp_path):
    """An image written by SimpleITK and read by Slicer's NRRD reader converts back to the same image."""
    image = sitk.GetImageFromArray(brain_array)
    image.SetOrigin((12.5, -40.0, 7.25))
    image.SetSpacing((1.1, 0.7, 2.3))
    image.SetDirection(rotation_3d(25.0, -12.0))  # a proper rotation, so Slicer keeps the voxel order
    sitk.WriteImage(image, str(tmp_path / "volume.nrrd"))
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "read by Slicer")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(tmp_path / "volume.nrrd"))
    assert storage.ReadData(volume)

    converted = logic.sitkImageFromVolume(volume)
    np.testing.assert_allclose(converted.GetOrigin(), image.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(converted.GetSpacing(), image.GetSpacing(), atol=1e-9)
    np.testing.assert_allclose(converted.GetDirection(), image.GetDirection(), atol=1e-9)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(converted), brain_array)


def test_linear_parent_transform_is_part_of_the_geometry(scene, logic, brain_array):
    volume = add_volume(scene, brain_array, ijk_to_ras(**REFERENCE_RAS))
    parent = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    toParent = np.eye(4)
    toParent[:3, 3] = (5.0, -3.0, 2.0)
    parent.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(toParent))
    volume.SetAndObserveTransformNodeID(parent.GetID())
    image = logic.sitkImageFromVolume(volume)
    world_origin = np.array(REFERENCE_RAS["origin"]) + (5.0, -3.0, 2.0)
    np.testing.assert_allclose(image.GetOrigin(), np.diag([-1, -1, 1]) @ world_origin)


# ----------------------------------------------------------------------------------------------- registration

def test_grid_transform_reproduces_the_warped_volume(scene, logic, pair_3d, model_3d, tmp_path):
    reference, floating = pair_3d
    result = logic.register(reference, floating, model=model_3d, finetune=False, device="cpu")

    # The warped volume lies on the reference grid.
    np.testing.assert_allclose(ijk_to_ras_of(result.warpedVolume), ijk_to_ras_of(reference), atol=1e-9)
    assert slicer.util.arrayFromVolume(result.warpedVolume).shape == (12, 32, 32)

    # The transform is the one Slicer itself makes of the engine's field (ITK file, LPS, "from parent").
    engine = sar.register(logic.sitkImageFromVolume(reference), logic.sitkImageFromVolume(floating), model_3d,
                          finetune=False, device="cpu")
    by_slicer = slicer_grid_transform_of(engine.displacement, scene, tmp_path)
    np.testing.assert_allclose(slicer.util.arrayFromGridTransform(result.transform),
                               slicer.util.arrayFromGridTransform(by_slicer), atol=1e-9)
    for mine, slicers in zip(grid_geometry(result.transform), grid_geometry(by_slicer)):
        np.testing.assert_allclose(mine, slicers, atol=1e-9)
    assert np.abs(slicer.util.arrayFromGridTransform(result.transform)).max() > 2 * min(REFERENCE_RAS["spacing"])

    # Slicer's evaluation of the transform moves each reference voxel where the engine sampled ...
    assert_transform_node_warps_like_engine(logic, result, reference, floating)
    # ... and Slicer's transform logic, hardening it on the floating volume, gives the warped volume.
    assert_warped_matches_hardened(scene, logic, result, reference, floating)


def test_slice_by_slice_mode_on_a_3d_volume(scene, logic, pair_3d, model_2d):
    reference, floating = pair_3d
    result = logic.register(reference, floating, model=model_2d, mode="slicewise", finetune=False, device="cpu")
    assert result.metrics["mode"] == "slicewise"
    np.testing.assert_allclose(ijk_to_ras_of(result.warpedVolume), ijk_to_ras_of(reference), atol=1e-9)
    # Nothing moves across slices: every displacement lies in the plane of the reference's slices.
    displacement = slicer.util.arrayFromGridTransform(result.transform)
    k_axis = np.array(REFERENCE_RAS["direction"]).reshape(3, 3)[:, 2]
    assert np.abs(displacement @ k_axis).max() < 1e-9 * np.abs(displacement).max()
    assert np.abs(displacement).max() > 2 * min(REFERENCE_RAS["spacing"])
    assert_transform_node_warps_like_engine(logic, result, reference, floating)
    assert_warped_matches_hardened(scene, logic, result, reference, floating)


def oblique_slice_pair(scene, read_test_image):
    """The 2D sample pair as single-slice volumes in one oblique plane, on different in-plane grids."""
    axes = np.array(rotation_3d(30.0, 60.0)).reshape(3, 3)  # columns: in-plane x, in-plane y, normal
    angle = np.deg2rad(20.0)
    floating_axes = axes @ np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    origin = np.array([-80.0, 42.0, 15.0])
    volumes = []
    for name, file, direction, spacing, shift in (
            ("reference", "brain_pd.nrrd", axes, (2.9, 3.1, 1.5), (0.0, 0.0)),
            ("floating", "sample_floating_t1.nrrd", floating_axes, (3.0, 3.0, 2.0), (4.0, -3.0))):
        array = sitk.GetArrayFromImage(sitk.Cast(sitk.Shrink(read_test_image(file), [3, 3]), sitk.sitkFloat32))[None]
        plane_origin = origin + axes[:, :2] @ np.array(shift)
        volumes.append(add_volume(scene, array, ijk_to_ras(plane_origin, spacing, direction.ravel()), name))
    return volumes, axes[:, 2]


def test_single_slice_pair_is_registered_in_2d_in_its_plane(scene, logic, model_2d, read_test_image):
    (reference, floating), normal = oblique_slice_pair(scene, read_test_image)
    assert slicer.util.arrayFromVolume(reference).shape == (1, 72, 60)
    result = logic.register(reference, floating, model=model_2d, mode="volume", finetune=False, device="cpu")
    assert result.metrics["mode"] == "image"  # the engine saw 2D images, whatever the mode said
    np.testing.assert_allclose(ijk_to_ras_of(result.warpedVolume), ijk_to_ras_of(reference), atol=1e-9)
    displacement = slicer.util.arrayFromGridTransform(result.transform)
    assert displacement.shape == (1, 72, 60, 3)
    assert np.abs(displacement @ normal).max() < 1e-9 * np.abs(displacement).max()  # in the plane
    assert np.abs(displacement).max() > 4.0
    assert_transform_node_warps_like_engine(logic, result, reference, floating)
    assert_warped_matches_hardened(scene, logic, result, reference, floating)


# ----------------------------------------------------------------------------------------------- structures and masks

def segment_arrays(segmentation_node) -> dict:
    """``{segment name: (k, j, i mask, image-to-world matrix)}`` of a segmentation node."""
    segmentation = segmentation_node.GetSegmentation()
    ids = vtk.vtkStringArray()
    segmentation.GetSegmentIDs(ids)
    arrays = {}
    for index in range(ids.GetNumberOfValues()):
        segment = segmentation.GetSegment(ids.GetValue(index))
        labelmap = slicer.vtkOrientedImageData()
        assert slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
            segmentation_node, ids.GetValue(index), labelmap)
        assert labelmap.GetExtent()[::2] == (0, 0, 0)
        array = vtk.util.numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars()).reshape(
            labelmap.GetDimensions()[::-1])
        matrix = vtk.vtkMatrix4x4()
        labelmap.GetImageToWorldMatrix(matrix)
        arrays[segment.GetName()] = ((array == segment.GetLabelValue()).astype(np.uint8),
                                     slicer.util.arrayFromVTKMatrix(matrix))
    return arrays


def test_structures_and_masks_become_segmentations_on_the_right_grids(scene, logic, pair_3d, model_3d,
                                                                      ventricles_array):
    reference, floating = pair_3d
    box = np.zeros_like(ventricles_array)
    box[4:8, 10:20, 12:22] = 1
    reference_structure = add_segmentation(scene, {"ventricles": ventricles_array, "box": box},
                                           ijk_to_ras(**REFERENCE_RAS), "reference structures")
    floating_labels = add_volume(scene, (ventricles_array + 2 * box * (1 - ventricles_array)).astype(np.int16),
                                 ijk_to_ras(**FLOATING_RAS), "floating labels", "vtkMRMLLabelMapVolumeNode")
    result = logic.register(reference, floating, reference_structure, floating_labels, model=model_3d,
                            finetune=False, device="cpu")

    # The same run, straight through the engine, with the union of the structures as masks.
    union = np.maximum(ventricles_array, box)
    engine = sar.register(logic.sitkImageFromVolume(reference), logic.sitkImageFromVolume(floating), model_3d,
                          reference_mask=mask_image(union, reference, logic),
                          floating_mask=mask_image(union, floating, logic), finetune=False, device="cpu")
    assert result.metrics["after"] == engine.metrics["after"] and result.metrics["before"] == engine.metrics["before"]

    (reference_mask, reference_matrix), = segment_arrays(result.referenceMaskSegmentation).values()
    np.testing.assert_allclose(reference_matrix, ijk_to_ras_of(reference), atol=1e-9)
    np.testing.assert_array_equal(reference_mask, sitk.GetArrayFromImage(engine.reference_mask))
    (floating_mask, floating_matrix), = segment_arrays(result.floatingMaskSegmentation).values()
    np.testing.assert_allclose(floating_matrix, ijk_to_ras_of(floating), atol=1e-9)
    np.testing.assert_array_equal(floating_mask, sitk.GetArrayFromImage(engine.floating_mask))
    assert reference_mask.any() and floating_mask.any()

    # Each label of the floating label map is warped to the reference grid as a segment of its own.
    warped = segment_arrays(result.warpedSegmentation)
    assert sorted(warped) == ["floating labels 1", "floating labels 2"]
    for mask, matrix in warped.values():
        np.testing.assert_allclose(matrix, ijk_to_ras_of(reference), atol=1e-9)
        assert mask.any()
    np.testing.assert_array_equal(np.maximum(*[mask for mask, _ in warped.values()]),
                                  sitk.GetArrayFromImage(engine.warped_floating_mask))


def test_segmentation_made_of_surfaces_is_converted(scene, logic, pair_3d, model_3d, monkeypatch):
    """A segment given as a closed surface (from a model or an STL file) reaches the engine as a mask."""
    reference, floating = pair_3d
    sphere = vtk.vtkSphereSource()
    sphere.SetCenter(*ijk_to_ras(**REFERENCE_RAS)[:3, :3] @ (16, 16, 6) + ijk_to_ras(**REFERENCE_RAS)[:3, 3])
    sphere.SetRadius(15.0)
    sphere.Update()
    structure = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "sphere")
    structure.AddSegmentFromClosedSurfaceRepresentation(sphere.GetOutput(), "sphere", (0.0, 1.0, 0.0))
    received = {}
    engine_register = sar.register
    monkeypatch.setattr(sar, "register", lambda *args, **options: received.update(options) or engine_register(
        *args, **options))
    logic.register(reference, floating, structure, model=model_3d, finetune=False, device="cpu")
    voxels = sitk.GetArrayFromImage(received["reference_mask"]).sum()
    sphere_voxels = 4 / 3 * np.pi * 15.0 ** 3 / np.prod(REFERENCE_RAS["spacing"])
    assert 0.7 * sphere_voxels < voxels < 1.3 * sphere_voxels


def mask_image(mask, volume, logic):
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    image.CopyInformation(logic.sitkImageFromVolume(volume))
    return image


def test_existing_output_nodes_are_updated_in_place(scene, logic, pair_3d, model_3d):
    reference, floating = pair_3d
    outputs = {"warpedVolume": scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "my warped"),
               "transform": scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "my transform"),
               "referenceMaskSegmentation": scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my reference mask"),
               "floatingMaskSegmentation": scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my floating mask")}
    before = scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") + scene.GetNumberOfNodesByClass(
        "vtkMRMLTransformNode") + scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    result = logic.register(reference, floating, model=model_3d, finetune=False, device="cpu", **outputs)
    for name, node in outputs.items():
        assert getattr(result, name) is node
    assert result.warpedSegmentation is None  # no floating structure, nothing to warp
    after = scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") + scene.GetNumberOfNodesByClass(
        "vtkMRMLTransformNode") + scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    assert after == before
    assert slicer.util.arrayFromVolume(outputs["warpedVolume"]).shape == (12, 32, 32)


# ----------------------------------------------------------------------------------------------- failures

@pytest.fixture
def chosen_outputs(scene, brain_array):
    """Output nodes the user picked before the run, holding earlier results."""
    warped = add_volume(scene, brain_array[::-1].copy(), ijk_to_ras(**FLOATING_RAS), "earlier warped")
    segmentation = add_segmentation(scene, {"earlier": brain_array > 50}, ijk_to_ras(**FLOATING_RAS), "earlier mask")
    return {"warpedVolume": warped, "transform": scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "earlier"),
            "referenceMaskSegmentation": segmentation}


def assert_outputs_untouched(chosen_outputs, brain_array):
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(chosen_outputs["warpedVolume"]), brain_array[::-1])
    np.testing.assert_allclose(ijk_to_ras_of(chosen_outputs["warpedVolume"]), ijk_to_ras(**FLOATING_RAS))
    assert list(segment_arrays(chosen_outputs["referenceMaskSegmentation"])) == ["earlier"]


def test_cancelled_run_leaves_the_scene_as_it_was(scene, logic, pair_3d, model_3d, chosen_outputs, brain_array):
    reference, floating = pair_3d
    messages = []
    state = scene_state(scene)
    with pytest.raises(RegistrationCancelled):
        logic.register(reference, floating, model=model_3d, device="cpu", finetune=True, maxIterations=50,
                       tolerance=0.0, progress=lambda fraction, message: messages.append(message),
                       cancel=lambda: any("iteration" in message for message in messages), **chosen_outputs)
    assert any("iteration" in message for message in messages)  # it was cancelled while finetuning
    assert scene_state(scene) == state
    assert_outputs_untouched(chosen_outputs, brain_array)


def test_failed_run_leaves_the_scene_as_it_was(scene, logic, pair_3d, chosen_outputs, brain_array,
                                              ventricles_array, tmp_path):
    reference, floating = pair_3d
    structure = add_segmentation(scene, {"ventricles": ventricles_array}, ijk_to_ras(**REFERENCE_RAS))
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a weights file")
    state = scene_state(scene)
    with pytest.raises(WeightsError):
        logic.register(reference, floating, structure, structure, weightsPath=corrupt, device="cpu",
                       **chosen_outputs)
    with pytest.raises(WeightsError):
        logic.register(reference, floating, weightsPath=tmp_path / "missing.pt", device="cpu")
    assert scene_state(scene) == state
    assert_outputs_untouched(chosen_outputs, brain_array)


def test_failure_while_building_outputs_leaves_the_scene_as_it_was(scene, logic, module, pair_3d, model_3d,
                                                                   chosen_outputs, brain_array, monkeypatch):
    """The outputs are all built before the first node is created or changed."""
    reference, floating = pair_3d

    def broken(*args, **kwargs):
        raise MemoryError("no memory left for the grid transform")

    monkeypatch.setattr(module.SARRegistrationLogic, "_gridTransform", staticmethod(broken))
    state = scene_state(scene)
    with pytest.raises(MemoryError):
        logic.register(reference, floating, model=model_3d, finetune=False, device="cpu", **chosen_outputs)
    assert scene_state(scene) == state
    assert_outputs_untouched(chosen_outputs, brain_array)


# ----------------------------------------------------------------------------------------------- bad inputs

def vector_volume(scene, brain_array):
    return add_volume(scene, np.stack([brain_array] * 3, axis=-1), ijk_to_ras(**FLOATING_RAS), "rgb",
                      "vtkMRMLVectorVolumeNode")


def four_d_volume(scene, brain_array):
    """A scalar volume node whose voxels hold 4 values (time points), as a MultiVolume node's do."""
    image = vtk.vtkImageData()
    image.SetDimensions(brain_array.shape[::-1])
    image.GetPointData().SetScalars(vtk.util.numpy_support.numpy_to_vtk(
        np.stack([brain_array] * 4, axis=-1).reshape(-1, 4), deep=True))
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "4D")
    volume.SetAndObserveImageData(image)
    return volume


def single_slice(scene, brain_array):
    return add_volume(scene, brain_array[5:6], ijk_to_ras(**FLOATING_RAS), "one slice")


def under_grid_transform(scene, brain_array):
    volume = add_volume(scene, brain_array, ijk_to_ras(**FLOATING_RAS), "warped by hand")
    volume.SetAndObserveTransformNodeID(scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "by hand").GetID())
    return volume


def no_volume(scene, brain_array):
    return None


def empty_volume(scene, brain_array):
    return scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "no voxels")


def nan_volume(scene, brain_array):
    array = brain_array.astype(np.float32)
    array[3, 10:12, 10:12] = np.nan
    return add_volume(scene, array, ijk_to_ras(**FLOATING_RAS), "with NaN")


def far_away_volume(scene, brain_array):
    far = {**FLOATING_RAS, "origin": tuple(value + 2000.0 for value in FLOATING_RAS["origin"])}
    return add_volume(scene, brain_array, ijk_to_ras(**far), "far away")


@pytest.mark.parametrize("make_floating, message", [
    (no_volume, "Select a floating volume"),
    (empty_volume, "has no voxels"),
    (vector_volume, "3 values per voxel"),
    (four_d_volume, "4 values per voxel"),
    (single_slice, "single slice but the other volume is 3D"),
    (under_grid_transform, "non-linear transform 'by hand'. Harden"),
    (nan_volume, "has 4 NaN or infinite voxels"),
    (far_away_volume, "does not overlap the reference in physical space"),
])
def test_bad_floating_volume_is_refused_clearly(scene, logic, pair_3d, model_3d, brain_array, make_floating, message):
    reference, _ = pair_3d
    floating = make_floating(scene, brain_array)
    state = scene_state(scene)
    with pytest.raises(ValueError, match=message):
        logic.register(reference, floating, model=model_3d, finetune=False, device="cpu")
    assert scene_state(scene) == state


def test_other_bad_inputs_are_refused_clearly(scene, logic, pair_3d, model_3d, read_test_image):
    reference, floating = pair_3d
    with pytest.raises(ValueError, match="Select a reference volume"):
        logic.register(None, floating, model=model_3d)
    with pytest.raises(ValueError, match="must be different volumes"):
        logic.register(reference, reference, model=model_3d)
    with pytest.raises(ValueError, match="Unknown mode 'sideways'"):
        logic.register(reference, floating, model=model_3d, mode="sideways")
    with pytest.raises(ValueError, match="output must be a volume other than the inputs"):
        logic.register(reference, floating, model=model_3d, warpedVolume=floating)
    empty_labels = add_volume(scene, np.zeros((12, 32, 32), np.int16), ijk_to_ras(**REFERENCE_RAS), "no labels",
                              "vtkMRMLLabelMapVolumeNode")
    with pytest.raises(ValueError, match="reference structure 'no labels' is empty"):
        logic.register(reference, floating, empty_labels, model=model_3d)
    with pytest.raises(ValueError, match="must be a segmentation or a label map"):
        logic.register(reference, floating, floating, model=model_3d)
    # Two single slices in different planes cannot be registered in 2D.
    (slice_a, slice_b), _ = oblique_slice_pair(scene, read_test_image)
    matrix = ijk_to_ras_of(slice_b)
    matrix[:3, 3] += 10.0 * np.array(rotation_3d(30.0, 60.0)).reshape(3, 3)[:, 2]
    slice_b.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(matrix))
    with pytest.raises(ValueError, match="not in one plane .* 10.00 mm away"):
        logic.register(slice_a, slice_b, model=model_3d)


def test_mismatched_grids_are_resampled_onto_the_reference(scene, logic, brain_array, model_3d):
    """A floating volume with another size, spacing and direction: outputs are on the reference grid."""
    reference = add_volume(scene, brain_array, ijk_to_ras(**REFERENCE_RAS), "reference")
    floating = add_volume(scene, brain_array[::2, ::2, ::2].copy(),
                          ijk_to_ras(FLOATING_RAS["origin"], (8.0, 8.4, 10.0), FLOATING_RAS["direction"]), "coarse")
    result = logic.register(reference, floating, model=model_3d, finetune=False, device="cpu")
    assert slicer.util.arrayFromVolume(result.warpedVolume).shape == (12, 32, 32)
    np.testing.assert_allclose(ijk_to_ras_of(result.warpedVolume), ijk_to_ras_of(reference), atol=1e-9)
    assert_transform_node_warps_like_engine(logic, result, reference, floating)


# ----------------------------------------------------------------------------------------------- ignore mask

def test_ignore_mask_reaches_the_engine_on_the_reference_grid(scene, logic, pair_3d, model_3d, ventricles_array,
                                                             monkeypatch):
    """The engine receives ``ignore_mask=``, uint8 0/1 on the reference image's grid, and finetunes with it."""
    reference, floating = pair_3d
    implant = add_segmentation(scene, {"implant": ventricles_array}, ijk_to_ras(**REFERENCE_RAS), "implant")
    received = {}
    engine_register = sar.register

    def register_with_ignore_mask(reference_image, floating_image, model=None, *, ignore_mask=None, **options):
        received.update(reference=reference_image, ignore_mask=ignore_mask)
        return engine_register(reference_image, floating_image, model, ignore_mask=ignore_mask, **options)

    monkeypatch.setattr(sar, "register", register_with_ignore_mask)
    result = logic.register(reference, floating, ignoreMask=implant, model=model_3d, maxIterations=2, device="cpu")
    assert result.metrics["ignore_mask"] is True
    ignore_mask = received["ignore_mask"]
    assert ignore_mask.GetPixelID() == sitk.sitkUInt8
    for attribute in ("GetSize", "GetOrigin", "GetSpacing", "GetDirection"):
        np.testing.assert_allclose(getattr(ignore_mask, attribute)(), getattr(received["reference"], attribute)())
    np.testing.assert_array_equal(sitk.GetArrayFromImage(ignore_mask), ventricles_array)


def test_structure_on_another_grid_is_resampled_onto_its_volume(scene, logic, pair_3d, model_3d, ventricles_array,
                                                                 monkeypatch):
    """A segmentation drawn on the floating grid, given as the reference structure, reaches the engine
    on the reference grid: as SimpleITK's nearest-neighbour resampling puts it there."""
    reference, floating = pair_3d
    structure = add_segmentation(scene, {"ventricles": ventricles_array}, ijk_to_ras(**FLOATING_RAS), "ventricles")
    received = {}
    engine_register = sar.register

    def spy(*args, **options):
        received.update(options)
        return engine_register(*args, **options)

    monkeypatch.setattr(sar, "register", spy)
    logic.register(reference, floating, structure, model=model_3d, finetune=False, device="cpu")
    reference_image = logic.sitkImageFromVolume(reference)
    expected = sitk.Resample(mask_image(ventricles_array, floating, logic), reference_image, sitk.Transform(),
                             sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    mask = received["reference_mask"]
    for attribute in ("GetSize", "GetOrigin", "GetSpacing", "GetDirection"):
        np.testing.assert_allclose(getattr(mask, attribute)(), getattr(reference_image, attribute)())
    mismatch = sitk.GetArrayFromImage(mask) != sitk.GetArrayFromImage(expected)
    assert sitk.GetArrayFromImage(expected).sum() > 20 and mismatch.mean() < 0.005


# ----------------------------------------------------------------------------------------------- weights, display

def test_weights_file_is_loaded_once(scene, logic, pair_3d, model_3d, tmp_path, monkeypatch):
    import SARRegistrationLib.model as model_module

    weights = save_model(model_3d, tmp_path / "tiny_3d.pt")
    loads = []
    load_model = model_module.load_model
    monkeypatch.setattr(model_module, "load_model",
                        lambda *args, **kwargs: loads.append(args) or load_model(*args, **kwargs))
    reference, floating = pair_3d
    for _ in range(2):
        result = logic.register(reference, floating, weightsPath=str(weights), finetune=False, device="cpu")
    assert len(loads) == 1
    assert result.metrics["weights"] == str(weights)


def test_results_are_shown_as_asked(scene, logic, pair_3d, model_3d, ventricles_array):
    reference, floating = pair_3d
    structure = add_segmentation(scene, {"ventricles": ventricles_array}, ijk_to_ras(**FLOATING_RAS), "ventricles")
    result = logic.register(reference, floating, structure, structure, model=model_3d, finetune=False, device="cpu")
    views = [scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode") for _ in range(3)]
    logic.showResults(result, reference, structure, fit=False)
    for view in views:
        assert view.GetBackgroundVolumeID() == reference.GetID()
        assert view.GetForegroundVolumeID() == result.warpedVolume.GetID()
        assert view.GetForegroundOpacity() == 0.5
    for segmentation in (result.referenceMaskSegmentation, result.warpedSegmentation, structure):
        display = segmentation.GetDisplayNode()
        assert display.GetVisibility() and display.GetVisibility2DOutline() and not display.GetVisibility2DFill()
    assert not result.floatingMaskSegmentation.GetDisplayNode().GetVisibility()


def test_measures_are_tabulated(module):
    metrics = {"before": {"dice": 0.61, "hd95_mm": 4.0, "mad_mm": 1.25}, "after": {"dice": 0.8, "hd95_mm": float("inf"),
               "mad_mm": 0.5}, "folding_fraction": 0.0012, "max_displacement_mm": 6.5, "iterations": 37,
               "converged": True, "seconds": 2.345, "device": "cpu"}
    rows = module.SARRegistrationLogic.metricsRows(metrics)
    assert rows[:3] == [("Dice", "0.610", "0.800"), ("HD95", "4.000 mm", "n/a"), ("MAD", "1.250 mm", "0.500 mm")]
    assert ("Folding (voxels with Jacobian ≤ 0)", "", "0.12 %") in rows
    assert ("Finetuning iterations", "", "37 (converged)") in rows
    assert ("Time", "", "2.3 s") in rows
    assert [row[0] for row in module.SARRegistrationLogic.metricsRows({"iterations": 0})] == ["Finetuning iterations"]


@pytest.mark.parametrize("pytorch_utils", [False, True])
def test_missing_packages_are_installed_after_one_confirmation(logic, module, monkeypatch, pytorch_utils):
    """PyTorch through the PyTorch Utils extension when it is there, otherwise pip; the rest with pip."""
    installed = {"numpy", "SimpleITK", "scipy", "tqdm"}
    monkeypatch.setattr(module.importlib.util, "find_spec", lambda name: object() if name in installed else None)
    questions, pip_calls, torch_utils_calls = [], [], []
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, *args, **kwargs: questions.append(text))
    monkeypatch.setattr(slicer.util, "pip_install", lambda requirements, *args, **kwargs: pip_calls.append(requirements))
    if pytorch_utils:
        class PyTorchUtilsLogic:
            def installTorch(self, **kwargs):
                torch_utils_calls.append(kwargs)
                return types.ModuleType("torch")
        monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic))
    else:
        monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # "import PyTorchUtils" fails

    assert logic.missingPythonPackages() == ["torch", "scikit-image"]
    assert logic.installPythonPackages() is False  # declined: nothing installed
    assert len(questions) == 1 and "torch, scikit-image" in questions[0] and not pip_calls

    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, *args, **kwargs: True)
    assert logic.installPythonPackages() is True
    if pytorch_utils:
        assert torch_utils_calls == [{"askConfirmation": False, "torchVersionRequirement": ">=2.0"}]
        assert pip_calls == [["scikit-image>=0.22"]]
    else:
        assert pip_calls == ["torch>=2.0", ["scikit-image>=0.22"]]


def test_finetuning_reports_progress_and_measures(scene, logic, pair_3d, model_3d):
    reference, floating = pair_3d
    progress = []
    result = logic.register(reference, floating, model=model_3d, device="cpu", maxIterations=2, smoothness=2.0,
                            progress=lambda fraction, message: progress.append(fraction))
    assert progress == sorted(progress) and progress[-1] == 1.0
    assert result.metrics["iterations"] == 2 and result.metrics["finetuned"]


# ----------------------------------------------------------------------------------------------- description

def test_module_description(module):
    parent = types.SimpleNamespace()
    module.SARRegistration(parent)
    assert parent.title == "SAR Registration" and parent.categories == ["Registration"]
    assert parent.contributors and "Slicer" not in parent.contributors[0]
    assert "Combining Transfer Learning and Segmentation" in parent.acknowledgementText
    assert "register(" in parent.helpText
    assert issubclass(module.SARRegistrationTest, unittest.TestCase) and callable(module.SARRegistrationTest.runTest)


def test_cmake_files_name_existing_files_and_build_an_extension():
    root = MODULE_DIR.parent
    extension = (root / "CMakeLists.txt").read_text()
    for required in ("project(SARRegistration)", "find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})",
                     "add_subdirectory(SARRegistration)", "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
                     "include(${Slicer_EXTENSION_CPACK})", "EXTENSION_CATEGORY \"Registration\""):
        assert required in extension, required
    assert (root / "SARRegistration.png").is_file()
    module_cmake = (MODULE_DIR / "CMakeLists.txt").read_text()
    assert "slicerMacroBuildScriptedModule(" in module_cmake and "slicer_add_python_unittest(" in module_cmake
    listed = re.findall(r"^\s+((?:Resources|Testing|\$\{MODULE_NAME\})[\w${}./-]*)$", module_cmake, re.M)
    assert len(listed) >= 8
    for entry in listed:
        relative = entry.replace("${MODULE_NAME}", "SARRegistration")
        assert (MODULE_DIR / relative).is_file() or (root / relative).is_file(), entry
    assert "${PROJECT_SOURCE_DIR}/SARRegistrationLib/*.py" in module_cmake


def test_the_modules_own_slicer_test_runs_on_the_sample_pair(module, scene, monkeypatch, model_2d):
    """SARRegistrationTest, the test Slicer runs, on the bundled pair; files are read by Slicer's NRRD
    reader (slicer.util.loadVolume needs the application) and the tiny model stands in for the
    shipped weights."""
    def load(path, properties, class_name):
        volume = slicer.mrmlScene.AddNewNodeByClass(class_name, properties["name"])
        storage = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        storage.SetFileName(path)
        assert storage.ReadData(volume)
        volume.SetAndObserveStorageNodeID(storage.GetID())
        volume.CreateDefaultDisplayNodes()
        return volume

    monkeypatch.setattr(slicer.util, "loadVolume",
                        lambda path, properties={}: load(path, properties, "vtkMRMLScalarVolumeNode"))
    monkeypatch.setattr(slicer.util, "loadLabelVolume",
                        lambda path, properties={}: load(path, properties, "vtkMRMLLabelMapVolumeNode"))
    monkeypatch.setattr(module.SARRegistrationTest, "model", model_2d)
    result = unittest.TestResult()
    module.SARRegistrationTest().run(result)
    assert result.wasSuccessful() and result.testsRun == 1, result.errors + result.failures


def test_engine_is_found_from_the_source_tree(module, monkeypatch):
    """Slicer puts SARRegistration/ on the path; the engine is one folder up, in the repository root."""
    monkeypatch.setattr(sys, "path", [str(MODULE_DIR)])
    monkeypatch.setattr(module.importlib.util, "find_spec", lambda name: None)
    module._makeEngineImportable()
    assert sys.path == [str(MODULE_DIR.parent), str(MODULE_DIR)]


def test_module_file_does_not_import_torch_at_import_time():
    """Slicer imports every module at start-up; PyTorch may not be installed yet and loads slowly."""
    tree = ast.parse((MODULE_DIR / "SARRegistration.py").read_text())
    top_level_imports = [alias.name for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))
                         for alias in node.names] + [node.module for node in tree.body
                                                     if isinstance(node, ast.ImportFrom)]
    assert not [name for name in top_level_imports if name and name.split(".")[0] in ("torch", "SARRegistrationLib")]


# ----------------------------------------------------------------------------------------------- the .ui file

# Slicer's and CTK's widget classes this project may use, with the Qt class each derives from and
# the Q_PROPERTYs of their headers (Slicer Libs/MRML/Widgets, CTK Libs/Widgets), plus those
# inherited from a Qt class other than QWidget.
SLICER_WIDGET_CLASSES = {
    "qMRMLWidget": ("QWidget", []),
    "qMRMLNodeComboBox": ("QWidget", [
        "currentNodeID", "currentNodeId", "nodeTypes", "showHidden", "showChildNodeTypes", "hideChildNodeTypes",
        "baseName", "noneEnabled", "addEnabled", "removeEnabled", "editEnabled", "renameEnabled",
        "interactionNodeSingletonTag", "selectNodeUponCreation", "noneDisplay"]),
    "ctkCollapsibleButton": ("QAbstractButton", [
        "collapsed", "collapsedHeight", "flat", "contentsFrameShape", "contentsFrameShadow", "contentsLineWidth",
        "contentsMidLineWidth", "buttonTextAlignment", "indicatorAlignment", "text", "checkable", "checked"]),
    "ctkSliderWidget": ("QWidget", [
        "decimals", "singleStep", "pageStep", "minimum", "maximum", "value", "prefix", "suffix", "tickInterval",
        "tickPosition", "synchronizeSiblings", "spinBoxAlignment", "tracking", "spinBoxVisible", "popupSlider",
        "invertedAppearance", "invertedControls"]),
    "ctkPathLineEdit": ("QWidget", [
        "label", "filters", "currentPath", "options", "settingKey", "showBrowseButton", "showHistoryButton",
        "sizeAdjustPolicy", "minimumContentsLength", "nameFilters"]),
}
# ctkPathLineEdit::Filter, which copies QDir::Filter.
PATH_LINE_EDIT_FILTERS = {"Dirs": 0x001, "Files": 0x002, "Drives": 0x004, "NoSymLinks": 0x008, "Readable": 0x010,
                          "Writable": 0x020, "Executable": 0x040, "Hidden": 0x100, "System": 0x200}


def ui_tree():
    return ElementTree.parse(UI_FILE).getroot()


def widget_names_used_by_module() -> set:
    return set(re.findall(r"self\.ui\.(\w+)", (MODULE_DIR / "SARRegistration.py").read_text()))


def test_ui_xml_names_every_widget_the_module_uses_with_valid_classes():
    from PyQt5 import QtWidgets

    root = ui_tree()
    widgets = {element.get("name"): element.get("class") for element in root.iter("widget")}
    assert widget_names_used_by_module() <= set(widgets), widget_names_used_by_module() - set(widgets)
    declared = {element.findtext("class") for element in root.iter("customwidget")}
    for name, class_name in widgets.items():
        assert hasattr(QtWidgets, class_name) or class_name in declared, (name, class_name)
    assert declared <= set(SLICER_WIDGET_CLASSES), declared - set(SLICER_WIDGET_CLASSES)
    for element in root.iter("widget"):  # properties of Slicer's and CTK's widgets are theirs or QWidget's
        if element.get("class") in SLICER_WIDGET_CLASSES:
            names = {p.get("name") for p in element.findall("property") if p.get("stdset") != "0"}
            unknown = {name for name in names - set(SLICER_WIDGET_CLASSES[element.get("class")][1])
                       if not hasattr(QtWidgets.QWidget, "set" + name[0].upper() + name[1:])}
            assert not unknown, (element.get("name"), unknown)
    # Every node selector gets the scene from the panel, or it would stay empty in Slicer.
    selectors = {name for name, class_name in widgets.items() if class_name == "qMRMLNodeComboBox"}
    connected = {c.findtext("receiver") for c in root.iter("connection")
                 if (c.findtext("signal"), c.findtext("slot")) == ("mrmlSceneChanged(vtkMRMLScene*)",
                                                                  "setMRMLScene(vtkMRMLScene*)")}
    assert selectors == connected


def placeholder_modules(QtCore, QtWidgets) -> dict:
    """Modules holding placeholders of Slicer's and CTK's widget classes, for PyQt5's .ui loader.

    Each placeholder declares the real class's properties (a setter each, so that a property the
    real class lacks fails to load) and the scene signal and slot the .ui file connects.
    """
    modules = {}
    for class_name, (base_name, properties) in SLICER_WIDGET_CLASSES.items():
        base = QtWidgets.QWidget if base_name == "QAbstractButton" else getattr(QtWidgets, base_name)
        namespace = {"receivedScenes": None}
        for property_name in properties:
            def setter(self, value, _name=property_name):
                self.setProperty("slicer_" + _name, value)
            namespace["set" + property_name[0].upper() + property_name[1:]] = setter
        if class_name == "qMRMLWidget":
            namespace["sceneChangedSignal"] = QtCore.pyqtSignal(object)
            # The .ui file names the C++ signature; here it is the one Python signal carrying the scene.
            namespace["mrmlSceneChanged"] = property(lambda self: {"vtkMRMLScene*": self.sceneChangedSignal})
        if class_name == "qMRMLNodeComboBox":
            namespace["setMRMLScene"] = lambda self, scene: setattr(self, "receivedScenes", scene)
        if class_name == "ctkPathLineEdit":
            namespace.update(PATH_LINE_EDIT_FILTERS)
        module = types.ModuleType(class_name)
        setattr(module, class_name, type(class_name, (base,), namespace))
        modules[class_name] = module
    return modules


@pytest.fixture(scope="module")
def qt_application():
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PyQt5 import QtWidgets

    return QtWidgets.QApplication.instance() or QtWidgets.QApplication([])


def test_ui_file_loads_in_qt_and_binds_every_parameter(qt_application, module, monkeypatch):
    from PyQt5 import QtCore, QtWidgets, uic

    for name, placeholder in placeholder_modules(QtCore, QtWidgets).items():
        monkeypatch.setitem(sys.modules, name, placeholder)
    panel = uic.loadUi(str(UI_FILE))
    children = {widget.objectName(): widget for widget in panel.findChildren(QtWidgets.QWidget)}
    assert widget_names_used_by_module() <= set(children), widget_names_used_by_module() - set(children)

    scene = slicer.vtkMRMLScene()
    panel.sceneChangedSignal.emit(scene)
    selectors = [widget for widget in children.values() if type(widget).__name__ == "qMRMLNodeComboBox"]
    assert selectors and all(selector.receivedScenes is scene for selector in selectors)

    # Each parameter has a widget bound by SlicerParameterName, of a kind Slicer's GUI connectors handle.
    hints = typing.get_type_hints(module.SARRegistrationParameterNode, vars(module), include_extras=True)
    bound = {widget.property("SlicerParameterName"): widget for widget in children.values()
             if widget.property("SlicerParameterName")}
    assert set(bound) == set(hints) - {"weightsPath"}  # the weights path is bound by hand (see the widget)
    for name, widget in bound.items():
        kind = typing.get_origin(hints[name]) is typing.Annotated and typing.get_args(hints[name])[0] or hints[name]
        widget_class = type(widget).__name__
        if isinstance(kind, type) and issubclass(kind, module.enum.Enum):
            assert widget_class == "QComboBox", name
        elif kind is bool:
            assert widget_class == "QCheckBox", name
        elif kind is int:
            assert widget_class == "QSpinBox", name
        elif kind is float:
            assert widget_class in ("QDoubleSpinBox", "ctkSliderWidget"), name
        else:  # MRML nodes, or a union of node types with None
            assert widget_class == "qMRMLNodeComboBox", name
    assert type(children["weightsPathLineEdit"]).__name__ == "ctkPathLineEdit"
