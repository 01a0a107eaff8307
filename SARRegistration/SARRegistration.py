"""SAR Registration: deep-learning deformable registration of two volumes in 3D Slicer.

The registration is done by the pure-Python engine ``SARRegistrationLib`` (PyTorch). This module
moves images between MRML nodes and SimpleITK images, calls the engine, and turns what it returns
into MRML nodes. It adds no registration maths of its own.

A run has three steps, so that the panel never blocks: :meth:`SARRegistrationLogic._prepare`
reads the scene (main thread), :meth:`SARRegistrationLogic._compute` runs the engine and builds
every output as data (a worker thread: it touches no MRML node), and
:meth:`SARRegistrationLogic._apply` puts the outputs into the scene (main thread).
:meth:`SARRegistrationLogic.register` runs the three in a row; :meth:`startRegistration` runs the
middle one in a :class:`SARRegistrationRunner.BackgroundRun`.

Conventions, where they change:

- MRML volume: voxels as a numpy array in ``k, j, i`` order; geometry as an IJK-to-RAS matrix
  (with any linear parent transform folded in, so that registration happens in world space).
- SimpleITK image (the engine's input and output): the same array in ``z, y, x`` order, geometry in
  LPS (x and y of RAS negated). A single-slice pair is given to the engine as 2D images whose
  physical frame is the reference slice's plane (see :class:`_VolumeGrid`).
- The engine's displacement: a vector image on the reference grid, in mm, LPS components, mapping
  a reference point ``p`` to ``p + d(p)`` in the floating image (ITK's resampling convention).
- Slicer's grid transform: the same field with RAS components on the same grid, set as the
  transform *from parent*, which is the resampling direction in Slicer as well. It maps reference
  world points to the floating volume's world (its parent transforms included), so a floating
  volume under a transform is moved by placing that transform under the output transform.
"""

from __future__ import annotations

import collections
import enum
import importlib.util
import inspect
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Callable, Optional, Union

import numpy as np
import vtk
import vtk.util.numpy_support

import qt
import slicer
from slicer import (vtkMRMLGridTransformNode, vtkMRMLLabelMapVolumeNode, vtkMRMLMarkupsFiducialNode,
                    vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTransformNode)
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Decimals, SingleStep, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

import SARRegistrationDecisions as decisions
import SARRegistrationDependencies as dependencies
from SARRegistrationRunner import BackgroundRun, RunOutcome, RunState

ENGINE_PACKAGE = "SARRegistrationLib"
MODULE_DIR = Path(__file__).resolve().parent
# Installed, the engine, the weights and the sample pair sit beside this file (see CMakeLists.txt);
# in the source tree they sit in the repository root, one folder up.
ROOT_CANDIDATES = (MODULE_DIR, MODULE_DIR.parent)
RUN_RECORD_ATTRIBUTE = "SARRegistration.RunRecord"


def _makeEngineImportable() -> None:
    """Put the repository root on ``sys.path`` when the module runs from the source tree.

    ``find_spec`` only locates the package, importing none of it: the engine's modules import
    PyTorch, which may not be installed yet and is slow to load at application start-up.
    """
    if importlib.util.find_spec(ENGINE_PACKAGE) is not None:
        return
    for root in ROOT_CANDIDATES:
        if (root / ENGINE_PACKAGE / "__init__.py").is_file():
            sys.path.insert(0, str(root))
            return


_makeEngineImportable()

# LPS <-> RAS: x and y change sign (the matrix is its own inverse).
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])

REFERENCE_MASK_COLOR = (0.2, 0.8, 0.2)
FLOATING_MASK_COLOR = (0.95, 0.6, 0.1)


def shippedWeightsPath(ndims: int) -> Path | None:
    """Where the engine looks for its shipped ``ndims``-D weights, found without importing it
    (the engine's modules import PyTorch)."""
    spec = importlib.util.find_spec(ENGINE_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).resolve().parents[1] / "Resources" / "Weights" / f"sar_{ndims}d.pt"


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
Deformable registration of a floating volume onto a reference volume: SAR, a
segmentation-augmented generative adversarial network whose last layer is finetuned on each pair
in seconds, gives the first estimate when a weights file is given (or the network is switched on
under Advanced), and an instance optimisation refines the field on the pair, in full 3D for
volumes. By default, as the engine's command line, the instance optimisation starts from the
identity. It works on 3D volumes and on single slices, on the CPU or a CUDA GPU.
<p>Pick the reference and floating volumes, optionally the structure to check in each (a
segmentation or a label map, e.g. ventricles or lungs), a landmark point list in each for the
target registration error, and click <b>Register</b>. The work runs in the background: the
progress bar moves and <b>Cancel</b> stops it. The outputs are the warped volume, a grid transform
that reproduces it when applied to the floating volume, optionally its inverse and its Jacobian
determinant, SAR's own masks of both images, the warped structure, and Dice, HD95, MAD, landmark
error and folding measures.</p>
<p>From the Python console: <code>SARRegistration.SARRegistrationLogic().register(referenceNode,
floatingNode)</code> returns the output nodes and the measures.</p>
""")
        self.parent.acknowledgementText = _("""
SAR Registration implements the method of <i>Combining Transfer Learning and Segmentation
Information with GANs for Training Data Independent Image Registration</i> (D. Mahapatra and
Z. Ge, arXiv:1903.10139, 2019). Please cite that paper when you use this module.
""")
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData() -> None:
    """Offer the sample pair in the Sample Data module (category Registration).

    The files are listed once, by the engine (``SARRegistrationLib.sample``, the command line's
    ``--sample``), and read only when the user asks for the pair.
    """
    import SampleData

    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="Registration", sampleName="SAR sample pair", uris=[], fileNames=[], nodeNames=[],
        thumbnailFileName=str(MODULE_DIR / "Resources" / "Icons" / "SARRegistration.png"),
        customDownloader=lambda source: SARRegistrationLogic().loadSamplePair())


#
# Parameters
#


class RegistrationMode(enum.Enum):
    AUTO = "auto"
    VOLUME = "volume"
    SLICEWISE = "slicewise"

    def label(self) -> str:
        return {RegistrationMode.AUTO: _("Automatic (3D model if there is one)"),
                RegistrationMode.VOLUME: _("Full volume (3D)"),
                RegistrationMode.SLICEWISE: _("Slice by slice (2D)")}[self]


class ComputeDevice(enum.Enum):
    AUTO = "auto"
    CUDA = "cuda"
    CPU = "cpu"

    def label(self) -> str:
        return {ComputeDevice.AUTO: _("Automatic"), ComputeDevice.CUDA: _("GPU (CUDA)"),
                ComputeDevice.CPU: _("CPU")}[self]


class AffinePrealignment(enum.Enum):
    """The engine's ``affine=``; auto: when a rigid search finds the pair misaligned."""

    AUTO = "auto"
    ALWAYS = "always"
    NEVER = "never"

    def label(self) -> str:
        return {AffinePrealignment.AUTO: _("When the pair is misaligned (the engine's default)"),
                AffinePrealignment.ALWAYS: _("Always"), AffinePrealignment.NEVER: _("Never")}[self]

    def engineValue(self) -> bool | str:
        return {AffinePrealignment.AUTO: "auto", AffinePrealignment.ALWAYS: True,
                AffinePrealignment.NEVER: False}[self]


# Parameters whose type changed between releases, and what the strings an older scene saved for
# them mean now. parameterNodeWrapper reads an enum by its member's name and raises on any other
# string, so a scene saved when `affine` was a bool ("True"/"False") could not be opened with this
# module until its value is renamed. Each old value keeps the behaviour it had.
LEGACY_PARAMETER_VALUES = {"affine": {"True": AffinePrealignment.ALWAYS.name, "False": AffinePrealignment.NEVER.name}}


def migrateParameterNode(node) -> None:
    """Rename the values an older release saved in this module's parameter node (see above)."""
    for name, renamed in LEGACY_PARAMETER_VALUES.items():
        value = node.GetParameter(name)
        if value in renamed:
            node.SetParameter(name, renamed[value])


class _AutoOnOff:
    """The engine value of an AUTO / ON / OFF choice: None (the engine's default), True or False."""

    def engineValue(self) -> bool | None:
        return {"auto": None, "on": True, "off": False}[self.value]


class NetworkUse(_AutoOnOff, enum.Enum):
    """The engine's ``network=``; auto: the network runs when weights are given."""

    AUTO = "auto"
    ON = "on"
    OFF = "off"

    def label(self) -> str:
        return {NetworkUse.AUTO: _("When a weights file is given (the engine's default)"),
                NetworkUse.ON: _("Always (the shipped weights by default)"),
                NetworkUse.OFF: _("Never: instance optimisation alone")}[self]


class ImageSimilarity(enum.Enum):
    """The engine's ``optimisation_similarity=``; auto: the engine's choice for the images' dimension."""

    AUTO = "auto"
    NMI_MIND = "nmi+mind"
    NMI = "nmi"
    MIND = "mind"

    def label(self) -> str:
        return {ImageSimilarity.AUTO: _("Automatic (NMI + MIND-SSC for slices, NMI for volumes)"),
                ImageSimilarity.NMI_MIND: _("NMI + MIND-SSC"), ImageSimilarity.NMI: _("NMI alone"),
                ImageSimilarity.MIND: _("MIND-SSC alone")}[self]

    def engineValue(self) -> str | None:
        return None if self is ImageSimilarity.AUTO else self.value


class CtEqualisation(_AutoOnOff, enum.Enum):
    """The engine's ``optimisation_equalise=``; auto: when both volumes are CT (Hounsfield units)."""

    AUTO = "auto"
    ON = "on"
    OFF = "off"

    def label(self) -> str:
        return {CtEqualisation.AUTO: _("When both volumes are CT (the engine's default)"),
                CtEqualisation.ON: _("Always"), CtEqualisation.OFF: _("Never")}[self]


class RegistrationPreset(enum.Enum):
    ACCURATE = "accurate"
    FAST = "fast"
    CUSTOM = decisions.CUSTOM_PRESET

    def label(self) -> str:
        return {RegistrationPreset.ACCURATE: _("Accurate (the engine's defaults)"),
                RegistrationPreset.FAST: _("Fast"), RegistrationPreset.CUSTOM: _("Custom")}[self]


StructureNode = Optional[Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode]]


@parameterNodeWrapper
class SARRegistrationParameterNode:
    """Everything the user chose; saved with the scene.

    ``weightsPath`` left empty means the shipped weights (it is a string, not a Path: an empty
    Path would read "."). The defaults are the engine's (``SARRegistrationLib.register``, its
    ``OptimisationSettings`` and the finetuning smoothness, ``LossWeights().for_finetuning()``),
    which the "accurate" preset sets.
    """

    referenceVolume: vtkMRMLScalarVolumeNode
    floatingVolume: vtkMRMLScalarVolumeNode
    referenceStructure: StructureNode
    floatingStructure: StructureNode
    initialTransform: Optional[vtkMRMLTransformNode]
    referenceLandmarks: Optional[vtkMRMLMarkupsFiducialNode]
    floatingLandmarks: Optional[vtkMRMLMarkupsFiducialNode]
    preset: RegistrationPreset = RegistrationPreset.ACCURATE
    mode: RegistrationMode = RegistrationMode.AUTO
    device: ComputeDevice = ComputeDevice.AUTO
    affine: AffinePrealignment = AffinePrealignment.AUTO
    network: NetworkUse = NetworkUse.AUTO
    finetune: bool = True
    maxIterations: Annotated[int, WithinRange(1, 10000)] = 100
    tolerance: Annotated[float, WithinRange(0.0, 1.0), Decimals(6), SingleStep(1e-5)] = 1e-4
    smoothness: Annotated[float, WithinRange(0.0, 5.0), Decimals(2), SingleStep(0.01)] = 0.05
    instanceOptimisation: bool = True
    optimisationIterations: Annotated[int, WithinRange(0, 10000)] = decisions.AUTO_ITERATIONS
    optimisationLevels: Annotated[int, WithinRange(1, 8)] = 3
    biasField: bool = True
    similarity: ImageSimilarity = ImageSimilarity.AUTO
    equalise: CtEqualisation = CtEqualisation.AUTO
    weightsPath: str = ""
    ignoreMask: StructureNode
    warpedVolume: vtkMRMLScalarVolumeNode
    transform: vtkMRMLGridTransformNode
    computeInverse: bool = False
    inverseTransform: vtkMRMLGridTransformNode
    computeJacobian: bool = False
    jacobianVolume: vtkMRMLScalarVolumeNode
    referenceMaskSegmentation: vtkMRMLSegmentationNode
    floatingMaskSegmentation: vtkMRMLSegmentationNode
    warpedSegmentation: vtkMRMLSegmentationNode
    showDetailedLog: bool = False


# The parameter-node settings a preset sets, by their names in the parameter node.
PRESET_PARAMETERS = tuple(decisions.PRESETS["accurate"])


#
# SARRegistrationWidget
#


class SARRegistrationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: binds the .ui to the parameter node, starts runs and shows what they report.

    The decisions (when Register is enabled, which devices are offered, what a preset sets) are
    plain functions of :mod:`SARRegistrationDecisions`; the work is the logic's, in a worker
    thread polled by a timer.
    """

    POLL_INTERVAL_MS = 100

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run = None  # the SARRegistrationRun in progress
        self._deviceProbe = None  # the BackgroundRun looking for a GPU
        self._cudaAvailable = None  # unknown until PyTorch has been looked at
        self._lastPreset = None
        self._updatingPreset = False
        self._pollTimer = None

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
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(self.POLL_INTERVAL_MS)
        self._pollTimer.connect("timeout()", self._onPollTimer)
        self._showRunning(False)

        self.initializeParameterNode()
        self._showDependencyStatus()
        self._startDeviceProbe()

    def cleanup(self) -> None:
        if self._run is not None:
            self._run.cancel()
        if self._pollTimer is not None:
            self._pollTimer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        # A running registration observes the scene itself: it cancels and writes nothing.
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
        self._lastPreset = None
        if self._parameterNode:
            # Each widget bound here has the dynamic property SlicerParameterName in the .ui file.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._showDeviceChoices()
            self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        parameters = self._parameterNode
        if parameters and self.ui.weightsPathLineEdit.currentPath != parameters.weightsPath:
            self.ui.weightsPathLineEdit.currentPath = parameters.weightsPath
        if parameters:
            self._followPreset(parameters)
        self.ui.logTextEdit.visible = bool(parameters and parameters.showDetailedLog)
        self._checkCanApply()

    def _followPreset(self, parameters) -> None:
        """A preset picked sets its settings; settings changed by hand make the preset "custom"."""
        if self._updatingPreset:
            return
        self._updatingPreset = True
        try:
            if parameters.preset != self._lastPreset and parameters.preset is not RegistrationPreset.CUSTOM:
                with slicer.util.NodeModify(parameters.parameterNode):
                    for name, value in decisions.presetSettings(parameters.preset.value).items():
                        setattr(parameters, name, value)
            else:
                current = {name: getattr(parameters, name) for name in PRESET_PARAMETERS}
                matching = RegistrationPreset(decisions.matchingPreset(current))
                if matching is not parameters.preset:
                    parameters.preset = matching
            self._lastPreset = parameters.preset
        finally:
            self._updatingPreset = False

    def onWeightsPathChanged(self, path: str) -> None:
        if self._parameterNode and self._parameterNode.weightsPath != path:
            self._parameterNode.weightsPath = path

    def _inputFacts(self) -> decisions.InputFacts:
        parameters = self._parameterNode

        def shape(volume):
            if volume is None:
                return None
            imageData = volume.GetImageData()
            return tuple(imageData.GetDimensions()[::-1]) if imageData is not None else (0, 0, 0)

        if not parameters:
            return decisions.InputFacts(None, None, running=self._run is not None)
        weights3D = shippedWeightsPath(3)
        return decisions.InputFacts(
            shape(parameters.referenceVolume), shape(parameters.floatingVolume),
            sameVolume=parameters.referenceVolume is not None
            and parameters.referenceVolume == parameters.floatingVolume,
            mode=parameters.mode.value, network=parameters.network.engineValue(),
            instanceOptimisation=parameters.instanceOptimisation, weightsPath=parameters.weightsPath,
            weightsPathExists=not parameters.weightsPath or Path(parameters.weightsPath).is_file(),
            shipped3DWeights=weights3D is not None and weights3D.is_file(), running=self._run is not None)

    def _checkCanApply(self, caller=None, event=None) -> None:
        enabled, reason = decisions.registerButtonState(self._inputFacts())
        self.ui.applyButton.enabled = enabled
        self.ui.applyButton.toolTip = _(reason)

    # ------------------------------------------------------------------ dependencies and devices

    def _showDependencyStatus(self) -> None:
        missing = dependencies.describe(self.logic.missingPythonPackages())
        self.ui.dependencyLabel.visible = bool(missing)
        if missing:
            self.ui.dependencyLabel.text = _(
                "Not installed yet, or too old: {packages}. They will be installed, after you agree, "
                "when you first click Register.").format(packages=", ".join(missing))

    def _startDeviceProbe(self) -> None:
        """Look for a GPU in the background: it imports PyTorch, which takes seconds the first time."""
        if self._deviceProbe is None and self._cudaAvailable is None and self.logic.isTorchInstalled():
            self._deviceProbe = self.logic.startDeviceProbe()
            self._pollTimer.start()

    def _showDeviceChoices(self) -> None:
        """The GPU choice is enabled only when PyTorch sees a CUDA device."""
        model = self.ui.deviceComboBox.model()
        for index, choice in enumerate(decisions.deviceChoices(self._cudaAvailable)):
            item = model.item(index)
            if item is None:
                return
            item.setEnabled(choice.enabled)
            item.setToolTip(_(choice.tooltip))
        if self._parameterNode:
            kept = decisions.deviceAfterProbe(self._parameterNode.device.value, self._cudaAvailable)
            if kept != self._parameterNode.device.value:
                self._parameterNode.device = ComputeDevice(kept)

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
        if self._run is not None:
            self._run.cancel()
            self.ui.cancelButton.enabled = False
            self.ui.statusLabel.text = _("Cancelling: waiting for the current step to stop…")

    def onApplyButton(self) -> None:
        if self._run is not None:  # the button is disabled while running; a queued click is ignored
            return
        try:
            if not self.logic.installPythonPackages(askConfirmation=True):
                self.ui.statusLabel.text = _("The required Python packages were not installed; nothing was done.")
                return
        except Exception as error:
            self._showError(_("Failed to install the required Python packages: {error}").format(error=error),
                            _("The required Python packages were not installed; nothing was done."))
            return
        self._showDependencyStatus()
        self._startDeviceProbe()

        parameters = self._parameterNode
        question = decisions.memoryWarning(self.logic.estimatedMemoryBytes(
            parameters.referenceVolume, parameters.floatingVolume, parameters.computeInverse,
            parameters.computeJacobian), self.logic.totalMemoryBytes())
        if question and not slicer.util.confirmOkCancelDisplay(_(question)):
            return
        self.ui.logTextEdit.clear()
        try:
            self._run = self.logic.startRegistration(
                parameters.referenceVolume, parameters.floatingVolume,
                parameters.referenceStructure, parameters.floatingStructure,
                ignoreMask=parameters.ignoreMask, initialTransform=parameters.initialTransform,
                referenceLandmarks=parameters.referenceLandmarks, floatingLandmarks=parameters.floatingLandmarks,
                mode=parameters.mode.value, device=parameters.device.value, affine=parameters.affine.engineValue(),
                network=parameters.network.engineValue(), finetune=parameters.finetune,
                maxIterations=parameters.maxIterations,
                tolerance=parameters.tolerance, smoothness=parameters.smoothness,
                instanceOptimisation=parameters.instanceOptimisation,
                optimisationIterations=decisions.engineIterations(parameters.optimisationIterations),
                optimisationLevels=parameters.optimisationLevels,
                optimisationBiasField=parameters.biasField,
                optimisationSimilarity=parameters.similarity.engineValue(),
                optimisationEqualise=parameters.equalise.engineValue(), weightsPath=parameters.weightsPath or None,
                computeInverse=parameters.computeInverse, computeJacobian=parameters.computeJacobian,
                warpedVolume=parameters.warpedVolume, transform=parameters.transform,
                inverseTransform=parameters.inverseTransform, jacobianVolume=parameters.jacobianVolume,
                referenceMaskSegmentation=parameters.referenceMaskSegmentation,
                floatingMaskSegmentation=parameters.floatingMaskSegmentation,
                warpedSegmentation=parameters.warpedSegmentation)
        except Exception as error:  # the inputs were refused before anything started
            self._showError(_("Registration failed: {error}").format(error=error),
                            _("Registration failed. The scene was left as it was."))
            return
        self._showRunning(True)
        self._pollTimer.start()

    def _onPollTimer(self) -> None:
        if self._deviceProbe is not None:
            outcome = self._deviceProbe.poll()[1]
            if outcome is not None:
                self._deviceProbe = None
                self._cudaAvailable = bool(outcome.value) if outcome.state is RunState.SUCCEEDED else False
                if outcome.state is RunState.FAILED:
                    self._log(_("Looking for a GPU failed: {error}").format(error=outcome.error))
                self._showDeviceChoices()
        if self._run is not None:
            for fraction, message in self._run.poll():
                self.ui.progressBar.value = int(round(100 * fraction))
                self.ui.statusLabel.text = message
                self._log(message)
            if self._run.finished:
                run, self._run = self._run, None
                self._showRunning(False)
                self._showOutcome(run)
        if self._run is None and self._deviceProbe is None:
            self._pollTimer.stop()

    def _showOutcome(self, run: "SARRegistrationRun") -> None:
        if run.state is RunState.SUCCEEDED:
            result = run.result
            parameters = self._parameterNode
            if parameters:
                with slicer.util.NodeModify(parameters.parameterNode):
                    for name in ("warpedVolume", "transform", "inverseTransform", "jacobianVolume",
                                 "referenceMaskSegmentation", "floatingMaskSegmentation", "warpedSegmentation"):
                        if getattr(result, name) is not None:  # an output not made keeps the user's choice
                            setattr(parameters, name, getattr(result, name))
                self.logic.showResults(result, parameters.referenceVolume, parameters.referenceStructure)
            self._showMetrics(result.metrics)
            self._log(json.dumps(result.record, indent=2))
            self.ui.statusLabel.text = _("Done in {seconds:.1f} s.").format(seconds=result.record["seconds"])
        elif run.state is RunState.CANCELLED:
            self.ui.statusLabel.text = run.message
            self._log(run.message)
        else:
            self._log(run.traceback)
            self._showError(_("Registration failed: {error}").format(error=run.error),
                            _("Registration failed. The scene was left as it was."), run.traceback)

    def _showError(self, text: str, status: str, details: str | None = None) -> None:
        import traceback

        logging.error(text)
        self.ui.statusLabel.text = status
        slicer.util.errorDisplay(text, detailedText=details or traceback.format_exc())

    def _log(self, message: str) -> None:
        self.ui.logTextEdit.appendPlainText(f"{time.strftime('%H:%M:%S')}  {message}")

    def _showRunning(self, running: bool) -> None:
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
    """The output nodes of one registration, the engine's measures (``metrics``), and the record
    of the run (``record``, also kept as the attribute ``SARRegistration.RunRecord`` of every
    output node)."""

    warpedVolume: vtkMRMLScalarVolumeNode
    transform: vtkMRMLTransformNode
    referenceMaskSegmentation: vtkMRMLSegmentationNode | None  # None when the network did not run
    floatingMaskSegmentation: vtkMRMLSegmentationNode | None
    warpedSegmentation: vtkMRMLSegmentationNode | None
    metrics: dict = field(default_factory=dict)
    inverseTransform: vtkMRMLTransformNode | None = None
    jacobianVolume: vtkMRMLScalarVolumeNode | None = None
    record: dict = field(default_factory=dict)


@dataclass
class _Structure:
    """One segment (or label) of a structure input, as a 0/1 array on its volume's voxel grid."""

    name: str
    color: tuple
    mask: np.ndarray  # uint8, k, j, i
    label: int | None = None  # its value in a label map node (None: a segment)


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

    def enginePoints(self, pointsRAS: np.ndarray) -> np.ndarray:
        """World RAS points ``(N, 3)`` in the engine's physical frame: LPS, or plane coordinates."""
        lps = np.asarray(pointsRAS, dtype=float).reshape(-1, 3) @ LPS_FROM_RAS
        if self.plane is None:
            return lps
        return (lps - self.plane.origin) @ np.linalg.pinv(self.plane.axes).T

    def worldPoints(self, enginePoints: np.ndarray) -> np.ndarray:
        """The inverse of :meth:`enginePoints` (points of a plane go back onto the plane)."""
        points = np.asarray(enginePoints, dtype=float)
        if self.plane is not None:
            points = self.plane.origin + points @ self.plane.axes.T
        return points @ LPS_FROM_RAS

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


@dataclass
class _PreparedRun:
    """What :meth:`SARRegistrationLogic._prepare` read from the scene: the worker needs nothing else.

    ``floatingGrid`` is where the engine sees the floating volume (its world, moved by the initial
    transform); ``floatingWorldGrid`` is where the volume is in the scene (without it).
    """

    scene: object
    nodes: dict  # the input nodes, by role, and the output nodes the user chose (None: create one)
    referenceGrid: _VolumeGrid
    floatingGrid: _VolumeGrid
    floatingWorldGrid: _VolumeGrid
    reference: object  # SimpleITK images, as the engine takes them
    floating: object
    referenceStructures: list
    floatingStructures: list
    ignoreMask: object
    initialToWorld: np.ndarray  # 4 x 4 RAS: the initial transform (identity without one)
    landmarks: tuple | None  # (reference points, floating points), (N, 3) RAS world, or None
    engineOptions: dict  # keywords of SARRegistrationLib.register, but the images and model
    model: object
    weightsPath: str | None
    computeInverse: bool
    computeJacobian: bool
    settings: dict  # the user's settings, for the run record


@dataclass
class _ComputedRun:
    """Every output of a run as data, built in the worker; nothing in the scene yet."""

    warpedImageData: object
    gridTransform: object
    referenceMask: list | None  # (name, color, labelmap) segments, or None without the network
    floatingMask: list | None
    warpedStructures: list
    inverseGridTransform: object | None
    jacobianImageData: object | None
    metrics: dict
    record: dict


class SARRegistrationRun:
    """A registration started by :meth:`SARRegistrationLogic.startRegistration`.

    The engine runs in a worker thread. Call :meth:`poll` on the main thread (the panel does it
    from a ``QTimer``): it returns the progress reported since the last call and, once the worker
    has ended, builds the output nodes there, so that MRML is touched on the main thread only.
    Closing the scene cancels the run, and a run that ends after the scene was closed writes
    nothing. ``state`` is a :class:`SARRegistrationRunner.RunState`; ``result``, ``error``,
    ``traceback`` and ``message`` say how it ended.
    """

    def __init__(self, logic: "SARRegistrationLogic", prepared: _PreparedRun):
        self._logic = logic
        self._prepared = prepared
        self.state = RunState.RUNNING
        self.result: SARRegistrationResult | None = None
        self.error: BaseException | None = None
        self.traceback = ""
        self.message = ""
        self.sceneClosed = False
        self.log: list[str] = []
        scene = prepared.scene
        self._sceneObserver = scene.AddObserver(scene.StartCloseEvent, self._onSceneStartClose)
        self._runner = BackgroundRun(lambda progress, cancelled: logic._compute(prepared, progress, cancelled))
        self._runner.start()

    @property
    def finished(self) -> bool:
        """The run has ended and :meth:`poll` has handled its outcome."""
        return self.state is not RunState.RUNNING

    @property
    def workerEnded(self) -> bool:
        """The worker has ended; its outputs reach the scene at the next :meth:`poll`."""
        return not self._runner.workerAlive

    def cancel(self) -> None:
        """Ask the worker to stop at its next check; :meth:`poll` reports when it has."""
        self._runner.cancel()

    def poll(self) -> list[tuple[float, str]]:
        events, outcome = self._runner.poll()
        self.log.extend(message for fraction, message in events)
        if outcome is not None:
            self._finish(outcome)
        return events

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the run has ended and its outputs are in the scene (the console, tests)."""
        ended = self._runner.wait(timeout)
        while ended and not self.finished:
            self.poll()
        return ended

    def _onSceneStartClose(self, caller, event) -> None:
        self.sceneClosed = True
        self._runner.cancel()

    def _finish(self, outcome: RunOutcome) -> None:
        self._prepared.scene.RemoveObserver(self._sceneObserver)
        self._logic._activeRun = None
        self.error, self.traceback = outcome.error, outcome.traceback
        if self.sceneClosed:
            self.state, self.message = RunState.CANCELLED, _("The scene was closed: the registration was "
                                                             "cancelled and nothing was written.")
        elif outcome.state is RunState.SUCCEEDED:
            try:
                self.result = self._logic._apply(self._prepared, outcome.value)
            except Exception as error:  # noqa: BLE001 (shown in the panel's dialog)
                import traceback

                self.state, self.error, self.traceback = RunState.FAILED, error, traceback.format_exc()
                self.message = _("Registration failed. The scene was left as it was.")
            else:
                self.state = RunState.SUCCEEDED
        elif outcome.state is RunState.CANCELLED:
            self.state, self.message = RunState.CANCELLED, _("Cancelled. The scene was left as it was.")
        else:
            self.state, self.message = RunState.FAILED, _("Registration failed. The scene was left as it was.")


class SARRegistrationLogic(ScriptedLoadableModuleLogic):
    """Registration of MRML volumes with the SAR engine; usable from the Python console.

    No widget is touched here. Example::

        logic = SARRegistrationLogic()
        result = logic.register(getNode("reference"), getNode("floating"))
        print(result.metrics["folding_fraction"], result.warpedVolume.GetName())
    """

    MAX_CACHED_MODELS = 2

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._models = {}  # (weights file, modification time, ndims) -> loaded SARModel
        self._activeRun: SARRegistrationRun | None = None

    def getParameterNode(self):
        node = super().getParameterNode()
        migrateParameterNode(node)
        return SARRegistrationParameterNode(node)

    # ------------------------------------------------------------------ Python dependencies

    @staticmethod
    def isTorchInstalled() -> bool:
        """Whether PyTorch is installed (its metadata is read; nothing is imported)."""
        return dependencies.installedVersion("torch") is not None

    @staticmethod
    def missingPythonPackages() -> list:
        """The engine's requirements that are not installed, or installed too old (nothing is imported)."""
        return dependencies.missingPackages()

    @staticmethod
    def isCudaAvailable() -> bool:
        """Whether PyTorch sees a CUDA GPU. Imports PyTorch: seconds the first time, so the panel
        asks through :meth:`startDeviceProbe`."""
        if not SARRegistrationLogic.isTorchInstalled():
            return False
        import torch

        return bool(torch.cuda.is_available())

    def startDeviceProbe(self) -> BackgroundRun:
        """:meth:`isCudaAvailable` in a worker thread; poll the returned run for the answer."""
        return BackgroundRun(lambda progress, cancelled: self.isCudaAvailable(), name="SAR GPU probe").start()

    @staticmethod
    def installPythonPackages(askConfirmation: bool = True) -> bool:
        """Install what the engine lacks (checked by version), after one confirmation; False if
        the user declined. PyTorch comes from the PyTorch Utils extension."""
        return dependencies.installMissing(askConfirmation)

    # ------------------------------------------------------------------ memory

    @staticmethod
    def estimatedMemoryBytes(referenceVolume, floatingVolume, computeInverse: bool = False,
                             computeJacobian: bool = False) -> int:
        """The memory a registration of these volumes is expected to need (bytes, an estimate)."""
        def voxels(volume):
            imageData = volume.GetImageData() if volume is not None else None
            return int(np.prod(imageData.GetDimensions())) if imageData is not None else 0

        floatingData = floatingVolume.GetImageData() if floatingVolume is not None else None
        floatingBytes = floatingData.GetScalarSize() if floatingData is not None else 4
        return decisions.estimatedMemoryBytes(voxels(referenceVolume), voxels(floatingVolume), floatingBytes,
                                              computeInverse, computeJacobian)

    @staticmethod
    def totalMemoryBytes() -> int | None:
        """This computer's physical memory, or None where it cannot be read."""
        try:
            import psutil

            return int(psutil.virtual_memory().total)
        except ImportError:
            pass
        try:
            import os

            return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        except (AttributeError, ValueError, OSError):
            return None

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
                 ignoreMask=None, initialTransform=None, referenceLandmarks=None, floatingLandmarks=None,
                 mode: str = "auto", device: str = "auto", affine: bool | str = "auto", network: bool | None = None,
                 finetune: bool = True, maxIterations: int = 100, tolerance: float = 1e-4,
                 smoothness: float | None = None, instanceOptimisation: bool = True,
                 optimisationIterations: int | None = None, optimisationLevels: int | None = None,
                 optimisationBiasField: bool | None = None, optimisationSimilarity: str | None = None,
                 optimisationEqualise: bool | None = None, weightsPath=None, model=None,
                 computeInverse: bool = False, computeJacobian: bool = False,
                 warpedVolume=None, transform=None, inverseTransform=None, jacobianVolume=None,
                 referenceMaskSegmentation=None, floatingMaskSegmentation=None, warpedSegmentation=None,
                 progress: Callable[[float, str], None] | None = None,
                 cancel: Callable[[], bool] | None = None) -> SARRegistrationResult:
        """Register ``floatingVolume`` onto ``referenceVolume`` and return the output nodes.

        The defaults are the engine's: this gives the field the command line gives with its defaults.

        Args:
            referenceVolume, floatingVolume: scalar volume nodes, both 3D or both single slices
                (a single-slice pair is registered in 2D, whatever ``mode`` says). Either may sit
                under a linear transform: registration happens in world space.
            referenceStructure, floatingStructure: optional segmentation or label map nodes of the
                structure to check (ventricles, lungs); they give Dice, HD95 and MAD, and the
                floating one is warped. They do not steer the registration.
            ignoreMask: optional segmentation or label map of regions the registration should
                ignore (bright implants, electrodes): the images are not compared there, and the
                field follows its smoothness.
            initialTransform: optional linear transform node that aligns the floating volume with
                the reference (from a rigid registration, or placed by hand): registration starts
                from it, and the output transform includes it.
            referenceLandmarks, floatingLandmarks: optional markups point lists, the same
                landmarks in the same order: the target registration error (mm) before and after
                goes into ``metrics["tre"]``.
            mode: ``"auto"`` (the 3D model when one is given or shipped, else the 2D model slice
                by slice), ``"volume"`` (3D model) or ``"slicewise"`` (2D model, slice by slice).
            device: ``"auto"`` (the GPU, falling back to the CPU when it runs out of memory),
                ``"cuda"`` or ``"cpu"``.
            network: run the SAR network (and finetune it) for the first estimate: True, False,
                or None, the engine's default, which runs it only when ``weightsPath`` or ``model``
                is given (instance optimisation from the identity otherwise).
            affine, finetune, maxIterations, tolerance, smoothness, instanceOptimisation,
                optimisationIterations, optimisationLevels, optimisationBiasField, optimisationSimilarity,
                optimisationEqualise: as in the engine's ``register`` (None keeps the engine's default).
            weightsPath: a SAR weights file; None takes the shipped weights. ``model``, a loaded
                ``SARRegistrationLib.SARModel``, overrides it.
            computeInverse, computeJacobian: also make the inverse transform (floating world to
                reference world, on the floating volume's grid) and the Jacobian determinant of
                the transform (a volume on the reference grid). Giving the node implies the flag.
            warpedVolume, transform, inverseTransform, jacobianVolume, referenceMaskSegmentation,
                floatingMaskSegmentation, warpedSegmentation: existing nodes to write the outputs
                into; new nodes are created for those left None.
            progress: ``progress(fraction, message)``, called as the work advances.
            cancel: ``cancel()`` returning true stops the run with ``RegistrationCancelled``.

        Nothing in the scene changes unless the whole run succeeds: new nodes are created, and
        given ones updated, only after the engine has returned and every output has been built.
        """
        arguments = {name: value for name, value in locals().items() if name not in ("self", "progress", "cancel")}
        prepared = self._prepare(**arguments)
        report = progress or (lambda fraction, message: None)
        result = self._apply(prepared, self._compute(prepared, report, cancel or (lambda: False)))
        report(1.0, _("done"))
        return result

    def startRegistration(self, *args, **kwargs) -> SARRegistrationRun:
        """:meth:`register` in a worker thread, with the same arguments but ``progress`` and ``cancel``.

        The inputs are checked and read here (errors raise at once); then the run goes on in the
        background: poll the returned :class:`SARRegistrationRun` from the main thread. Only one
        run at a time: starting another while one runs raises ``RuntimeError``.
        """
        arguments = inspect.signature(self.register).bind(*args, **kwargs)
        arguments.apply_defaults()
        if arguments.arguments.pop("progress") is not None or arguments.arguments.pop("cancel") is not None:
            raise TypeError("A background run reports through SARRegistrationRun.poll and stops with its cancel().")
        self._activeRun = SARRegistrationRun(self, self._prepare(**arguments.arguments))
        return self._activeRun

    @staticmethod
    def registerBatch(pairsCsv, outputDir, *, progress: Callable[[float, str], None] | None = None,
                      cancel: Callable[[], bool] | None = None, **options) -> list:
        """Register every pair of files in a CSV manifest with the engine's batch code, as
        ``python -m SARRegistrationLib batch`` does: pair ``id`` into ``outputDir/id/``, one row per
        pair in ``outputDir/report.csv`` and ``report.json`` (one per label of label maps in
        ``labels.csv``), and pairs done by an earlier run skipped.

        ``options`` are the engine's ``register`` keywords (``mode="slicewise"``, ``max_iterations=50``,
        ``weights=...``; see ``SARRegistrationLib.batch.run_batch``). Returns the report's rows.
        Works on files only: the scene is not touched. A cancelled batch keeps the pairs it finished.
        """
        from SARRegistrationLib.batch import read_pairs, run_batch

        return run_batch(read_pairs(pairsCsv), outputDir, progress=progress, cancel=cancel, **options)

    def _prepare(self, referenceVolume, floatingVolume, referenceStructure, floatingStructure, *, ignoreMask,
                 initialTransform, referenceLandmarks, floatingLandmarks, mode, device, affine, network, finetune,
                 maxIterations, tolerance, smoothness, instanceOptimisation, optimisationIterations,
                 optimisationLevels, optimisationBiasField, optimisationSimilarity, optimisationEqualise, weightsPath,
                 model, computeInverse, computeJacobian,
                 warpedVolume, transform, inverseTransform, jacobianVolume, referenceMaskSegmentation,
                 floatingMaskSegmentation, warpedSegmentation) -> _PreparedRun:
        """Check the inputs and read everything the run needs from the scene (main thread)."""
        if self._activeRun is not None:  # one run at a time: they would share the loaded model
            raise RuntimeError(_("A registration is already running: wait for it to end, or cancel it."))
        self._checkInputVolume(referenceVolume, _("reference volume"))
        self._checkInputVolume(floatingVolume, _("floating volume"))
        if referenceVolume == floatingVolume:
            raise ValueError(_("The reference and the floating volume must be different volumes."))
        if referenceVolume.GetScene() is None or referenceVolume.GetScene() != floatingVolume.GetScene():
            raise ValueError(_("The reference and the floating volume must be in the same scene."))
        if mode not in [choice.value for choice in RegistrationMode]:
            raise ValueError(_("Unknown mode {mode!r}: choose 'auto', 'volume' or 'slicewise'.").format(mode=mode))
        similarities = [choice.engineValue() for choice in ImageSimilarity]
        if optimisationSimilarity not in similarities:
            raise ValueError(_("Unknown similarity {similarity!r}: choose {choices}, or None for the engine's "
                               "default.").format(similarity=optimisationSimilarity,
                                                  choices=", ".join(repr(value) for value in similarities[1:])))
        computeInverse = bool(computeInverse or inverseTransform is not None)
        computeJacobian = bool(computeJacobian or jacobianVolume is not None)
        self._checkOutputNodes(referenceVolume, floatingVolume, warpedVolume, transform, inverseTransform,
                               jacobianVolume)
        scene = referenceVolume.GetScene()

        initialToWorld = self._initialTransformMatrix(initialTransform, floatingVolume)
        floatingWorldGrid = _VolumeGrid.ofVolume(floatingVolume)
        referenceGrid, floatingGrid = self._registrationGrids(
            referenceVolume, floatingVolume, _VolumeGrid(initialToWorld @ floatingWorldGrid.ijkToRAS,
                                                         floatingWorldGrid.shape))
        reference = referenceGrid.sitkImage(slicer.util.arrayFromVolume(referenceVolume))
        floating = floatingGrid.sitkImage(slicer.util.arrayFromVolume(floatingVolume))
        referenceStructures = self._structures(referenceStructure, referenceGrid, _("reference structure"))
        floatingStructures = self._structures(floatingStructure, floatingGrid, _("floating structure"))
        ignore = None if ignoreMask is None else self._ignoreMaskImage(ignoreMask, referenceGrid)
        landmarks = self._landmarks(referenceLandmarks, floatingLandmarks)

        engineOptions = {"mode": mode, "device": device, "affine": affine, "network": network, "finetune": finetune,
                         "max_iterations": maxIterations, "tolerance": tolerance, "smoothness": smoothness,
                         "instance_optimisation": instanceOptimisation,
                         "optimisation_iterations": optimisationIterations, "optimisation_levels": optimisationLevels,
                         "optimisation_bias_field": optimisationBiasField,
                         "optimisation_similarity": optimisationSimilarity,
                         "optimisation_equalise": optimisationEqualise}
        settings = {**engineOptions, "weights": None if weightsPath is None else str(weightsPath),
                    "initial_transform": initialTransform.GetName() if initialTransform is not None else None,
                    "compute_inverse": computeInverse, "compute_jacobian": computeJacobian}
        nodes = {"referenceVolume": referenceVolume, "floatingVolume": floatingVolume,
                 "referenceStructure": referenceStructure, "floatingStructure": floatingStructure,
                 "warpedVolume": warpedVolume, "transform": transform, "inverseTransform": inverseTransform,
                 "jacobianVolume": jacobianVolume, "referenceMaskSegmentation": referenceMaskSegmentation,
                 "floatingMaskSegmentation": floatingMaskSegmentation, "warpedSegmentation": warpedSegmentation}
        return _PreparedRun(
            scene, nodes, referenceGrid, floatingGrid, floatingWorldGrid, reference, floating, referenceStructures,
            floatingStructures, ignore, initialToWorld, landmarks, engineOptions, model,
            None if weightsPath is None else str(weightsPath), computeInverse, computeJacobian, settings)

    def _compute(self, run: _PreparedRun, progress: Callable[[float, str], None],
                 cancelled: Callable[[], bool]) -> _ComputedRun:
        """Run the engine and build every output as data. Touches no MRML node: it may run in a
        worker thread while the user works on."""
        log = []  # every message, for the run record (finetuning's name the loss of each iteration)

        def report(fraction, message):
            if not log or log[-1] != message:
                log.append(message)
            progress(fraction, message)

        report(0.0, _("loading PyTorch and the SAR engine"))
        import SARRegistrationLib as sar
        from SARRegistrationLib import grids, imageio

        import SARRegistrationFields as fields  # SimpleITK: loaded when needed, not at Slicer's start-up

        def check():
            if cancelled():
                raise sar.RegistrationCancelled("The registration was cancelled.")

        check()
        # The first import of PyTorch: seconds.
        from SARRegistrationLib.registration import network_dimension, uses_network

        model = run.model
        options = run.engineOptions
        if model is None and uses_network(options["network"], None, run.weightsPath):
            report(0.02, _("loading the weights"))
            # Loaded here rather than by the engine, so that a batch of runs loads it once.
            model = self._model(run.weightsPath, network_dimension(run.reference.GetDimension(), options["mode"]))
        check()
        referenceMask, floatingMask, labelNames = self._structureMasks(run)
        masks = {"reference_mask": referenceMask, "floating_mask": floatingMask, "ignore_mask": run.ignoreMask}
        result, notes = self._runEngine(sar, run, model, masks, lambda f, m: report(0.03 + 0.82 * f, m), cancelled)
        check()

        # Build every output before touching the scene, so that a failure here changes nothing.
        report(0.86, _("building the transform"))
        engineTransform = result.transform()
        referenceGrid, floatingGrid = run.referenceGrid, run.floatingGrid
        floatingFromAligned = np.linalg.inv(run.initialToWorld)  # the initial transform, undone after the field
        warpedImageData = self._imageData(referenceGrid.arrayFromImage(result.warped))
        displacementRAS = fields.composeLinearAfter(referenceGrid.displacementToRAS(result.displacement),
                                                    referenceGrid.ijkToRAS, floatingFromAligned)
        gridTransform = self._gridTransform(displacementRAS, referenceGrid)
        del displacementRAS
        check()
        referenceMask = floatingMask = None
        if result.reference_mask is not None:
            referenceMask = self._segments([_Structure(
                _("SAR reference mask"), REFERENCE_MASK_COLOR, referenceGrid.arrayFromImage(result.reference_mask))],
                referenceGrid)
            floatingMask = self._segments([_Structure(
                _("SAR floating mask"), FLOATING_MASK_COLOR, floatingGrid.arrayFromImage(result.floating_mask))],
                run.floatingWorldGrid)
        # Each segment is warped by the engine's own resampling with the engine's transform.
        report(0.88, _("warping the structures"))
        warpedStructures = self._segments([
            _Structure(structure.name, structure.color, referenceGrid.arrayFromImage(grids.resample_to(
                floatingGrid.sitkImage(structure.mask), run.reference, label=True, transform=engineTransform)))
            for structure in run.floatingStructures], referenceGrid)
        check()

        inverseGridTransform = jacobianImageData = None
        if run.computeInverse:
            inverseGridTransform = self._inverseGridTransform(run, result.displacement, report, cancelled, sar)
        check()
        if run.computeJacobian:
            report(0.97, _("computing the Jacobian determinant"))
            determinant = fields.jacobianDeterminant(result.displacement, np.linalg.det(floatingFromAligned[:3, :3]))
            jacobianImageData = self._imageData(referenceGrid.arrayFromImage(
                imageio.image_like(determinant, result.warped)))
        check()

        metrics = dict(result.metrics)
        for when in ("before", "after"):  # the engine's labels 1, 2, ... are the segments' names
            if "labels" in metrics.get(when, {}):
                metrics[when] = {**metrics[when], "labels": {
                    labelNames[int(label) - 1]: values for label, values in metrics[when]["labels"].items()}}
        if run.landmarks is not None:
            metrics["tre"] = fields.targetRegistrationErrors(
                *run.landmarks, lambda points: self._mapToFloating(points, engineTransform, run, floatingFromAligned))
        record = self._runRecord(run, model, metrics, notes, log)
        report(0.99, _("handing the outputs to the scene"))
        return _ComputedRun(warpedImageData, gridTransform, referenceMask, floatingMask, warpedStructures,
                            inverseGridTransform, jacobianImageData, metrics, record)

    def _runEngine(self, sar, run: _PreparedRun, model, masks: dict, progress, cancelled):
        """The engine's ``register``; on a GPU that runs out of memory with device "auto", once more
        on the CPU. Returns the result and notes for the run record."""
        import torch

        outOfMemory = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
        options = dict(run.engineOptions)
        try:
            return sar.register(run.reference, run.floating, model, **masks, **options, progress=progress,
                                cancel=cancelled), []
        except outOfMemory as error:
            torch.cuda.empty_cache()
            if options["device"] != "auto":
                raise RuntimeError(_("The GPU ran out of memory ({error}). Choose the device Automatic (it falls "
                                     "back to the CPU) or CPU, or register slice by slice.").format(
                                       error=str(error).splitlines()[0])) from None
            note = _("The GPU ran out of memory; registering on the CPU instead.")
            progress(0.0, note)
            options["device"] = "cpu"
            return sar.register(run.reference, run.floating, model, **masks, **options, progress=progress,
                                cancel=cancelled), [note]

    def _inverseGridTransform(self, run: _PreparedRun, displacement, progress, cancelled, sar):
        """The grid transform of the inverse map, floating world -> reference world, on the floating
        volume's grid: ``x -> T(x) + u(T(x))`` with ``T`` the initial transform and ``u`` the inverse
        of the engine's field."""
        import SimpleITK as sitk

        import SARRegistrationFields as fields

        progress(0.9, _("inverting the field"))
        inverse = fields.invertDisplacement(
            displacement, lambda f: progress(0.9 + 0.06 * f, _("inverting the field")), cancelled)
        if cancelled():
            raise sar.RegistrationCancelled("The registration was cancelled.")
        # The inverse at the floating voxels as the engine saw them (moved by T): the floating image's grid.
        atFloating = sitk.Resample(inverse, run.floating, sitk.Transform(), sitk.sitkLinear, 0.0,
                                   sitk.sitkVectorFloat64)
        inverseRAS = fields.addLinearDisplacement(run.floatingGrid.displacementToRAS(atFloating),
                                                  run.floatingWorldGrid.ijkToRAS, run.initialToWorld)
        return self._gridTransform(inverseRAS, run.floatingWorldGrid)

    @staticmethod
    def _mapToFloating(pointsRAS: np.ndarray, engineTransform, run: _PreparedRun,
                       floatingFromAligned: np.ndarray) -> np.ndarray:
        """Reference world points (RAS) moved as the output transform moves them: into the floating
        volume's world."""
        grid = run.referenceGrid
        moved = np.array([engineTransform.TransformPoint(tuple(float(v) for v in point))
                          for point in grid.enginePoints(pointsRAS)])
        aligned = grid.worldPoints(moved)
        return aligned @ floatingFromAligned[:3, :3].T + floatingFromAligned[:3, 3]

    def _runRecord(self, run: _PreparedRun, model, metrics: dict, notes: list, log: list) -> dict:
        """What a later reader needs to know how an output was made."""
        weights = None
        if model is not None:
            path = model.metadata.get("weights_path")
            weights = {"path": path, "sha256": self._weightsHash(path)}
        return {"module": "SARRegistration", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "reference": run.nodes["referenceVolume"].GetName(), "floating": run.nodes["floatingVolume"].GetName(),
                "settings": run.settings, "weights": weights, "device": metrics.get("device"),
                "mode": metrics.get("mode"), "iterations": metrics.get("iterations"),
                "instance_optimisation": metrics.get("instance_optimisation"), "seconds": metrics.get("seconds"),
                "notes": notes, "metrics": metrics, "log": log}

    @staticmethod
    def _weightsHash(path) -> str | None:
        if not path or not Path(path).is_file():
            return None
        from SARRegistrationLib.model import sha256_of

        return sha256_of(path)

    def _apply(self, run: _PreparedRun, computed: _ComputedRun) -> SARRegistrationResult:
        """Put the outputs into the scene (main thread). Refuses if an input or a chosen output
        node has left the scene since the run started."""
        scene, nodes = run.scene, run.nodes
        for role, node in nodes.items():
            if node is not None and node.GetScene() is not scene:
                raise ValueError(_("'{name}' ({role}) was removed from the scene during the registration; "
                                   "nothing was written.").format(name=node.GetName(), role=role))
        referenceVolume, floatingVolume = nodes["referenceVolume"], nodes["floatingVolume"]
        referenceGrid = run.referenceGrid
        floatingName = floatingVolume.GetName()
        recordText = json.dumps(computed.record)

        warpedVolume = nodes["warpedVolume"] or self._newNode(scene, "vtkMRMLScalarVolumeNode",
                                                              f"{floatingName} SAR warped")
        self._setVolumeVoxels(warpedVolume, computed.warpedImageData, referenceGrid.ijkToRAS)
        self._showVolume(warpedVolume, floatingVolume)
        transform = self._setGridTransform(nodes["transform"], scene, f"{floatingName} SAR transform",
                                           computed.gridTransform)
        inverseTransform = jacobianVolume = None
        if computed.inverseGridTransform is not None:
            inverseTransform = self._setGridTransform(nodes["inverseTransform"], scene,
                                                      f"{floatingName} SAR inverse transform",
                                                      computed.inverseGridTransform)
        if computed.jacobianImageData is not None:
            jacobianVolume = nodes["jacobianVolume"] or self._newNode(scene, "vtkMRMLScalarVolumeNode",
                                                                      f"{floatingName} SAR Jacobian determinant")
            self._setVolumeVoxels(jacobianVolume, computed.jacobianImageData, referenceGrid.ijkToRAS)
            if jacobianVolume.GetDisplayNode() is None:
                jacobianVolume.CreateDefaultDisplayNodes()
        referenceMaskSegmentation = floatingMaskSegmentation = None
        if computed.referenceMask is not None:
            referenceMaskSegmentation = self._fillSegmentation(
                nodes["referenceMaskSegmentation"], scene, f"{referenceVolume.GetName()} SAR mask",
                computed.referenceMask, referenceVolume)
            floatingMaskSegmentation = self._fillSegmentation(
                nodes["floatingMaskSegmentation"], scene, f"{floatingName} SAR mask", computed.floatingMask,
                floatingVolume)
        warpedSegmentation = None
        if computed.warpedStructures:
            warpedSegmentation = self._fillSegmentation(
                nodes["warpedSegmentation"], scene, f"{nodes['floatingStructure'].GetName()} SAR warped",
                computed.warpedStructures, referenceVolume)
        outputs = [warpedVolume, transform, inverseTransform, jacobianVolume, referenceMaskSegmentation,
                   floatingMaskSegmentation, warpedSegmentation]
        for node in outputs:
            if node is not None:
                node.SetAttribute(RUN_RECORD_ATTRIBUTE, recordText)
        metrics = computed.metrics
        logging.info(f"SAR registration of '{floatingName}' onto '{referenceVolume.GetName()}': "
                     f"{metrics.get('mode')}, {metrics['iterations']} finetuning iterations, "
                     f"{metrics['seconds']:.1f} s on {metrics['device']}")
        return SARRegistrationResult(warpedVolume, transform, referenceMaskSegmentation, floatingMaskSegmentation,
                                     warpedSegmentation, dict(metrics), inverseTransform, jacobianVolume,
                                     computed.record)

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
        floatingMask = result.floatingMaskSegmentation
        if floatingMask is not None and floatingMask.GetDisplayNode() is not None:
            floatingMask.GetDisplayNode().SetVisibility(False)

    @staticmethod
    def metricsRows(metrics: dict) -> list:
        """``(measure, before, after)`` text rows of the engine's metrics, for a table."""

        def number(value, digits=3, unit=""):
            if value is None or not np.isfinite(value):
                return _("n/a")
            return f"{value:.{digits}f}{unit}"

        rows = []
        before, after = metrics.get("before", {}), metrics.get("after", {})
        measures = (("dice", _("Dice"), ""), ("hd95_mm", _("HD95"), " mm"), ("mad_mm", _("MAD"), " mm"))
        for key, label, unit in measures:
            if key in after:
                mean = _("{measure}, mean of {count} structures").format(measure=label, count=len(after["labels"])) \
                    if "labels" in after else label
                rows.append((mean, number(before.get(key), unit=unit), number(after[key], unit=unit)))
        for name, values in after.get("labels", {}).items():  # each structure measured on its own
            previous = before.get("labels", {}).get(name, {})
            for key, label, unit in measures:
                rows.append((_("{measure}: {structure}").format(measure=label, structure=name),
                             number(previous.get(key), unit=unit), number(values[key], unit=unit)))
        if "tre" in metrics:
            tre = metrics["tre"]
            rows.append((_("Landmark error (TRE, mean of {count})").format(count=tre["points"]),
                         number(tre["before"]["mean_mm"], 2, " mm"), number(tre["after"]["mean_mm"], 2, " mm")))
            rows.append((_("Landmark error (TRE, largest)"), number(tre["before"]["max_mm"], 2, " mm"),
                         number(tre["after"]["max_mm"], 2, " mm")))
        if "folding_fraction" in metrics:
            folding = number(100 * metrics["folding_fraction"], 2, " %")
            rows.append((_("Folding (voxels with Jacobian ≤ 0)"), "", folding))
        if "max_displacement_mm" in metrics:
            rows.append((_("Largest displacement"), "", number(metrics["max_displacement_mm"], 2, " mm")))
        if metrics.get("network") is False:
            rows.append((_("Registration"), "", _("instance optimisation alone (no network)")))
        elif "mode" in metrics:
            modes = {"volume": _("full volume (3D model)"), "slicewise": _("slice by slice (2D model)"),
                     "image": _("2D image (2D model)")}
            rows.append((_("Registration"), "", modes.get(metrics["mode"], str(metrics["mode"]))))
        if "affine_prealignment" in metrics:
            search = metrics.get("rigid_search")
            if metrics["affine_prealignment"]:
                text = _("affine") if not search else _(
                    "affine, from a rotation of {degrees}° and a shift of {shift} mm (the pair was misaligned)").format(
                    degrees=", ".join(f"{angle:g}" for angle in search["rotation_degrees"]),
                    shift=", ".join(f"{shift:g}" for shift in search["shift_mm"]))
            elif not search:
                text = _("none")
            elif search.get("declined"):
                text = _("none (the affine from the search's motion matched the images no better)")
            else:
                text = _("none (the pair was aligned)")
            rows.append((_("Pre-alignment"), "", text))
        if "iterations" in metrics:
            converged = {True: _(" (converged)"), False: _(" (iteration limit)")}.get(metrics.get("converged"), "")
            rows.append((_("Finetuning iterations"), "", f"{metrics['iterations']}{converged}"))
        if metrics.get("finetuning_declined"):
            rows.append((_("Finetuning"), "", _("network's own field kept (the tuned one matched the images no better)")))
        if "instance_optimisation" in metrics:
            optimisation = metrics["instance_optimisation"]
            text = _("off") if not optimisation else _("{levels} levels, {iterations} iterations, {seconds}").format(
                levels=optimisation.get("levels"), iterations=optimisation.get("iterations"),
                seconds=number(optimisation.get("seconds"), 1, " s"))
            similarity = {"nmi": "NMI", "nmi+mind": "NMI + MIND-SSC", "mind": "MIND-SSC"}.get(
                (optimisation or {}).get("similarity"))
            if similarity and (optimisation or {}).get("equalised"):
                similarity += _(" of the equalised CT intensities")
            if similarity and (optimisation or {}).get("bias_field"):
                similarity += _(" with a bias field")
            rows.append((_("Instance optimisation"), "", f"{text}, {similarity}" if similarity else text))
        if "seconds" in metrics:
            rows.append((_("Time"), "", number(metrics["seconds"], 1, " s")))
        if "device" in metrics:
            rows.append((_("Device"), "", str(metrics["device"])))
        return rows

    SAMPLE_NODE_NAMES = {"reference": "SAR sample reference PD", "floating": "SAR sample floating T1",
                         "reference_mask": "SAR sample reference ventricles",
                         "floating_mask": "SAR sample floating ventricles"}

    def loadSamplePair(self) -> dict:
        """Load the sample pair of the command line's ``register --sample``: BrainWeb proton density
        (reference), the T1 slice moved by a known B-spline (floating), and their ventricle label maps."""
        from SARRegistrationLib.sample import SAMPLE  # the one list, torch-free: loading the pair stays quick
        missing = [str(path) for path in SAMPLE.values() if not Path(path).is_file()]
        if missing:
            raise FileNotFoundError(_("The sample pair was not found: {files}.").format(files=", ".join(missing)))
        names = self.SAMPLE_NODE_NAMES
        return {
            "reference": slicer.util.loadVolume(str(SAMPLE["reference"]), {"name": names["reference"]}),
            "floating": slicer.util.loadVolume(str(SAMPLE["floating"]), {"name": names["floating"]}),
            "referenceStructure": slicer.util.loadLabelVolume(str(SAMPLE["reference_mask"]),
                                                              {"name": names["reference_mask"]}),
            "floatingStructure": slicer.util.loadLabelVolume(str(SAMPLE["floating_mask"]),
                                                             {"name": names["floating_mask"]}),
        }

    # ------------------------------------------------------------------ helpers of _prepare

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
    def _checkOutputNodes(referenceVolume, floatingVolume, warpedVolume, transform, inverseTransform,
                          jacobianVolume) -> None:
        for volume, what in ((warpedVolume, _("warped volume")), (jacobianVolume, _("Jacobian determinant"))):
            if volume is not None and volume in (referenceVolume, floatingVolume):
                raise ValueError(_("The {output} output must be a volume other than the inputs.").format(output=what))
        if warpedVolume is not None and warpedVolume == jacobianVolume:
            raise ValueError(_("The warped volume and the Jacobian determinant need two different volumes."))
        for node in (transform, inverseTransform):
            if node is not None and not (node.IsA("vtkMRMLGridTransformNode")
                                         or node.GetClassName() == "vtkMRMLTransformNode"):
                raise ValueError(_("The output transform '{name}' is a {kind}; choose a grid transform.").format(
                    name=node.GetName(), kind=node.GetClassName()))
        if transform is not None and transform == inverseTransform:
            raise ValueError(_("The transform and its inverse need two different transform nodes."))

    @staticmethod
    def _initialTransformMatrix(initialTransform, floatingVolume) -> np.ndarray:
        """The initial transform as a 4 x 4 RAS matrix (to world), or the identity without one."""
        if initialTransform is None:
            return np.eye(4)
        if not initialTransform.IsTransformToWorldLinear():
            raise ValueError(_("The initial transform '{name}' is not linear. Give a linear (rigid or affine) "
                               "transform, or harden a non-linear one on the floating volume first.").format(
                                 name=initialTransform.GetName()))
        parent = floatingVolume.GetParentTransformNode()
        while parent is not None:
            if parent == initialTransform:
                raise ValueError(_("The initial transform '{name}' already moves the floating volume (it is one of "
                                   "its parent transforms), so it would be applied twice. Leave the initial "
                                   "transform empty.").format(name=initialTransform.GetName()))
            parent = parent.GetParentTransformNode()
        matrix = vtk.vtkMatrix4x4()
        initialTransform.GetMatrixTransformToWorld(matrix)
        return slicer.util.arrayFromVTKMatrix(matrix)

    @staticmethod
    def _landmarks(referenceLandmarks, floatingLandmarks):
        """The two point lists as ``(N, 3)`` RAS world arrays, or None when neither is given."""
        if referenceLandmarks is None and floatingLandmarks is None:
            return None
        if referenceLandmarks is None or floatingLandmarks is None:
            raise ValueError(_("Give a landmark point list for both volumes, or for neither."))
        points = [slicer.util.arrayFromMarkupsControlPoints(node, world=True) for node in
                  (referenceLandmarks, floatingLandmarks)]
        counts = [len(p) for p in points]
        if counts[0] != counts[1] or counts[0] == 0:
            raise ValueError(_("The landmark lists '{reference}' and '{floating}' must hold the same landmarks in "
                               "the same order; they have {referenceCount} and {floatingCount} points.").format(
                                 reference=referenceLandmarks.GetName(), floating=floatingLandmarks.GetName(),
                                 referenceCount=counts[0], floatingCount=counts[1]))
        return tuple(np.asarray(p, dtype=float) for p in points)

    @staticmethod
    def _registrationGrids(referenceVolume, floatingVolume, floatingGrid: _VolumeGrid):
        """The two volumes' grids; for a single-slice pair, both in the reference slice's plane."""
        referenceGrid = _VolumeGrid.ofVolume(referenceVolume)
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
                structures.append(_Structure(name, color, (labels == label).astype(np.uint8), int(label)))
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
    def _structureMasks(run: _PreparedRun):
        """The engine's structure masks of both images, and the names of their labels.

        Two or more segments named alike in both structures (left lung, right lung), or labels of
        the same value in two label map nodes (whose names come from their colour tables, which
        may differ), go to the engine as label maps, label ``k + 1`` the ``k``-th of them in the
        reference's order, so that each is measured on its own; otherwise, or where a structure's
        segments overlap (a label map cannot hold a voxel twice), every segment together. Returns
        ``(reference, floating, names)``: the reference's names of the labels, empty for the union."""
        structureGrids = (run.referenceGrid, run.floatingGrid)
        structures = (run.referenceStructures, run.floatingStructures)
        byValue = all(structure.label is not None for each in structures for structure in each)
        keys = [[structure.label if byValue else structure.name for structure in each] for each in structures]
        counts = [collections.Counter(each) for each in keys]
        shared = [key for key, count in counts[0].items() if count == 1 and counts[1][key] == 1]
        byKey = [dict(zip(each, (structure.mask for structure in group))) for each, group in zip(keys, structures)]
        if len(shared) < 2 or any(
                np.sum([masks[key] for key in shared], axis=0, dtype=np.int32).max() > 1 for masks in byKey):
            return SARRegistrationLogic._union(structures[0], structureGrids[0]), \
                SARRegistrationLogic._union(structures[1], structureGrids[1]), []
        labelMaps = [grid.sitkImage(np.sum([(k + 1) * masks[key] for k, key in enumerate(shared)], axis=0,
                                           dtype=np.uint16)) for masks, grid in zip(byKey, structureGrids)]
        names = dict(zip(keys[0], (structure.name for structure in structures[0])))
        names = [names[key] for key in shared]
        if len(set(names)) < len(names):  # a colour table that names two labels alike: the values tell them apart
            names = [f"{name} ({key})" for name, key in zip(names, shared)]
        return labelMaps[0], labelMaps[1], names

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
            while len(self._models) >= self.MAX_CACHED_MODELS:
                self._models.pop(next(iter(self._models)))
            self._models[key] = model
        return self._models[key]

    # ------------------------------------------------------------------ building outputs

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
    def _setGridTransform(transformNode, scene, name: str, gridTransform):
        """``gridTransform`` as the transform from parent of ``transformNode`` (created when None)."""
        if transformNode is None:
            transformNode = SARRegistrationLogic._newNode(scene, "vtkMRMLGridTransformNode", name)
        transformNode.SetAndObserveTransformNodeID(None)
        transformNode.SetAndObserveTransformFromParent(gridTransform)
        return transformNode

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
        self.setUp()
        self.test_backgroundRunWritesOnTheMainThread()

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
                                device="cpu", network=True, maxIterations=20, optimisationIterations=10,
                                model=self.model,
                                computeInverse=True, computeJacobian=True,
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
        self.assertIsNotNone(result.inverseTransform)
        self.assertEqual(result.jacobianVolume.GetImageData().GetDimensions(),
                         reference.GetImageData().GetDimensions())
        self.assertIn('"settings"', result.warpedVolume.GetAttribute(RUN_RECORD_ATTRIBUTE))
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

    def test_backgroundRunWritesOnTheMainThread(self):
        logic = SARRegistrationLogic()
        sample = logic.loadSamplePair()
        run = logic.startRegistration(sample["reference"], sample["floating"], device="cpu", finetune=False,
                                      instanceOptimisation=False, model=self.model)
        with self.assertRaises(RuntimeError):  # one run at a time
            logic.startRegistration(sample["reference"], sample["floating"], model=self.model)
        self.assertTrue(run.wait(timeout=300))
        self.assertIs(run.state, RunState.SUCCEEDED, run.traceback)
        self.assertIsNotNone(run.result.warpedVolume.GetScene())
        self.delayDisplay("Test passed")

    @staticmethod
    def _sampleOnGrid(volumeNode, gridVolumeNode) -> np.ndarray:
        """Voxels of ``volumeNode`` at the voxel centres of ``gridVolumeNode`` (linear interpolation)."""
        import SimpleITK as sitk

        image = SARRegistrationLogic.sitkImageFromVolume(volumeNode)
        grid = SARRegistrationLogic.sitkImageFromVolume(gridVolumeNode)
        return sitk.GetArrayFromImage(sitk.Resample(image, grid, sitk.Transform(), sitk.sitkLinear, 0.0,
                                                    sitk.sitkFloat32))
