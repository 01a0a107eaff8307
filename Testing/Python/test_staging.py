"""Tests of SARRegistrationLib.staging: outputs appear all together or not at all, Ctrl-C included."""

import os
import signal

import pytest

from SARRegistrationLib import staging
from SARRegistrationLib.errors import OutputError


def test_staged_output_dir_success_moves_files(tmp_path):
    output = tmp_path / "new" / "out"
    with staging.staged_output_dir(output) as folder:
        assert folder.parent == output
        (folder / "a.txt").write_text("a")
        (folder / "b.txt").write_text("b")
    assert sorted(p.name for p in output.iterdir()) == ["a.txt", "b.txt"]
    assert (output / "a.txt").read_text() == "a"


def test_staged_output_dir_error_removes_new_dir(tmp_path):
    output = tmp_path / "out"
    with pytest.raises(OutputError, match="Writing the outputs into .* failed: midway"):
        with staging.staged_output_dir(output) as folder:
            (folder / "a.txt").write_text("a")
            raise RuntimeError("midway")  # as SimpleITK's writers raise
    assert not output.exists()


def test_staged_output_dir_error_leaves_existing_dir_as_it_was(tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with staging.staged_output_dir(output) as folder:
            (folder / "old.txt").write_text("new")
            (folder / "a.txt").write_text("a")
            raise KeyboardInterrupt
    assert [p.name for p in output.iterdir()] == ["old.txt"]
    assert (output / "old.txt").read_text() == "old"


def test_staged_output_dir_error_keeps_existing_empty_dir(tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    with pytest.raises(ValueError):
        with staging.staged_output_dir(output):
            raise ValueError
    assert output.is_dir() and not any(output.iterdir())


def test_staged_output_dir_that_is_a_file_is_an_output_error(tmp_path):
    output = tmp_path / "out"
    output.write_text("a file, not a folder")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        with staging.staged_output_dir(output):
            pytest.fail("the block must not run")
    assert output.read_text() == "a file, not a folder"


def _existing_outputs(output):
    output.mkdir()
    for name in ("a.txt", "b.txt", "c.txt"):
        (output / name).write_text("old " + name)


def _stage_new_outputs(folder):
    for name in ("a.txt", "b.txt", "c.txt", "d.txt"):
        (folder / name).write_text("new " + name)


def _assert_old_outputs(output):
    assert sorted(p.name for p in output.iterdir()) == ["a.txt", "b.txt", "c.txt"]
    assert all((output / name).read_text() == "old " + name for name in ("a.txt", "b.txt", "c.txt"))


def test_failed_move_puts_every_replaced_file_back(tmp_path, monkeypatch):
    output = tmp_path / "out"
    _existing_outputs(output)
    real_replace, calls = os.replace, []

    def failing_replace(source, target):
        calls.append(source)
        if len(calls) == 4:  # after a.txt was set aside and replaced, while b.txt moves in
            raise OSError(28, "No space left on device")
        real_replace(source, target)

    monkeypatch.setattr(staging.os, "replace", failing_replace)
    with pytest.raises(OutputError, match="No space left on device; the folder is as it was"):
        with staging.staged_output_dir(output) as folder:
            _stage_new_outputs(folder)
    _assert_old_outputs(output)


def test_ctrl_c_while_moving_undoes_the_moves(tmp_path, monkeypatch):
    output = tmp_path / "out"
    _existing_outputs(output)
    real_replace = os.replace

    def interrupted_replace(source, target):
        signal.raise_signal(signal.SIGINT)  # Ctrl-C arrives in the middle of the moves
        real_replace(source, target)

    monkeypatch.setattr(staging.os, "replace", interrupted_replace)
    with pytest.raises(KeyboardInterrupt):
        with staging.staged_output_dir(output) as folder:
            _stage_new_outputs(folder)
    _assert_old_outputs(output)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_staged_output_dir_replaces_old_outputs_when_all_goes_well(tmp_path):
    output = tmp_path / "out"
    _existing_outputs(output)
    with staging.staged_output_dir(output) as folder:
        _stage_new_outputs(folder)
    assert sorted(p.name for p in output.iterdir()) == ["a.txt", "b.txt", "c.txt", "d.txt"]
    assert all((output / name).read_text() == "new " + name for name in ("a.txt", "b.txt", "c.txt", "d.txt"))


def test_unwritable_output_folder_is_an_output_error_and_leaves_no_folder(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(staging.tempfile, "TemporaryDirectory", refuse)
    output = tmp_path / "out"
    with pytest.raises(OutputError, match="cannot be written: Permission denied"):
        with staging.staged_output_dir(output):
            pytest.fail("the block must not run")
    assert not output.exists()
