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
import collections
import importlib
import os
import re
import subprocess
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
    their arguments, and an identity ``tr``. ``qt`` is an empty module: only the widget uses it,
    and the panel's test (:func:`test_panel_runs_a_registration_without_blocking`) gives it fakes.
    """
    scripted = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent

        def setup(self):  # the real one adds the reload-and-test section to the panel
            self.layout = types.SimpleNamespace(addWidget=lambda widget: None)

        def resourcePath(self, filename):
            return str(MODULE_DIR / "Resources" / filename)

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


@pytest.fixture(scope="module")
def box_array(ventricles_array):
    """A second structure for the ventricles' grid: a box, the voxels it shares with them left out."""
    box = np.zeros_like(ventricles_array)
    box[4:8, 10:20, 12:22] = 1
    return box * (1 - ventricles_array)


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
    """Without instance optimisation: hardening (two interpolations) is only close to the engine's
    warp for a field that is smooth at the voxel scale, as the network's is."""
    reference, floating = pair_3d
    result = logic.register(reference, floating, model=model_3d, finetune=False, instanceOptimisation=False,
                            device="cpu", affine=False)

    # The warped volume lies on the reference grid.
    np.testing.assert_allclose(ijk_to_ras_of(result.warpedVolume), ijk_to_ras_of(reference), atol=1e-9)
    assert slicer.util.arrayFromVolume(result.warpedVolume).shape == (12, 32, 32)

    # The transform is the one Slicer itself makes of the engine's field (ITK file, LPS, "from parent").
    engine = sar.register(logic.sitkImageFromVolume(reference), logic.sitkImageFromVolume(floating), model_3d,
                          finetune=False, instance_optimisation=False, device="cpu", affine=False)
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
    result = logic.register(reference, floating, model=model_2d, mode="slicewise", finetune=False,
                            instanceOptimisation=False, device="cpu")
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
                                                                      ventricles_array, box_array):
    reference, floating, box = *pair_3d, box_array
    reference_structure = add_segmentation(scene, {"ventricles": ventricles_array, "box": box},
                                           ijk_to_ras(**REFERENCE_RAS), "reference structures")
    floating_labels = add_volume(scene, (ventricles_array + 2 * box).astype(np.int16),
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


def assert_measured_as_label_maps(logic, result, reference, floating, model, labels, names):
    """The module's measures of ``result`` equal the engine's run of the pair with ``labels`` as
    both structures' label maps, label ``k + 1`` named ``names[k]``; returns that run."""
    engine = sar.register(logic.sitkImageFromVolume(reference), logic.sitkImageFromVolume(floating), model,
                          reference_mask=mask_image(labels, reference, logic),
                          floating_mask=mask_image(labels, floating, logic), finetune=False, device="cpu")
    for when in ("before", "after"):
        assert result.metrics[when]["labels"] == {name: engine.metrics[when]["labels"][str(k + 1)]
                                                  for k, name in enumerate(names)}
        assert result.metrics[when]["dice"] == engine.metrics[when]["dice"]
    assert logic.metricsRows(result.metrics)[0][0] == f"Dice, mean of {len(names)} structures"
    return engine


def test_segments_named_alike_in_both_structures_are_measured_one_by_one(scene, logic, pair_3d, model_3d,
                                                                          ventricles_array, box_array):
    reference, floating, box = *pair_3d, box_array  # segments that do not overlap: one label map holds them
    segments = {"ventricles": ventricles_array, "box": box}
    reference_structure = add_segmentation(scene, segments, ijk_to_ras(**REFERENCE_RAS), "reference structures")
    floating_structure = add_segmentation(scene, dict(reversed(segments.items())), ijk_to_ras(**FLOATING_RAS),
                                          "floating structures")  # matched by name, not by order
    result = logic.register(reference, floating, reference_structure, floating_structure, model=model_3d,
                            finetune=False, device="cpu")

    # The same run through the engine, with label maps numbered in the reference's order.
    engine = assert_measured_as_label_maps(logic, result, reference, floating, model_3d, ventricles_array + 2 * box,
                                           ["ventricles", "box"])
    rows = logic.metricsRows(result.metrics)
    dice = engine.metrics["after"]["labels"]["1"]["dice"]
    assert ("Dice: ventricles", f"{engine.metrics['before']['labels']['1']['dice']:.3f}", f"{dice:.3f}") in rows

    # Segments that overlap cannot share a label map: both structures are measured as one, as before.
    overlapping = add_segmentation(scene, {"ventricles": ventricles_array, "box": np.maximum(box, ventricles_array)},
                                   ijk_to_ras(**FLOATING_RAS), "overlapping structures")
    union = logic.register(reference, floating, reference_structure, overlapping, model=model_3d, finetune=False,
                           device="cpu")
    assert "labels" not in union.metrics["after"]


def test_two_label_map_nodes_are_matched_by_value_whatever_their_names(scene, logic, pair_3d, model_3d,
                                                                         ventricles_array, box_array):
    # Label map nodes name their labels from their colour tables, or after themselves without one:
    # here "reference labels 1" and "floating labels 1", which share no name.
    reference, floating, box = *pair_3d, box_array
    labels = (ventricles_array + 2 * box).astype(np.int16)
    reference_labels = add_volume(scene, labels, ijk_to_ras(**REFERENCE_RAS), "reference labels",
                                  "vtkMRMLLabelMapVolumeNode")
    floating_labels = add_volume(scene, labels, ijk_to_ras(**FLOATING_RAS), "floating labels",
                                 "vtkMRMLLabelMapVolumeNode")
    result = logic.register(reference, floating, reference_labels, floating_labels, model=model_3d,
                            finetune=False, device="cpu")
    assert_measured_as_label_maps(logic, result, reference, floating, model_3d, labels,
                                  ["reference labels 1", "reference labels 2"])

    # A colour table that names both labels alike: the names take the values, so both are reported.
    colors = scene.AddNewNodeByClass("vtkMRMLColorTableNode", "tissue colours")
    colors.SetTypeToUser()
    colors.SetNumberOfColors(3)
    for value, name in enumerate(["background", "tissue", "tissue"]):
        colors.SetColor(value, name, 0.2 * value, 0.5, 0.5, 1.0)
    reference_labels.GetDisplayNode().SetAndObserveColorNodeID(colors.GetID())
    result = logic.register(reference, floating, reference_labels, floating_labels, model=model_3d,
                            finetune=False, device="cpu")
    assert_measured_as_label_maps(logic, result, reference, floating, model_3d, labels, ["tissue (1)", "tissue (2)"])


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


# ----------------------------------------------------------------------------------------------- background runs

def poll_until_finished(run, timeout=120.0) -> list:
    """Poll as the panel's timer does, until the run has ended; the scene state seen at each poll."""
    import time

    states, deadline = [], time.monotonic() + timeout
    while not run.finished:
        assert time.monotonic() < deadline, "the run did not end"
        run.poll()
        states.append(scene_state(slicer.mrmlScene))
        time.sleep(0.01)
    return states


def test_background_run_touches_the_scene_only_when_polled_at_the_end(scene, logic, module, pair_3d, model_3d):
    """The worker builds the outputs as data; the scene changes only in the poll that ends the run."""
    reference, floating = pair_3d
    state = scene_state(scene)
    run = logic.startRegistration(reference, floating, model=model_3d, finetune=False, device="cpu")
    with pytest.raises(RuntimeError, match="already running"):  # Register cannot be pressed twice
        logic.startRegistration(reference, floating, model=model_3d)
    with pytest.raises(RuntimeError, match="already running"):  # nor the console run one beside it
        logic.register(reference, floating, model=model_3d)
    states = poll_until_finished(run)
    assert run.state is module.RunState.SUCCEEDED, run.traceback
    assert all(seen == state for seen in states[:-1]) and states[-1] != state
    assert run.result.warpedVolume.GetScene() is scene
    assert any("instance optimisation" in message for message in run.log)
    # Only now can another run start.
    second = logic.startRegistration(reference, floating, model=model_3d, finetune=False,
                                     instanceOptimisation=False, device="cpu")
    assert second.wait(120) and second.state is module.RunState.SUCCEEDED


def gate(monkeypatch, owner, name, phase=None):
    """Hold the run at ``owner.name`` until the test has pressed Cancel (or closed the scene).

    With ``phase``, ``owner.name`` is the engine's ``register`` and the hold is at its first
    progress message naming the phase. Returns (reached, release) events.
    """
    import threading

    reached, release = threading.Event(), threading.Event()
    original = getattr(owner, name)

    def hold():
        if not reached.is_set():
            reached.set()
            assert release.wait(30)

    if phase is None:
        def held(*args, **kwargs):
            hold()
            return original(*args, **kwargs)
    else:
        def held(*args, progress=None, **kwargs):
            def progress_then_hold(fraction, message):
                progress(fraction, message)
                if phase in message:
                    hold()
            return original(*args, progress=progress_then_hold, **kwargs)
    monkeypatch.setattr(owner, name, held)
    return reached, release


@pytest.mark.parametrize("phase", ["loading the weights", "finetuning", "instance optimisation",
                                   "inverting the field"])
def test_cancel_works_in_every_phase(scene, logic, module, pair_3d, model_3d, chosen_outputs, brain_array,
                                     monkeypatch, phase):
    reference, floating = pair_3d
    if phase == "loading the weights":
        reached, release = gate(monkeypatch, module.SARRegistrationLogic, "_model")
    elif phase == "inverting the field":
        reached, release = gate(monkeypatch, sys.modules["SARRegistrationFields"], "invertDisplacement")
    else:
        reached, release = gate(monkeypatch, sar, "register", phase)
    model = None if phase == "loading the weights" else model_3d  # None: the shipped weights are loaded
    state = scene_state(scene)
    run = logic.startRegistration(reference, floating, model=model, network=True, device="cpu", maxIterations=3,
                                  optimisationIterations=2, computeInverse=True, **chosen_outputs)
    assert reached.wait(60), run.poll() or run.traceback
    run.cancel()
    release.set()
    poll_until_finished(run)
    assert run.state is module.RunState.CANCELLED and "Cancelled" in run.message
    assert scene_state(scene) == state
    assert_outputs_untouched(chosen_outputs, brain_array)


def test_closing_the_scene_cancels_the_run_and_writes_nothing(scene, logic, module, pair_3d, model_3d, monkeypatch):
    reference, floating = pair_3d
    reached, release = gate(monkeypatch, sar, "register", "instance optimisation")
    run = logic.startRegistration(reference, floating, model=model_3d, finetune=False, device="cpu")
    assert reached.wait(60)
    scene.Clear(0)  # File > Close scene
    release.set()
    poll_until_finished(run)
    assert run.state is module.RunState.CANCELLED and run.sceneClosed and "scene was closed" in run.message
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 0
    assert scene.GetNumberOfNodesByClass("vtkMRMLTransformNode") == 0


def test_a_run_that_ended_just_before_the_scene_closed_writes_nothing(scene, logic, module, pair_3d, model_3d):
    reference, floating = pair_3d
    run = logic.startRegistration(reference, floating, model=model_3d, finetune=False, instanceOptimisation=False,
                                  device="cpu")
    while not run.workerEnded:  # the result waits for the panel's next poll...
        pass
    scene.Clear(0)  # ... and the scene closes first
    poll_until_finished(run)
    assert run.state is module.RunState.CANCELLED and run.result is None
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 0


def test_a_broken_pytorch_install_reaches_the_panel(scene, logic, module, pair_3d, model_3d, monkeypatch):
    """The engine (and PyTorch) are imported in the worker: the import error ends the run as FAILED,
    with the message and traceback the panel's dialog shows."""
    reference, floating = pair_3d
    state = scene_state(scene)
    monkeypatch.setitem(sys.modules, "SARRegistrationLib", None)  # "import SARRegistrationLib" fails
    run = logic.startRegistration(reference, floating, model=model_3d, device="cpu")
    poll_until_finished(run)
    assert run.state is module.RunState.FAILED and isinstance(run.error, ImportError)
    assert "SARRegistrationLib" in run.traceback and "failed" in run.message
    assert scene_state(scene) == state


def test_engine_and_scene_errors_reach_the_panel(scene, logic, module, pair_3d, model_3d, ventricles_array,
                                                 monkeypatch, tmp_path):
    reference, floating = pair_3d
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a weights file")
    state = scene_state(scene)
    run = logic.startRegistration(reference, floating, weightsPath=corrupt, device="cpu")
    poll_until_finished(run)
    assert run.state is module.RunState.FAILED and isinstance(run.error, WeightsError)
    assert scene_state(scene) == state
    # An input deleted while the run works: refused when the outputs would be written.
    structure = add_segmentation(scene, {"ventricles": ventricles_array}, ijk_to_ras(**FLOATING_RAS), "ventricles")
    reached, release = gate(monkeypatch, sar, "register", "instance optimisation")
    run = logic.startRegistration(reference, floating, None, structure, model=model_3d, finetune=False,
                                  device="cpu")
    assert reached.wait(60)
    scene.RemoveNode(structure)
    state = scene_state(scene)
    release.set()
    poll_until_finished(run)
    assert run.state is module.RunState.FAILED and "'ventricles' (floatingStructure) was removed" in str(run.error)
    assert scene_state(scene) == state


def test_gpu_out_of_memory_falls_back_to_the_cpu_with_device_auto(scene, logic, pair_3d, model_3d, monkeypatch):
    import torch

    reference, floating = pair_3d
    devices = []
    engine_register = sar.register

    def register_out_of_gpu_memory(*args, device="auto", **kwargs):
        devices.append(device)
        if device != "cpu":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return engine_register(*args, device=device, **kwargs)

    monkeypatch.setattr(sar, "register", register_out_of_gpu_memory)
    result = logic.register(reference, floating, model=model_3d, finetune=False, instanceOptimisation=False)
    assert devices == ["auto", "cpu"] and result.metrics["device"] == "cpu"
    assert result.record["notes"] == ["The GPU ran out of memory; registering on the CPU instead."]
    state = scene_state(scene)
    with pytest.raises(RuntimeError, match=r"GPU ran out of memory \(CUDA out of memory. Tried.*device Automatic"):
        logic.register(reference, floating, model=model_3d, device="cuda")
    assert scene_state(scene) == state


# ----------------------------------------------------------------------------------------------- inputs

def add_linear_transform(scene, matrix, name="transform"):
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    node.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(matrix))
    return node


def rigid_matrix(degrees=8.0, shift=(6.0, -4.0, 3.0)) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3] = np.array(rotation_3d(degrees, 0.5 * degrees)).reshape(3, 3)
    matrix[:3, 3] = shift
    return matrix


def test_floating_volume_under_a_parent_transform(scene, logic, pair_3d, model_3d):
    """The same warped volume as an untransformed copy resampled into world space first (Slicer's
    hardening), and the output transform placed above the parent moves the volume onto the result."""
    reference, floating = pair_3d
    parent = add_linear_transform(scene, rigid_matrix(), "parent")
    floating.SetAndObserveTransformNodeID(parent.GetID())
    hardened = harden_on_clone(scene, floating, parent, logic)
    options = dict(model=model_3d, finetune=False, device="cpu", affine=False)
    with_parent = logic.register(reference, floating, **options)
    resampled_first = logic.register(reference, hardened, **options)
    np.testing.assert_allclose(slicer.util.arrayFromVolume(with_parent.warpedVolume),
                               slicer.util.arrayFromVolume(resampled_first.warpedVolume), atol=1e-4)
    np.testing.assert_allclose(slicer.util.arrayFromGridTransform(with_parent.transform),
                               slicer.util.arrayFromGridTransform(resampled_first.transform), atol=1e-6)
    assert floating.GetParentTransformNode() is parent  # the input is left where it was
    # floating -> parent -> output transform: Slicer's evaluation sends each reference voxel where the engine sampled.
    parent.SetAndObserveTransformNodeID(with_parent.transform.GetID())
    expected, inside = warp_through_transform_node(floating, reference, parent)
    warped = slicer.util.arrayFromVolume(with_parent.warpedVolume)
    assert inside.mean() > 0.3
    np.testing.assert_allclose(warped[inside], expected[inside], atol=1e-4 * np.abs(expected[inside]).max())


def test_initial_transform_starts_the_registration_and_is_part_of_the_output(scene, logic, pair_3d, model_3d):
    """With an initial transform the engine sees the floating volume moved by it (the same warped
    volume as with the volume under it), and the output transform alone, applied to the floating
    volume, gives the warped volume."""
    reference, floating = pair_3d
    initial = add_linear_transform(scene, rigid_matrix(), "initial")
    options = dict(model=model_3d, finetune=False, device="cpu")
    result = logic.register(reference, floating, initialTransform=initial, **options)
    assert floating.GetParentTransformNode() is None
    expected, inside = warp_through_transform_node(floating, reference, result.transform)
    warped = slicer.util.arrayFromVolume(result.warpedVolume)
    assert inside.mean() > 0.3
    np.testing.assert_allclose(warped[inside], expected[inside], atol=1e-4 * np.abs(expected[inside]).max())
    floating.SetAndObserveTransformNodeID(initial.GetID())
    under_it = logic.register(reference, floating, **options)
    np.testing.assert_allclose(warped, slicer.util.arrayFromVolume(under_it.warpedVolume), atol=1e-4)
    assert result.record["settings"]["initial_transform"] == "initial"
    with pytest.raises(ValueError, match="already moves the floating volume .* applied twice"):
        logic.register(reference, floating, initialTransform=initial, **options)
    floating.SetAndObserveTransformNodeID(None)
    bent = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "bent")
    with pytest.raises(ValueError, match="initial transform 'bent' is not linear"):
        logic.register(reference, floating, initialTransform=bent, **options)


def test_the_bias_field_setting_reaches_the_engine(scene, logic, module, pair_3d):
    """The panel's bias-field box: ticked (the default) estimates one; unticked does not."""
    reference, floating = pair_3d
    assert module.SARRegistrationParameterNode.biasField is True
    for ticked in (True, False):
        result = logic.register(reference, floating, network=False, optimisationIterations=3, device="cpu",
                                optimisationBiasField=ticked)
        assert result.metrics["instance_optimisation"]["bias_field"] is ticked
        assert result.record["settings"]["optimisation_bias_field"] is ticked


def test_the_ct_equalisation_choice_reaches_the_engine(scene, logic, module, pair_3d):
    """The panel's CT equalisation: automatic leaves these MR-like volumes as they are (they are not
    CT); always and never are passed on."""
    reference, floating = pair_3d
    assert module.SARRegistrationParameterNode.equalise is module.CtEqualisation.AUTO
    for choice, expected in ((module.CtEqualisation.AUTO, False), (module.CtEqualisation.ON, True),
                             (module.CtEqualisation.OFF, False)):
        result = logic.register(reference, floating, network=False, optimisationIterations=3, device="cpu",
                                optimisationEqualise=choice.engineValue())
        assert result.metrics["instance_optimisation"]["equalised"] is expected
        assert result.record["settings"]["optimisation_equalise"] is choice.engineValue()


def test_the_similarity_choice_reaches_the_engine(scene, logic, module, pair_3d):
    """The panel's similarity: automatic is the engine's choice for a volume (NMI); another choice is passed on."""
    from SARRegistrationLib.instance_optimisation import SIMILARITIES

    offered = [choice.engineValue() for choice in module.ImageSimilarity]
    assert offered[0] is None and sorted(offered[1:]) == sorted(SIMILARITIES)
    assert module.SARRegistrationParameterNode.similarity is module.ImageSimilarity.AUTO
    reference, floating = pair_3d
    for choice, expected in ((module.ImageSimilarity.AUTO, "nmi"), (module.ImageSimilarity.NMI_MIND, "nmi+mind")):
        result = logic.register(reference, floating, network=False, optimisationIterations=3, device="cpu",
                                optimisationSimilarity=choice.engineValue())
        assert result.metrics["instance_optimisation"]["similarity"] == expected
        assert result.record["settings"]["optimisation_similarity"] == choice.engineValue()
    nodes = scene.GetNumberOfNodes()
    with pytest.raises(ValueError, match="Unknown similarity 'ncc'"):
        logic.register(reference, floating, network=False, device="cpu", optimisationSimilarity="ncc")
    assert scene.GetNumberOfNodes() == nodes


def test_without_the_network_there_are_no_sar_masks(scene, logic, pair_3d):
    reference, floating = pair_3d
    result = logic.register(reference, floating, network=False, optimisationIterations=5, device="cpu")
    assert result.metrics["network"] is False and result.metrics["instance_optimisation"]["iterations"] > 0
    assert result.referenceMaskSegmentation is None and result.floatingMaskSegmentation is None
    assert result.record["weights"] is None
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0


# ----------------------------------------------------------------------------------------------- outputs and QA

def transform_points(transform_node, points, from_parent=True) -> np.ndarray:
    transform = transform_node.GetTransformFromParent() if from_parent else transform_node.GetTransformToParent()
    return np.array([transform.TransformPoint(tuple(float(v) for v in point)) for point in points])


def interior_points(volume, margin=3, step=3) -> np.ndarray:
    """RAS centres of voxels at least ``margin`` voxels inside ``volume``."""
    shape = slicer.util.arrayFromVolume(volume).shape
    k, j, i = np.meshgrid(*[np.arange(margin, n - margin, step) for n in shape], indexing="ij")
    ijk = np.stack([i.ravel(), j.ravel(), k.ravel(), np.ones(i.size)])
    return (ijk_to_ras_of(volume) @ ijk)[:3].T


@pytest.mark.parametrize("with_initial_transform", [False, True])
def test_inverse_transform_composed_with_the_forward_one_is_the_identity(scene, logic, pair_3d, model_3d,
                                                                        with_initial_transform):
    reference, floating = pair_3d
    initial = add_linear_transform(scene, rigid_matrix(3.0, (2.0, -1.0, 1.5))) if with_initial_transform else None
    # The network's field alone: smooth at the scale of this 32 x 32 x 12 volume, where instance
    # optimisation's residual is not (the inverse's accuracy follows the field's smoothness), and
    # no affine pre-alignment, which would carry much of this small volume outside the other.
    result = logic.register(reference, floating, model=model_3d, finetune=False, computeInverse=True,
                            initialTransform=initial, device="cpu", instanceOptimisation=False, affine=False)
    inverse = result.inverseTransform
    assert inverse.IsA("vtkMRMLGridTransformNode") and inverse.GetName() == "floating SAR inverse transform"
    # On the floating volume's grid, in the floating volume's world.
    origin, spacing, _ = grid_geometry(inverse)
    np.testing.assert_allclose(origin, ijk_to_ras_of(floating)[:3, 3], atol=1e-9)
    points = interior_points(reference)
    moved = transform_points(result.transform, points)  # reference world -> floating world
    floating_box = np.linalg.inv(ijk_to_ras_of(floating)) @ np.c_[moved, np.ones(len(moved))].T
    inside = np.all((floating_box[:3] > 1) & (floating_box[:3] < np.array([32, 32, 12])[:, None] - 2), axis=0)
    assert inside.mean() > 0.5
    back = transform_points(inverse, moved[inside])  # floating world -> reference world
    error = np.linalg.norm(back - points[inside], axis=1)
    moved_by = np.linalg.norm(moved[inside] - points[inside], axis=1)
    assert np.median(error) < 0.05 and np.percentile(error, 95) < 0.5, (np.median(error), error.max())
    assert np.median(moved_by) > 2.0  # mm: the forward transform moves points far more than that


def test_jacobian_volume_is_the_engines_determinant(scene, logic, pair_3d, model_3d):
    from SARRegistrationLib.fields import displacement_in_voxels
    from SARRegistrationLib.metrics import jacobian_determinant

    reference, floating = pair_3d
    result = logic.register(reference, floating, model=model_3d, finetune=False, computeJacobian=True,
                            device="cpu", affine=False)
    engine = sar.register(logic.sitkImageFromVolume(reference), logic.sitkImageFromVolume(floating), model_3d,
                          finetune=False, device="cpu", affine=False)
    jacobian = slicer.util.arrayFromVolume(result.jacobianVolume)
    np.testing.assert_allclose(ijk_to_ras_of(result.jacobianVolume), ijk_to_ras_of(reference), atol=1e-9)
    np.testing.assert_allclose(jacobian, jacobian_determinant(displacement_in_voxels(engine.displacement)),
                               rtol=1e-5, atol=1e-6)
    assert np.mean(jacobian <= 0) == pytest.approx(result.metrics["folding_fraction"])
    assert jacobian.std() > 0.01  # the field is not a translation


def test_landmark_error_follows_the_output_transform(scene, logic, pair_3d, model_3d):
    """Floating landmarks put where Slicer's evaluation of the output transform sends the reference
    ones: the error after is zero, before it is their distance."""
    reference, floating = pair_3d
    first = logic.register(reference, floating, model=model_3d, finetune=False, device="cpu", affine=False)
    points = interior_points(reference, margin=4, step=6)[:6]
    targets = transform_points(first.transform, points)
    reference_landmarks = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "reference landmarks")
    floating_landmarks = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "floating landmarks")
    for point, target in zip(points, targets):
        reference_landmarks.AddControlPoint(list(point))
        floating_landmarks.AddControlPoint(list(target))
    result = logic.register(reference, floating, model=model_3d, finetune=False, device="cpu", affine=False,
                            referenceLandmarks=reference_landmarks, floatingLandmarks=floating_landmarks)
    tre = result.metrics["tre"]
    assert tre["points"] == 6 and tre["after"]["max_mm"] < 1e-3
    np.testing.assert_allclose(tre["before"]["per_point_mm"], np.linalg.norm(points - targets, axis=1), atol=1e-3)
    assert tre["before"]["mean_mm"] > 2.0
    assert ("Landmark error (TRE, mean of 6)", f"{tre['before']['mean_mm']:.2f} mm", "0.00 mm") in \
        logic.metricsRows(result.metrics)
    floating_landmarks.RemoveNthControlPoint(0)
    with pytest.raises(ValueError, match="same landmarks in the same order; they have 6 and 5 points"):
        logic.register(reference, floating, model=model_3d, referenceLandmarks=reference_landmarks,
                       floatingLandmarks=floating_landmarks)


def test_every_output_node_keeps_the_record_of_its_run(scene, logic, pair_3d, model_3d, ventricles_array,
                                                      tmp_path):
    import json

    from SARRegistrationLib.model import sha256_of

    reference, floating = pair_3d
    weights = save_model(model_3d, tmp_path / "tiny_3d.pt")
    structure = add_segmentation(scene, {"ventricles": ventricles_array}, ijk_to_ras(**FLOATING_RAS), "ventricles")
    result = logic.register(reference, floating, structure, structure, weightsPath=str(weights), maxIterations=3,
                            optimisationIterations=2, computeInverse=True, computeJacobian=True, device="cpu")
    record = result.record
    assert record["weights"] == {"path": str(weights), "sha256": sha256_of(weights)}
    assert record["settings"]["max_iterations"] == 3 and record["settings"]["optimisation_iterations"] == 2
    assert record["iterations"] == 3 and record["device"] == "cpu" and record["seconds"] > 0
    assert record["mode"] == "volume" and record["instance_optimisation"]["levels"] == 3
    assert any("loss" in line for line in record["log"])  # the finetuning losses, iteration by iteration
    outputs = [result.warpedVolume, result.transform, result.inverseTransform, result.jacobianVolume,
               result.referenceMaskSegmentation, result.floatingMaskSegmentation, result.warpedSegmentation]
    for node in outputs:
        assert json.loads(node.GetAttribute("SARRegistration.RunRecord")) == json.loads(json.dumps(record))


def test_logic_with_defaults_gives_the_engines_field(scene, logic, pair_3d, tmp_path):
    """Issue 13: the logic with every default registers as the engine with every default."""
    reference, floating = pair_3d
    result = logic.register(reference, floating)
    engine = sar.register(logic.sitkImageFromVolume(reference), logic.sitkImageFromVolume(floating))
    assert result.metrics["instance_optimisation"]["iterations"] > 0 and result.metrics["network"] is False
    by_slicer = slicer_grid_transform_of(engine.displacement, scene, tmp_path)
    np.testing.assert_allclose(slicer.util.arrayFromGridTransform(result.transform),
                               slicer.util.arrayFromGridTransform(by_slicer), atol=1e-9)


def test_defaults_are_the_engines(module, logic):
    """The logic, the parameter node and the panel start from the engine's defaults."""
    import inspect

    from SARRegistrationLib.instance_optimisation import OptimisationSettings
    from SARRegistrationLib.objective import LossWeights

    engine = inspect.signature(sar.register).parameters
    mine = inspect.signature(logic.register).parameters
    for engine_name, name in (("mode", "mode"), ("device", "device"), ("affine", "affine"), ("network", "network"),
                              ("finetune", "finetune"), ("max_iterations", "maxIterations"),
                              ("tolerance", "tolerance"), ("smoothness", "smoothness"),
                              ("instance_optimisation", "instanceOptimisation"),
                              ("optimisation_iterations", "optimisationIterations"),
                              ("optimisation_levels", "optimisationLevels"),
                              ("optimisation_bias_field", "optimisationBiasField"),
                              ("optimisation_similarity", "optimisationSimilarity"),
                              ("optimisation_equalise", "optimisationEqualise")):
        assert mine[name].default == engine[engine_name].default, name
    parameters = module.SARRegistrationParameterNode
    assert parameters.mode is module.RegistrationMode.AUTO and parameters.device is module.ComputeDevice.AUTO
    assert parameters.network.engineValue() is engine["network"].default
    assert parameters.affine.engineValue() == engine["affine"].default
    assert parameters.similarity.engineValue() is engine["optimisation_similarity"].default
    assert parameters.equalise.engineValue() is engine["optimisation_equalise"].default
    assert parameters.preset is module.RegistrationPreset.ACCURATE
    settings = OptimisationSettings()
    assert (module.decisions.engineIterations(parameters.optimisationIterations), parameters.optimisationLevels,
            parameters.biasField) == (settings.iterations, settings.levels, settings.bias_field)
    assert parameters.smoothness == LossWeights().for_finetuning().smoothness
    assert (parameters.maxIterations, parameters.tolerance, parameters.finetune, parameters.instanceOptimisation) == \
        (engine["max_iterations"].default, engine["tolerance"].default, engine["finetune"].default,
         engine["instance_optimisation"].default)
    # The presets name parameter-node settings, and the menus list what the decisions offer, in order.
    assert set(module.PRESET_PARAMETERS) <= set(typing.get_type_hints(parameters, vars(module)))
    assert [preset.value for preset in module.RegistrationPreset] == [*module.decisions.PRESETS, "custom"]
    assert [device.value for device in module.ComputeDevice] == \
        [choice.device for choice in module.decisions.deviceChoices(True)]
    for ndims in (2, 3):
        from SARRegistrationLib.model import default_weights_path
        assert module.shippedWeightsPath(ndims) == default_weights_path(ndims)


def test_memory_estimate_of_the_chosen_volumes(scene, logic, pair_3d, module):
    reference, floating = pair_3d
    voxels = 12 * 32 * 32
    estimate = logic.estimatedMemoryBytes(reference, floating, computeInverse=True)
    assert estimate == module.decisions.estimatedMemoryBytes(voxels, voxels, 4, inverse=True)
    assert logic.totalMemoryBytes() is None or logic.totalMemoryBytes() > 2 ** 28


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
    assert not any(row[0] == "Finetuning" for row in rows)
    optimised = module.SARRegistrationLogic.metricsRows({"instance_optimisation": {
        "levels": 3, "iterations": 120, "seconds": 0.21, "similarity": "nmi+mind"}})
    assert optimised == [("Instance optimisation", "", "3 levels, 120 iterations, 0.2 s, NMI + MIND-SSC")]
    with_bias = module.SARRegistrationLogic.metricsRows({"instance_optimisation": {
        "levels": 3, "iterations": 240, "seconds": 2.0, "similarity": "nmi", "bias_field": True}})
    assert with_bias == [("Instance optimisation", "", "3 levels, 240 iterations, 2.0 s, NMI with a bias field")]
    ct = module.SARRegistrationLogic.metricsRows({"instance_optimisation": {
        "levels": 3, "iterations": 240, "seconds": 2.0, "similarity": "nmi", "bias_field": True, "equalised": True}})
    assert ct == [("Instance optimisation", "", "3 levels, 240 iterations, 2.0 s, "
                                                "NMI of the equalised CT intensities with a bias field")]
    aligned = module.SARRegistrationLogic.metricsRows({"affine_prealignment": True, "rigid_search": {
        "gain": 0.12, "rotation_degrees": [-20.0], "shift_mm": [8.0, 0.0]}})
    assert aligned == [("Pre-alignment", "", "affine, from a rotation of -20° and a shift of 8, 0 mm "
                                             "(the pair was misaligned)")]
    assert module.SARRegistrationLogic.metricsRows({"affine_prealignment": False, "rigid_search": {
        "gain": 0.0, "rotation_degrees": [0.0], "shift_mm": [0.0, 0.0]}}) == [
        ("Pre-alignment", "", "none (the pair was aligned)")]
    assert module.SARRegistrationLogic.metricsRows({"affine_prealignment": False, "rigid_search": {
        "gain": 0.02, "rotation_degrees": [10.0], "shift_mm": [16.0, 16.0], "declined": True}}) == [
        ("Pre-alignment", "", "none (the affine from the search's motion matched the images no better)")]
    assert module.SARRegistrationLogic.metricsRows({"affine_prealignment": False, "rigid_search": None}) == [
        ("Pre-alignment", "", "none")]
    declined = module.SARRegistrationLogic.metricsRows({**metrics, "finetuning_declined": True})
    assert ("Finetuning", "", "network's own field kept (the tuned one matched the images no better)") in declined


@pytest.fixture
def dependencies(module):
    """The module's dependency helper (imported with the module)."""
    return sys.modules["SARRegistrationDependencies"]


@pytest.mark.parametrize("pydeps", [False, True])
def test_packages_are_checked_by_version_and_installed_after_one_confirmation(logic, dependencies, monkeypatch,
                                                                               pydeps):
    """Missing or too old: one question; PyTorch through PyTorch Utils, the rest with pip_ensure or pip."""
    versions = {"scipy": "1.8.0", "tqdm": "4.66.0"}  # torch and scikit-image missing, scipy too old
    monkeypatch.setattr(dependencies, "installedVersion", lambda name: versions.get(name))
    questions, pip_calls, torch_calls = [], [], []
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, *args, **kwargs: questions.append(text))
    monkeypatch.setattr(slicer.util, "pip_install", lambda requirements, *args, **kwargs: pip_calls.append(
        requirements) or versions.update({"scipy": "1.17.1", "scikit-image": "0.26.0"}))

    class PyTorchUtilsLogic:
        def torchInstalled(self):
            return "torch" in versions

        def installTorch(self, **kwargs):
            torch_calls.append(kwargs)
            versions["torch"] = "2.13.0"
            return types.ModuleType("torch")

    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic))
    if pydeps:
        def pip_ensure(requirements, **kwargs):
            pip_calls.append(([str(requirement) for requirement in requirements], kwargs))
            versions.update({"scipy": "1.17.1", "scikit-image": "0.26.0"})
        monkeypatch.setitem(sys.modules, "slicer.pydeps", types.SimpleNamespace(pip_ensure=pip_ensure))
    else:
        monkeypatch.setitem(sys.modules, "slicer.pydeps", None)  # Slicer before 5.11

    assert logic.missingPythonPackages() == ["torch>=2.0", "scipy>=1.10", "scikit-image>=0.22"]
    assert logic.installPythonPackages() is False  # declined: nothing installed
    assert len(questions) == 1 and "torch>=2.0, scipy>=1.10 (1.8.0 is installed), scikit-image>=0.22" in questions[0]
    assert not pip_calls and not torch_calls

    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, *args, **kwargs: True)
    assert logic.installPythonPackages() is True
    assert torch_calls == [{"askConfirmation": False, "torchVersionRequirement": ">=2.0"}]
    if pydeps:
        assert pip_calls == [(["scipy>=1.10", "scikit-image>=0.22"],
                              {"prompt_install": False, "requester": "SAR Registration"})]
    else:
        assert pip_calls == [["scipy>=1.10", "scikit-image>=0.22"]]
    assert logic.missingPythonPackages() == []


def test_pytorch_comes_only_from_the_pytorch_extension(logic, dependencies, monkeypatch):
    """No silent CPU-only ``pip install torch``: without the PyTorch extension, or with a PyTorch too
    old to replace while loaded, the message says what to do."""
    versions = {"scipy": "1.17.1", "scikit-image": "0.26.0", "tqdm": "4.70.1"}
    monkeypatch.setattr(dependencies, "installedVersion", lambda name: versions.get(name))
    monkeypatch.setattr(slicer.util, "pip_install", lambda *args, **kwargs: pytest.fail("pip must not install torch"))
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # "import PyTorchUtils" fails
    with pytest.raises(RuntimeError, match="needs the PyTorch extension.*Extensions Manager"):
        logic.installPythonPackages(askConfirmation=False)
    versions["torch"] = "1.13.1"
    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=lambda: None))
    assert logic.missingPythonPackages() == ["torch>=2.0"]
    with pytest.raises(RuntimeError, match="PyTorch 1.13.1 is installed but SAR Registration needs torch>=2.0"):
        logic.installPythonPackages(askConfirmation=False)


def test_minimum_versions_admit_the_pinned_requirements(dependencies):
    """The module asks for at least what requirements.txt pins (the versions the tests run on)."""
    pinned = dict(line.split("==") for line in (MODULE_DIR.parent / "requirements.txt").read_text().splitlines()
                  if "==" in line and not line.startswith("#"))
    asked = (dependencies.TORCH_REQUIREMENT, *dependencies.PIP_REQUIREMENTS)
    assert dependencies.unsatisfied(asked, lambda name: pinned.get(name)) == []
    assert {requirement.split(">")[0] for requirement in asked} <= set(pinned)


def test_finetuning_reports_progress_and_measures(scene, logic, pair_3d, model_3d):
    reference, floating = pair_3d
    progress = []
    result = logic.register(reference, floating, model=model_3d, device="cpu", maxIterations=2, smoothness=2.0,
                            progress=lambda fraction, message: progress.append(fraction))
    assert progress == sorted(progress) and progress[-1] == 1.0
    assert result.metrics["iterations"] == 2 and result.metrics["finetuned"]


# ----------------------------------------------------------------------------------------------- description

def test_module_description(module, monkeypatch):
    connected = []
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(connect=lambda *args: connected.append(args)),
                        raising=False)
    parent = types.SimpleNamespace()
    module.SARRegistration(parent)
    assert connected == [("startupCompleted()", module.registerSampleData)]
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
                     "include(${Slicer_EXTENSION_CPACK})", "EXTENSION_CATEGORY \"Registration\"",
                     "EXTENSION_DEPENDS \"PyTorch\""):
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
    # Every Python file of the module is built and installed, the helpers the module imports too.
    scripts = {entry.replace("${MODULE_NAME}", "SARRegistration") for entry in listed if entry.endswith(".py")}
    assert scripts == {path.name for path in MODULE_DIR.glob("*.py")}


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


def test_sample_data_module_offers_the_command_lines_sample_pair(module, scene, monkeypatch):
    """Registered with the Sample Data module at start-up without reading the engine; clicking it
    loads the four files of ``sample.SAMPLE``, the list ``register --sample`` uses."""
    from SARRegistrationLib.sample import SAMPLE

    registered, loaded = [], []
    sample_data = types.ModuleType("SampleData")
    sample_data.SampleDataLogic = types.SimpleNamespace(
        registerCustomSampleDataSource=lambda **source: registered.append(source))
    monkeypatch.setitem(sys.modules, "SampleData", sample_data)
    for loader, kind in (("loadVolume", "volume"), ("loadLabelVolume", "labels")):
        monkeypatch.setattr(slicer.util, loader, lambda path, properties, kind=kind: loaded.append(
            (path, kind, properties["name"])) or scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode"))
    module.registerSampleData()
    (source,) = registered
    assert source["category"] == "Registration" and Path(source["thumbnailFileName"]).is_file()
    assert not loaded
    source["customDownloader"](source)
    assert [(path, kind) for path, kind, _ in loaded] == [
        (str(SAMPLE["reference"]), "volume"), (str(SAMPLE["floating"]), "volume"),
        (str(SAMPLE["reference_mask"]), "labels"), (str(SAMPLE["floating_mask"]), "labels")]


def test_the_sample_list_imports_no_pytorch():
    """Loading the sample pair runs on Slicer's main thread: its list comes without PyTorch (or SimpleITK)."""
    check = "import sys, SARRegistrationLib.sample; print(sorted({'torch', 'SimpleITK'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", check], cwd=MODULE_DIR.parent, capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "[]"


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


def test_batches_from_the_console_run_the_engines_batch(logic, read_test_image, tmp_path):
    """registerBatch is the command line's batch: a folder per pair, the report, and a rerun skips what is done."""
    import json

    image = sitk.Cast(sitk.Shrink(read_test_image("brain_pd.nrrd"), [3, 3]), sitk.sitkFloat32)
    sitk.WriteImage(image, str(tmp_path / "reference.nrrd"))
    sitk.WriteImage(sitk.Cast(sitk.Shrink(read_test_image("sample_floating_t1.nrrd"), [3, 3]), sitk.sitkFloat32),
                    str(tmp_path / "floating.nrrd"))
    (tmp_path / "pairs.csv").write_text("reference,floating\nreference.nrrd,floating.nrrd\nreference.nrrd,gone.nrrd\n")
    options = {"device": "cpu", "optimisation_iterations": 5, "optimisation_levels": 1, "qa_figure": False}
    rows = logic.registerBatch(tmp_path / "pairs.csv", tmp_path / "out", **options)
    assert [(row["id"], row["status"]) for row in rows] == [("floating", "registered"), ("gone", "failed")]
    assert sorted(path.name for path in (tmp_path / "out" / "floating").iterdir()) == [
        "displacement.nrrd", "metrics.json", "warped.nrrd"]
    assert json.loads((tmp_path / "out" / "report.json").read_text())["rows"] == rows
    again = logic.registerBatch(tmp_path / "pairs.csv", tmp_path / "out", **options)
    assert [row["status"] for row in again] == ["skipped", "failed"]
    with pytest.raises(RegistrationCancelled, match="0 of 2 pairs are done"):
        logic.registerBatch(tmp_path / "pairs.csv", tmp_path / "cancelled", cancel=lambda: True, **options)


# ----------------------------------------------------------------------------------------------- the panel

class FakeWidget:
    """Any widget of the panel, as the widget code uses it: properties are kept, signals recorded."""

    def __init__(self):
        self.__dict__.update(enabled=True, visible=True, text="", toolTip="", value=0, currentPath="", lines=[],
                             items={}, cells={}, slots={})

    def connect(self, signal, slot):
        self.slots[signal] = slot

    def model(self):
        return types.SimpleNamespace(item=lambda index: self.items.setdefault(index, FakeItem()))

    def appendPlainText(self, text):
        self.lines.append(text)

    def clear(self):
        self.lines.clear()

    def setRowCount(self, count):
        self.cells = {}

    def setItem(self, row, column, text):
        self.cells[row, column] = text

    def resizeColumnsToContents(self):
        pass

    def setMRMLScene(self, scene):
        pass


class FakeItem:
    def setEnabled(self, enabled):
        self.enabled = enabled

    def setToolTip(self, text):
        self.toolTip = text


class FakeTimer:
    def setInterval(self, milliseconds):
        pass

    def connect(self, signal, slot):
        self.slot = slot

    def start(self):
        self.active = True

    def stop(self):
        self.active = False


def fake_parameter_node(module, scene):
    """The parameter node as the panel sees it: every parameter at its default, bound to nothing."""
    hints = typing.get_type_hints(module.SARRegistrationParameterNode, vars(module))
    parameters = types.SimpleNamespace(**{name: getattr(module.SARRegistrationParameterNode, name, None)
                                          for name in hints})
    parameters.parameterNode = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "SARRegistration")
    parameters.connectGui = lambda ui: "tag"
    parameters.disconnectGui = lambda tag: None
    return parameters


@pytest.fixture
def panel(module, scene, monkeypatch):
    """The module's widget on fake Qt widgets, with the real logic and scene."""
    monkeypatch.setattr(module.qt, "QTimer", FakeTimer, raising=False)
    monkeypatch.setattr(module.qt, "QTableWidgetItem", lambda text: text, raising=False)
    ui = collections.defaultdict(FakeWidget)
    monkeypatch.setattr(slicer.util, "loadUI", lambda path: FakeWidget(), raising=False)
    monkeypatch.setattr(slicer.util, "childWidgetVariables", lambda widget: types.SimpleNamespace(
        **{name: ui[name] for name in widget_names_used_by_module()}), raising=False)
    parameters = fake_parameter_node(module, scene)
    monkeypatch.setattr(module.SARRegistrationLogic, "getParameterNode", lambda self: parameters)
    monkeypatch.setattr(module.SARRegistrationLogic, "installPythonPackages",
                        staticmethod(lambda askConfirmation=True: True))
    monkeypatch.setattr(module.SARRegistrationLogic, "showResults", lambda self, *args, **kwargs: None)
    errors = []
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, **kwargs: errors.append(text), raising=False)
    widget = module.SARRegistrationWidget(types.SimpleNamespace(isEntered=True))
    # The parameter node here is no VTK object: observing it is the real wrapper's business.
    monkeypatch.setattr(widget, "addObserver", lambda obj, *args: None if obj is parameters else
                        module.VTKObservationMixin.addObserver(widget, obj, *args))
    monkeypatch.setattr(widget, "removeObserver", lambda *args: None)
    widget.setup()
    widget.errors = errors
    yield widget
    widget.cleanup()  # stops observing the scene, which the scene fixture then clears


def run_panel_timer(widget, timeout=120.0):
    import time

    deadline = time.monotonic() + timeout
    while widget._pollTimer.active:
        assert time.monotonic() < deadline, "the panel's run did not end"
        widget._onPollTimer()
        time.sleep(0.01)


def test_panel_runs_a_registration_without_blocking(panel, module, scene, pair_3d):
    reference, floating = pair_3d
    parameters = panel._parameterNode
    run_panel_timer(panel)  # the GPU probe, started with the panel, ends
    assert panel._cudaAvailable is False and not panel.ui.deviceComboBox.items[1].enabled
    assert not panel.ui.applyButton.enabled and "Select the reference" in panel.ui.applyButton.toolTip
    parameters.referenceVolume, parameters.floatingVolume = reference, floating
    parameters.preset = module.RegistrationPreset.FAST
    panel._onParameterNodeModified()
    assert panel.ui.applyButton.enabled
    assert parameters.maxIterations == module.decisions.PRESETS["fast"]["maxIterations"]
    parameters.optimisationIterations = 3  # a hand edit: the preset becomes custom
    panel._onParameterNodeModified()
    assert parameters.preset is module.RegistrationPreset.CUSTOM
    parameters.computeJacobian = True

    panel.onApplyButton()
    assert panel._run is not None and not panel.ui.applyButton.enabled and panel.ui.cancelButton.enabled
    assert "A registration is running" in panel.ui.applyButton.toolTip
    running = panel._run
    panel.onApplyButton()  # a second press while it runs starts nothing
    assert panel._run is running
    run_panel_timer(panel)
    assert not panel.errors and panel._run is None and panel.ui.applyButton.enabled
    assert parameters.warpedVolume is not None and parameters.jacobianVolume.GetScene() is scene
    assert panel.ui.statusLabel.text.startswith("Done in")
    assert ("Registration", "", "instance optimisation alone (no network)") in [
        tuple(panel.ui.metricsTableWidget.cells[row, column] for column in range(3))
        for row in range(len(panel.ui.metricsTableWidget.cells) // 3)]
    assert any("instance optimisation" in line for line in panel.ui.logTextEdit.lines)


def test_panel_cancel_and_errors(panel, module, scene, pair_3d, monkeypatch):
    reference, floating = pair_3d
    parameters = panel._parameterNode
    parameters.referenceVolume, parameters.floatingVolume = reference, floating
    panel.onApplyButton()
    panel.onCancelButton()
    assert not panel.ui.cancelButton.enabled and "Cancelling" in panel.ui.statusLabel.text
    run_panel_timer(panel)
    assert panel.ui.statusLabel.text == "Cancelled. The scene was left as it was." and not panel.errors
    assert parameters.warpedVolume is None
    # A failure in the worker (here the engine's import) reaches the dialog.
    with monkeypatch.context() as broken:
        broken.setitem(sys.modules, "SARRegistrationLib", None)
        panel.onApplyButton()
        run_panel_timer(panel)
    assert panel.errors and "Registration failed" in panel.errors[0] and "SARRegistrationLib" in panel.errors[0]
    # Inputs refused before anything starts reach it too.
    parameters.floatingVolume = reference
    panel.onApplyButton()
    assert len(panel.errors) == 2 and "must be different volumes" in panel.errors[1] and panel._run is None


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


def test_scene_of_an_older_release_opens_with_its_affine_choice(module, scene):
    """`affine` was a bool before the automatic pre-alignment; parameterNodeWrapper reads an enum by
    its member's name, so the old "True"/"False" are renamed to what they meant, and nothing else."""
    node = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "SARRegistration")
    for saved, meant in (("True", "ALWAYS"), ("False", "NEVER"), ("AUTO", "AUTO"), ("NEVER", "NEVER")):
        node.SetParameter("affine", saved)
        node.SetParameter("finetune", "False")  # a bool parameter keeps its value
        module.migrateParameterNode(node)
        assert node.GetParameter("affine") == meant and module.AffinePrealignment[meant].name == meant
        assert node.GetParameter("finetune") == "False"
    node.UnsetParameter("affine")
    module.migrateParameterNode(node)
    assert not node.GetParameter("affine")
