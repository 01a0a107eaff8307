"""Shared helpers of the tests: tiny models, small real images with non-trivial geometry.

Imported by the test modules (``from helpers import ...``); ``one_torch_thread`` is an autouse
fixture that a module activates by importing it.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SARRegistrationLib.model import SARModel

SLICER_MODULE_DIR = Path(__file__).resolve().parents[2] / "SARRegistration"
TINY = {"discriminator_width": 8, "generator_channels": (8, 16, 16, 16), "feature_channels": (8, 16)}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One intra-op thread: the tiny networks are faster so, and a background job shares the CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class RunsCodeOnLoad:
    """Unpickling this object runs a shell command (what a malicious weights file would do)."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@contextlib.contextmanager
def slicer_module_file(name: str):
    """One plain-Python file of the Slicer module (``SARRegistration/NAME.py``), imported as Slicer would."""
    sys.path.insert(0, str(SLICER_MODULE_DIR))
    try:
        yield importlib.import_module(name)
    finally:
        sys.path.remove(str(SLICER_MODULE_DIR))


def tiny_model(ndims: int, working_size: int = 32, seed: int = 0) -> SARModel:
    """An untrained, small, deterministic model in evaluation mode."""
    torch.manual_seed(seed)
    return SARModel.create(ndims, working_size, **TINY).eval()


def perturb_head(model: SARModel, bias, weight_std: float = 0.0, seed: int = 0) -> SARModel:
    """Give the last layer a bias of ``bias`` voxels (array axis order) and random weights of ``weight_std``."""
    head = model.generator.flow_head
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.bias.copy_(torch.as_tensor(bias, dtype=head.bias.dtype))
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * weight_std)
    return model


def rotation_2d(degrees: float) -> tuple:
    a = np.deg2rad(degrees)
    return (np.cos(a), -np.sin(a), np.sin(a), np.cos(a))


def rotation_3d(degrees_z: float, degrees_x: float) -> tuple:
    a, b = np.deg2rad(degrees_z), np.deg2rad(degrees_x)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return tuple((rz @ rx).ravel())


def with_geometry(image: sitk.Image, origin, spacing, direction) -> sitk.Image:
    image = sitk.Image(image)
    image.SetOrigin(tuple(float(v) for v in origin))
    image.SetSpacing(tuple(float(v) for v in spacing))
    image.SetDirection(tuple(float(v) for v in direction))
    return image


def small_float(image: sitk.Image, factor: int) -> sitk.Image:
    """Shrink by an integer factor per axis and cast to float32 (linear resampling keeps floats)."""
    return sitk.Cast(sitk.Shrink(image, [factor] * image.GetDimension()), sitk.sitkFloat32)


def small_label(image: sitk.Image, factor: int) -> sitk.Image:
    return sitk.Shrink(image, [factor] * image.GetDimension())


def small_pair_2d(read_test_image, factor: int = 3):
    """BrainWeb PD reference and the deformed T1 floating image, shrunk (181x217 -> 61x73 for 3)."""
    return (small_float(read_test_image("brain_pd.nrrd"), factor),
            small_float(read_test_image("sample_floating_t1.nrrd"), factor))


def index_to_physical(image: sitk.Image) -> np.ndarray:
    ndims = image.GetDimension()
    return np.array(image.GetDirection()).reshape(ndims, ndims) @ np.diag(image.GetSpacing())


def corner_points(image: sitk.Image) -> np.ndarray:
    """Physical positions of the outer corners of the corner voxels (2**ndims points, one per row)."""
    ndims = image.GetDimension()
    size = np.array(image.GetSize(), dtype=float)
    matrix = index_to_physical(image)
    corners = []
    for bits in range(2 ** ndims):
        index = np.array([(size[a] - 0.5) if bits >> a & 1 else -0.5 for a in range(ndims)])
        corners.append(np.array(image.GetOrigin()) + matrix @ index)
    return np.array(corners)
