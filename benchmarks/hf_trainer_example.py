"""In-Run Shapley values of a tiny GPT-2 trained by ``transformers.Trainer`` on the generated
text corpus (no download): the training sentences that helped and hurt the loss on paraphrase
queries most.

Run: ``python -m benchmarks.hf_trainer_example [--steps 40] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch
from torch.utils.data import Dataset

from benchmarks.common.textdata import make_corpus


class Rows(Dataset):
    """Dict items of ``input_ids``/``attention_mask``/``labels`` (pads ignored by the loss)."""

    def __init__(self, ids: torch.Tensor, pad_id: int):
        mask = ids != pad_id
        self.table = {"input_ids": ids, "attention_mask": mask.long(), "labels": ids.masked_fill(~mask, -100)}

    def __len__(self) -> int:
        return len(self.table["input_ids"])

    def __getitem__(self, i: int) -> dict:
        return {k: v[i] for k, v in self.table.items()}


def main(argv=None) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    from inrun_shapley import IndexedDataset
    from inrun_shapley.callbacks import ShapleyTrainerCallback

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", default=None, help="Trainer output_dir (default: a temporary folder)")
    flags = parser.parse_args(argv)

    corpus = make_corpus(n_sentences=120, n_queries=20, seed=0)
    tok = corpus.tokenizer
    length = max(len(tok.encode(s)) for s in corpus.sentences + corpus.queries)
    train = Rows(tok.encode_batch(corpus.sentences, length=length), tok.pad_id)
    val = Rows(tok.encode_batch(corpus.queries, length=length), tok.pad_id).table
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=len(tok), n_positions=length))
    shapley = ShapleyTrainerCallback(val_data=val)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=flags.out or tmp, max_steps=flags.steps, per_device_train_batch_size=8,
                                 gradient_accumulation_steps=2, learning_rate=3e-3, report_to=[], use_cpu=True,
                                 save_strategy="no", logging_steps=10)
        Trainer(model=model, args=args, train_dataset=IndexedDataset(train), callbacks=[shapley]).train()
    values = shapley.values
    order = np.argsort(values)
    print(f"{int((shapley.counts > 0).sum())} sentences scored over {flags.steps} steps")
    print("most helpful:", *[f"  {values[i]:+.2e}  {corpus.sentences[i]}" for i in order[::-1][:5]], sep="\n")
    print("most harmful:", *[f"  {values[i]:+.2e}  {corpus.sentences[i]}" for i in order[:5]], sep="\n")


if __name__ == "__main__":
    main()
