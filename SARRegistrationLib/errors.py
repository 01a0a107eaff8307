"""Errors a user can act on. Each message names the problem and, where it helps, the fix; and
:func:`last_line`, the part of a library's error message that such a message quotes."""


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


def last_line(error: Exception, default: str) -> str:
    """The last line of an error's message (SimpleITK's end in the one that names the problem)."""
    text = str(error).strip()
    return text.splitlines()[-1] if text else default
