"""Run under ``torchrun --nproc_per_node 2``: FSDP2 (``fully_shard``, gloo, CPU) training of the
models of fsdp_setup.py with a ShapleyTracker; each rank writes its values to
``$RESULT_PATH.<kind>.rank<r>.npy``."""

import gc
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
        tracker.detach()
        del tracker
    # Free what holds the process group (the tracker holds the sharded model, its optimizer and their
    # device mesh) before destroying it: a gloo group whose last owner goes only at interpreter
    # teardown can abort the process there (std::terminate), after all the work is done. Seen here
    # about once in 20 runs; none in 24 with this.
    gc.collect()
    dist.destroy_process_group()
