"""2-process Accelerate run with its FSDP2 plugin (torchrun, gloo on CPU); rank 0 writes the
merged values to $RESULT_PATH.

Accelerate turns FSDP on only for accelerator devices: for CPU processes it silently uses DDP
(``DistributedType.MULTI_CPU``). Without a GPU this script sets the state's distributed type to
FSDP after construction, as a GPU launch would, so that ``prepare`` runs Accelerate's own FSDP2
path (``fully_shard`` on the model, DTensor parameters and optimizer state).

``crash``: ``accelerator.save_state`` after the first epoch (step 4; the hook registered for
checkpointing), the log flushed every step, rank 1 killed (``os._exit``) at the start of step 7.
``resume``: ``load_state`` of that checkpoint and the second epoch, as after a crash. These two
run DDP (``--ddp``): Accelerate's FSDP ``save_state`` is not reachable with the CPU override.
"""

import os
import sys

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

if __name__ == "__main__":
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    from inrun_shapley import IndexedDataset
    from inrun_shapley.callbacks import ShapleyHook
    from tests.callbacks.integration_setup import data, make_model, make_optimizer, write_result

    train, val = data()
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    ddp = "--ddp" in sys.argv
    if ddp:
        accelerator = Accelerator(cpu=True)
    elif torch.cuda.is_available():
        accelerator = Accelerator(fsdp_plugin=plugin)
    else:
        accelerator = Accelerator(cpu=True)
        accelerator.state.distributed_type, accelerator.state.fsdp_plugin = DistributedType.FSDP, plugin
    model = make_model()
    opt = make_optimizer(model.parameters())
    sampler = DistributedSampler(IndexedDataset(train), num_replicas=2, rank=accelerator.process_index, shuffle=False)
    loader = DataLoader(IndexedDataset(train), batch_size=4, sampler=sampler)
    model, opt = accelerator.prepare(model, opt)
    assert ddp or type(next(model.parameters())).__name__ == "DTensor", "Accelerate did not shard the model"
    mode = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] != "--ddp" else "plain"
    hook = ShapleyHook(accelerator, model, opt, val_data=val, log_dir="log", flush_every=1,
                       resume=mode == "resume")
    accelerator.register_for_checkpointing(hook)
    epochs = range(2)
    if mode == "resume":
        accelerator.load_state("ckpt")
        epochs = range(1, 2)
    for epoch in epochs:
        if epoch == 1 and mode == "crash":
            accelerator.save_state("ckpt")
        for i, batch in enumerate(loader):
            if mode == "crash" and epoch == 1 and i == 2 and accelerator.process_index == 1:
                os._exit(1)
            with hook.batch(batch):
                x, y = batch
                accelerator.backward(F.cross_entropy(model(x.to(accelerator.device)), y.to(accelerator.device)))
            opt.step()
            opt.zero_grad()
    hook.close()
    if accelerator.is_main_process:
        write_result(hook)
