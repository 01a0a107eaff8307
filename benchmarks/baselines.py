"""The registration methods of the brain benchmark, each behind one small interface.

Every method turns a :class:`Pair` (reference and floating image, SimpleITK, same physical space)
into a :class:`MethodOutput`: its displacement field **on the reference grid, in millimetres, ITK
convention** (reference point ``p`` maps to ``p + d(p)`` in the floating image: what SAR's
``displacement.nrrd``, Elastix's, ANTs' and Greedy's composed fields all are; ConvexAdam's voxel
field is converted) and the wall-clock seconds of its registration call. The benchmark then warps
every method's floating mask with SimpleITK through that field and measures it with the same code,
so all methods are measured identically. ``convention_check.py`` checks each conversion on a
known translation and a known rigid motion.

What each method times (``time.perf_counter``, same process):

- SAR: the whole :func:`SARRegistrationLib.register` call (working-grid resampling, network,
  finetuning, instance optimisation, field back on the reference grid). The model is loaded
  beforehand, untimed.
- VoxelMorph: the same scope as SAR: resampling to the same working grid, the network's forward
  pass, the field back on the reference grid. The network is loaded beforehand, untimed.
- Elastix: the ``itk.elastix_registration_method`` call.
- ANTs: the ``ants.registration`` call.
- Greedy: its rigid and its deformable ``execute`` calls (not the composition of the two into one
  field).
- ConvexAdam: resampling both images onto its isotropic grid and the ``convex_adam_pt`` call.

The optional packages (``itk-elastix``, ``antspyx``, ``voxelmorph``, ``picsl-greedy``,
``convexadam``) are imported only when their method is prepared; a missing one raises
:class:`NotRun`, which the benchmark reports as a row "not run: <package> not installed". Missing
weights do the same ("not run: weights missing"), and so does an engine whose ``register`` lacks
a keyword a SAR row needs.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from SARRegistrationLib import grids
from SARRegistrationLib.fields import displacement_to_sitk

REPO = Path(__file__).resolve().parents[1]
VOXELMORPH_FORMAT = "sar-benchmark-voxelmorph"
# The shape_multiple of SAR's shipped generators: VoxelMorph registers on the grid they use.
SAR_GRID_MULTIPLE = 8


class NotRun(Exception):
    """The method cannot run here (package or weights missing); the message says why."""


def require(module: str, package: str):
    """Import ``module`` or raise :class:`NotRun` naming the pip ``package`` that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise NotRun(f"{package} not installed") from None


def display_path(path) -> str:
    if path is None:
        return "none given"
    path = Path(path)
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


@dataclass
class Pair:
    """One registration problem with a known answer: the floating image is a known deformation."""

    dataset: str  # the group's name, e.g. "2D T1->PD"
    index: int
    reference: sitk.Image
    floating: sitk.Image
    reference_mask: sitk.Image  # uint8 0/1, on the reference grid
    floating_mask: sitk.Image  # uint8 0/1, on the floating grid


@dataclass
class MethodOutput:
    displacement: sitk.Image  # vector float64, mm, physical (LPS) components, on the reference grid
    seconds: float | None  # wall clock of the registration call; None for "before"
    extras: dict = field(default_factory=dict)


def identity_field(reference: sitk.Image) -> sitk.Image:
    field_image = sitk.Image(reference.GetSize(), sitk.sitkVectorFloat64, reference.GetDimension())
    field_image.CopyInformation(reference)
    return field_image


def field_on_reference(field_image: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """A displacement field (any grid covering the reference) as float64 vectors on the reference grid."""
    field_image = sitk.Cast(field_image, sitk.sitkVectorFloat64)
    same_grid = (field_image.GetSize() == reference.GetSize()
                 and np.allclose(field_image.GetOrigin(), reference.GetOrigin(), atol=1e-4)
                 and np.allclose(field_image.GetSpacing(), reference.GetSpacing(), atol=1e-6)
                 and np.allclose(field_image.GetDirection(), reference.GetDirection(), atol=1e-6))
    if same_grid:
        field_image.CopyInformation(reference)
        return field_image
    return sitk.Resample(field_image, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64, True)


class Method:
    """A benchmark row: ``prepare()`` once (may raise :class:`NotRun`), then ``run(pair)`` per pair."""

    key = "method"
    label = "method"

    def prepare(self) -> None:
        pass

    def run(self, pair: Pair) -> MethodOutput:
        raise NotImplementedError

    # The attributes that bound a run's iterations and the small values a warm-up needs.
    warm_up_settings: dict = {}

    def warm_up(self, pair: Pair) -> None:
        """An untimed run on a small pair so that one-time costs (lazy imports, first kernels) are
        not charged to the first timed pair; with ``warm_up_settings``, a run of few iterations."""
        saved = {name: getattr(self, name) for name in self.warm_up_settings}
        for name, quick in self.warm_up_settings.items():
            setattr(self, name, quick)
        try:
            self.run(pair)
        finally:
            for name, value in saved.items():
                setattr(self, name, value)

    def settings(self) -> dict:
        return {}


class Before(Method):
    """No registration: the identity field."""

    key, label = "before", "before (no registration)"

    def run(self, pair: Pair) -> MethodOutput:
        return MethodOutput(identity_field(pair.reference), None)

    def warm_up(self, pair: Pair) -> None:
        pass


class SARMethod(Method):
    """SAR through :func:`SARRegistrationLib.register`, one row per combination of its stages.

    ``network`` (the trained network's field), ``finetune`` (last-layer finetuning, paper §2.3) and
    ``instance_optimisation`` (a residual field optimised per pair) are passed to ``register`` as
    they are, so each ablation row is this one class with other switches. ``network=False`` needs
    no weights (``weights=None``). If ``register`` lacks a keyword a row passes, :meth:`prepare`
    raises :class:`NotRun` naming it.
    """

    warm_up_settings = {"max_iterations": 2, "optimisation_iterations": 2}

    def __init__(self, key: str, label: str, weights, ndims: int, *, finetune: bool = True,
                 instance_optimisation: bool = True, network: bool = True, mode: str = "auto",
                 max_iterations: int = 100, optimisation_iterations: int | None = None, device: str = "auto",
                 similarity: str | None = None, bias_field: bool | None = None):
        self.key, self.label = key, label
        self.similarity = similarity  # instance optimisation's image similarity; None: the engine's default
        self.bias_field = bias_field  # whether it estimates a bias field; None: the engine's default
        self.weights = None if weights is None else Path(weights)
        self.ndims, self.mode = ndims, mode
        self.network, self.finetune, self.instance_optimisation = network, finetune and network, instance_optimisation
        self.max_iterations, self.optimisation_iterations, self.device = max_iterations, optimisation_iterations, device
        self.model = None

    def _keywords(self) -> dict:
        keywords = {"mode": self.mode, "device": self.device, "finetune": self.finetune,
                    "max_iterations": self.max_iterations, "instance_optimisation": self.instance_optimisation,
                    "network": self.network}
        if self.optimisation_iterations is not None:
            keywords["optimisation_iterations"] = self.optimisation_iterations
        if self.similarity is not None:
            keywords["optimisation_similarity"] = self.similarity
        if self.bias_field is not None:
            keywords["optimisation_bias_field"] = self.bias_field
        return keywords

    def prepare(self) -> None:
        from SARRegistrationLib.devices import resolve_device
        from SARRegistrationLib.model import load_model
        from SARRegistrationLib.registration import register

        accepted = inspect.signature(register).parameters
        missing = [name for name in self._keywords() if name not in accepted]
        if missing:
            raise NotRun(f"this engine's register() has no {', '.join(missing)} keyword")
        self.device = resolve_device(self.device)
        if not self.network:
            return
        if self.weights is None or not self.weights.is_file():
            raise NotRun(f"weights missing ({display_path(self.weights)})")
        self.model = load_model(self.weights, self.ndims, self.device)

    def run(self, pair: Pair) -> MethodOutput:
        from SARRegistrationLib.registration import register

        started = time.perf_counter()
        result = register(pair.reference, pair.floating, self.model, **self._keywords())
        seconds = time.perf_counter() - started
        extras = {name: result.metrics[name] for name in ("mode", "iterations", "converged", "instance_optimisation",
                                                           "stage_seconds") if name in result.metrics}
        return MethodOutput(result.displacement, seconds, extras)

    def settings(self) -> dict:
        settings = {"weights": display_path(self.weights) if self.network else None, "network": self.network,
                    "finetune": self.finetune, "instance_optimisation": self.instance_optimisation, "mode": self.mode,
                    "max_iterations": self.max_iterations if self.finetune else 0}
        if self.instance_optimisation:
            settings["optimisation_iterations"] = self.optimisation_iterations or "engine default"
            settings["optimisation_similarity"] = self.similarity or "engine default"
            settings["optimisation_bias_field"] = "engine default" if self.bias_field is None else self.bias_field
        return settings


# ---------------------------------------------------------------------------------------------
# Elastix (itk-elastix)


def _to_itk(itk, image: sitk.Image):
    """A SimpleITK image as a float32 ITK image with the same geometry."""
    ndims = image.GetDimension()
    converted = itk.image_from_array(np.ascontiguousarray(sitk.GetArrayFromImage(image).astype(np.float32)))
    converted.SetOrigin(image.GetOrigin())
    converted.SetSpacing(image.GetSpacing())
    converted.SetDirection(itk.matrix_from_array(np.array(image.GetDirection(), dtype=np.float64).reshape(ndims, ndims)))
    return converted


def _from_itk(itk, image, vector: bool = False) -> sitk.Image:
    array = itk.array_from_image(image)
    converted = sitk.GetImageFromArray(array.astype(np.float64) if vector else array, isVector=vector)
    ndims = image.GetImageDimension()
    converted.SetOrigin(tuple(float(v) for v in image.GetOrigin()))
    converted.SetSpacing(tuple(float(v) for v in image.GetSpacing()))
    converted.SetDirection(tuple(itk.array_from_matrix(image.GetDirection()).reshape(ndims * ndims).tolist()))
    return converted


class ElastixBSpline(Method):
    """Elastix's default multi-resolution B-spline registration with Advanced Mattes mutual information.

    The parameter map is ``GetDefaultParameterMap("bspline", resolutions, grid_spacing_mm)``:
    AdvancedMattesMutualInformation plus a bending-energy penalty, adaptive stochastic gradient
    descent, a smoothing pyramid, random coordinate sampling. The floating mask is also warped
    natively by transformix with ``FinalBSplineInterpolationOrder 0`` (nearest neighbour); its Dice
    with the SimpleITK-warped mask is kept as a check of the field conversion.
    """

    key, label = "elastix", "Elastix B-spline (MI)"

    warm_up_settings = {"iterations": 2}

    def __init__(self, *, grid_spacing_mm: float = 10.0, resolutions: int = 4, iterations: int = 256,
                 threads: int | None = None, seed: int = 0):
        self.grid_spacing_mm, self.resolutions, self.iterations = grid_spacing_mm, resolutions, iterations
        self.threads, self.seed = threads, seed
        self.itk = None

    def prepare(self) -> None:
        self.itk = require("itk", "itk-elastix")
        if not hasattr(self.itk, "elastix_registration_method"):
            raise NotRun("itk-elastix not installed (itk is, without elastix)")

    def _parameters(self):
        parameters = self.itk.ParameterObject.New()
        parameter_map = parameters.GetDefaultParameterMap("bspline", self.resolutions, float(self.grid_spacing_mm))
        parameter_map["MaximumNumberOfIterations"] = [str(self.iterations)]
        parameter_map["RandomSeed"] = [str(self.seed)]
        parameters.AddParameterMap(parameter_map)
        return parameters

    def run(self, pair: Pair) -> MethodOutput:
        itk = self.itk
        fixed, moving = _to_itk(itk, pair.reference), _to_itk(itk, pair.floating)
        parameters = self._parameters()
        options = {"parameter_object": parameters, "log_to_console": False}
        if self.threads:
            options["number_of_threads"] = int(self.threads)
        # transformix writes deformationField.nii into its output directory (the working
        # directory by default): keep it in a temporary folder.
        with tempfile.TemporaryDirectory(prefix="sar-bench-elastix-") as folder:
            started = time.perf_counter()
            _, transform_parameters = itk.elastix_registration_method(fixed, moving, **options)
            seconds = time.perf_counter() - started
            deformation = itk.transformix_deformation_field(moving, transform_parameters, output_directory=folder)
            field_mm = field_on_reference(_from_itk(itk, deformation, vector=True), pair.reference)
            # transformix's own nearest-neighbour warp of the mask, to cross-check the field
            transform_parameters.SetParameter("FinalBSplineInterpolationOrder", "0")
            native = _from_itk(itk, itk.transformix_filter(_to_itk(itk, pair.floating_mask), transform_parameters,
                                                           output_directory=folder))
        return MethodOutput(field_mm, seconds, {"native_mask": sitk.Cast(native > 0.5, sitk.sitkUInt8)})

    def settings(self) -> dict:
        return {"parameter_map": "default 'bspline' (AdvancedMattesMutualInformation + TransformBendingEnergyPenalty)",
                "final_grid_spacing_mm": self.grid_spacing_mm, "resolutions": self.resolutions,
                "iterations_per_resolution": self.iterations, "random_seed": self.seed}


# ---------------------------------------------------------------------------------------------
# ANTs (antspyx)


class AntsSyN(Method):
    """``ants.registration(type_of_transform="SyN")``: affine then SyN, both with Mattes mutual information.

    Images go to ANTs through NRRD files in a temporary folder (geometry preserved exactly; not
    timed). The forward transforms are composed into one displacement field by
    ``ants.apply_transforms(compose=...)``; the floating mask is also warped natively with
    ``interpolator="nearestNeighbor"`` to cross-check that field.
    """

    key, label = "ants", "ANTs SyN (MI)"

    warm_up_settings = {"reg_iterations": (2, 0, 0)}

    def __init__(self, *, reg_iterations=(40, 20, 0), seed: int = 0):
        self.reg_iterations = tuple(int(n) for n in reg_iterations)
        self.seed = seed
        self.ants = None

    def prepare(self) -> None:
        self.ants = require("ants", "antspyx")

    def run(self, pair: Pair) -> MethodOutput:
        ants = self.ants
        config = getattr(ants, "config", None)
        if config is not None and hasattr(config, "_random_seed"):
            config._random_seed = self.seed  # antspyx passes it to antsRegistration as --random-seed
        with tempfile.TemporaryDirectory(prefix="sar-bench-ants-") as folder:
            folder = Path(folder)
            paths = {}
            for name, image in (("fixed", sitk.Cast(pair.reference, sitk.sitkFloat32)),
                                ("moving", sitk.Cast(pair.floating, sitk.sitkFloat32)),
                                ("moving_mask", sitk.Cast(pair.floating_mask, sitk.sitkFloat32))):
                paths[name] = folder / f"{name}.nrrd"
                sitk.WriteImage(image, str(paths[name]))
            fixed, moving = ants.image_read(str(paths["fixed"])), ants.image_read(str(paths["moving"]))
            started = time.perf_counter()
            registration = ants.registration(fixed, moving, type_of_transform="SyN", aff_metric="mattes",
                                             syn_metric="mattes", reg_iterations=self.reg_iterations,
                                             outprefix=str(folder / "ants_"), verbose=False)
            seconds = time.perf_counter() - started
            composed = ants.apply_transforms(fixed, moving, transformlist=registration["fwdtransforms"],
                                             compose=str(folder / "composed_"))
            field_mm = field_on_reference(sitk.ReadImage(str(composed), sitk.sitkVectorFloat64), pair.reference)
            native = ants.apply_transforms(fixed, ants.image_read(str(paths["moving_mask"])),
                                           transformlist=registration["fwdtransforms"], interpolator="nearestNeighbor")
            ants.image_write(native, str(folder / "native_mask.nrrd"))
            native_mask = sitk.Cast(sitk.ReadImage(str(folder / "native_mask.nrrd")) > 0.5, sitk.sitkUInt8)
        return MethodOutput(field_mm, seconds, {"native_mask": native_mask})

    def settings(self) -> dict:
        return {"type_of_transform": "SyN", "aff_metric": "mattes", "syn_metric": "mattes",
                "reg_iterations": list(self.reg_iterations), "random_seed": self.seed}


# ---------------------------------------------------------------------------------------------
# Greedy (picsl-greedy)


@contextlib.contextmanager
def _native_output_silenced():
    """Send the process's own stdout and stderr (file descriptors 1 and 2) to /dev/null for a while:
    Greedy's optimiser (vnl's L-BFGS) prints messages from C even at ``-V 0``, past Python's streams."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 1)
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for descriptor in saved:
                os.close(descriptor)


class GreedyMethod(Method):
    """Greedy's standard two-stage pipeline: a rigid alignment, then greedy diffeomorphic registration.

    ``-a -dof 6 -n 100x50x10`` (initialised from the image headers, which here share one physical
    space; rigid because the benchmark's motions have no scaling or shear), then ``-it <rigid>
    -n 100x50x10 -s 2vox 1vox``, both with ``metric``: ``"NCC"`` (radius 2 voxels per axis, Greedy's
    documented choice within one contrast) or ``"NMI"`` (across contrasts). Greedy's reslicer
    composes the warp and the rigid matrix (``-r warp affine -rc``) into one ITK displacement field
    on the reference grid (LPS millimetres, ``p -> p + d(p)``, checked by ``convention_check.py``;
    Greedy's matrices are RAS, its warps LPS). Images pass to Greedy in memory as SimpleITK images;
    ``-seed`` is ``seed + 1`` because Greedy's ``-seed 0`` means "random". The floating mask is also
    resliced natively (``-ri NN``) to cross-check the field.
    """

    key = "greedy"

    warm_up_settings = {"iterations": "2x1x1"}

    def __init__(self, *, metric: str = "NMI", iterations: str = "100x50x10", smoothing: str = "2vox 1vox",
                 threads: int | None = None, seed: int = 0):
        if metric not in ("NMI", "NCC"):
            raise ValueError(f"metric must be 'NMI' or 'NCC', got {metric!r}")
        self.metric, self.iterations, self.smoothing, self.threads, self.seed = metric, iterations, smoothing, threads, seed
        self.label = f"Greedy ({metric})"
        self.greedy = None

    def prepare(self) -> None:
        self.greedy = require("picsl_greedy", "picsl-greedy")

    def _metric(self, ndims: int) -> str:
        return "-m NMI" if self.metric == "NMI" else "-m NCC " + "x".join(["2"] * ndims)

    def run(self, pair: Pair) -> MethodOutput:
        ndims = pair.reference.GetDimension()
        greedy = getattr(self.greedy, f"Greedy{ndims}D")()
        common = f"-d {ndims} -V 0 -seed {self.seed + 1}" + (f" -threads {int(self.threads)}" if self.threads else "")
        metric = self._metric(ndims)
        images = {"fixed": sitk.Cast(pair.reference, sitk.sitkFloat32),
                  "moving": sitk.Cast(pair.floating, sitk.sitkFloat32)}
        with _native_output_silenced(), open(os.devnull, "w") as quiet:
            started = time.perf_counter()
            greedy.execute(f"{common} -i fixed moving -a -dof 6 {metric} -n {self.iterations} -o affine",
                           out=quiet, err=quiet, affine=None, **images)
            greedy.execute(f"{common} -i fixed moving -it affine {metric} -n {self.iterations} -s {self.smoothing} "
                           f"-wp 0 -o warp", out=quiet, err=quiet, warp=None)
            seconds = time.perf_counter() - started
            greedy.execute(f"{common} -rf fixed -r warp affine -rc composed", out=quiet, err=quiet, composed=None)
            greedy.execute(f"{common} -rf fixed -ri NN -rm moving_mask native_mask -r warp affine", out=quiet,
                           err=quiet, moving_mask=sitk.Cast(pair.floating_mask, sitk.sitkFloat32), native_mask=None)
        field_mm = field_on_reference(greedy["composed"], pair.reference)
        native = sitk.Cast(greedy["native_mask"] > 0.5, sitk.sitkUInt8)
        return MethodOutput(field_mm, seconds, {"native_mask": native})

    def settings(self) -> dict:
        metric = self._metric(2).replace("2x2", "2x2[x2]")
        return {"rigid": f"-a -dof 6 {metric} -n {self.iterations}",
                "deformable": f"{metric} -n {self.iterations} -s {self.smoothing}", "seed": self.seed + 1}


# ---------------------------------------------------------------------------------------------
# ConvexAdam (convexadam)


def isotropic_grid(image: sitk.Image, spacing_mm: float, multiple: int) -> sitk.Image:
    """An empty float32 grid over ``image``'s extent (same corner and direction), ``spacing_mm``
    isotropic, each size rounded up to a multiple of ``multiple`` (the extra voxels lie beyond
    the far corner)."""
    ndims = image.GetDimension()
    extent = np.array(image.GetSize()) * np.array(image.GetSpacing())
    size = [int(math.ceil(length / spacing_mm / multiple - 1e-6)) * multiple for length in extent]
    grid = sitk.Image(size, sitk.sitkFloat32)
    direction = np.array(image.GetDirection()).reshape(ndims, ndims)
    corner = np.array(image.TransformContinuousIndexToPhysicalPoint([-0.5] * ndims))
    grid.SetSpacing([spacing_mm] * ndims)
    grid.SetDirection(image.GetDirection())
    grid.SetOrigin((corner + direction @ np.full(ndims, spacing_mm / 2)).tolist())
    return grid


class ConvexAdamMethod(Method):
    """ConvexAdam with MIND-SSC features (``convexAdam.convex_adam_MIND.convex_adam_pt``), 3D only.

    As the package's own tests do, both images are resampled (linear) onto one isotropic grid, here
    at the reference's finest spacing with sizes rounded up to a multiple of ``grid_sp`` (6), which
    its coarse grid needs; every other parameter is the package default (MIND radius 1, dilation
    2, λ 1.25, grid_sp 6, disp_hw 4, 80 Adam iterations, grid_sp_adam 2, inverse consistency on).
    Its field is in voxels of that grid, numpy axis order, pulling back (``apply_convex`` samples
    ``moving`` at ``x + d(x)``): :func:`displacement_to_sitk` turns it into millimetres there, and
    it is resampled onto the reference grid. float32 and the benchmark's torch device.
    """

    key, label = "convexadam", "ConvexAdam (MIND-SSC)"

    warm_up_settings = {"iterations": 2}
    grid_spacing_voxels = 6  # convex_adam_pt's default grid_sp

    def __init__(self, *, iterations: int = 80, device: str = "auto"):
        self.iterations, self.device = iterations, device
        self.convex_adam_pt = None

    def prepare(self) -> None:
        from SARRegistrationLib.devices import resolve_device

        self.convex_adam_pt = require("convexAdam.convex_adam_MIND", "convexadam").convex_adam_pt
        self.device = resolve_device(self.device)

    def run(self, pair: Pair) -> MethodOutput:
        import torch

        if pair.reference.GetDimension() != 3:
            raise NotRun("ConvexAdam registers 3D volumes only")
        started = time.perf_counter()
        grid = isotropic_grid(pair.reference, min(pair.reference.GetSpacing()), self.grid_spacing_voxels)
        fixed, moving = (sitk.Resample(image, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
                         for image in (pair.reference, pair.floating))
        displacement = self.convex_adam_pt(fixed, moving, grid_sp=self.grid_spacing_voxels,
                                           selected_niter=self.iterations, dtype=torch.float32, device=self.device)
        seconds = time.perf_counter() - started
        field_mm = displacement_to_sitk(np.moveaxis(displacement, -1, 0), grid)
        return MethodOutput(field_on_reference(field_mm, pair.reference), seconds)

    def settings(self) -> dict:
        return {"function": "convexAdam.convex_adam_MIND.convex_adam_pt", "features": "MIND-SSC",
                "grid": "isotropic at the reference's finest spacing", "grid_sp": self.grid_spacing_voxels,
                "selected_niter": self.iterations, "other parameters": "package defaults", "dtype": "float32"}


# ---------------------------------------------------------------------------------------------
# VoxelMorph (voxelmorph 0.3.x, PyTorch)


def build_voxelmorph(config: dict):
    """A ``voxelmorph.nn.models.VxmPairwise`` (U-Net + scaling-and-squaring) from a config dict."""
    vxm = require("voxelmorph", "voxelmorph")
    return vxm.nn.models.VxmPairwise(ndim=int(config["ndims"]), source_channels=1, target_channels=1,
                                     nb_features=list(config["nb_features"]),
                                     integration_steps=int(config["integration_steps"]))


def pad_multiple(config: dict) -> int:
    """neurite's BasicUNet pools once per entry of ``nb_features``: inputs must be multiples of this."""
    return 2 ** len(config["nb_features"])


def voxelmorph_forward(model, floating, reference, multiple: int):
    """``(displacement, velocity, warped floating)`` for ``(B, 1, *spatial)`` tensors of any size.

    The inputs are padded (edge values repeated) to a multiple of ``multiple`` and the outputs
    cropped back. Displacements are in voxels, channel ``i`` along array axis ``i``, pulling back
    (``warped(x) = floating(x + u(x))``): the convention of ``SARRegistrationLib.spatial``.
    """
    import torch.nn.functional as F

    shape = floating.shape[2:]
    pads = []
    for n in reversed(shape):
        pads += [0, (-n) % multiple]
    if any(pads):
        floating_in, reference_in = F.pad(floating, pads, mode="replicate"), F.pad(reference, pads, mode="replicate")
    else:
        floating_in, reference_in = floating, reference
    displacement, warped = model(floating_in, reference_in, return_warped_source=True)
    velocity = getattr(model, "velocity", None) if model.integration_steps > 0 else displacement
    crop = (slice(None), slice(None)) + tuple(slice(0, n) for n in shape)
    return displacement[crop], (velocity if velocity is not None else displacement)[crop], warped[crop]


def save_voxelmorph(path, model, config: dict, card: dict) -> Path:
    """Write the weights (plain tensors and a config, readable with ``weights_only=True``) and a JSON card."""
    from SARRegistrationLib.model import save_state, write_model_card

    state = {"format": VOXELMORPH_FORMAT, "config": config,
             "state_dict": {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}}
    path = save_state(state, path)
    write_model_card(path, card)
    return path


def load_voxelmorph(path, device="cpu"):
    """``(model, config)`` from a file written by :func:`save_voxelmorph`; the model in eval mode."""
    import torch

    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != VOXELMORPH_FORMAT:
        raise ValueError(f"{display_path(path)} is not a VoxelMorph weights file of this benchmark")
    model = build_voxelmorph(state["config"])
    model.load_state_dict(state["state_dict"])
    model.requires_grad_(False)
    return model.to(device).eval(), dict(state["config"])


class VoxelMorphMethod(Method):
    """VoxelMorph trained by ``benchmarks/train_voxelmorph.py`` on SAR's training data and budget.

    It registers on the grid SAR's networks use (``grids.working_grid(reference, working_size,
    SAR_GRID_MULTIPLE)``, the same intensity normalisation); its voxel field is turned into
    millimetres on that grid with ``fields.displacement_to_sitk`` and resampled onto the reference
    grid, as ``register`` does.
    ``mode="slicewise"`` runs 2D weights on a 3D volume as ``register`` does for SAR: the slices
    along the k axis are one batch and nothing moves across slices.
    """

    def __init__(self, weights, ndims: int, device: str = "auto", *, mode: str = "volume", key: str = "voxelmorph",
                 label: str = "VoxelMorph"):
        self.key, self.label, self.base_label = key, label, label
        self.weights = Path(weights)
        self.ndims, self.device, self.mode = ndims, device, mode
        self.model, self.config = None, None

    def prepare(self) -> None:
        from SARRegistrationLib.devices import resolve_device

        require("voxelmorph", "voxelmorph")
        if not self.weights.is_file():
            raise NotRun(f"weights missing ({display_path(self.weights)})")
        self.device = resolve_device(self.device)
        self.model, self.config = load_voxelmorph(self.weights, self.device)
        if int(self.config["ndims"]) != self.ndims:
            raise NotRun(f"{display_path(self.weights)} holds {self.config['ndims']}D weights, not {self.ndims}D")
        self.label = f"{self.base_label} ({self.config.get('similarity', '?').upper()})"

    def run(self, pair: Pair) -> MethodOutput:
        import torch

        # register's own network inputs and conversion of a (slice) batch of voxel fields
        from SARRegistrationLib.registration import network_input, voxel_field

        slicewise = self.mode == "slicewise" and pair.reference.GetDimension() == 3
        started = time.perf_counter()
        grid = grids.working_grid(pair.reference, int(self.config["working_size"]), SAR_GRID_MULTIPLE,
                                  keep_axes=(2,) if slicewise else ())
        reference = network_input(pair.reference, grid, slicewise, self.device)
        floating = network_input(pair.floating, grid, slicewise, self.device)
        with torch.no_grad():
            displacement, _, _ = voxelmorph_forward(self.model, floating, reference, pad_multiple(self.config))
        field_mm = sitk.Resample(displacement_to_sitk(voxel_field(displacement, slicewise), grid), pair.reference,
                                 sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64, True)
        seconds = time.perf_counter() - started
        return MethodOutput(field_mm, seconds)

    def settings(self) -> dict:
        return {"weights": display_path(self.weights), "mode": self.mode,
                **({"config": self.config} if self.config else {})}
