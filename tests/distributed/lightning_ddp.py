"""2-process Lightning DDP run (gloo on CPU); writes rank 0's merged values to $RESULT_PATH.

Each rank gets 4 of every 8 consecutive samples (an explicit DistributedSampler without shuffling:
Lightning's automatic one reshuffles), so the global batch of each step equals the 1-process run's
batch of 8.
"""

import os

import lightning.pytorch as pl
from torch.utils.data import DataLoader, DistributedSampler

from inrun_shapley import IndexedDataset
from inrun_shapley.callbacks import ShapleyCallback
from tests.callbacks.integration_setup import data, lightning_module_class, trainer_kwargs, write_result

if __name__ == "__main__":
    train, val = data()
    cb = ShapleyCallback(val_data=val, log_dir="log")
    trainer = pl.Trainer(callbacks=[cb], **trainer_kwargs(devices=2, strategy="ddp", use_distributed_sampler=False))
    rank = int(os.environ.get("LOCAL_RANK", 0))
    sampler = DistributedSampler(IndexedDataset(train), num_replicas=2, rank=rank, shuffle=False)
    trainer.fit(lightning_module_class()(), DataLoader(IndexedDataset(train), batch_size=4, sampler=sampler))
    if trainer.global_rank == 0:
        write_result(cb)
