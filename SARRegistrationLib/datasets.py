"""Image folders, patient-level splits and PyTorch datasets of training pairs.

A source is ``(image, mask)``: a scalar SimpleITK image and the mask of its structure of interest
(non-zero inside, same grid) or ``None``. A dataset item is a pair from
:func:`deformations.make_training_pair` on the source resampled to a fixed working shape, as torch
float32 tensors in array axis order (``z, y, x``) with a leading channel axis.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from torch.utils.data import ConcatDataset, Dataset

from .deformations import make_training_pair
from .synthetic import synthetic_sample
from .grids import grid_with_shape
from .imageio import SUPPORTED_SUFFIXES, read_image

Source = tuple[sitk.Image, sitk.Image | None]


def patient_id(path: str | Path) -> str:
    """Patient of a ChestX-ray14-style file name: the part before the first underscore.

    ``00000001_000.png`` -> ``00000001``; a name without underscore is its own patient (extensions
    dropped).
    """
    name = Path(path).name
    return name.split("_", 1)[0] if "_" in name else name.split(".", 1)[0]


def read_mask(path: str | Path) -> sitk.Image:
    """Read a mask file as uint8 0/1 (any non-zero value, e.g. 255 in a PNG, is inside; may be empty)."""
    return sitk.Cast(read_image(path, "mask", allow_constant=True) != 0, sitk.sitkUInt8)


def mask_path_for(image_path: str | Path, mask_dir: str | Path | None) -> Path | None:
    """The mask of an image: the file of the same name in ``mask_dir``, or ``None`` if there is none."""
    if mask_dir is None:
        return None
    candidate = Path(mask_dir) / Path(image_path).name
    return candidate if candidate.is_file() else None


def load_training_sources(paths, mask_dir: str | Path | None = None) -> list[Source]:
    """Read image files, each with its same-named mask from ``mask_dir`` where one exists."""
    sources = []
    for path in paths:
        mask_path = mask_path_for(path, mask_dir)
        sources.append((read_image(path), None if mask_path is None else read_mask(mask_path)))
    return sources


def split_by_patient(paths, fractions=(0.7, 0.1, 0.2), seed: int = 0) -> dict[str, list]:
    """Split files into train / validation / test with every patient in exactly one fold (paper §3).

    Patients are shuffled (seeded) and laid end to end by image count; a patient goes to the fold
    whose share of the images, ``fractions`` (normalised), contains the middle of its run, so the
    folds follow ``fractions`` in images up to one patient's worth at each boundary. Files keep
    their input order within a fold.
    """
    fractions = np.asarray(fractions, dtype=float)
    if fractions.shape != (3,) or (fractions < 0).any() or fractions.sum() <= 0:
        raise ValueError(f"need three non-negative fractions, got {fractions}")
    paths = list(paths)
    counts: dict[str, int] = {}
    for path in paths:
        counts[patient_id(path)] = counts.get(patient_id(path), 0) + 1
    patients = [str(p) for p in np.random.default_rng(seed).permutation(sorted(counts))]
    sizes = np.array([counts[p] for p in patients])
    middles = (np.cumsum(sizes) - sizes / 2) / len(paths)
    boundaries = np.cumsum(fractions / fractions.sum())[:-1]
    fold_of = dict(zip(patients, np.searchsorted(boundaries, middles)))
    names = ("train", "validation", "test")
    return {name: [path for path in paths if fold_of[patient_id(path)] == k] for k, name in enumerate(names)}


def resample_to_shape(image: sitk.Image, shape: tuple[int, ...], interpolator=sitk.sitkLinear) -> sitk.Image:
    """Resample onto a grid of array ``shape`` (``z, y, x``) covering the same physical extent.

    The voxel edges of the new grid coincide with those of the old one. Linear resampling first
    smooths along axes that shrink, so that downsampling does not alias.
    """
    grid = grid_with_shape(image, shape[::-1])
    # A Gaussian of sigma half the new spacing (mm) suppresses detail finer than the new grid holds.
    old_spacing, new_spacing = np.array(image.GetSpacing()), np.array(grid.GetSpacing())
    variances = np.where(new_spacing > old_spacing, (new_spacing / 2) ** 2, 0.0)
    if interpolator != sitk.sitkNearestNeighbor and variances.any():
        image = sitk.DiscreteGaussian(sitk.Cast(image, sitk.sitkFloat32), variances.tolist(), 64, 0.01, True)
    return sitk.Resample(image, grid, sitk.Transform(), interpolator, 0.0)


class _PairDataset(Dataset):
    """Shared machinery: item ``i`` is a training pair drawn with the generator seeded by ``(seed, i)``."""

    def __init__(self, shape: tuple[int, ...], length: int, seed: int = 0, **pair_options):
        self.shape = tuple(shape)
        self.length = length
        self.seed = seed
        self.pair_options = pair_options

    def __len__(self) -> int:
        return self.length

    def _source(self, index: int, rng: np.random.Generator) -> Source:
        """Item ``index``'s ``(image, mask)`` on the working grid."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        """``reference``, ``floating``, ``reference_mask``, ``floating_mask``: ``(1, *shape)``;
        ``displacement``: ``(ndims, *shape)`` in voxels of the working grid. All float32."""
        if not 0 <= index < self.length:
            raise IndexError(index)
        rng = np.random.default_rng((self.seed, index))
        image, mask = self._source(index, rng)
        pair = make_training_pair(image, mask, rng, **self.pair_options)
        return {name: torch.from_numpy(array if name == "displacement" else array[None])
                for name, array in pair.items()}


class PairDataset(_PairDataset):
    """Training pairs from real sources: item ``i`` deforms source ``i mod len(sources)``.

    Args:
        sources: ``(image, mask or None)`` tuples, e.g. from :func:`load_training_sources`.
        shape: working array shape, e.g. ``(128, 128)`` or ``(64, 64, 64)``; sources are resampled to it.
        length: items per epoch.
        seed: with the index, fixes every random choice, so an item is the same on every read.
        pair_options: passed to :func:`deformations.make_training_pair` (``max_displacement_mm``,
            ``affine``, ``intensity``, ``mesh_size``).
    """

    def __init__(self, sources: list[Source], shape: tuple[int, ...], length: int, seed: int = 0, **pair_options):
        if not sources:
            raise ValueError("PairDataset needs at least one source")
        super().__init__(shape, length, seed, **pair_options)
        self.sources = list(sources)

    def _source(self, index: int, rng: np.random.Generator) -> Source:
        image, mask = self.sources[index % len(self.sources)]
        if mask is not None:
            mask = resample_to_shape(mask, self.shape, sitk.sitkNearestNeighbor)
        return resample_to_shape(image, self.shape), mask


class SyntheticPairDataset(_PairDataset):
    """Training pairs from SynthMorph-style synthetic images (:func:`synthetic.synthetic_sample`).

    Args:
        shape, length, seed, pair_options: as for :class:`PairDataset`.
        spacing: voxel spacing in mm (SimpleITK ``x, y, z`` order) of the synthetic images; 1 mm if ``None``.
    """

    def __init__(self, shape: tuple[int, ...], length: int, seed: int = 0,
                 spacing: tuple[float, ...] | None = None, **pair_options):
        super().__init__(shape, length, seed, **pair_options)
        self.spacing = spacing

    def _source(self, index: int, rng: np.random.Generator) -> Source:
        return synthetic_sample(self.shape, rng, self.spacing)


def expand_image_paths(paths) -> list[Path]:
    """Files as given, folders as every image file in them (sorted), or as themselves where they hold
    none (a DICOM series' folder, which :func:`read_image` reads as one volume)."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            images = sorted(p for p in path.iterdir() if p.name.lower().endswith(SUPPORTED_SUFFIXES))
            files.extend(images or [path])
        else:
            files.append(path)
    return files


def training_sources(paths, mask_dir=None, use_training_fold: bool = False) -> tuple[list[Source], str]:
    """The sources to train on and a one-line description of them for the model card.

    With ``use_training_fold`` only the training fold of :func:`split_by_patient` is read, so the
    validation and test patients stay unseen (paper §3).
    """
    files = expand_image_paths(paths)
    if use_training_fold:
        files = split_by_patient(files)["train"]
    if not files and paths:
        raise ValueError(f"No image files found in {', '.join(map(str, paths))}.")
    sources = load_training_sources(files, mask_dir)
    with_masks = sum(mask is not None for _, mask in sources)
    description = (f"{len(files)} images ({', '.join(p.name for p in files[:8])}{', …' if len(files) > 8 else ''}), "
                   f"{with_masks} with manual masks" if files else "no real images")
    return sources, description


def training_dataset(sources: list[Source], shape, epoch_length: int, synthetic: int = 0, seed: int = 0,
                     **pair_options) -> Dataset:
    """Real pairs from ``sources`` (``epoch_length`` per epoch) plus ``synthetic`` synthetic pairs."""
    parts = []
    if sources:
        parts.append(PairDataset(sources, shape, epoch_length, seed, **pair_options))
    if synthetic:
        parts.append(SyntheticPairDataset(shape, synthetic, seed + 1, **pair_options))
    return parts[0] if len(parts) == 1 else ConcatDataset(parts)
