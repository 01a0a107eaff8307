"""SAR Registration: deep-learning deformable registration of two volumes in 3D Slicer.

The registration is done by the pure-Python engine ``SARRegistrationLib`` (PyTorch). This module
moves images between MRML nodes and SimpleITK images, calls the engine, and turns what it returns
into MRML nodes. It adds no registration maths of its own.

Conventions, where they change:

- MRML volume: voxels as a numpy array in ``k, j, i`` order; geometry as an IJK-to-RAS matrix
  (with any linear parent transform folded in, so that registration happens in world space).
- SimpleITK image (the engine's input and output): the same array in ``z, y, x`` order, geometry in
  LPS (x and y of RAS negated). A single-slice pair is given to the engine as 2D images whose
  physical frame is the reference slice's plane (see :class:`_VolumeGrid`).
- The engine's displacement: a vector image on the reference grid, in mm, LPS components, mapping
  a reference point ``p`` to ``p + d(p)`` in the floating image (ITK's resampling convention).
- Slicer's grid transform: the same field with RAS components on the same grid, set as the
  transform *from parent*, which is the resampling direction in Slicer as well.
"""

from __future__ import annotations

import enum
import importlib.util
import logging
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Callable, Optional, Union

import numpy as np
import vtk
import vtk.util.numpy_support

import qt
import slicer
from slicer import (vtkMRMLGridTransformNode, vtkMRMLLabelMapVolumeNode, vtkMRMLScalarVolumeNode,
                    vtkMRMLSegmentationNode, vtkMRMLTransformNode)
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Decimals, SingleStep, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

ENGINE_PACKAGE = "SARRegistrationLib"
MODULE_DIR = Path(__file__).resolve().parent
# Installed, the engine, the weights and the sample pair sit beside this file (see CMakeLists.txt);
# in the source tree they sit in the repository root, one folder up.
ROOT_CANDIDATES = (MODULE_DIR, MODULE_DIR.parent)


def _makeEngineImportable() -> None:
    """Put the repository root on ``sys.path`` when the module runs from the source tree.

    ``find_spec`` only locates the package: importing it would import PyTorch, which may not be
    installed yet and is slow to load at application start-up.
    """
    if importlib.util.find_spec(ENGINE_PACKAGE) is not None:
        return
    for root in ROOT_CANDIDATES:
        if (root / ENGINE_PACKAGE / "__init__.py").is_file():
            sys.path.insert(0, str(root))
            return


_makeEngineImportable()

# Python packages the engine needs beyond what Slicer ships (numpy, SimpleITK): import name -> pip
# requirement. PyTorch is installed separately, through the PyTorch Utils extension when present.
PIP_REQUIREMENTS = {"scipy": "scipy>=1.10", "skimage": "scikit-image>=0.22", "tqdm": "tqdm>=4.60"}
TORCH_VERSION_REQUIREMENT = ">=2.0"

# LPS <-> RAS: x and y change sign (the matrix is its own inverse).
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])

REFERENCE_MASK_COLOR = (0.2, 0.8, 0.2)
FLOATING_MASK_COLOR = (0.95, 0.6, 0.1)


#
# SARRegistration
#


class SARRegistration(ScriptedLoadableModule):
    """Module description shown in Slicer's module panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SAR Registration")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Registration")]
        self.parent.dependencies = []
        self.parent.contributors = ["SARRegistration developers"]
        self.parent.helpText = _("""
Deformable registration of a floating volume onto a reference volume with SAR, a
segmentation-augmented generative adversarial network whose last layer is finetuned on each pair
in seconds. It works on 3D volumes (in full, or slice by slice) and on single slices, on the CPU or
a CUDA GPU.
<p>Pick the reference and floating volumes, optionally the structure to check in each (a
segmentation or a label map, e.g. ventricles or lungs), and click <b>Register</b>. The outputs are
the warped volume, a grid transform that reproduces it when applied to the floating volume, SAR's
own masks of both images, the warped structure, and Dice, HD95, MAD and folding measures.</p>
<p>From the Python console: <code>SARRegistration.SARRegistrationLogic().register(referenceNode,
floatingNode)</code> returns the output nodes and the measures.</p>
""")
        self.parent.acknowledgementText = _("""
SAR Registration implements the method of <i>Combining Transfer Learning and Segmentation
Information with GANs for Training Data Independent Image Registration</i> (D. Mahapatra and
Z. Ge, arXiv:1903.10139, 2019). Please cite that paper when you use this module.
""")


#
# Parameters
#


class RegistrationMode(enum.Enum):
    VOLUME = "volume"
    SLICEWISE = "slicewise"

    def label(self) -> str:
        return _("Full volume (3D)") if self is RegistrationMode.VOLUME else _("Slice by slice (2D)")


class ComputeDevice(enum.Enum):
    AUTO = "auto"
    CUDA = "cuda"
    CPU = "cpu"

    def label(self) -> str:
        return {ComputeDevice.AUTO: _("Automatic"), ComputeDevice.CUDA: _("GPU (CUDA)"),
                ComputeDevice.CPU: _("CPU")}[self]


StructureNode = Optional[Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode]]


@parameterNodeWrapper
class SARRegistrationParameterNode:
    """Everything the user chose; saved with the scene.

    ``weightsPath`` left empty means the shipped weights (it is a string, not a Path: an empty
    Path would read "."). ``smoothness`` starts at the engine's finetuning default
    (``LossWeights.smoothness``).
    """

    referenceVolume: vtkMRMLScalarVolumeNode
    floatingVolume: vtkMRMLScalarVolumeNode
    referenceStructure: StructureNode
    floatingStructure: StructureNode
    # Slice by slice until 3D weights are shipped: the full-volume mode needs a 3D weights file.
    mode: RegistrationMode = RegistrationMode.SLICEWISE
    device: ComputeDevice = ComputeDevice.AUTO
    affine: bool = False
    finetune: bool = True
    maxIterations: Annotated[int, WithinRange(1, 10000)] = 100
    tolerance: Annotated[float, WithinRange(0.0, 1.0), Decimals(6), SingleStep(1e-5)] = 1e-4
    smoothness: Annotated[float, WithinRange(0.0, 5.0), Decimals(2), SingleStep(0.05)] = 0.5
    weightsPath: str = ""
    ignoreMask: StructureNode
    warpedVolume: vtkMRMLScalarVolumeNode
    transform: vtkMRMLGridTransformNode
    referenceMaskSegmentation: vtkMRMLSegmentationNode
    floatingMaskSegmentation: vtkMRMLSegmentationNode
    warpedSegmentation: vtkMRMLSegmentationNode


#
# SARRegistrationWidget
#


class SARRegistrationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: binds the .ui to the parameter node and hands the work to the logic."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._cancelRequested = False
        self._cudaAvailable = None  # unknown until PyTorch has been looked at

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SARRegistration.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = SARRegistrationLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        # Bound by hand: the parameter node keeps an empty string for "shipped weights".
        self.ui.weightsPathLineEdit.connect("currentPathChanged(QString)", self.onWeightsPathChanged)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.loadSampleButton.connect("clicked(bool)", self.onLoadSampleButton)
        self._setRunning(False)

        self.initializeParameterNode()
        self._showDependencyStatus()
        # Looking for a GPU imports PyTorch (seconds): do it once the panel is on screen.
        qt.QTimer.singleShot(0, self._updateDeviceChoices)

    def cleanup(self) -> None:
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode: SARRegistrationParameterNode | None) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Each widget bound here has the dynamic property SlicerParameterName in the .ui file.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._greyOutUnavailableDevices()
            self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        if self._parameterNode and self.ui.weightsPathLineEdit.currentPath != self._parameterNode.weightsPath:
            self.ui.weightsPathLineEdit.currentPath = self._parameterNode.weightsPath
        self._checkCanApply()

    def onWeightsPathChanged(self, path: str) -> None:
        if self._parameterNode and self._parameterNode.weightsPath != path:
            self._parameterNode.weightsPath = path

    def _checkCanApply(self, caller=None, event=None) -> None:
        parameters = self._parameterNode
        if not parameters or not parameters.referenceVolume or not parameters.floatingVolume:
            self.ui.applyButton.toolTip = _("Select the reference and the floating volume.")
            self.ui.applyButton.enabled = False
        elif parameters.referenceVolume == parameters.floatingVolume:
            self.ui.applyButton.toolTip = _("The reference and the floating volume must be different volumes.")
            self.ui.applyButton.enabled = False
        else:
            self.ui.applyButton.toolTip = _("Register the floating volume onto the reference volume.")
            self.ui.applyButton.enabled = not self.ui.cancelButton.enabled

    # ------------------------------------------------------------------ dependencies and devices

    def _showDependencyStatus(self) -> None:
        missing = self.logic.missingPythonPackages()
        self.ui.dependencyLabel.visible = bool(missing)
        if missing:
            self.ui.dependencyLabel.text = _(
                "Not installed yet: {packages}. They will be installed, after you agree, "
                "when you first click Register.").format(packages=", ".join(missing))

    def _updateDeviceChoices(self) -> None:
        if self._cudaAvailable is None and self.logic.isTorchInstalled():
            self._cudaAvailable = self.logic.isCudaAvailable()
        self._greyOutUnavailableDevices()

    def _greyOutUnavailableDevices(self) -> None:
        """The GPU choice is enabled only when PyTorch sees a CUDA device."""
        cudaIndex = list(ComputeDevice).index(ComputeDevice.CUDA)
        item = self.ui.deviceComboBox.model().item(cudaIndex)
        if item is None:
            return
        item.setEnabled(bool(self._cudaAvailable))
        if self._cudaAvailable is None:
            item.setToolTip(_("Not known yet: PyTorch has not been installed or loaded."))
        elif not self._cudaAvailable:
            item.setToolTip(_("PyTorch sees no CUDA GPU on this computer."))
        if self._cudaAvailable is False and self._parameterNode and self._parameterNode.device == ComputeDevice.CUDA:
            self._parameterNode.device = ComputeDevice.AUTO

    # ------------------------------------------------------------------ running

    def onLoadSampleButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to load the sample pair."), waitCursor=True):
            sample = self.logic.loadSamplePair()
            self._parameterNode.referenceVolume = sample["reference"]
            self._parameterNode.floatingVolume = sample["floating"]
            self._parameterNode.referenceStructure = sample["referenceStructure"]
            self._parameterNode.floatingStructure = sample["floatingStructure"]
            slicer.util.setSliceViewerLayers(background=sample["reference"], foreground=sample["floating"],
                                             foregroundOpacity=0.5, fit=True)

    def onCancelButton(self) -> None:
        self._cancelRequested = True
        self.ui.statusLabel.text = _("Cancelling…")

    def onApplyButton(self) -> None:
        try:
            if not self.logic.installPythonPackages(askConfirmation=True):
                self.ui.statusLabel.text = _("The required Python packages were not installed; nothing was done.")
                return
        except Exception as error:
            slicer.util.errorDisplay(_("Failed to install the required Python packages: {error}").format(error=error),
                                     detailedText=traceback.format_exc())
            return
        self._showDependencyStatus()
        self._updateDeviceChoices()
        from SARRegistrationLib import RegistrationCancelled  # PyTorch is installed by now

        parameters = self._parameterNode
        self._cancelRequested = False
        self._setRunning(True)
        try:
            result = self.logic.register(
                parameters.referenceVolume, parameters.floatingVolume,
                parameters.referenceStructure, parameters.floatingStructure,
                ignoreMask=parameters.ignoreMask, mode=parameters.mode.value, device=parameters.device.value,
                affine=parameters.affine, finetune=parameters.finetune, maxIterations=parameters.maxIterations,
                tolerance=parameters.tolerance, smoothness=parameters.smoothness,
                weightsPath=parameters.weightsPath or None,
                warpedVolume=parameters.warpedVolume, transform=parameters.transform,
                referenceMaskSegmentation=parameters.referenceMaskSegmentation,
                floatingMaskSegmentation=parameters.floatingMaskSegmentation,
                warpedSegmentation=parameters.warpedSegmentation,
                progress=self._onProgress, cancel=lambda: self._cancelRequested)
        except RegistrationCancelled:
            self.ui.statusLabel.text = _("Cancelled. The scene was left as it was.")
        except Exception as error:
            logging.exception("SAR registration failed")
            self.ui.statusLabel.text = _("Registration failed. The scene was left as it was.")
            slicer.util.errorDisplay(_("Registration failed: {error}").format(error=error),
                                     detailedText=traceback.format_exc())
        else:
            with slicer.util.NodeModify(parameters.parameterNode):
                parameters.warpedVolume = result.warpedVolume
                parameters.transform = result.transform
                parameters.referenceMaskSegmentation = result.referenceMaskSegmentation
                parameters.floatingMaskSegmentation = result.floatingMaskSegmentation
                parameters.warpedSegmentation = result.warpedSegmentation
            self._showMetrics(result.metrics)
            self.logic.showResults(result, parameters.referenceVolume, parameters.referenceStructure)
            self.ui.statusLabel.text = _("Done in {seconds:.1f} s.").format(seconds=result.metrics.get("seconds", 0.0))
        finally:
            self._setRunning(False)

    def _onProgress(self, fraction: float, message: str) -> None:
        self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.statusLabel.text = message
        slicer.app.processEvents()  # draws the progress and lets the Cancel button be clicked

    def _setRunning(self, running: bool) -> None:
        self.ui.cancelButton.enabled = running
        self.ui.progressBar.visible = running
        self.ui.progressBar.value = 0
        for panel in (self.ui.inputsCollapsibleButton, self.ui.optionsCollapsibleButton,
                      self.ui.advancedCollapsibleButton, self.ui.outputsCollapsibleButton):
            panel.enabled = not running
        self._checkCanApply()

    def _showMetrics(self, metrics: dict) -> None:
        rows = SARRegistrationLogic.metricsRows(metrics)
        table = self.ui.metricsTableWidget
        table.setRowCount(len(rows))
        for row, cells in enumerate(rows):
            for column, text in enumerate(cells):
                table.setItem(row, column, qt.QTableWidgetItem(text))
        table.resizeColumnsToContents()


#
# SARRegistrationLogic
#


@dataclass
class SARRegistrationResult:
    """The output nodes of one registration, and the engine's measures (``result.metrics``)."""

    warpedVolume: vtkMRMLScalarVolumeNode
    transform: vtkMRMLTransformNode
    referenceMaskSegmentation: vtkMRMLSegmentationNode
    floatingMaskSegmentation: vtkMRMLSegmentationNode
    warpedSegmentation: vtkMRMLSegmentationNode | None
    metrics: dict = field(default_factory=dict)


@dataclass
class _Structure:
    """One segment (or label) of a structure input, as a 0/1 array on its volume's voxel grid."""

    name: str
    color: tuple
    mask: np.ndarray  # uint8, k, j, i


@dataclass
class _Plane:
    """The physical frame of a single-slice pair: the reference slice's plane, in LPS."""

    origin: np.ndarray  # (3,) mm
    axes: np.ndarray  # (3, 2) unit vectors: the frame's x and y
    thickness: float  # mm, the reference slice's spacing across the plane


class _VolumeGrid:
    """The voxel grid of a volume node in world space, and the SimpleITK form of arrays on it.

    A 3D grid becomes a 3D SimpleITK image with the same geometry (in LPS). When both volumes are
    single slices, ``plane`` is set and arrays become 2D images in the plane's frame: the engine
    then registers in 2D, and its 2D vectors map back to 3D through ``plane.axes``.
    """

    def __init__(self, ijkToRAS: np.ndarray, shape):
        self.ijkToRAS = np.asarray(ijkToRAS, dtype=float)  # 4 x 4, voxel index (i, j, k) -> world RAS
        self.shape = tuple(int(n) for n in shape)  # k, j, i (numpy order)
        self.plane: _Plane | None = None

    @classmethod
    def ofVolume(cls, volumeNode) -> "_VolumeGrid":
        return cls(SARRegistrationLogic.worldIJKToRAS(volumeNode), volumeNode.GetImageData().GetDimensions()[::-1])

    @property
    def flatAxis(self) -> int | None:
        """The ``i, j, k`` axis that is one voxel thick (k first), or None for a 3D grid."""
        flat = [axis for axis in (2, 1, 0) if self.shape[2 - axis] == 1]
        return flat[0] if flat else None

    @property
    def inPlaneAxes(self) -> list:
        return [axis for axis in range(3) if axis != self.flatAxis]

    def lps(self):
        """Origin (mm) and index-to-physical matrix (direction times spacing, columns i, j, k) in LPS."""
        return LPS_FROM_RAS @ self.ijkToRAS[:3, 3], LPS_FROM_RAS @ self.ijkToRAS[:3, :3]

    def planeOfSlice(self) -> _Plane:
        origin, matrix = self.lps()
        inPlane = matrix[:, self.inPlaneAxes]
        return _Plane(origin, inPlane / np.linalg.norm(inPlane, axis=0),
                      float(np.linalg.norm(matrix[:, self.flatAxis])))

    def sitkImage(self, array: np.ndarray):
        """Wrap ``array`` (``k, j, i`` on this grid) as a SimpleITK image with this grid's geometry."""
        import SimpleITK as sitk

        if array.shape[:3] != self.shape:
            raise ValueError(f"Array of shape {array.shape} is not on this grid of shape {self.shape}.")
        origin, matrix = self.lps()
        if self.plane is not None:
            toPlane = np.linalg.pinv(self.plane.axes)  # (2, 3): physical point -> plane coordinates
            origin = toPlane @ (origin - self.plane.origin)
            matrix = toPlane @ matrix[:, self.inPlaneAxes]
            array = np.squeeze(array, axis=2 - self.flatAxis)
        spacing = np.linalg.norm(matrix, axis=0)
        image = sitk.GetImageFromArray(np.ascontiguousarray(array))
        image.SetOrigin(tuple(float(v) for v in origin))
        image.SetSpacing(tuple(float(v) for v in spacing))
        image.SetDirection(tuple(float(v) for v in (matrix / spacing).ravel()))
        return image

    def arrayFromImage(self, image) -> np.ndarray:
        """The voxels of a SimpleITK image on this grid, as a ``k, j, i[, component]`` array."""
        import SimpleITK as sitk

        array = sitk.GetArrayFromImage(image)
        if self.plane is not None:
            array = np.expand_dims(array, axis=2 - self.flatAxis)
        if array.shape[:3] != self.shape:
            raise ValueError(f"The image of size {image.GetSize()} is not on this grid of shape {self.shape}.")
        return array

    def displacementToRAS(self, displacement) -> np.ndarray:
        """The engine's displacement image (mm, LPS or plane components) as ``k, j, i, 3`` RAS vectors."""
        vectors = self.arrayFromImage(displacement).astype(np.float64)
        if self.plane is not None:
            vectors = vectors @ self.plane.axes.T  # plane x, y -> LPS x, y, z
        return vectors @ LPS_FROM_RAS  # the matrix is diagonal: this negates x and y

    def orientedImage(self, mask: np.ndarray):
        """A 0/1 ``k, j, i`` array as a vtkOrientedImageData on this grid (a segment's labelmap)."""
        image = slicer.vtkOrientedImageData()
        image.SetDimensions(self.shape[::-1])
        image.GetPointData().SetScalars(vtk.util.numpy_support.numpy_to_vtk(
            np.ascontiguousarray(mask, dtype=np.uint8).ravel(), deep=True, array_type=vtk.VTK_UNSIGNED_CHAR))
        image.SetImageToWorldMatrix(slicer.util.vtkMatrixFromArray(self.ijkToRAS))
        return image

    def geometryImage(self):
        """An empty vtkOrientedImageData with this grid's extent and geometry, to resample onto."""
        image = slicer.vtkOrientedImageData()
        image.SetExtent(0, self.shape[2] - 1, 0, self.shape[1] - 1, 0, self.shape[0] - 1)
        image.SetImageToWorldMatrix(slicer.util.vtkMatrixFromArray(self.ijkToRAS))
        return image


class SARRegistrationLogic(ScriptedLoadableModuleLogic):
    """Registration of MRML volumes with the SAR engine; usable from the Python console.

    No widget is touched here. Example::

        logic = SARRegistrationLogic()
        result = logic.register(getNode("reference"), getNode("floating"), mode="slicewise")
        print(result.metrics["folding_fraction"], result.warpedVolume.GetName())
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._models = {}  # (weights file, modification time, ndims) -> loaded SARModel

    def getParameterNode(self):
        return SARRegistrationParameterNode(super().getParameterNode())

    # ------------------------------------------------------------------ Python dependencies

    @staticmethod
    def isTorchInstalled() -> bool:
        return importlib.util.find_spec("torch") is not None

    @staticmethod
    def missingPythonPackages() -> list:
        """Pip names of the engine's dependencies that are not installed (nothing is imported)."""
        missing = [] if SARRegistrationLogic.isTorchInstalled() else ["torch"]
        return missing + [requirement.split(">")[0] for name, requirement in PIP_REQUIREMENTS.items()
                          if importlib.util.find_spec(name) is None]

    @staticmethod
    def isCudaAvailable() -> bool:
        if not SARRegistrationLogic.isTorchInstalled():
            return False
        import torch

        return bool(torch.cuda.is_available())

    def installPythonPackages(self, askConfirmation: bool = True) -> bool:
        """Install what the engine lacks, after one confirmation; False if the user declined.

        PyTorch comes from the PyTorch Utils extension when it is installed (it picks the build
        that fits the computer's GPU driver), otherwise from pip.
        """
        missing = self.missingPythonPackages()
        if not missing:
            return True
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                _("SAR Registration needs these Python packages: {packages}.\n\nDownload and install them now? "
                  "PyTorch is large: this can take several minutes.").format(packages=", ".join(missing))):
            return False
        if "torch" in missing:
            try:
                import PyTorchUtils
            except ModuleNotFoundError:
                slicer.util.pip_install(f"torch{TORCH_VERSION_REQUIREMENT}")
            else:
                torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                    askConfirmation=False, torchVersionRequirement=TORCH_VERSION_REQUIREMENT)
                if torch is None:
                    raise RuntimeError(_("PyTorch could not be installed. Install it with the PyTorch Utils module."))
        others = [PIP_REQUIREMENTS[name] for name in PIP_REQUIREMENTS if importlib.util.find_spec(name) is None]
        if others:
            slicer.util.pip_install(others)
        return True

    # ------------------------------------------------------------------ MRML <-> SimpleITK

    @staticmethod
    def worldIJKToRAS(volumeNode) -> np.ndarray:
        """The volume's voxel-to-world matrix (4 x 4, RAS), including a linear parent transform."""
        matrix = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(matrix)
        ijkToRAS = slicer.util.arrayFromVTKMatrix(matrix)
        parent = volumeNode.GetParentTransformNode()
        if parent is not None:
            if not parent.IsTransformToWorldLinear():
                raise ValueError(_("'{volume}' is under the non-linear transform '{transform}'. Harden that "
                                   "transform first (Data module, right-click the volume), then register.").format(
                                     volume=volumeNode.GetName(), transform=parent.GetName()))
            parent.GetMatrixTransformToWorld(matrix)
            ijkToRAS = slicer.util.arrayFromVTKMatrix(matrix) @ ijkToRAS
        return ijkToRAS

    @staticmethod
    def sitkImageFromVolume(volumeNode):
        """A 3D SimpleITK image with the volume's voxels and world geometry (LPS)."""
        SARRegistrationLogic._checkInputVolume(volumeNode, _("volume"))
        return _VolumeGrid.ofVolume(volumeNode).sitkImage(slicer.util.arrayFromVolume(volumeNode))

    @staticmethod
    def updateVolumeFromSitkImage(volumeNode, image) -> None:
        """Give ``volumeNode`` the voxels and geometry of a 3D SimpleITK image (the inverse of
        :meth:`sitkImageFromVolume`); the node leaves any parent transform."""
        import SimpleITK as sitk

        if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
            raise ValueError(_("Only 3D scalar images can be put in a volume node."))
        matrix = np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
        ijkToRAS = np.eye(4)
        ijkToRAS[:3, :3] = LPS_FROM_RAS @ matrix
        ijkToRAS[:3, 3] = LPS_FROM_RAS @ np.array(image.GetOrigin())
        SARRegistrationLogic._setVolumeVoxels(volumeNode, sitk.GetArrayFromImage(image), ijkToRAS)

    # ------------------------------------------------------------------ registration

    def register(self, referenceVolume, floatingVolume, referenceStructure=None, floatingStructure=None, *,
                 ignoreMask=None, mode: str = "volume", device: str = "auto", affine: bool = False,
                 finetune: bool = True, maxIterations: int = 100, tolerance: float = 1e-4,
                 smoothness: float | None = None, weightsPath=None, model=None,
                 warpedVolume=None, transform=None, referenceMaskSegmentation=None, floatingMaskSegmentation=None,
                 warpedSegmentation=None, progress: Callable[[float, str], None] | None = None,
                 cancel: Callable[[], bool] | None = None) -> SARRegistrationResult:
        """Register ``floatingVolume`` onto ``referenceVolume`` and return the output nodes.

        Args:
            referenceVolume, floatingVolume: scalar volume nodes, both 3D or both single slices
                (a single-slice pair is registered in 2D, whatever ``mode`` says).
            referenceStructure, floatingStructure: optional segmentation or label map nodes of the
                structure to check (ventricles, lungs); they give Dice, HD95 and MAD, and the
                floating one is warped. They do not steer the registration.
            ignoreMask: optional segmentation or label map of regions the registration should
                ignore (bright implants, electrodes): the images are not compared there during
                finetuning, and the field follows its smoothness.
            mode: ``"volume"`` (3D model) or ``"slicewise"`` (2D model, slice by slice along k).
            device: ``"auto"``, ``"cuda"`` or ``"cpu"``.
            affine, finetune, maxIterations, tolerance, smoothness: as in the engine's ``register``
                (``smoothness=None`` keeps the model's default).
            weightsPath: a SAR weights file; None takes the shipped weights. ``model``, a loaded
                ``SARRegistrationLib.SARModel``, overrides it.
            warpedVolume, transform, referenceMaskSegmentation, floatingMaskSegmentation,
                warpedSegmentation: existing nodes to write the outputs into; new nodes are
                created for those left None.
            progress: ``progress(fraction, message)``, called as the work advances.
            cancel: ``cancel()`` returning true stops the run with ``RegistrationCancelled``.

        Nothing in the scene changes unless the whole run succeeds: new nodes are created, and
        given ones updated, only after the engine has returned and every output has been built.
        """
        import SARRegistrationLib as sar
        from SARRegistrationLib import imageio

        report = progress or (lambda fraction, message: None)
        self._checkInputVolume(referenceVolume, _("reference volume"))
        self._checkInputVolume(floatingVolume, _("floating volume"))
        if referenceVolume == floatingVolume:
            raise ValueError(_("The reference and the floating volume must be different volumes."))
        if referenceVolume.GetScene() is None or referenceVolume.GetScene() != floatingVolume.GetScene():
            raise ValueError(_("The reference and the floating volume must be in the same scene."))
        if mode not in (RegistrationMode.VOLUME.value, RegistrationMode.SLICEWISE.value):
            raise ValueError(_("Unknown mode {mode!r}: choose 'volume' or 'slicewise'.").format(mode=mode))
        self._checkOutputNodes(referenceVolume, floatingVolume, warpedVolume, transform)
        scene = referenceVolume.GetScene()

        referenceGrid, floatingGrid = self._registrationGrids(referenceVolume, floatingVolume)
        reference = referenceGrid.sitkImage(slicer.util.arrayFromVolume(referenceVolume))
        floating = floatingGrid.sitkImage(slicer.util.arrayFromVolume(floatingVolume))
        referenceStructures = self._structures(referenceStructure, referenceGrid, _("reference structure"))
        floatingStructures = self._structures(floatingStructure, floatingGrid, _("floating structure"))
        ignore = None if ignoreMask is None else self._ignoreMaskImage(ignoreMask, referenceGrid)
        if model is None:
            model = self._model(weightsPath, ndims=2 if referenceGrid.plane is not None or mode == "slicewise" else 3)

        result = sar.register(
            reference, floating, model, reference_mask=self._union(referenceStructures, referenceGrid),
            floating_mask=self._union(floatingStructures, floatingGrid), mode=mode, device=device, affine=affine,
            finetune=finetune, max_iterations=maxIterations, tolerance=tolerance, smoothness=smoothness,
            ignore_mask=ignore, progress=lambda fraction, message: report(0.95 * fraction, message), cancel=cancel)

        # Build every output before touching the scene, so that a failure here changes nothing.
        report(0.96, _("creating the output nodes"))
        engineTransform = result.transform()
        warpedImageData = self._imageData(referenceGrid.arrayFromImage(result.warped))
        gridTransform = self._gridTransform(referenceGrid.displacementToRAS(result.displacement), referenceGrid)
        referenceMask = self._segments([_Structure(
            _("SAR reference mask"), REFERENCE_MASK_COLOR, referenceGrid.arrayFromImage(result.reference_mask))],
            referenceGrid)
        floatingMask = self._segments([_Structure(
            _("SAR floating mask"), FLOATING_MASK_COLOR, floatingGrid.arrayFromImage(result.floating_mask))],
            floatingGrid)
        # Each segment is warped by the engine's own resampling with the engine's transform.
        warpedStructures = self._segments([
            _Structure(structure.name, structure.color, referenceGrid.arrayFromImage(imageio.resample_to(
                floatingGrid.sitkImage(structure.mask), reference, label=True, transform=engineTransform)))
            for structure in floatingStructures], referenceGrid)

        # Only now is the scene changed.
        floatingName = floatingVolume.GetName()
        if warpedVolume is None:
            warpedVolume = self._newNode(scene, "vtkMRMLScalarVolumeNode", f"{floatingName} SAR warped")
        self._setVolumeVoxels(warpedVolume, warpedImageData, referenceGrid.ijkToRAS)
        self._showVolume(warpedVolume, floatingVolume)
        if transform is None:
            transform = self._newNode(scene, "vtkMRMLGridTransformNode", f"{floatingName} SAR transform")
        transform.SetAndObserveTransformNodeID(None)
        transform.SetAndObserveTransformFromParent(gridTransform)
        referenceMaskSegmentation = self._fillSegmentation(
            referenceMaskSegmentation, scene, f"{referenceVolume.GetName()} SAR mask", referenceMask, referenceVolume)
        floatingMaskSegmentation = self._fillSegmentation(
            floatingMaskSegmentation, scene, f"{floatingName} SAR mask", floatingMask, floatingVolume)
        if warpedStructures:
            warpedSegmentation = self._fillSegmentation(
                warpedSegmentation, scene, f"{floatingStructure.GetName()} SAR warped", warpedStructures,
                referenceVolume)
        else:
            warpedSegmentation = None
        report(1.0, _("done"))
        logging.info(f"SAR registration of '{floatingName}' onto '{referenceVolume.GetName()}': "
                     f"{result.metrics['iterations']} finetuning iterations, {result.metrics['seconds']:.1f} s")
        return SARRegistrationResult(warpedVolume, transform, referenceMaskSegmentation, floatingMaskSegmentation,
                                     warpedSegmentation, dict(result.metrics))

    def showResults(self, result: SARRegistrationResult, referenceVolume, referenceStructure=None,
                    fit: bool = True) -> None:
        """Reference in the background, warped volume in the foreground at half opacity, structures
        as outlines. SAR's floating mask lives on the floating grid, so it starts hidden."""
        slicer.util.setSliceViewerLayers(background=referenceVolume, foreground=result.warpedVolume,
                                          foregroundOpacity=0.5, fit=fit)
        shown = [result.referenceMaskSegmentation, result.warpedSegmentation]
        if isinstance(referenceStructure, vtkMRMLSegmentationNode):
            shown.append(referenceStructure)
        for segmentation in [node for node in shown if node is not None]:
            if segmentation.GetDisplayNode() is None:
                segmentation.CreateDefaultDisplayNodes()
            display = segmentation.GetDisplayNode()
            display.SetVisibility(True)
            display.SetVisibility2DFill(False)
            display.SetVisibility2DOutline(True)
        if result.floatingMaskSegmentation.GetDisplayNode() is not None:
            result.floatingMaskSegmentation.GetDisplayNode().SetVisibility(False)

    @staticmethod
    def metricsRows(metrics: dict) -> list:
        """``(measure, before, after)`` text rows of the engine's metrics, for a table."""

        def number(value, digits=3, unit=""):
            if value is None or not np.isfinite(value):
                return _("n/a")
            return f"{value:.{digits}f}{unit}"

        rows = []
        before, after = metrics.get("before", {}), metrics.get("after", {})
        for key, label, unit in (("dice", _("Dice"), ""), ("hd95_mm", _("HD95"), " mm"), ("mad_mm", _("MAD"), " mm")):
            if key in after:
                rows.append((label, number(before.get(key), unit=unit), number(after[key], unit=unit)))
        if "folding_fraction" in metrics:
            folding = number(100 * metrics["folding_fraction"], 2, " %")
            rows.append((_("Folding (voxels with Jacobian ≤ 0)"), "", folding))
        if "max_displacement_mm" in metrics:
            rows.append((_("Largest displacement"), "", number(metrics["max_displacement_mm"], 2, " mm")))
        if "iterations" in metrics:
            converged = {True: _(" (converged)"), False: _(" (iteration limit)")}.get(metrics.get("converged"), "")
            rows.append((_("Finetuning iterations"), "", f"{metrics['iterations']}{converged}"))
        if "seconds" in metrics:
            rows.append((_("Time"), "", number(metrics["seconds"], 1, " s")))
        if "device" in metrics:
            rows.append((_("Device"), "", str(metrics["device"])))
        return rows

    def loadSamplePair(self) -> dict:
        """Load the bundled sample pair: BrainWeb proton density (reference), the T1 slice moved by a
        known B-spline (floating), and their ventricle label maps."""
        dataDir = next((root / "Testing" / "Data" for root in ROOT_CANDIDATES
                        if (root / "Testing" / "Data" / "brain_pd.nrrd").is_file()), None)
        if dataDir is None:
            raise FileNotFoundError(_("The bundled sample pair was not found next to the module."))
        return {
            "reference": slicer.util.loadVolume(str(dataDir / "brain_pd.nrrd"), {"name": "SAR sample reference PD"}),
            "floating": slicer.util.loadVolume(str(dataDir / "sample_floating_t1.nrrd"),
                                               {"name": "SAR sample floating T1"}),
            "referenceStructure": slicer.util.loadLabelVolume(str(dataDir / "brain_ventricles.nrrd"),
                                                              {"name": "SAR sample reference ventricles"}),
            "floatingStructure": slicer.util.loadLabelVolume(str(dataDir / "sample_floating_ventricles.nrrd"),
                                                             {"name": "SAR sample floating ventricles"}),
        }

    # ------------------------------------------------------------------ helpers of register

    @staticmethod
    def _checkInputVolume(volumeNode, role: str) -> None:
        if volumeNode is None:
            raise ValueError(_("Select a {role}.").format(role=role))
        name = volumeNode.GetName() if hasattr(volumeNode, "GetName") else str(volumeNode)
        if not isinstance(volumeNode, vtkMRMLScalarVolumeNode):
            raise ValueError(_("The {role} '{name}' is a {kind}, not a scalar volume.").format(
                role=role, name=name, kind=volumeNode.GetClassName()))
        imageData = volumeNode.GetImageData()
        if imageData is None or 0 in imageData.GetDimensions():
            raise ValueError(_("The {role} '{name}' has no voxels.").format(role=role, name=name))
        components = imageData.GetNumberOfScalarComponents()
        if volumeNode.IsA("vtkMRMLTensorVolumeNode") or components != 1:
            raise ValueError(_(
                "The {role} '{name}' has {components} values per voxel (a vector, colour, tensor or 4D volume); "
                "SAR registers scalar volumes. Extract one component or time point first, for example with the "
                "Vector to Scalar Volume module.").format(role=role, name=name, components=components))

    @staticmethod
    def _checkOutputNodes(referenceVolume, floatingVolume, warpedVolume, transform) -> None:
        if warpedVolume is not None and warpedVolume in (referenceVolume, floatingVolume):
            raise ValueError(_("The warped volume output must be a volume other than the inputs."))
        if transform is not None and not (transform.IsA("vtkMRMLGridTransformNode")
                                          or transform.GetClassName() == "vtkMRMLTransformNode"):
            raise ValueError(_("The output transform '{name}' is a {kind}; choose a grid transform.").format(
                name=transform.GetName(), kind=transform.GetClassName()))

    @staticmethod
    def _registrationGrids(referenceVolume, floatingVolume):
        """The two volumes' grids; for a single-slice pair, both in the reference slice's plane."""
        referenceGrid, floatingGrid = _VolumeGrid.ofVolume(referenceVolume), _VolumeGrid.ofVolume(floatingVolume)
        for grid, volume in ((referenceGrid, referenceVolume), (floatingGrid, floatingVolume)):
            if sum(n == 1 for n in grid.shape) > 1:
                raise ValueError(_("'{name}' is a line or a point of voxels ({shape}); SAR registers images and "
                                   "volumes.").format(name=volume.GetName(), shape=grid.shape[::-1]))
        if (referenceGrid.flatAxis is None) != (floatingGrid.flatAxis is None):
            single = referenceVolume if referenceGrid.flatAxis is not None else floatingVolume
            raise ValueError(_("'{single}' is a single slice but the other volume is 3D; both must be 3D volumes "
                               "or both single slices.").format(single=single.GetName()))
        if referenceGrid.flatAxis is None:
            return referenceGrid, floatingGrid
        plane = referenceGrid.planeOfSlice()
        floatingPlane = floatingGrid.planeOfSlice()
        normal = np.cross(plane.axes[:, 0], plane.axes[:, 1])
        distance = abs(normal @ (floatingPlane.origin - plane.origin))
        tilt = np.abs(normal @ floatingPlane.axes).max()
        if distance > 0.5 * plane.thickness or tilt > 1e-3:
            raise ValueError(_("The two single slices are not in one plane (the floating slice is {distance:.2f} mm "
                               "away and tilted by {angle:.2f}°); SAR registers slices in the same plane.").format(
                                 distance=distance, angle=np.degrees(np.arcsin(min(tilt, 1.0)))))
        referenceGrid.plane = floatingGrid.plane = plane
        return referenceGrid, floatingGrid

    @staticmethod
    def _structures(structureNode, grid: _VolumeGrid, role: str) -> list:
        """Each segment (or label) of a segmentation (or label map) node as a mask on ``grid``.

        Slicer resamples them onto the grid (nearest neighbour), so a structure may have a
        geometry of its own."""
        if structureNode is None:
            return []
        logic = slicer.vtkSlicerSegmentationsModuleLogic
        structures = []
        if isinstance(structureNode, vtkMRMLSegmentationNode):
            segmentation = structureNode.GetSegmentation()
            # A segmentation made from surfaces (a model, an STL file) gets a labelmap, as its 2D display does.
            if not structureNode.CreateBinaryLabelmapRepresentation():
                raise ValueError(_("The {role} '{name}' cannot be converted to a labelmap.").format(
                    role=role, name=structureNode.GetName()))
            segmentIds = vtk.vtkStringArray()
            segmentation.GetSegmentIDs(segmentIds)
            for index in range(segmentIds.GetNumberOfValues()):
                segmentId = segmentIds.GetValue(index)
                segment = segmentation.GetSegment(segmentId)
                labelmap = slicer.vtkOrientedImageData()
                if not logic.GetSegmentBinaryLabelmapRepresentation(structureNode, segmentId, labelmap):
                    raise ValueError(_("Segment '{segment}' of the {role} '{name}' has no labelmap.").format(
                        segment=segment.GetName(), role=role, name=structureNode.GetName()))
                # Segments can share one labelmap layer, each with its own label value.
                mask = SARRegistrationLogic._resampledArray(labelmap, grid) == segment.GetLabelValue()
                structures.append(_Structure(segment.GetName(), tuple(segment.GetColor()), mask.astype(np.uint8)))
        elif isinstance(structureNode, vtkMRMLLabelMapVolumeNode):
            if structureNode.GetImageData() is None:
                raise ValueError(_("The {role} '{name}' has no voxels.").format(
                    role=role, name=structureNode.GetName()))
            labelmap = logic.CreateOrientedImageDataFromVolumeNode(structureNode)
            labels = SARRegistrationLogic._resampledArray(labelmap, grid)
            colors = structureNode.GetDisplayNode().GetColorNode() if structureNode.GetDisplayNode() else None
            for label in np.unique(labels[labels != 0]):
                rgba = [0.0, 0.0, 0.0, 0.0]
                named = colors is not None and colors.GetColor(int(label), rgba)
                name = colors.GetColorName(int(label)) if named else f"{structureNode.GetName()} {int(label)}"
                color = tuple(rgba[:3]) if named else (1.0, 1.0, 0.0)
                structures.append(_Structure(name, color, (labels == label).astype(np.uint8)))
        else:
            raise ValueError(_("The {role} must be a segmentation or a label map volume, not a {kind}.").format(
                role=role, kind=structureNode.GetClassName()))
        if not structures:
            raise ValueError(_("The {role} '{name}' is empty.").format(role=role, name=structureNode.GetName()))
        return structures

    @staticmethod
    def _resampledArray(orientedImage, grid: _VolumeGrid) -> np.ndarray:
        """An oriented (label) image resampled onto ``grid`` by Slicer, as a ``k, j, i`` array."""
        resampled = slicer.vtkOrientedImageData()
        if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
                orientedImage, grid.geometryImage(), resampled):
            raise ValueError(_("A structure could not be resampled onto its volume."))
        scalars = resampled.GetPointData().GetScalars()
        if scalars is None:  # an empty input gives an empty output
            return np.zeros(grid.shape, dtype=np.uint8)
        return vtk.util.numpy_support.vtk_to_numpy(scalars).reshape(grid.shape)

    @staticmethod
    def _union(structures: list, grid: _VolumeGrid):
        """The engine's structure mask: every segment together, as a SimpleITK image (or None)."""
        if not structures:
            return None
        return grid.sitkImage(np.any([structure.mask for structure in structures], axis=0).astype(np.uint8))

    @staticmethod
    def _ignoreMaskImage(ignoreMask, referenceGrid: _VolumeGrid):
        """The regions to ignore, as the uint8 SimpleITK image on the reference grid the engine expects."""
        structures = SARRegistrationLogic._structures(ignoreMask, referenceGrid, _("mask of regions to ignore"))
        return SARRegistrationLogic._union(structures, referenceGrid)

    def _model(self, weightsPath, ndims: int):
        """The SAR model of a weights file (None: the shipped ``ndims``-D weights), loaded once."""
        from SARRegistrationLib.model import default_weights_path, load_model

        path = Path(weightsPath) if weightsPath is not None else default_weights_path(ndims)
        key = (str(path.resolve()), path.stat().st_mtime_ns if path.is_file() else None, ndims)
        if key not in self._models:
            # None for the shipped weights, so that the engine's message can say what to do without them.
            model = load_model(None if weightsPath is None else path, ndims)  # a WeightsError says what is wrong
            self._models = {k: m for k, m in self._models.items() if k[2] != ndims}  # one model per dimension
            self._models[key] = model
        return self._models[key]

    # ------------------------------------------------------------------ building output nodes

    @staticmethod
    def _newNode(scene, className: str, name: str):
        return scene.AddNewNodeByClass(className, scene.GenerateUniqueName(name))

    @staticmethod
    def _imageData(array: np.ndarray):
        """A ``k, j, i`` numpy array as a new vtkImageData (voxels copied)."""
        imageData = vtk.vtkImageData()
        imageData.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
        imageData.GetPointData().SetScalars(
            vtk.util.numpy_support.numpy_to_vtk(np.ascontiguousarray(array).ravel(), deep=True))
        return imageData

    @staticmethod
    def _setVolumeVoxels(volumeNode, voxels, ijkToRAS: np.ndarray) -> None:
        """Replace a volume's voxels (vtkImageData or ``k, j, i`` array) and geometry in one step."""
        imageData = voxels if isinstance(voxels, vtk.vtkImageData) else SARRegistrationLogic._imageData(voxels)
        wasModifying = volumeNode.StartModify()
        volumeNode.SetAndObserveTransformNodeID(None)
        volumeNode.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ijkToRAS))
        volumeNode.SetAndObserveImageData(imageData)
        volumeNode.EndModify(wasModifying)

    @staticmethod
    def _showVolume(volumeNode, likeVolume) -> None:
        """Give a new output volume a display like the volume it comes from."""
        if volumeNode.GetDisplayNode() is None:
            volumeNode.CreateDefaultDisplayNodes()
        display, source = volumeNode.GetDisplayNode(), likeVolume.GetDisplayNode()
        if display is not None and source is not None and source.IsA("vtkMRMLScalarVolumeDisplayNode"):
            display.SetAutoWindowLevel(False)
            display.SetWindowLevel(source.GetWindow(), source.GetLevel())
            display.SetAndObserveColorNodeID(source.GetColorNodeID())

    @staticmethod
    def _gridTransform(displacementRAS: np.ndarray, grid: _VolumeGrid):
        """A Slicer grid transform of a ``k, j, i, 3`` RAS displacement field on ``grid``.

        Linear interpolation, as ITK's displacement field transform, so that Slicer's resampling
        gives back the engine's warped image.
        """
        matrix = grid.ijkToRAS[:3, :3]
        spacing = np.linalg.norm(matrix, axis=0)
        direction = np.eye(4)
        direction[:3, :3] = matrix / spacing
        displacementGrid = vtk.vtkImageData()
        displacementGrid.SetOrigin(grid.ijkToRAS[:3, 3])
        displacementGrid.SetSpacing(spacing)
        displacementGrid.SetDimensions(grid.shape[2], grid.shape[1], grid.shape[0])
        displacementGrid.GetPointData().SetScalars(vtk.util.numpy_support.numpy_to_vtk(
            np.ascontiguousarray(displacementRAS, dtype=np.float64).reshape(-1, 3), deep=True,
            array_type=vtk.VTK_DOUBLE))
        transform = slicer.vtkOrientedGridTransform()
        transform.SetDisplacementGridData(displacementGrid)
        transform.SetGridDirectionMatrix(slicer.util.vtkMatrixFromArray(direction))
        transform.SetInterpolationModeToLinear()
        return transform

    @staticmethod
    def _segments(structures: list, grid: _VolumeGrid) -> list:
        """``(name, color, labelmap)`` of each structure, its mask as a vtkOrientedImageData on ``grid``."""
        return [(structure.name, structure.color, grid.orientedImage(structure.mask)) for structure in structures]

    @staticmethod
    def _fillSegmentation(segmentationNode, scene, name: str, segments: list, volumeNode):
        """Make ``segments`` (from :meth:`_segments`) the segments of ``segmentationNode`` (created when None)."""
        if segmentationNode is None:
            segmentationNode = SARRegistrationLogic._newNode(scene, "vtkMRMLSegmentationNode", name)
        wasModifying = segmentationNode.StartModify()
        segmentationNode.SetAndObserveTransformNodeID(None)
        segmentationNode.GetSegmentation().RemoveAllSegments()
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        for segmentName, color, labelmap in segments:
            segmentationNode.AddSegmentFromBinaryLabelmapRepresentation(labelmap, segmentName, color)
        segmentationNode.EndModify(wasModifying)
        if segmentationNode.GetDisplayNode() is None:
            segmentationNode.CreateDefaultDisplayNodes()
        return segmentationNode


#
# SARRegistrationTest
#


class SARRegistrationTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer on the bundled sample pair, with the shipped 2D weights."""

    model = None  # a loaded SARModel to use instead of the shipped weights (set by tests outside Slicer)

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_registersSamplePair()
        self.setUp()
        self.test_failedRunLeavesSceneUnchanged()

    def test_registersSamplePair(self):
        self.delayDisplay("Loading the sample pair")
        logic = SARRegistrationLogic()
        self.assertEqual(logic.missingPythonPackages(), [], "Install the Python dependencies first.")
        sample = logic.loadSamplePair()
        reference, floating = sample["reference"], sample["floating"]
        self.assertEqual(reference.GetImageData().GetDimensions(), (181, 217, 1))

        self.delayDisplay("Registering")
        progress = []
        result = logic.register(reference, floating, sample["referenceStructure"], sample["floatingStructure"],
                                device="cpu", maxIterations=20, model=self.model,
                                progress=lambda fraction, message: progress.append(fraction))
        self.assertEqual(progress[-1], 1.0)

        # The warped volume is on the reference grid.
        self.assertEqual(result.warpedVolume.GetImageData().GetDimensions(), reference.GetImageData().GetDimensions())
        np.testing.assert_allclose(logic.worldIJKToRAS(result.warpedVolume), logic.worldIJKToRAS(reference), atol=1e-9)
        # Slicer's own resampling with the grid transform gives the warped volume back (up to the
        # interpolation of reading the hardened volume at the reference voxels).
        hardened = slicer.vtkSlicerVolumesLogic.CloneVolume(slicer.mrmlScene, floating, "hardened")
        hardened.SetAndObserveTransformNodeID(result.transform.GetID())
        self.assertTrue(slicer.vtkSlicerTransformLogic.hardenTransform(hardened))
        hardenedOnReference = self._sampleOnGrid(hardened, reference)
        warped = slicer.util.arrayFromVolume(result.warpedVolume)
        inside = (hardenedOnReference != 0) & (warped != 0)
        self.assertGreater(inside.mean(), 0.3)
        self.assertLess(np.abs(hardenedOnReference - warped)[inside].mean(), 0.01 * np.ptp(warped))

        # SAR's masks and the warped ventricles are segmentations on their grids; the measures are there.
        self.assertEqual(result.referenceMaskSegmentation.GetSegmentation().GetNumberOfSegments(), 1)
        self.assertEqual(result.floatingMaskSegmentation.GetSegmentation().GetNumberOfSegments(), 1)
        self.assertIsNotNone(result.warpedSegmentation)
        for key in ("dice", "hd95_mm", "mad_mm"):
            self.assertIn(key, result.metrics["after"])
        self.assertGreaterEqual(result.metrics["folding_fraction"], 0.0)
        logic.showResults(result, reference, sample["referenceStructure"], fit=False)
        self.delayDisplay("Test passed")

    def test_failedRunLeavesSceneUnchanged(self):
        from SARRegistrationLib import WeightsError

        logic = SARRegistrationLogic()
        sample = logic.loadSamplePair()
        nodesBefore = slicer.mrmlScene.GetNumberOfNodes()
        with self.assertRaises(WeightsError):
            logic.register(sample["reference"], sample["floating"], weightsPath="/nonexistent/sar_2d.pt")
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)
        self.delayDisplay("Test passed")

    @staticmethod
    def _sampleOnGrid(volumeNode, gridVolumeNode) -> np.ndarray:
        """Voxels of ``volumeNode`` at the voxel centres of ``gridVolumeNode`` (linear interpolation)."""
        import SimpleITK as sitk

        image = SARRegistrationLogic.sitkImageFromVolume(volumeNode)
        grid = SARRegistrationLogic.sitkImageFromVolume(gridVolumeNode)
        return sitk.GetArrayFromImage(sitk.Resample(image, grid, sitk.Transform(), sitk.sitkLinear, 0.0,
                                                    sitk.sitkFloat32))
