"""A tiny GPT-2 on the generated text corpus, trained by ``transformers.Trainer`` or by a plain
loop with ShapleyTracker (the reference); shared by the Hugging Face tests and their 2-process script."""

from __future__ import annotations


import torch
from torch.utils.data import Dataset

from benchmarks.common.textdata import make_corpus
from inrun_shapley import IndexedDataset, ShapleyTracker
from inrun_shapley.callbacks.huggingface import causal_lm_loss

# Every module of GPT-2 is tracked, its position embedding included (called on position_ids
# [1, T], broadcast over the batch).
EXCLUDE: list[str] = []
LR = 1e-2
# Adam's eps well above the round-off of the gradients: Adam's direction weighs an element by
# 1 / (sqrt(v) + eps), so elements whose gradient is round-off (GPT-2's key bias has none in exact
# arithmetic) carry it into the values. With eps=1e-8, runs that sum the same gradients in another
# order (2 processes, other micro-batches) part by ~1e-3 relative at the first step; with 1e-4 by ~2e-6.
EPS = 1e-4


def _encode(tokenizer, sentences, length):
    ids = tokenizer.encode_batch(sentences, length=length)
    mask = ids != tokenizer.pad_id
    return {"input_ids": ids, "attention_mask": mask.long(), "labels": ids.masked_fill(~mask, -100)}


def corpus_data(n_sentences: int = 32, n_queries: int = 6):
    """``(train, val, vocab_size, length)``: train and val as dicts of ``[n, T]`` tensors."""
    corpus = make_corpus(n_sentences=n_sentences, n_queries=n_queries, seed=0)
    tok = corpus.tokenizer
    length = max(len(tok.encode(s)) for s in corpus.sentences + corpus.queries)
    return _encode(tok, corpus.sentences, length), _encode(tok, corpus.queries, length), len(tok), length


class Rows(Dataset):
    """Dict items; ``n_words`` is a column GPT-2's forward does not take (the Trainer drops it)."""

    def __init__(self, table: dict):
        self.table = table

    def __len__(self) -> int:
        return len(self.table["input_ids"])

    def __getitem__(self, i: int) -> dict:
        return {**{k: v[i] for k, v in self.table.items()}, "n_words": int(self.table["attention_mask"][i].sum())}


def make_model(vocab_size: int, length: int, seed: int = 0, arch: str = "gpt2"):
    """A 2-layer GPT-2 (or Llama: its layers are nn.Linear, which the capture replays under bf16;
    GPT-2's Conv1D takes the generic JVP rule, which does not) built from a config, no download."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=2, num_key_value_heads=2, vocab_size=vocab_size,
                                            max_position_embeddings=length))
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=vocab_size, n_positions=length,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def training_args(output_dir, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(output_dir), per_device_train_batch_size=4, learning_rate=LR,
                adam_epsilon=EPS, lr_scheduler_type="constant", train_sampling_strategy="sequential",
                report_to=[], use_cpu=True,
                save_strategy="no", disable_tqdm=True, logging_steps=1, dataloader_num_workers=0)
    return TrainingArguments(**{**base, **kw})


def train_with_trainer(output_dir, callback, data, *, resume=None, arch: str = "gpt2", **args):
    """One Trainer run of the tiny GPT-2 with ``callback``; returns the Trainer."""
    from transformers import Trainer

    train, _, vocab, length = data
    trainer = Trainer(model=make_model(vocab, length, arch=arch), args=training_args(output_dir, **args),
                      train_dataset=IndexedDataset(Rows(train)), callbacks=[callback])
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _predicted_from(model) -> int:
    """First label position the Trainer counts in ``num_items_in_batch``: 1 for models whose loss
    shifts the labels (Llama's ``ForCausalLM`` loss: position 0 is never a prediction target), else 0
    (transformers' ``Trainer._get_num_items_in_batch``). Counting from 0 for Llama was the ~25%
    difference once blamed on bf16 (40 against 36 tokens in the first window)."""
    from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

    model = getattr(model, "module", model)
    return 1 if LOSS_MAPPING.get(getattr(model, "loss_type", None)) is ForCausalLMLoss else 0


def plain_values(data, *, steps: int, batch_size: int = 4, accumulate: int = 1, clip: float | None = 1.0,
                 bf16: bool = False, arch: str = "gpt2", val_loss_fn=causal_lm_loss, **tracker_options):
    """The reference: a plain loop over the rows in order, the loss as the Trainer computes it
    (token sum over the whole accumulation window's count of predicted tokens, passed as
    ``num_items_in_batch`` to models that take it), fused AdamW as the Trainer's
    default, clipping after the window."""
    train, val, vocab, length = data
    model = make_model(vocab, length, arch=arch)
    exclude = EXCLUDE if arch == "gpt2" else []
    opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS, weight_decay=0.0, fused=True)
    if bf16:  # as the Trainer does: Accelerate runs the model's forward under autocast
        from accelerate import Accelerator

        model = Accelerator(cpu=True, mixed_precision="bf16").prepare_model(model)
    tracker = ShapleyTracker(model, opt, val_data=val, val_loss_fn=val_loss_fn, exclude=exclude, **tracker_options)
    skip = _predicted_from(model)
    n = len(train["input_ids"])
    start = 0
    for _ in range(steps):
        window = []
        for _ in range(accumulate):
            window.append(list(range(start, start + batch_size)))
            start = (start + batch_size) % n
        tokens = torch.tensor(sum(int((train["labels"][rows][:, skip:] != -100).sum()) for rows in window))
        for rows in window:
            with tracker.batch(rows):
                model(**{k: v[rows] for k, v in train.items()}, num_items_in_batch=tokens).loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
    tracker.detach()
    return tracker.values, tracker.counts
