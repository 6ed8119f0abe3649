"""Sharded training: communication and memory per rank, FSDP2 against DDP, with and without the tracker.

``python -m benchmarks.fsdp_cost`` launches ``torchrun --nproc_per_node 2`` (gloo, CPU) once per
strategy (``ddp``, ``fsdp``); each worker trains the benchmarks' transformer LM for ``--steps``
steps without a tracker, then ``--steps`` more with a ``ShapleyTracker`` (default midpoint
estimator), and reports per rank and per optimizer step:

* payload bytes entering collectives, by kind: all-gather (output size), reduce-scatter (input
  size), all-reduce (size). FSDP's are counted by wrapping ``torch.distributed``'s functions
  (``all_gather_single``, ``reduce_scatter_single``, ``all_reduce``), DDP's by a comm hook on
  its gradient buckets, the tracker's direction gathers by wrapping
  ``inrun_shapley.engine.sharding._full``. A ring moves ``(W-1)/W`` of an all-gather's or
  reduce-scatter's payload per rank, twice that for an all-reduce;
* what the alternative to gathering ``M`` (reducing partial dot products) would have to move:
  every rank's captured layer inputs and output gradients (their bytes, measured on the step's
  captures);
* memory per rank: bytes of the parameters, gradients and optimizer state this rank holds
  (local shards under FSDP), the largest direction gathered at once, and the peak resident set
  (``ru_maxrss``) after the untracked and the tracked phase.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from benchmarks.common.cli import add_quick, add_threads, command_line

ROOT = Path(__file__).resolve().parents[1]


def _nbytes(t) -> int:
    from inrun_shapley.engine.sharding import _local

    t = _local(t)
    return t.numel() * t.element_size()


class Counter:
    """Payload bytes per collective kind, and the largest single gather of a direction."""

    def __init__(self):
        self.bytes = defaultdict(int)
        self.largest_direction = 0

    def install(self):
        import torch.distributed as dist

        from inrun_shapley.engine import sharding

        def wrap(name, kind, which, key):
            orig = getattr(dist, name)

            def counted(*args, **kwargs):
                self.bytes[kind] += _nbytes(args[which] if len(args) > which else kwargs[key])
                return orig(*args, **kwargs)
            setattr(dist, name, counted)

        wrap("all_gather_single", "all_gather", 0, "output_tensor")
        wrap("reduce_scatter_single", "reduce_scatter", 1, "input")
        wrap("all_reduce", "all_reduce", 0, "tensor")
        full = sharding._full

        def counted_full(t):
            out = full(t)
            if sharding.is_sharded(t):
                self.bytes["direction_gather"] += _nbytes(out)
                self.largest_direction = max(self.largest_direction, _nbytes(out))
            return out
        sharding._full = counted_full

    def ddp_hook(self, ddp):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        # torch's default all-reduce, through torch.distributed.all_reduce (counted by install())
        ddp.register_comm_hook(None, allreduce_hook)

    def take(self) -> dict:
        out = dict(self.bytes)
        self.bytes.clear()
        return out


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from benchmarks.common.models import TinyTransformerLM, lm_losses
    from inrun_shapley import ShapleyTracker
    from inrun_shapley.engine import sharding

    torch.set_num_threads(args.threads or 1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    counter = Counter()
    counter.install()
    torch.manual_seed(0)
    model = TinyTransformerLM(args.vocab, args.seq + 1, d=args.width, heads=4, layers=args.layers)
    n_params = sum(p.numel() for p in model.parameters())
    if args.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        train_model = tracked = model
    else:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model)
        counter.ddp_hook(train_model)
        tracked = model
    opt = torch.optim.AdamW(train_model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    n_rows = world * args.batch * (2 * args.steps + 2)
    data = torch.randint(1, args.vocab, (n_rows, args.seq + 1), generator=g)
    val = torch.randint(1, args.vocab, (args.val_rows, args.seq + 1), generator=g)

    def step(s, tracker=None):
        ids = torch.arange(s * world * args.batch, (s + 1) * world * args.batch).tensor_split(world)[rank]
        if tracker is None:
            lm_losses(train_model, data[ids]).mean().backward()
        else:
            with tracker.batch(ids):
                lm_losses(train_model, data[ids]).mean().backward()
        opt.step()
        opt.zero_grad()

    step(0)  # warm-up: optimizer state, FSDP lazy init
    counter.take()
    for s in range(1, args.steps + 1):
        step(s)
    plain = counter.take()
    rss_plain = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    capture_bytes = []
    score = sharding.score_sharded

    def measured_score(batches, *a, **kw):
        capture_bytes.append(sum(_nbytes(t) for mb in batches for caps in mb.captures.values() for c in caps
                                 for t in [*c.args, *c.grad_outputs] if isinstance(t, torch.Tensor)))
        return score(batches, *a, **kw)
    sharding.score_sharded = measured_score  # before the tracker: it binds its scorer at construction
    tracker = ShapleyTracker(tracked, opt, val_data=val, val_loss_fn=lm_losses, val_batch_size=args.val_rows)
    step(args.steps + 1, tracker)  # first tracked step (lazy lookups)
    counter.take()
    largest = counter.largest_direction
    for s in range(args.steps + 2, 2 * args.steps + 2):
        step(s, tracker)
    tracked_bytes = counter.take()
    rss_tracked = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    state_bytes = sum(_nbytes(v) for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor))
    result = {
        "rank": rank, "world": world, "strategy": args.strategy, "params": n_params, "steps": args.steps,
        "param_bytes": sum(_nbytes(p) for p in train_model.parameters()),
        "grad_bytes_max": sum(_nbytes(p) for p in train_model.parameters()),  # one gradient per parameter
        "optimizer_state_bytes": state_bytes,
        "plain_per_step": {k: v / args.steps for k, v in plain.items()},
        "tracked_per_step": {k: v / args.steps for k, v in tracked_bytes.items()},
        "largest_direction_gather": max(largest, counter.largest_direction),
        "capture_bytes_per_step": capture_bytes[-1] if args.strategy == "fsdp" and capture_bytes else None,
        "rss_plain": rss_plain, "rss_tracked": rss_tracked,
        "values_finite": bool(torch.isfinite(torch.as_tensor(tracker.values)).all()),
    }
    tracker.detach()
    with open(f"{args.result}.{args.strategy}.rank{rank}.json", "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def mb(x: float) -> str:
    return f"{x / 2**20:.2f}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4, help="rows per rank per step")
    parser.add_argument("--val-rows", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--strategies", nargs="+", default=["ddp", "fsdp"])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    add_quick(parser)
    add_threads(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.width, args.layers, args.vocab, args.seq, args.steps = 32, 1, 64, 8, 1
    if args.worker:
        return worker(args)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "cost")
        for strategy in args.strategies:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                   "-m", "benchmarks.fsdp_cost", "--worker", "--strategy", strategy, "--result", prefix,
                   "--width", str(args.width), "--layers", str(args.layers), "--vocab", str(args.vocab),
                   "--seq", str(args.seq), "--batch", str(args.batch), "--val-rows", str(args.val_rows),
                   "--steps", str(args.steps), "--threads", str(args.threads or 1)]
            env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                raise SystemExit(proc.stdout[-3000:] + proc.stderr[-5000:])
            rows[strategy] = [json.loads(Path(f"{prefix}.{strategy}.rank{r}.json").read_text()) for r in range(2)]
    print(f"# {command_line('fsdp_cost', argv)}")
    first = next(iter(rows.values()))[0]
    print(f"model: {first['params']:,} parameters (fp32 {mb(4 * first['params'])} MiB), 2 ranks, gloo on CPU, "
          f"per-rank batch {args.batch}x{args.seq} tokens, {args.val_rows} validation rows")
    kinds = ("all_gather", "reduce_scatter", "all_reduce", "direction_gather")
    print("\nPayload MiB per rank per optimizer step (rank 0):")
    print("| strategy | phase | " + " | ".join(kinds) + " | total |")
    print("|---|---|" + "---|" * (len(kinds) + 1))
    for strategy, (r0, _) in rows.items():
        for phase in ("plain", "tracked"):
            b = r0[f"{phase}_per_step"]
            print(f"| {strategy} | {phase} | " + " | ".join(mb(b.get(k, 0)) for k in kinds) + f" | {mb(sum(b.values()))} |")
    print("\nMemory per rank (MiB; rank 0 / rank 1):")
    print("| strategy | parameters | optimizer state | largest gathered M | captures per step | peak RSS untracked | peak RSS tracked |")
    print("|---|---|---|---|---|---|---|")
    for strategy, rs in rows.items():
        cell = lambda key: " / ".join("-" if r[key] is None else mb(r[key]) for r in rs)  # noqa: E731
        print(f"| {strategy} | {cell('param_bytes')} | {cell('optimizer_state_bytes')} | "
              f"{cell('largest_direction_gather')} | {cell('capture_bytes_per_step')} | {cell('rss_plain')} | "
              f"{cell('rss_tracked')} |")
    assert all(r["values_finite"] for rs in rows.values() for r in rs)


if __name__ == "__main__":
    main()
