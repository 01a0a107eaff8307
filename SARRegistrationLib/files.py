"""Writing a file so that no reader ever sees half of it, and a crash leaves none."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def write_atomically(path, write: Callable[[str], None]) -> Path:
    """``write(temporary)`` to a hidden file beside ``path``, then rename it to ``path``.

    A rename within one folder is atomic, so ``path`` is either its old content or the whole new
    one. The file gets the usual ``0644`` (``mkstemp`` makes it private; outputs are meant to be
    shared). The temporary file is removed on any error, Ctrl-C included.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(descriptor)
    try:
        write(temporary)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path
