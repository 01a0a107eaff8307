"""Registering one image pair: image -> working grid -> generator -> field -> warp -> metrics -> outputs.

The network sees both images resampled onto a working grid that covers the reference's physical
extent (:func:`grids.working_grid`); its voxel field is turned into millimetres and resampled
onto the reference's own grid, and the floating image is warped there by SimpleITK with that very
field. So ``warped`` is exactly what ``sitk.Resample(floating, reference, DisplacementFieldTransform
(displacement))`` gives, as in ITK, Elastix and ANTs.

A 3D volume is registered either in full by the 3D model (``mode="volume"``) or slice by slice
along its third (``k``) axis by the 2D model (``mode="slicewise"``): the slices are one batch, so
both modes run the same code. ``mode="auto"`` takes the 3D model when one is given (or shipped),
else the 2D one slice by slice.

The network's field is the first estimate. Instance optimisation (:mod:`instance_optimisation`)
then optimises a residual on top of it, on a grid of its own (up to :data:`OPTIMISATION_GRID_SIZE`
voxels per axis) and always in the image's full dimension: a volume registered slice-wise by the
network still moves across slices.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
# numpy loads numpy.ma (which np.percentile uses) and numpy.random on first use: 20 ms that a
# process's first registration would otherwise count in its seconds.
import numpy.ma  # noqa: F401
import numpy.random  # noqa: F401
import SimpleITK as sitk
import torch

from . import grids, imageio, metrics
from .affine import MINIMUM_VOXELS, affine_align, can_align, matches_better
from .rigid_search import search_rigid
from .fields import displacement_in_voxels, displacement_to_sitk
from .instance_optimisation import OptimisationSettings, optimise_residual
from .devices import resolve_device
from .errors import InputImageError, RegistrationCancelled, SettingsError, WeightsError
from .finetuning import (CancelCheck, FinetuneSettings, ProgressCallback, encode_pair, finetune_last_layer,
                         tuned_items)
from .model import SARModel, default_weights_path, load_model
from .networks.generator import otsu_mask, soft_otsu_mask
from .staging import staged_output_dir

MODES = ("auto", "volume", "slicewise")
# Voxels along the longest axis of instance optimisation's grid, by image dimension: its cost per
# iteration depends on the samples, not the grid, so the grid can be finer than the network's;
# the cap bounds the memory of the dense fields on it.
OPTIMISATION_GRID_SIZE = {2: 256, 3: 192}
# Below this fraction of the reference covered by the floating image, instance optimisation leaves
# out the samples that land outside the floating image instead of comparing them with 0. With 15 or
# 30 % of a 2D floating image cropped, comparing them gave 0.130 and 0.259 mm of field error where
# it covered, leaving them out 0.061 and 0.060 (0.059 uncropped). But where the floating image
# covers the reference, only the deformation carries samples outside it, near the border, and
# leaving those out loosened the field there: on the 2D tuning sets with the floating image a
# third of a voxel off their grid, the velocity fields' error rose from 0.241 and 0.455 mm to
# 0.268 and 0.522 (benchmarks/results/robustness.md and bias_field_tuning.md).
PARTIAL_COVERAGE = 0.98


@dataclass
class RegistrationResult:
    """Outputs of one registration; images carry the geometry of the grid they live on."""

    warped: sitk.Image  # floating image on the reference grid
    displacement: sitk.Image  # vector, mm, physical (LPS) components, on the reference grid, ITK convention
    # SAR's generated masks: of the reference on the reference grid, of the floating image on its
    # own grid; None when the network was not run (instance optimisation alone).
    reference_mask: sitk.Image | None
    floating_mask: sitk.Image | None
    metrics: dict
    warped_floating_mask: sitk.Image | None = None  # the user's floating mask, warped
    # What the QA figure is drawn from: the inputs, the voxel field and the mask arrays.
    qa_inputs: dict = field(default_factory=dict, repr=False)

    def transform(self) -> sitk.DisplacementFieldTransform:
        """The field as a SimpleITK transform (reference point -> floating point)."""
        return sitk.DisplacementFieldTransform(sitk.Image(self.displacement))  # the transform takes the buffer

    def save(self, output_dir, qa_figure: bool = True) -> list[Path]:
        """Write the outputs into ``output_dir``: all of them, or, on any error, none."""
        images = {name: image for name, image in (
            ("warped.nrrd", self.warped), ("displacement.nrrd", self.displacement),
            ("reference_mask.nrrd", self.reference_mask), ("floating_mask.nrrd", self.floating_mask),
            ("warped_floating_mask.nrrd", self.warped_floating_mask)) if image is not None}
        with staged_output_dir(output_dir) as staging:
            for name, image in images.items():
                if name == "displacement.nrrd":
                    # float32 (a 1e-7 relative error: nanometres), as Elastix, ANTs and Greedy write fields,
                    # and not compressed: zlib barely shrinks a smooth field's floats. On the 512 x 512 x
                    # 300 pair of benchmarks/large_volume.py compressed float64 took 48 s to save and
                    # 1.81 GB, this 9.7 s and 0.94 GB. Read it as sitk.sitkVectorFloat64 for a transform.
                    sitk.WriteImage(sitk.Cast(image, sitk.sitkVectorFloat32), str(staging / name), False)
                else:
                    sitk.WriteImage(image, str(staging / name), True)
            (staging / "metrics.json").write_text(json.dumps(self.metrics, indent=2) + "\n")
            if qa_figure:
                from .qa import save_qa_planes  # matplotlib (a second to import) only when a figure is drawn

                save_qa_planes(staging / "qa.png", **self._qa_planes())
        return sorted(Path(output_dir) / name for name in [*images, "metrics.json", *(["qa.png"] if qa_figure else [])])

    def _qa_planes(self) -> dict:
        """The QA figure's planes (:func:`qa.plane`) and settings, built only when a figure is drawn.

        A volume's planes are axial, coronal and sagittal: each is cut, as a three-slice slab
        (:func:`qa.slab`), along the array axis nearest the plane's normal, and the slab is then
        turned to LPS (``sitk.DICOMOrient``: axes permuted and flipped, no resampling), so that
        every figure shows anterior and superior at the top and the patient's right on the left,
        whatever order the file stores its axes in. No whole-volume array is made. The folded
        fraction of the title is the whole field's, and whether the masks are drawn label by label
        is decided on the whole masks.
        """
        from . import qa

        reference, floating = self.qa_inputs["reference"], self.qa_inputs["floating"]
        masks = self.qa_inputs.get("masks", {})
        size = reference.GetSize()[::-1]  # array axis order
        centre = qa.focus(None if self.warped_floating_mask is None else
                          sitk.GetArrayViewFromImage(self.warped_floating_mask), size)
        if reference.GetDimension() == 2:
            cuts = [(None, "", lambda image: image)]
        else:
            # For each plane, the array axis whose direction is nearest its normal (LPS z, y, x).
            direction = np.abs(np.reshape(reference.GetDirection(), (3, 3)))  # rows: L, P, S; columns: index i, j, k
            cuts = []
            for normal, name in ((2, "axial"), (1, "coronal"), (0, "sagittal")):
                axis = 2 - int(np.argmax(direction[normal]))
                if axis in qa.plane_axes(size):
                    rows = tuple(qa.slab(centre[k], size[k]) if k == axis else slice(None) for k in range(3))[::-1]
                    cuts.append((2 - normal, f"{name} ({'kji'[axis]} = {centre[axis]})",
                                 lambda image, rows=rows: sitk.DICOMOrient(image[rows], "LPS")))
        planes = []
        for axis, name, cut in cuts:
            grid = cut(reference)
            # The outputs are on the reference's grid; the inputs are resampled onto the slab's.
            arrays = {key: None if mask is None else imageio.array_of(
                cut(mask) if key == "warped_mask" else grids.resample_to(mask, grid, label=True))
                for key, mask in masks.items()}
            planes.append(qa.plane(
                imageio.array_of(grid), imageio.array_of(grids.resample_to(floating, grid)),
                imageio.array_of(cut(self.warped)), displacement_in_voxels(cut(self.displacement)), arrays,
                axis, grid.GetSpacing()[::-1], name))
        return {"planes": planes, "folded_fraction": self.metrics["folding_fraction"],
                "by_label": bool(self.qa_inputs.get("by_label"))}


def register(reference, floating, model: SARModel | None = None, *, reference_mask=None, floating_mask=None,
             ignore_mask=None, mode: str = "auto", device="auto", affine: bool | str = "auto", finetune: bool = True,
             max_iterations: int = 100, tolerance: float = 1e-4, smoothness: float | None = None, weights=None,
             instance_optimisation: bool | OptimisationSettings = True, optimisation_iterations: int | None = None,
             optimisation_levels: int | None = None, optimisation_similarity: str | None = None,
             optimisation_bias_field: bool | None = None, optimisation_equalise: bool | None = None,
             network: bool | None = None,
             progress: ProgressCallback | None = None, cancel: CancelCheck | None = None) -> RegistrationResult:
    """Register ``floating`` to ``reference`` with SAR.

    Args:
        reference, floating: SimpleITK images or file paths, both 2D or both 3D.
        model: a loaded :class:`SARModel`; by default the weights file ``weights`` (or the shipped
            weights) of the dimension the mode needs.
        reference_mask, floating_mask: optional structure masks or label maps (images or paths);
            they do not steer the registration. The floating one is warped onto the reference
            (``warped_floating_mask``, nearest neighbour: its values are kept); with both, Dice,
            HD95 and MAD before and after. A mask with one non-zero value is one structure whatever
            the value (0/1 and 0/255 masks compare as the same); when both hold several values,
            each label is measured on its own and the metrics are their means (each label's in
            ``"labels"``). Non-integer values (a probability map) count as one structure where
            non-zero.
        ignore_mask: optional mask (image or path, any grid: it is resampled physically) of
            regions the images are not compared in during finetuning and instance optimisation,
            such as bright implants or electrodes; the field there follows its smoothness alone.
        mode: ``"auto"``, ``"volume"`` or ``"slicewise"`` (3D only; 2D images are always one slice):
            ``auto`` runs a 3D model when one is given or shipped, else the 2D one slice-wise.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        affine: align the floating image affinely first (Mattes mutual information, as the paper
            does before deforming): ``"auto"`` when the pair is misaligned (a rigid search of
            coarse copies, :mod:`rigid_search`, finds a motion under which they match better than
            as they lie, and the affine from that motion also matches better at its finest level,
            :func:`affine.matches_better`; never slice by slice, where nothing
            moves across slices, nor on images under 4 voxels thick), ``True`` always, ``False``
            never. The affine starts from the search's best motion; the saved field then
            includes the affine part.
        finetune: tune the last layer on this pair (paper §2.3); off gives the trained network's field.
        max_iterations, tolerance: finetuning stops after this many iterations or when the loss
            changes by less than ``tolerance`` between two.
        smoothness: weight of the field's smoothness during finetuning (default 0.05: ``LossWeights.for_finetuning``).
        instance_optimisation: optimise a residual field on top of the network's for this pair
            (:mod:`instance_optimisation`), in the image's full dimension; an
            :class:`OptimisationSettings` turns it on with those settings.
        optimisation_iterations, optimisation_levels, optimisation_similarity: its iterations per
            level, resolution levels and image similarity ("nmi", "nmi+mind" or "mind"; default:
            :class:`OptimisationSettings`: NMI with MIND-SSC in 2D, NMI alone in 3D).
        optimisation_bias_field: optimise a smooth intensity gain of the floating image with the
            field, so that NMI holds under an MR bias field (default: :class:`OptimisationSettings`'s, on).
        optimisation_equalise: let NMI compare the images with equalised histograms (True), or as
            they are (False); by default (None) when both images are CT, in Hounsfield units
            (``OptimisationSettings.equalise``).
        network: start from the network's (finetuned) field and give SAR's masks. By default
            (None) only when a ``model`` or ``weights`` is given: on the benchmark, instance
            optimisation from the identity was more accurate than from the network's field, in 2D
            and 3D, in less time (README, "Benchmark"). ``False`` skips the network
            and finetuning, and the result has no SAR masks.
        progress: ``progress(fraction, message)`` is called as work advances.
        cancel: ``cancel()`` returning true stops the run with :class:`RegistrationCancelled`.

    Nothing is written to disk: call :meth:`RegistrationResult.save`.
    """
    started = time.perf_counter()
    stage_seconds = {}
    network = uses_network(network, model, weights)
    report = progress or (lambda fraction, message: None)
    reference = _as_image(reference, "reference")
    floating = _as_image(floating, "floating image")
    imageio.check_pair(reference, floating)
    reference_mask = _as_labels(reference_mask, "reference mask")
    floating_mask = _as_labels(floating_mask, "floating mask")
    ignore_mask = _as_image(ignore_mask, "ignore mask", mask=True)
    for role, mask in (("reference mask", reference_mask), ("floating mask", floating_mask),
                       ("ignore mask", ignore_mask)):
        if mask is not None and mask.GetDimension() != reference.GetDimension():
            raise InputImageError(f"The {role} is {mask.GetDimension()}D but the reference is "
                                  f"{reference.GetDimension()}D.")
    if mode not in MODES:
        raise SettingsError(f"Unknown mode {mode!r}: choose 'auto', 'volume' or 'slicewise'.")
    if not network and not instance_optimisation:
        raise SettingsError("Without the network, instance optimisation is the only registration stage: turn one "
                            "of them on (the paper's network-only registration: network on, instance optimisation off).")
    if not (isinstance(affine, bool) or affine == "auto"):
        raise SettingsError(f"The affine pre-alignment is 'auto', True or False, not {affine!r}.")
    _check_finetuning_options(max_iterations, tolerance, smoothness)
    optimisation = _optimisation_settings(instance_optimisation, optimisation_iterations, optimisation_levels,
                                          optimisation_similarity, optimisation_bias_field, optimisation_equalise)
    ndims = reference.GetDimension()
    torch_device = resolve_device(device)
    if network and model is None and weights is not None:
        report(0.02, "loading the model")
        model = load_model(weights, device=torch_device)  # its dimension decides what "auto" runs
    network_ndims = network_dimension(ndims, mode, model)
    slicewise = ndims == 3 and network_ndims == 2
    imageio.check_size(reference, "reference", slicewise)
    imageio.check_size(floating, "floating image", slicewise)

    if network:
        report(0.02, "loading the model")
        model = model if model is not None else load_model(None, network_ndims, torch_device)
        if model.ndims != network_ndims:
            raise WeightsError(f"These weights are for {model.ndims}D images but {mode} registration of a "
                               f"{ndims}D image needs a {network_ndims}D model"
                               + (" (or choose mode 'slicewise')." if network_ndims == 3 else "."))
        model.to(torch_device).eval()  # inference: batch norm uses, and never updates, its statistics
    _check_cancel(cancel)

    # The network's grid (slices run along SimpleITK's k axis, array axis 0, which keeps its voxel
    # count), in multiples of what the network needs, and instance optimisation's, which needs none.
    grid = grids.working_grid(reference, model.working_size, model.generator.shape_multiple,
                              keep_axes=(2,) if slicewise else ()) if network else None
    optimisation_grid = None if optimisation is None else \
        grids.working_grid(reference, OPTIMISATION_GRID_SIZE[ndims], multiple=1)
    prealignment, search, aligned, overlap = sitk.Transform(), None, False, None
    alignable = can_align(reference) and can_align(floating)
    if affine is True and not alignable:
        raise InputImageError(f"The affine pre-alignment needs at least {MINIMUM_VOXELS} voxels along every axis; "
                              f"the reference has {reference.GetSize()}, the floating image {floating.GetSize()}. "
                              "Register without it.")
    # Automatic: not slice by slice, where nothing moves across slices, nor on images too thin to align.
    if affine is True or (affine == "auto" and alignable and not (network and slicewise)):
        if affine == "auto":  # a pair that does not overlap at all is a mistake to report, not to undo
            overlap = grids.check_overlap(grid or optimisation_grid, reference, floating)
        stage_start = time.perf_counter()
        report(0.02, "searching for misalignment")
        search = search_rigid(reference, floating, with_centres=affine is True)
        aligned = affine is True or search.misaligned
        if aligned:
            report(0.03, "affine pre-alignment")
            prealignment = affine_align(reference, floating, search.transform)
            # Under auto, the affine must also match the images better than none at its finest
            # level, or the pair is left as it lies.
            if affine == "auto" and not matches_better(reference, floating, prealignment):
                prealignment, aligned = sitk.Transform(), False
        stage_seconds["prealignment"] = time.perf_counter() - stage_start
        _check_cancel(cancel)
    if aligned or overlap is None:
        overlap = grids.check_overlap(grid or optimisation_grid, reference, floating, prealignment)
    stage_seconds["preparation"] = time.perf_counter() - started - stage_seconds.get("prealignment", 0.0)

    iterations, converged, encoding, field_grid, field_voxels = 0, None, None, None, None
    finetuning_losses, finetuning_declined = [], None
    if network:
        stage_start = time.perf_counter()
        reference_input = network_input(reference, grid, slicewise, torch_device)
        floating_input = network_input(floating, grid, slicewise, torch_device, prealignment)
        settings = FinetuneSettings(max_iterations=max_iterations, tolerance=tolerance)
        if smoothness is not None:
            settings.weights.smoothness = smoothness
        report(0.05, "encoding the pair")
        # The backward features serve only the cycle term of finetuning, on the slices it tunes on.
        backward_items = tuned_items(reference_input.shape[0], settings) if finetune and settings.weights.cycle else []
        encoding = encode_pair(model, reference_input, floating_input, backward_items, cancel,
                               progress=lambda f: report(0.05 + 0.15 * f, "encoding the pair"))
        _check_cancel(cancel)
        stage_seconds["network"] = time.perf_counter() - stage_start
        if finetune:
            stage_start = time.perf_counter()
            ignore_input = None if ignore_mask is None else \
                network_input(ignore_mask, grid, slicewise, torch_device, normalise=False)
            share = 0.3 if optimisation is not None else 0.7
            tuned = finetune_last_layer(model, encoding, reference_input, floating_input, settings,
                                        progress=lambda f, message: report(0.2 + share * f, message), cancel=cancel,
                                        ignore_mask=ignore_input)
            displacement, iterations, converged = tuned.displacement, tuned.iterations, tuned.converged
            finetuning_losses = [round(loss, 5) for loss in tuned.losses]
            finetuning_declined = tuned.declined
            stage_seconds["finetuning"] = time.perf_counter() - stage_start
        else:
            with torch.no_grad():
                displacement = model.generator.field(encoding.forward)
        field_grid, field_voxels = grid, voxel_field(displacement, slicewise)
        _check_cancel(cancel)

    optimisation_summary = False
    if optimisation is not None:
        stage_start = time.perf_counter()
        field_voxels, optimisation_summary = _instance_optimisation(
            reference, floating, prealignment if aligned else None, overlap, ignore_mask, optimisation_grid,
            field_grid, field_voxels, encoding,
            slicewise, optimisation, torch_device,
            lambda f, message: report(0.5 + 0.4 * f if network else 0.05 + 0.85 * f, message), cancel)
        field_grid = optimisation_grid
        optimisation_summary["seconds"] = round(time.perf_counter() - stage_start, 3)
        stage_seconds["instance_optimisation"] = time.perf_counter() - stage_start
        _check_cancel(cancel)

    stage_start = time.perf_counter()
    report(0.92, "resampling the outputs")
    working_field = displacement_to_sitk(field_voxels, field_grid)
    if _same_geometry(field_grid, reference):  # instance optimisation on the reference's own grid
        field_mm = working_field
    else:
        field_mm = _in_slabs(reference, lambda slab: sitk.Resample(
            working_field, slab, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64, True),
            cancel, lambda f: report(0.92 + 0.03 * f, "resampling the field"))
    if aligned:  # p -> A(p + d(p)): the composite applies the last-listed transform first
        composite = sitk.CompositeTransform([prealignment, sitk.DisplacementFieldTransform(field_mm)])
        field_mm = _in_slabs(reference, lambda slab: sitk.TransformToDisplacementField(
            composite, sitk.sitkVectorFloat64, slab.GetSize(), slab.GetOrigin(), slab.GetSpacing(),
            slab.GetDirection()), cancel, lambda f: report(0.95 + 0.01 * f, "adding the affine pre-alignment"))
    transform = sitk.DisplacementFieldTransform(sitk.Image(field_mm))
    warped = _in_slabs(reference, lambda slab: sitk.Resample(
        floating, slab, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32),
        cancel, lambda f: report(0.96 + 0.03 * f, "warping the floating image"))
    generated_reference = generated_floating = None
    if encoding is not None:
        generated_reference = grids.resample_to(_mask_image(otsu_mask(encoding.reference_map), grid, slicewise),
                                                  reference, label=True)
        generated_floating = grids.resample_to(_mask_image(otsu_mask(encoding.floating_map), grid, slicewise),
                                                 floating, label=True, transform=prealignment.GetInverse())

    folding, largest_displacement = _field_statistics(field_mm)
    # What ran on a volume: the network slice by slice, or a whole-volume stage (3D network or
    # instance optimisation alone).
    summary = {"mode": ("slicewise" if network and slicewise else "volume") if ndims == 3 else "image",
               "device": str(torch_device), "network": network,
               "affine_prealignment": aligned,
               # How much better (NMI of coarse copies) the rigid search's best motion matched than none.
               "rigid_search": None if search is None else {
                   "gain": round(search.gain, 4), "rotation_degrees": list(search.rotation_degrees),
                   "shift_mm": list(search.shift_mm),
                   # The search found a better motion on its coarse copies, but under auto the
                   # affine from it matched the images no better than none at a finer level.
                   "declined": search.misaligned and not aligned},
               "overlap_fraction": round(overlap, 4),
               "finetuned": network and finetune, "ignore_mask": ignore_mask is not None,
               "iterations": iterations, "converged": converged, "finetuning_losses": finetuning_losses,
               # True: the tuned last layer lowered the loss but not the image term, so the network's
               # own field was kept (FinetuneSettings.require_similarity_gain).
               "finetuning_declined": finetuning_declined,
               "instance_optimisation": optimisation_summary,
               "folding_fraction": folding, "max_displacement_mm": largest_displacement,
               "weights": model.metadata.get("weights_path", "in memory") if network else None}
    qa_inputs = {"reference": reference, "floating": floating}
    warped_floating_mask = None if floating_mask is None else \
        grids.resample_to(floating_mask, reference, label=True, transform=transform)
    if floating_mask is not None:
        given = [mask for mask in (reference_mask, floating_mask) if mask is not None]
        labels = [metrics.label_values(sitk.GetArrayViewFromImage(mask)) for mask in given]
        by_label = min(len(values) for values in labels) > 1  # else: one structure in each, whatever its value
        qa_inputs["masks"] = {"reference_mask": reference_mask, "floating_mask": floating_mask,
                              "warped_mask": warped_floating_mask}
        qa_inputs["by_label"] = by_label
    if reference_mask is not None and floating_mask is not None:
        masks = {name: imageio.array_of(image) for name, image in (
            ("reference_mask", grids.resample_to(reference_mask, reference, label=True)),
            ("floating_mask", grids.resample_to(floating_mask, reference, label=True)),
            ("warped_mask", warped_floating_mask))}
        spacing = reference.GetSpacing()[::-1]
        for key, moving in (("before", "floating_mask"), ("after", "warped_mask")):
            summary[key] = metrics.label_overlap_metrics(masks["reference_mask"], masks[moving], spacing,
                                                         np.union1d(*labels)) if by_label else \
                metrics.overlap_metrics(masks["reference_mask"], masks[moving], spacing)
    stage_seconds["outputs"] = time.perf_counter() - stage_start
    summary["stage_seconds"] = {name: round(value, 3) for name, value in stage_seconds.items()}
    summary["seconds"] = round(time.perf_counter() - started, 3)
    report(1.0, "done")
    return RegistrationResult(
        warped=warped, displacement=field_mm, reference_mask=generated_reference, floating_mask=generated_floating,
        metrics=summary, warped_floating_mask=warped_floating_mask, qa_inputs=qa_inputs)


def uses_network(network: bool | None, model=None, weights=None) -> bool:
    """Whether a registration runs the network: as asked, or by default when a model or weights are given."""
    return (model is not None or weights is not None) if network is None else bool(network)


def network_dimension(image_ndims: int, mode: str, model: SARModel | None = None) -> int:
    """The dimension of the network a registration runs: 2 for 2D images and slice-wise volumes.

    ``mode="auto"`` registers a volume in full when a 3D model is given, or none is and 3D weights ship.
    """
    if image_ndims == 2 or mode == "slicewise":
        return 2
    if mode == "auto":
        available = model.ndims == 3 if model is not None else default_weights_path(3).is_file()
        return 3 if available else 2
    return 3


def _optimisation_settings(instance_optimisation, iterations, levels, similarity, bias_field,
                           equalise) -> OptimisationSettings | None:
    """The settings of instance optimisation, or None when it is off."""
    if instance_optimisation is False:
        return None
    settings = instance_optimisation if isinstance(instance_optimisation, OptimisationSettings) \
        else OptimisationSettings()
    overrides = {"iterations": iterations, "levels": levels, "similarity": similarity, "bias_field": bias_field,
                 "equalise": equalise}
    settings = replace(settings, **{name: value for name, value in overrides.items() if value is not None})
    settings.check()
    return settings


def _instance_optimisation(reference, floating, prealignment, overlap: float, ignore_mask, grid, field_grid,
                           field_voxels, encoding, encoding_slicewise: bool, settings: OptimisationSettings, device,
                           progress, cancel):
    """The residual stage: the images and the network's estimate (``field_voxels`` on ``field_grid``,
    or None) on the optimisation ``grid``, then :func:`optimise_residual`. ``overlap`` is the fraction
    of the reference that the floating image covers. Returns the total field on ``grid`` in voxels
    and a summary."""
    if settings.equalise is None:  # CT to CT: NMI compares the images equalised (OptimisationSettings.equalise)
        settings = replace(settings, equalise=imageio.in_hounsfield_units(reference)
                           and imageio.in_hounsfield_units(floating))
    fixed = network_input(reference, grid, False, device)
    native = _floating_on_its_own_grid(floating, grid, prealignment, device)
    resolved = settings.for_dimension(fixed.dim() - 2)
    # On the reference's grid: the floating image itself, or (read natively) for MIND-SSC alone.
    resampled = network_input(floating, grid, False, device, prealignment) \
        if native is None or "mind" in resolved.similarity else None
    moving, floating_map, floating_spacing = native if native is not None else (resampled, None, None)
    initial = None
    if field_voxels is not None:
        initial = torch.from_numpy(np.ascontiguousarray(_resampled_field(field_voxels, field_grid, grid), np.float32))
        initial = initial[None].to(device)
    masks = {}
    if encoding is not None and settings.mask_weight > 0:
        for name, fused in (("reference_mask", encoding.reference_map), ("floating_mask", encoding.floating_map)):
            soft = _mask_image(soft_otsu_mask(fused), field_grid, encoding_slicewise, np.float32)
            masks[name] = torch.from_numpy(imageio.array_of(grids.resample_to(soft, grid)))[None, None].to(device)
    ignore = None if ignore_mask is None else network_input(ignore_mask, grid, False, device, normalise=False)
    skip_outside = native is not None and overlap < PARTIAL_COVERAGE
    result = optimise_residual(fixed, moving, initial, settings, ignore_mask=ignore, floating_map=floating_map,
                               floating_on_reference=None if native is None else resampled, skip_outside=skip_outside,
                               spacing=grid.GetSpacing()[::-1], floating_spacing=floating_spacing, progress=progress,
                               cancel=cancel, **masks)
    summary = {"levels": settings.levels, "iterations": result.iterations,
               "similarity": resolved.similarity, "bias_field": resolved.bias_field, "equalised": settings.equalise,
               "loss_before": round(result.start_loss, 5), "loss_after": round(result.final_loss, 5),
               "kept_first_estimate": result.kept_initial,
               "floating_read_on_its_own_grid": native is not None,
               "samples_outside_floating_left_out": skip_outside,
               "losses": [round(loss, 5) for loss in result.losses]}
    return result.displacement[0].detach().cpu().numpy().astype(np.float64), summary


def _floating_on_its_own_grid(floating: sitk.Image, grid: sitk.Image, prealignment, device):
    """The floating image on a working grid of its own, the map to it from ``grid`` through the
    affine ``prealignment`` (None: none; see :func:`optimise_residual`'s ``floating_map``) and the
    own grid's voxel size (mm, array order); or None where that grid would be ``grid`` itself and
    nothing aligns it first (both ways then give the same image)."""
    own_grid = grids.working_grid(floating, OPTIMISATION_GRID_SIZE[floating.GetDimension()], multiple=1)
    if prealignment is None and _same_geometry(own_grid, grid):
        return None
    linear, offset = grids.normalised_map(grid, own_grid, prealignment)
    as_tensor = lambda array: torch.tensor(array, dtype=torch.float32, device=device)  # noqa: E731
    return network_input(floating, own_grid, False, device), (as_tensor(linear), as_tensor(offset)), \
        own_grid.GetSpacing()[::-1]


def _same_geometry(grid: sitk.Image, reference: sitk.Image) -> bool:
    """Whether ``grid`` has the reference's voxels (up to float rounding of its computed origin)."""
    return grid.GetSize() == reference.GetSize() and all(
        np.allclose(a, b, rtol=0, atol=1e-6 * max(reference.GetSpacing())) for a, b in (
            (grid.GetOrigin(), reference.GetOrigin()), (grid.GetSpacing(), reference.GetSpacing()),
            (grid.GetDirection(), reference.GetDirection())))


def _resampled_field(field_voxels: np.ndarray, from_grid: sitk.Image, to_grid: sitk.Image) -> np.ndarray:
    """A voxel field of one grid as a voxel field of another over the same space (physically resampled)."""
    if _same_geometry(from_grid, to_grid):
        return field_voxels
    field_mm = sitk.Resample(displacement_to_sitk(field_voxels, from_grid), to_grid, sitk.Transform(),
                             sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64, True)
    return displacement_in_voxels(field_mm)


def _checked(source, role: str, allow_constant: bool = False):
    """``source``, an image or a path, read and checked (or None)."""
    if source is None:
        return None
    # read_image checks what it reads; an image handed in is checked here.
    return imageio.check_image(source, role, allow_constant) if isinstance(source, sitk.Image) \
        else imageio.read_image(source, role, allow_constant=allow_constant)


def _as_image(source, role: str, mask: bool = False):
    image = _checked(source, role, allow_constant=mask)
    # An ignore mask may be empty or hold several labels: any non-zero voxel is in it.
    return sitk.Cast(sitk.NotEqual(image, 0), sitk.sitkUInt8) if mask and image is not None else image


def _as_labels(source, role: str):
    """A structure mask or label map (see ``register``'s masks) as an image of whole numbers, or None.

    Its values are kept, so that the warped map holds the user's labels; non-integer values (a
    probability map) become one structure, 1 where non-zero.
    """
    image = _checked(source, role, allow_constant=True)
    if image is None:
        return None
    array = sitk.GetArrayViewFromImage(image)
    if array.dtype.kind in "bui":
        return image
    if np.array_equal(array, np.round(array)) and np.abs(array).max() < 2 ** 31:
        return sitk.Cast(image, sitk.sitkInt32)
    return sitk.Cast(sitk.NotEqual(image, 0), sitk.sitkUInt8)


def network_input(image: sitk.Image, grid: sitk.Image, slicewise: bool, device, transform=None,
                   normalise: bool = True) -> torch.Tensor:
    """``(B, 1, *spatial)`` in [0, 1] on the working grid; the slices are the batch in slice-wise mode.

    What the network is given; the benchmark's VoxelMorph row uses it too, so both see the same.

    Images are intensity-normalised; a 0/1 mask (``normalise=False``) becomes the fraction of each
    working voxel it covers, by linear resampling.
    """
    array = imageio.array_of(grids.averaged_resample(image, grid, transform))
    array = array.astype(np.float32)
    if normalise:
        array = imageio.normalise_intensity(array)
    tensor = torch.from_numpy(array)
    tensor = tensor.unsqueeze(1) if slicewise else tensor[None, None]
    return tensor.to(device)


def voxel_field(displacement: torch.Tensor, slicewise: bool) -> np.ndarray:
    """The network's field as ``(ndims, *spatial)`` voxels of the working grid."""
    field_array = displacement.detach().cpu().numpy().astype(np.float64)
    if not slicewise:
        return field_array[0]
    # (slices, 2, H, W) -> (3, slices, H, W); nothing moves across slices.
    in_plane = np.moveaxis(field_array, 1, 0)
    return np.concatenate([np.zeros_like(in_plane[:1]), in_plane])


# Slices per slab when full-resolution outputs are made: at CT size (512×512×300) one resampling
# takes tens of seconds in ITK, where neither a cancel nor Ctrl-C can be seen; in slabs, both are.
_OUTPUT_SLAB_SLICES = 16


def _in_slabs(reference: sitk.Image, make, cancel: CancelCheck | None, progress) -> sitk.Image:
    """``make(grid)`` on slabs of the reference grid along ``k``, assembled on the reference grid.

    Slicing a SimpleITK image keeps the physical position of its voxels, so every slab samples
    exactly the points of the whole grid. A 2D image is one slab.
    """
    if reference.GetDimension() == 2:
        _check_cancel(cancel)
        return make(reference)
    depth = reference.GetSize()[2]
    assembled = None
    for start in range(0, depth, _OUTPUT_SLAB_SLICES):
        _check_cancel(cancel)
        piece = make(reference[:, :, start:start + _OUTPUT_SLAB_SLICES])
        values = sitk.GetArrayViewFromImage(piece)
        if assembled is None:
            assembled = np.empty((depth, *values.shape[1:]), values.dtype)
        assembled[start:start + values.shape[0]] = values
        progress(min(start + _OUTPUT_SLAB_SLICES, depth) / depth)
    image = sitk.GetImageFromArray(assembled, isVector=piece.GetNumberOfComponentsPerPixel() > 1)
    image.CopyInformation(reference)
    return image


# Slices (array axis 0) per slab when a volume's full-resolution field is summarised: the Jacobian
# of a whole CT-sized field (512×512×300) would take over 10 GB at once.
_SLAB_ROWS = 16


def _field_statistics(field_mm: sitk.Image) -> tuple[float, float]:
    """Folded-voxel fraction and largest displacement (mm) of an ITK field, a slab at a time (a 2D
    image is one slab: in 16-row slabs a 256² field took 10 ms, a twentieth of its registration)."""
    millimetres = sitk.GetArrayViewFromImage(field_mm)
    rows = millimetres.shape[0]
    slab_rows = _SLAB_ROWS if field_mm.GetDimension() == 3 else rows
    folded, largest = 0, 0.0
    for start in range(0, rows, slab_rows):
        stop = min(start + slab_rows, rows)
        # One row of margin on each side: the derivatives on the slab's edges are those of the whole field.
        low, high = max(start - 1, 0), min(stop + 1, rows)
        determinant = metrics.jacobian_determinant(displacement_in_voxels(field_mm, slice(low, high)))
        folded += int(np.count_nonzero(determinant[start - low:stop - low] <= 0))
        largest = max(largest, float(np.sqrt((millimetres[start:stop] ** 2).sum(axis=-1)).max()))
    return folded / field_mm.GetNumberOfPixels(), largest


def _mask_image(mask: torch.Tensor, grid: sitk.Image, slicewise: bool, dtype=np.uint8) -> sitk.Image:
    """A ``(B, 1, *spatial)`` mask of the network's grid (the slices as the batch when ``slicewise``) as an image."""
    array = mask.detach().cpu().numpy().astype(dtype)
    return imageio.image_like(array[:, 0] if slicewise else array[0, 0], grid)


def _check_finetuning_options(max_iterations, tolerance, smoothness) -> None:
    if not isinstance(max_iterations, (int, np.integer)) or max_iterations < 1:
        raise SettingsError(f"The iteration limit must be a whole number of at least 1, not {max_iterations!r} "
                              "(to use the trained network as it is, turn finetuning off).")
    for name, value in (("tolerance", tolerance), ("smoothness", smoothness)):
        if value is not None and not (np.isfinite(value) and value >= 0):
            raise SettingsError(f"The {name} must be a finite number of at least 0, not {value!r}.")


def _check_cancel(cancel: CancelCheck | None) -> None:
    if cancel is not None and cancel():
        raise RegistrationCancelled("Registration cancelled; nothing was written.")
