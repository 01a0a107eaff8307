"""Benchmarks of SARRegistration against classical and learned baselines (see benchmarks/README.md)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path


def command_line(script: str, argv=None) -> str:
    """How to rerun a benchmark script as it was run, for its report: ``python benchmarks/NAME.py
    ARGS``, with ``argv`` (the script's arguments; None: this process's) quoted for a shell."""
    return shlex.join(["python", f"benchmarks/{Path(script).name}", *(sys.argv[1:] if argv is None else argv)])
