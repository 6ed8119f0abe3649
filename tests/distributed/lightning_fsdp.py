"""2-process Lightning run with the FSDP2 strategy (``ModelParallelStrategy``, gloo on CPU);
writes rank 0's merged values to $RESULT_PATH.

The LightningModule shards its network with ``fully_shard`` in ``configure_model`` (Lightning's
FSDP2 recipe). Each rank gets 4 of every 8 consecutive samples, so each global batch equals the
1-process run's batch of 8.
"""

import json
import os

import lightning.pytorch as pl
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, DistributedSampler

from inrun_shapley import IndexedDataset
from inrun_shapley.callbacks import ShapleyCallback
from tests.callbacks.integration_setup import data, lightning_module_class, trainer_kwargs


def sharded_module():
    class Sharded(lightning_module_class()):
        def configure_model(self):
            mesh = self.device_mesh["data_parallel"]
            fully_shard(self.net[0], mesh=mesh)
            fully_shard(self.net, mesh=mesh)

    return Sharded()


if __name__ == "__main__":
    train, val = data()
    cb = ShapleyCallback(val_data=val, log_dir="log")
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    trainer = pl.Trainer(callbacks=[cb], **trainer_kwargs(devices=2, strategy=strategy, use_distributed_sampler=False))
    rank = int(os.environ.get("LOCAL_RANK", 0))
    sampler = DistributedSampler(IndexedDataset(train), num_replicas=2, rank=rank, shuffle=False)
    trainer.fit(sharded_module(), DataLoader(IndexedDataset(train), batch_size=4, sampler=sampler))
    if trainer.global_rank == 0:
        with open(os.environ["RESULT_PATH"], "w") as f:
            json.dump({"values": cb.values.tolist(), "counts": cb.counts.tolist()}, f)
