"""Processes started by ``torchrun``: their rank, the world size, each one's device, the process group.

``torchrun --nproc_per_node N`` starts N copies of a command with ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` in their environment; a process started otherwise is rank 0 of a world of 1.
Training (:mod:`training`) and batches (:mod:`batch`) both run this way.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from .errors import DeviceError


def launched_rank() -> tuple[int, int]:
    """``(rank, world size)`` as torchrun gives them, before any process group is joined."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def join_process_group(device: torch.device, backend: str | None = None,
                       timeout: datetime.timedelta | None = None) -> tuple[int, int, torch.device]:
    """``(rank, world size, device)``; joins the process group when started by ``torchrun``.

    On CUDA each process takes the GPU of its ``LOCAL_RANK`` (a :class:`DeviceError` when the
    machine has fewer GPUs than processes). ``backend`` defaults to NCCL on CUDA and gloo on the
    CPU; ``timeout`` bounds the wait of every collective (PyTorch's default, 30 minutes for gloo,
    when None).
    """
    world_size = launched_rank()[1]
    if world_size < 2:
        return 0, 1, device
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise DeviceError(f"torchrun started more processes on this machine than the {torch.cuda.device_count()} "
                              "GPU(s) PyTorch sees here: start one process per GPU (--nproc_per_node), or choose "
                              "device 'cpu'.")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if device.type == "cuda" else "gloo"), timeout=timeout)
    return dist.get_rank(), world_size, device
