"""Choosing the torch device from a user's ``auto`` / ``cpu`` / ``cuda`` setting."""

import torch

from .errors import DeviceError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(choice: str = "auto") -> torch.device:
    """``auto`` takes CUDA when PyTorch sees a GPU, else the CPU; ``cuda`` without a GPU is an error."""
    if isinstance(choice, torch.device):
        choice = choice.type
    name = (choice or "auto").lower()
    if name not in DEVICE_CHOICES and not name.startswith("cuda:"):
        raise DeviceError(f"Unknown device {choice!r}: choose one of {', '.join(DEVICE_CHOICES)}.")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise DeviceError(f"CUDA was requested but PyTorch ({torch.__version__}, {build}) sees no CUDA GPU. "
                          "Choose device 'cpu' or 'auto'.")
    return torch.device(name)
