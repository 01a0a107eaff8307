"""`train` runs unchanged under torchrun with DistributedDataParallel (two CPU processes, gloo)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from SARRegistrationLib.training import TrainingSettings, _batch


class _IndexDataset:
    """Items that say which dataset index they are."""

    def __len__(self):
        return 10

    def __getitem__(self, index):
        return {"index": torch.tensor([index])}


def test_ranks_take_disjoint_shares_of_each_step():
    settings = TrainingSettings(batch_size=2, seed=3)
    for step in range(4):
        single = _batch(_IndexDataset(), 2 * step, settings)["index"].tolist() + \
            _batch(_IndexDataset(), 2 * step + 1, settings)["index"].tolist()
        ranks = [_batch(_IndexDataset(), step, settings, rank, 2)["index"].tolist() for rank in (0, 1)]
        assert ranks[0] + ranks[1] == single  # the same items as one process taking both batches


def test_two_gloo_processes_train_in_sync(tmp_path):
    output = tmp_path / "ddp.pt"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "SARRegistrationLib", "train", "--synthetic", "8", "--ndims", "2", "--shape", "32", "32",
               "--batch-size", "1", "--feature-steps", "2", "--pretrain-steps", "2", "--gan-steps", "2",
               "--device", "cpu", "--output", str(output)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    finished = subprocess.run(command, cwd=Path(__file__).resolve().parents[2], env=environment, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    card = json.loads(output.with_suffix(".json").read_text())
    assert card["distributed"] == {"world_size": 2, "backend": "gloo", "ranks_in_sync": True}
    assert len([record for record in card["final_losses"]]) == 3  # feature, pretrain and gan stages ran
