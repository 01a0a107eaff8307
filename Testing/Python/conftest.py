"""Shared fixtures: paths to the small real test images of Testing/Data."""

from pathlib import Path

import pytest
import SimpleITK as sitk

DATA_DIR = Path(__file__).resolve().parents[1] / "Data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA_DIR


@pytest.fixture(scope="session")
def read_test_image():
    """Read a file of Testing/Data as a SimpleITK image."""
    return lambda name: sitk.ReadImage(str(DATA_DIR / name))
