"""SARRegistrationLib: segmentation augmented deformable registration with GANs (pure Python, PyTorch).

The operations of the command line, one import away::

    import SARRegistrationLib as sar
    result = sar.register("reference.nrrd", "floating.nrrd", device="auto")  # instance optimisation
    result.save("out/")                      # warped, displacement (mm, ITK convention), masks, metrics
    model = sar.load_model(ndims=2)          # reuse one loaded model for a batch of pairs

Importing the package loads only its errors; the names below that need PyTorch load their module
when first used, so that a torch-free module (:mod:`SARRegistrationLib.sample`) stays light.
"""

import importlib

from .errors import (Cancelled, DeviceError, InputImageError, OutputError, RegistrationCancelled, SARError,
                     SettingsError, TrainingCancelled, WeightsError)

_LAZY = {"register": "registration", "RegistrationResult": "registration", "load_model": "model",
         "SARModel": "model", "FinetuneSettings": "finetuning", "OptimisationSettings": "instance_optimisation",
         "LossWeights": "objective"}

__all__ = ["register", "RegistrationResult", "load_model", "SARModel", "FinetuneSettings", "OptimisationSettings",
           "LossWeights",
           "SARError", "InputImageError", "WeightsError", "DeviceError", "OutputError",
           "SettingsError", "Cancelled", "RegistrationCancelled", "TrainingCancelled"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
