"""Long work off Slicer's main thread: one worker thread, progress through a queue, cancel by a flag.

Plain Python (no ``slicer``, ``qt`` or ``vtk``), so that tests and the Python console drive it
without an application. The panel polls :meth:`BackgroundRun.poll` from a ``QTimer`` on the main
thread; everything the work reports comes back there, in order, and so does its outcome. The work
itself must not touch MRML or widgets: the main thread does that with what the work returned.
"""

from __future__ import annotations

import enum
import queue
import threading
import traceback
from dataclasses import dataclass
from typing import Any, Callable

Progress = Callable[[float, str], None]
Work = Callable[[Progress, Callable[[], bool]], Any]


class RunState(enum.Enum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass
class RunOutcome:
    """How the work ended: its return value, or the exception it raised (with its traceback text)."""

    state: RunState
    value: Any = None
    error: BaseException | None = None
    traceback: str = ""


class BackgroundRun:
    """``work(progress, cancelled)`` in a daemon thread.

    ``progress(fraction, message)`` may be called from the worker as often as it likes: the calls
    are queued and handed to :meth:`poll`. ``cancelled()`` turns true once :meth:`cancel` has been
    called; the work checks it and stops (the engine raises ``RegistrationCancelled``). A run that
    was asked to cancel ends CANCELLED whatever the work did after that, so a result that arrives
    after the user pressed Cancel is never used.
    """

    def __init__(self, work: Work, name: str = "SAR registration"):
        self._work = work
        self._events: queue.Queue = queue.Queue()
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._outcome: RunOutcome | None = None
        self._delivered = False
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    def start(self) -> "BackgroundRun":
        self._thread.start()
        return self

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelRequested(self) -> bool:
        return self._cancel.is_set()

    @property
    def workerAlive(self) -> bool:
        return self._thread.is_alive()

    def poll(self) -> tuple[list[tuple[float, str]], RunOutcome | None]:
        """The progress reported since the last poll, and the outcome once the work has ended.

        The outcome is given once, by the first poll after the work ended, and after the last of
        its progress; later polls return ``([], None)``.
        """
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                break
        if self._done.is_set() and not self._delivered and self._events.empty():
            self._delivered = True
            return events, self._outcome
        return events, None

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the work has ended (for the console and tests; never on the GUI thread)."""
        return self._done.wait(timeout)

    def _main(self) -> None:
        try:
            value = self._work(lambda fraction, message: self._events.put((float(fraction), str(message))),
                               self._cancel.is_set)
        except BaseException as error:  # noqa: BLE001 (a worker's every error must reach the main thread)
            state = RunState.CANCELLED if self._cancel.is_set() else RunState.FAILED
            self._outcome = RunOutcome(state, error=error, traceback=traceback.format_exc())
        else:
            state = RunState.CANCELLED if self._cancel.is_set() else RunState.SUCCEEDED
            self._outcome = RunOutcome(state, value=None if state is RunState.CANCELLED else value)
        self._done.set()
