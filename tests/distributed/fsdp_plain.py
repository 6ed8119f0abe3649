"""Run under ``torchrun --nproc_per_node 2``: FSDP2 (``fully_shard``, gloo, CPU) training of the
models of fsdp_setup.py with a ShapleyTracker; each rank writes its values to
``$RESULT_PATH.<kind>.rank<r>.npy``."""

import os
import sys

import numpy as np
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from tests.distributed.fsdp_setup import train  # noqa: E402


def shard(model, blocks):
    for b in blocks:
        fully_shard(b)
    fully_shard(model)


if __name__ == "__main__":
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for kind in sys.argv[1:] or ["mlp", "lm"]:
        tracker = train(kind, rank, world, shard=shard)
        np.save(f"{os.environ['RESULT_PATH']}.{kind}.rank{rank}.npy", np.stack([tracker.values, tracker.counts]))
    dist.destroy_process_group()
