"""Errors a user can act on. Each message names the problem and, where it helps, the fix."""


class SARError(Exception):
    """Base class of every error SARRegistration raises on purpose."""


class InputImageError(SARError, ValueError):
    """An input image cannot be registered (wrong dimension, empty, constant, NaN, unreadable)."""


class SettingsError(SARError, ValueError):
    """An option is out of range: an unknown mode, a negative tolerance, no iterations."""


class ManifestError(SARError, ValueError):
    """A batch's list of pairs cannot be used (no such file, a missing column, an id that is taken or unsafe)."""


class WeightsError(SARError):
    """A weights file is missing, corrupt, not a SAR checkpoint, or fails its hash check."""


class DeviceError(SARError):
    """The requested compute device is not available."""


class OutputError(SARError):
    """The outputs cannot be written (the folder is a file, not writable, or the disk is full)."""


class Cancelled(SARError):
    """The user cancelled running work."""


class RegistrationCancelled(Cancelled):
    """The user cancelled a running registration; nothing was written."""


class TrainingCancelled(Cancelled):
    """The user cancelled training; the last checkpoint is kept."""
