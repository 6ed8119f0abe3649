"""What the use-site watch costs: nanoGPT's ``wpe(torch.arange(T))`` (watched) against the same
model with ``wpe(torch.arange(T)[None])`` (GPT-2's shared-row path, not watched), side by side.

Times the tracked micro-batch (forward and backward inside ``tracker.batch``) and the whole step
(with ``optimizer.step()`` and the tracker's scoring), interleaved, median of ``--reps``.

    python -m benchmarks.use_site_overhead [--width 128 --layers 4 --batch 8 --tokens 128]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from inrun_shapley import ShapleyTracker
from tests.engine.zoo_models import V, NanoGPT


class RowPositions(NanoGPT):
    """The same model with positions of shape ``[1, T]``."""

    def forward(self, idx):
        t = idx.shape[1]
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)[None]
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


def _loss(model, tokens):
    logits = model(tokens[:, :-1])
    per = F.cross_entropy(logits.reshape(-1, V), tokens[:, 1:].reshape(-1), reduction="none")
    return per.view(tokens.shape[0], -1).mean(1)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    data = torch.randint(0, V, (args.batch, args.tokens + 1))
    runs = {}
    for name, cls in (("arange(T) (watched)", NanoGPT), ("arange(T)[None] (not watched)", RowPositions)):
        torch.manual_seed(0)
        model = cls(d=args.width, heads=4, layers=args.layers, block=args.tokens)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        tracker = ShapleyTracker(model, opt, val_data=(data[:2],), val_loss_fn=lambda m, b: _loss(m, *b))
        runs[name] = (model, opt, tracker)
    times = {name: ([], []) for name in runs}
    for rep in range(args.reps + 2):
        for name, (model, opt, tracker) in runs.items():
            t0 = time.perf_counter()
            with tracker.batch(torch.arange(args.batch)):
                _loss(model, data).mean().backward()
            t1 = time.perf_counter()
            opt.step()
            opt.zero_grad()
            t2 = time.perf_counter()
            if rep >= 2:  # the first two are warm-up (the watch probes the first forward)
                times[name][0].append(t1 - t0)
                times[name][1].append(t2 - t0)
    print(f"width {args.width}, {args.layers} layers, batch {args.batch} x {args.tokens} tokens, "
          f"{torch.get_num_threads()} threads, median of {args.reps}")
    base = statistics.median(times["arange(T)[None] (not watched)"][0]), statistics.median(
        times["arange(T)[None] (not watched)"][1])
    for name, (fb, step) in times.items():
        fb, step = statistics.median(fb), statistics.median(step)
        print(f"{name:<32} forward+backward {fb * 1e3:8.1f} ms ({fb / base[0]:.3f}x)   "
              f"whole step {step * 1e3:8.1f} ms ({step / base[1]:.3f}x)")


if __name__ == "__main__":
    main()
