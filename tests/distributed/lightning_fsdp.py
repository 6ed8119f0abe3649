"""2-process Lightning run with the FSDP2 strategy (``ModelParallelStrategy``, gloo on CPU);
writes rank 0's merged values to $RESULT_PATH.

The LightningModule shards its network with ``fully_shard`` in ``configure_model`` (Lightning's
FSDP2 recipe). Each rank gets 4 of every 8 consecutive samples, so each global batch equals the
1-process run's batch of 8.

``crash``: a distributed checkpoint at the end of the first epoch (step 4), the log flushed every
step, and rank 1 killed (``os._exit``) at the start of step 7. ``resume``: continue from the last checkpoint
(``fit(ckpt_path=...)``), as after a crash.
"""

import os
import sys
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, DistributedSampler

from inrun_shapley import IndexedDataset
from inrun_shapley.callbacks import ShapleyCallback
from tests.callbacks.integration_setup import data, lightning_module_class, trainer_kwargs, write_result


def sharded_module():
    class Sharded(lightning_module_class()):
        def configure_model(self):
            mesh = self.device_mesh["data_parallel"]
            fully_shard(self.net[0], mesh=mesh)
            fully_shard(self.net, mesh=mesh)

    return Sharded()


class KillRank(pl.Callback):
    """Kills rank 1 at the start of a step, as a lost node would (no cleanup, no flush)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and trainer.global_rank == 1:
            os._exit(1)


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "plain"
    train, val = data()
    callbacks = [ShapleyCallback(val_data=val, log_dir="log", flush_every=1 if mode != "plain" else 50)]
    extra, ckpt_path = {}, None
    if mode != "plain":
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath="ckpt", save_top_k=-1, save_on_train_epoch_end=True))
        extra["enable_checkpointing"] = True
    if mode == "crash":
        callbacks.append(KillRank(6))
    if mode == "resume":
        ckpt_path = str(max(Path("ckpt").iterdir(), key=lambda p: int(p.stem.split("step=")[1])))
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    trainer = pl.Trainer(callbacks=callbacks, **trainer_kwargs(devices=2, strategy=strategy,
                                                               use_distributed_sampler=False, **extra))
    cb = callbacks[0]
    rank = int(os.environ.get("LOCAL_RANK", 0))
    sampler = DistributedSampler(IndexedDataset(train), num_replicas=2, rank=rank, shuffle=False)
    trainer.fit(sharded_module(), DataLoader(IndexedDataset(train), batch_size=4, sampler=sampler),
                ckpt_path=ckpt_path)
    if trainer.global_rank == 0:
        write_result(cb)
