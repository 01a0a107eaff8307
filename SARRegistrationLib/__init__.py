"""SARRegistrationLib: segmentation augmented deformable registration with GANs (pure Python, PyTorch).

The operations of the command line, one import away::

    import SARRegistrationLib as sar
    result = sar.register("reference.nrrd", "floating.nrrd", device="auto")  # instance optimisation
    result.save("out/")                      # warped, displacement (mm, ITK convention), masks, metrics
    model = sar.load_model(ndims=2)          # reuse one loaded model for a batch of pairs
"""

from .errors import (Cancelled, DeviceError, InputImageError, OutputError, RegistrationCancelled, SARError,
                     SettingsError, TrainingCancelled, WeightsError)
from .finetuning import FinetuneSettings
from .instance_optimisation import OptimisationSettings
from .model import SARModel, load_model
from .objective import LossWeights
from .registration import RegistrationResult, register

__all__ = ["register", "RegistrationResult", "load_model", "SARModel", "FinetuneSettings", "OptimisationSettings",
           "LossWeights",
           "SARError", "InputImageError", "WeightsError", "DeviceError", "OutputError",
           "SettingsError", "Cancelled", "RegistrationCancelled", "TrainingCancelled"]
