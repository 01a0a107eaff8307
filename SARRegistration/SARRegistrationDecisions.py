"""What the panel decides, as plain functions of plain values (no ``slicer``, ``qt`` or ``vtk``).

The widget gathers the facts (which volumes are picked, their voxel counts, whether PyTorch sees a
GPU) and applies the answers to its widgets; the decisions themselves are here, where tests call
them directly: when Register may be pressed, which devices are offered, what the presets set, and
how much memory a run will need.
"""

from __future__ import annotations

from dataclasses import dataclass

# Presets up front; "custom" is what the settings are when they match neither. "accurate" is the
# engine's defaults (SARRegistrationLib.register, OptimisationSettings), so a run with the default
# preset gives the command line's result; "fast" trades iterations for time.
# The panel's instance-optimisation iterations of 0 ("Auto") leave the engine's default of the
# images' dimension (OptimisationSettings.for_dimension).
AUTO_ITERATIONS = 0
PRESETS = {
    "accurate": {"finetune": True, "maxIterations": 100, "instanceOptimisation": True,
                 "optimisationIterations": AUTO_ITERATIONS, "optimisationLevels": 3},
    "fast": {"finetune": True, "maxIterations": 30, "instanceOptimisation": True,
             "optimisationIterations": 15, "optimisationLevels": 2},
}
CUSTOM_PRESET = "custom"

# Peak memory of the engine per reference voxel, measured on 512 x 512 x 300 and 256 x 256 x 100
# volumes (README, "Large volumes": about 80 bytes, the field alone 24).
ENGINE_BYTES_PER_VOXEL = 80
# The module's own copies per reference voxel: the field in RAS (float64 x 3) and the grid
# transform's copy of it, the warped volume's voxels (float32), the SAR mask (uint8).
MODULE_BYTES_PER_VOXEL = 24 + 24 + 4 + 1
# The inverse field: SimpleITK's inversion holds about three fields while it iterates, then the
# RAS copy and the grid transform's; the Jacobian: its float32 image and the volume's copy.
INVERSE_BYTES_PER_VOXEL = 3 * 24 + 24 + 24
JACOBIAN_BYTES_PER_VOXEL = 4 + 4
# Warn before a run whose estimate passes this share of the computer's memory.
MEMORY_WARNING_FRACTION = 0.7


@dataclass
class InputFacts:
    """What the panel knows about the chosen inputs, read from the scene (no voxels)."""

    referenceShape: tuple | None  # k, j, i voxel counts; None when no reference is picked
    floatingShape: tuple | None
    sameVolume: bool = False
    mode: str = "auto"  # "auto", "volume" or "slicewise"
    network: bool | None = None  # None: the engine's default, the network only with a weights file
    instanceOptimisation: bool = True
    weightsPath: str = ""  # empty: the shipped weights
    weightsPathExists: bool = True
    shipped3DWeights: bool = False  # whether 3D weights ship with the module
    running: bool = False


def isSingleSlice(shape) -> bool:
    return shape is not None and sum(n == 1 for n in shape) == 1


def registerButtonState(facts: InputFacts) -> tuple[bool, str]:
    """Whether Register may be pressed, and the tooltip that says why (not)."""
    if facts.running:
        return False, "A registration is running: wait for it, or cancel it."
    if facts.referenceShape is None or facts.floatingShape is None:
        return False, "Select the reference and the floating volume."
    if facts.sameVolume:
        return False, "The reference and the floating volume must be different volumes."
    for shape in (facts.referenceShape, facts.floatingShape):
        if 0 in shape:
            return False, "A selected volume has no voxels."
        if sum(n == 1 for n in shape) > 1:
            return False, "A selected volume is a line or a point of voxels; SAR registers images and volumes."
    if isSingleSlice(facts.referenceShape) != isSingleSlice(facts.floatingShape):
        return False, "One volume is a single slice and the other is 3D: pick two 3D volumes or two slices."
    network = bool(facts.weightsPath) if facts.network is None else facts.network
    if not network and not facts.instanceOptimisation:
        return False, "Turn on the network or instance optimisation (Advanced): nothing would register."
    if network and facts.weightsPath and not facts.weightsPathExists:
        return False, f"The weights file '{facts.weightsPath}' does not exist."
    volumeMode = facts.mode == "volume" and not isSingleSlice(facts.referenceShape)
    if network and volumeMode and not facts.weightsPath and not facts.shipped3DWeights:
        return False, ("Full-volume registration needs a 3D weights file and none is shipped: give one "
                       "(Advanced), or choose Automatic or Slice by slice.")
    return True, "Register the floating volume onto the reference volume."


@dataclass
class DeviceChoice:
    device: str  # "auto", "cuda" or "cpu"
    enabled: bool
    tooltip: str


def deviceChoices(cudaAvailable: bool | None) -> list[DeviceChoice]:
    """The device menu: the GPU only when PyTorch sees one (``None``: not known yet)."""
    if cudaAvailable is None:
        gpu = DeviceChoice("cuda", False, "Not known yet: PyTorch has not been installed or looked at.")
    elif cudaAvailable:
        gpu = DeviceChoice("cuda", True, "The CUDA GPU PyTorch sees.")
    else:
        gpu = DeviceChoice("cuda", False, "PyTorch sees no CUDA GPU on this computer.")
    return [DeviceChoice("auto", True, "The GPU when PyTorch sees one (and the CPU if it runs out of memory), "
                                       "else the CPU."),
            gpu, DeviceChoice("cpu", True, "The CPU: slower, but never out of GPU memory.")]


def deviceAfterProbe(chosen: str, cudaAvailable: bool | None) -> str:
    """The device to keep once PyTorch has been looked at: a GPU choice without a GPU becomes auto."""
    return "auto" if chosen == "cuda" and cudaAvailable is False else chosen


def engineIterations(panelValue: int) -> int | None:
    """The engine's ``optimisation_iterations`` for the panel's value: None (its default) for "Auto"."""
    return None if panelValue == AUTO_ITERATIONS else panelValue


def presetSettings(preset: str) -> dict:
    """The settings a preset sets (a copy); ``custom`` sets none."""
    return dict(PRESETS.get(preset, {}))


def matchingPreset(settings: dict) -> str:
    """The preset whose every setting ``settings`` has, else ``custom``."""
    for name, values in PRESETS.items():
        if all(settings.get(key) == value for key, value in values.items()):
            return name
    return CUSTOM_PRESET


def estimatedMemoryBytes(referenceVoxels: int, floatingVoxels: int, floatingBytesPerVoxel: int = 4,
                         inverse: bool = False, jacobian: bool = False) -> int:
    """The peak memory a run is expected to take, in bytes (an estimate, not a bound).

    The engine's share is its measured peak per reference voxel; the module adds its own copies of
    the outputs and the floating volume's voxels handed to the engine.
    """
    perVoxel = ENGINE_BYTES_PER_VOXEL + MODULE_BYTES_PER_VOXEL
    perVoxel += INVERSE_BYTES_PER_VOXEL if inverse else 0
    perVoxel += JACOBIAN_BYTES_PER_VOXEL if jacobian else 0
    return int(referenceVoxels * perVoxel + floatingVoxels * floatingBytesPerVoxel)


def memoryWarning(estimateBytes: int, totalBytes: int | None) -> str | None:
    """A question to ask before starting when the run may not fit in memory, else None."""
    if totalBytes is None or estimateBytes <= MEMORY_WARNING_FRACTION * totalBytes:
        return None
    return (f"This registration may need about {estimateBytes / 2**30:.1f} GiB of memory and this computer has "
            f"{totalBytes / 2**30:.1f} GiB. Slicer may become very slow or stop. Continue?")
