"""Output staging: a folder's outputs appear all together or not at all, Ctrl-C included."""

from __future__ import annotations

import os
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputError, last_line


@contextmanager
def staged_output_dir(output_dir):
    """Yield a staging folder; move its files into ``output_dir`` only if the block succeeds.

    Outputs are written into a temporary folder beside ``output_dir`` and moved in at the end, so
    an error or Ctrl-C midway leaves ``output_dir`` as it was (and removes it if this call created
    it). Failures to create or write the folder raise :class:`OutputError`.
    """
    output_dir = Path(output_dir)
    created = not output_dir.exists()
    if not created and not output_dir.is_dir():
        raise OutputError(f"The output folder {str(output_dir)!r} is a file, not a folder; choose another name.")
    try:
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
            staging = tempfile.TemporaryDirectory(dir=output_dir, prefix=".sar-partial-")
        except OSError as error:
            raise OutputError(f"The output folder {str(output_dir)!r} cannot be written: "
                              f"{error.strerror or error}.") from None
        with staging as folder:
            try:
                yield Path(folder)
            except (OSError, RuntimeError) as error:  # RuntimeError: SimpleITK's writers
                message = last_line(error, type(error).__name__)
                raise OutputError(f"Writing the outputs into {str(output_dir)!r} failed: {message}") from None
            _move_all_or_none(Path(folder), output_dir)
    except BaseException:
        if created and output_dir.is_dir() and not any(output_dir.iterdir()):
            output_dir.rmdir()
        raise


def _move_all_or_none(staging: Path, output_dir: Path) -> None:
    """Move every file of ``staging`` into ``output_dir``, or, if anything fails, none.

    Files about to be replaced are set aside in ``staging`` and put back on failure. Ctrl-C is
    held back during the moves (a few renames) and then undoes them, so it can never leave a mix
    of old and new outputs.
    """
    replaced = staging / ".replaced"
    replaced.mkdir()
    moved = []
    with interrupts_recorded() as interrupted:
        try:
            for staged in sorted(path for path in staging.iterdir() if path != replaced):
                target = output_dir / staged.name
                if target.exists():
                    os.replace(target, replaced / staged.name)
                os.replace(staged, target)
                moved.append(staged.name)
            if interrupted:
                raise KeyboardInterrupt
        except BaseException as error:
            for name in moved:
                os.replace(output_dir / name, staging / name)
            for old in replaced.iterdir():
                os.replace(old, output_dir / old.name)
            if isinstance(error, OSError):
                raise OutputError(f"Moving the outputs into {str(output_dir)!r} failed: {error.strerror or error}; "
                                  "the folder is as it was.") from None
            raise


@contextmanager
def interrupts_recorded():
    """Record Ctrl-C (SIGINT) in the yielded list instead of raising it; only the main thread can
    change signal handling, so elsewhere the list stays empty."""
    received = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield received
    finally:
        signal.signal(signal.SIGINT, previous)
