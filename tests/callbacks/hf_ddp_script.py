"""2-process transformers.Trainer run on CPU (torchrun, gloo); rank 0 writes the merged values
to $RESULT_PATH. Each process takes 2 rows per micro-batch (the sequential sampler's batches
dealt out in turn), so each optimizer step sees the rows of the 1-process run with 4 rows per
micro-batch."""


import torch

from inrun_shapley.callbacks import ShapleyTrainerCallback
from tests.callbacks.hf_setup import EXCLUDE, corpus_data, train_with_trainer
from tests.callbacks.integration_setup import write_result

if __name__ == "__main__":
    torch.set_num_threads(1)
    data = corpus_data()
    cb = ShapleyTrainerCallback(val_data=data[1], exclude=EXCLUDE, log_dir="log")
    trainer = train_with_trainer("out", cb, data, max_steps=3, per_device_train_batch_size=2,
                                 gradient_accumulation_steps=2, max_grad_norm=0.5)
    if trainer.is_world_process_zero():
        norms = [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry]
        write_result(cb, grad_norms=norms)
