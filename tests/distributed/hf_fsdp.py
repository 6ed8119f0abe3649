"""2-process transformers.Trainer run with ``fsdp=`` and ``fsdp_config={"fsdp_version": 2}``
(torchrun, gloo on CPU); rank 0 writes the merged values to $RESULT_PATH.

The Trainer's FSDP goes through Accelerate, which turns it on only for accelerator devices (on
CPU processes it silently runs DDP). Without a GPU this script sets Accelerate's state to FSDP
right after the Trainer creates it, as a GPU launch would, so the Trainer prepares the model
with ``fully_shard`` (each LlamaDecoderLayer, then the root). Each process takes 2 rows per
micro-batch, so each optimizer step sees the rows of the 1-process run with 4 rows.
"""


import torch
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from transformers import Trainer

from inrun_shapley import IndexedDataset
from inrun_shapley.callbacks import ShapleyTrainerCallback
from tests.callbacks.hf_setup import Rows, corpus_data, make_model, training_args
from tests.callbacks.integration_setup import write_result

FSDP_CONFIG = {"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}


class CpuFsdpTrainer(Trainer):
    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        if not torch.cuda.is_available():  # what a GPU launch sets by itself
            state = self.accelerator.state
            state.distributed_type = DistributedType.FSDP
            state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            self.is_fsdp_enabled = True


if __name__ == "__main__":
    torch.set_num_threads(1)
    train, val, vocab, length = corpus_data()
    cb = ShapleyTrainerCallback(val_data=val, log_dir="log")
    args = training_args("out", max_steps=3, per_device_train_batch_size=2, max_grad_norm=0.5,
                         fsdp="full_shard", fsdp_config=FSDP_CONFIG)
    trainer = CpuFsdpTrainer(model=make_model(vocab, length, arch="llama"), args=args,
                             train_dataset=IndexedDataset(Rows(train)), callbacks=[cb])
    trainer.train()
    assert type(next(trainer.model.parameters())).__name__ == "DTensor", "the Trainer did not shard the model"
    if trainer.is_world_process_zero():
        write_result(cb)
