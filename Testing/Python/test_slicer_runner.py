"""The Slicer module's background runner (SARRegistration/SARRegistrationRunner.py), without Qt.

The registration-specific paths (cancel in each phase, closing the scene, errors reaching the
panel) are tested on real MRML in test_slicer_module.py; here the runner alone: progress arrives in
order on the polling thread, the outcome once, after it; cancel and errors end the run as they must.
"""

from __future__ import annotations

import threading
import time

import pytest

from helpers import slicer_module_file

@pytest.fixture(scope="module")
def runner():
    with slicer_module_file("SARRegistrationRunner") as module:
        yield module


def poll_until_done(run, timeout=10.0):
    """Poll as the panel's timer does; returns every progress event and the outcome."""
    events, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        new, outcome = run.poll()
        events.extend(new)
        if outcome is not None:
            return events, outcome
        time.sleep(0.005)
    raise AssertionError("the run did not end")


def test_progress_arrives_in_order_then_the_outcome_once(runner):
    def work(progress, cancelled):
        for step in range(5):
            progress(step / 4, f"step {step}")
        return "value"

    run = runner.BackgroundRun(work).start()
    events, outcome = poll_until_done(run)
    assert events == [(step / 4, f"step {step}") for step in range(5)]
    assert outcome.state is runner.RunState.SUCCEEDED and outcome.value == "value" and outcome.error is None
    assert run.poll() == ([], None)  # given once


def test_polling_never_waits_for_the_work(runner):
    """The main thread stays free: a poll returns at once while the work is blocked."""
    release = threading.Event()

    def work(progress, cancelled):
        progress(0.5, "waiting")
        assert release.wait(10)
        return 1

    run = runner.BackgroundRun(work).start()
    deadline = time.monotonic() + 5
    while not run.poll()[0] and time.monotonic() < deadline:
        time.sleep(0.005)
    started = time.perf_counter()
    for _ in range(20):
        assert run.poll() == ([], None)
    assert time.perf_counter() - started < 0.5
    assert run.workerAlive
    release.set()
    assert poll_until_done(run)[1].state is runner.RunState.SUCCEEDED


@pytest.mark.parametrize("error", [ImportError("No module named 'torch'"), MemoryError("no memory"),
                                   ValueError("bad input")])
def test_every_error_of_the_work_reaches_the_polling_thread(runner, error):
    def work(progress, cancelled):
        progress(0.1, "about to fail")
        raise error

    events, outcome = poll_until_done(runner.BackgroundRun(work).start())
    assert events == [(0.1, "about to fail")]
    assert outcome.state is runner.RunState.FAILED and outcome.error is error
    assert type(error).__name__ in outcome.traceback and "raise error" in outcome.traceback


def test_cancel_stops_work_that_checks_it(runner):
    started = threading.Event()

    def work(progress, cancelled):
        started.set()
        while not cancelled():
            time.sleep(0.001)
        raise RuntimeError("stopped as asked")

    run = runner.BackgroundRun(work).start()
    assert started.wait(5) and not run.cancelRequested
    run.cancel()
    assert run.cancelRequested
    outcome = poll_until_done(run)[1]
    assert outcome.state is runner.RunState.CANCELLED
    assert str(outcome.error) == "stopped as asked"


def test_a_result_that_arrives_after_cancel_is_not_used(runner):
    """Work that finishes anyway after Cancel was pressed: its value is dropped, the run is cancelled."""
    release = threading.Event()

    def work(progress, cancelled):
        assert release.wait(10)
        return "too late"

    run = runner.BackgroundRun(work).start()
    run.cancel()
    release.set()
    outcome = poll_until_done(run)[1]
    assert outcome.state is runner.RunState.CANCELLED and outcome.value is None


def test_wait_blocks_until_the_work_has_ended(runner):
    run = runner.BackgroundRun(lambda progress, cancelled: time.sleep(0.05) or 3).start()
    assert run.wait(5)
    assert not run.workerAlive
    assert run.poll()[1].value == 3
