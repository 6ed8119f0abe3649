"""Where the tracker's step time goes, stage by stage, beside the floor's two parts (issue 23).

The overhead benchmark (:mod:`benchmarks.overhead`) gives the ratios; this one says which stage
of the tracker's step is above the floor and by how much. It runs the overhead benchmark's
``plain``, ``floor_1/8`` and ``tracker_1/8`` variants (optionally ``compiled_1/8``) on its
models, interleaved step by step, and times:

* each variant's whole step (process CPU time, or wall time with a device sync on CUDA);
* each stage of the tracker's step: the pipeline's named ranges (``inrun_shapley.engine.step.
  STAGES``: the same names a ``torch.profiler`` trace shows), timed here by replacing the
  pipeline's ``stage`` context with a timer (no profiler, so its per-operator overhead does not
  inflate the stages made of many small kernels);
* the floor's two parts: the validation forward/backward and the layer forwards.

What no stage covers (``tracker − plain − Σ stages``) is the forward/backward under capture: the
hooks and the slowdown of holding the captured output gradients, plus the per-batch bookkeeping.

Numbers are medians over the measured steps: of each variant's step, of each stage's per-step sum,
and of each step's remainder (its time outside the stages), so a slow outlier step moves none of
them; the rows then add up to the difference of the medians only approximately. The ratios to
quote are :mod:`benchmarks.overhead`'s (medians over repeats).

Run::

    python -m benchmarks.step_stages                      # mlp and transformer, CPU, 1 thread
    python -m benchmarks.step_stages --device cuda        # the GPT-2-small-size model, bf16 autocast
    python -m benchmarks.step_stages --models mlp --compiled --steps 30
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections import defaultdict

import torch

from benchmarks.common import cli
from benchmarks.overhead import add_workload_args, build_variants, make_workload, workload_setup
from inrun_shapley.engine import step as step_module
from inrun_shapley.engine import tracker as tracker_module

# the tracker's stages, and the floor part each is set against (None: nothing in the floor)
COUNTERPART = {
    "validation": "validation", "score": "layer forwards", "midpoint": None, "directions": None,
    "terms": None, "grad_norm": None, "check": None, "to_host": None, "before_step": None,
}


class StageClock:
    """Accumulates time per stage name for the step in progress (the pipeline's ``stage``)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.current: dict[str, float] = defaultdict(float)

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return time.perf_counter()
        return time.process_time()

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = self.now()
        try:
            yield
        finally:
            self.current[name] += self.now() - t0

    def take(self) -> dict[str, float]:
        out, self.current = dict(self.current), defaultdict(float)
        return out


@contextlib.contextmanager
def timed_stages(clock: StageClock):
    """Route the pipeline's (and the tracker's) ``stage`` ranges to ``clock`` while the block runs."""
    saved = step_module.stage, tracker_module.stage
    step_module.stage = tracker_module.stage = clock
    try:
        yield
    finally:
        step_module.stage, tracker_module.stage = saved


def _timed_method(obj, name: str, clock: StageClock, label: str) -> None:
    method = getattr(obj, name)

    def timed(*args, **kwargs):
        with clock(label):
            return method(*args, **kwargs)

    setattr(obj, name, timed)


def measure(model: str, steps: int, warmup: int, device: torch.device, compiled: bool, quick: bool = False):
    """``(totals, stages)``: per variant the median step in ms; per variant the median ms of each
    stage (tracker variants: pipeline stages; floor: its two parts) and of the step's remainder
    outside them (``"rest"``)."""
    names = ["plain", "floor_1/8", "tracker_1/8"] + (["compiled_1/8"] if compiled else [])
    wl = make_workload(model, quick, 8, device)
    variants = build_variants(wl, device, names)
    clock = StageClock(device)
    floor = variants["floor_1/8"]
    _timed_method(floor, "validation_gradient", clock, "validation")
    _timed_method(floor, "layer_forwards", clock, "layer forwards")
    totals: dict[str, list[float]] = {n: [] for n in names}
    parts: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    with timed_stages(clock):
        for k in range(warmup + steps):
            r = k % len(names)
            for n in names[r:] + names[:r]:
                clock.take()
                t0 = clock.now()
                variants[n].step()
                t1 = clock.now()
                stage_times = clock.take()
                if k >= warmup:
                    totals[n].append(t1 - t0)
                    parts[n].append(stage_times)
    median_ms = {n: statistics.median(v) * 1e3 for n, v in totals.items()}
    stage_ms = {}
    for n, per_step in parts.items():
        keys = sorted({key for d in per_step for key in d})
        stage_ms[n] = {key: statistics.median(d.get(key, 0.0) for d in per_step) * 1e3 for key in keys}
        stage_ms[n]["rest"] = statistics.median(t - sum(d.values()) for t, d in zip(totals[n], per_step)) * 1e3
    return median_ms, stage_ms


def report(model: str, totals: dict, stages: dict, tracker: str = "tracker_1/8") -> list[str]:
    plain, floor, tr = totals["plain"], totals["floor_1/8"], totals[tracker]
    floor_parts = stages["floor_1/8"]
    lines = [f"[{model}] {tracker}: step {tr:.2f} ms, plain {plain:.2f} ms, floor {floor:.2f} ms "
             f"(tracker / floor {tr / floor:.2f})",
             f"  {'stage':<26}{'tracker ms':>11}{'floor ms':>10}{'above floor':>13}{'% of floor':>12}"]
    for name in step_module.STAGES:
        if name not in stages[tracker]:
            continue
        ms = stages[tracker][name]
        other = COUNTERPART.get(name)
        base = floor_parts.get(other, 0.0) if other else 0.0
        shown = f"{base:10.2f}" if other else f"{'-':>10}"
        lines.append(f"  {name + ('' if not other else ' (vs ' + other + ')'):<26}{ms:11.2f}{shown}"
                     f"{ms - base:13.2f}{(ms - base) / floor * 100:11.1f}%")
    rest = stages[tracker]["rest"] - plain
    floor_rest = floor_parts["rest"] - plain
    lines.append(f"  {'forward/backward, capture':<26}{rest:11.2f}{floor_rest:10.2f}{rest - floor_rest:13.2f}"
                 f"{(rest - floor_rest) / floor * 100:11.1f}%")
    lines.append(f"  {'total above the floor':<26}{'':11}{'':10}{tr - floor:13.2f}{(tr - floor) / floor * 100:11.1f}%")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_args(ap)
    ap.add_argument("--compiled", action="store_true", help="also the tracker with kernels='compiled'")
    args = ap.parse_args(argv)
    device = workload_setup(args, "step_stages")
    if device is None:
        return 0
    print(f"command: {cli.command_line('step_stages', argv)}")
    print(f"torch {torch.__version__}, device {device}, "
          + ("wall time, synchronized" if device.type == "cuda" else f"process CPU time, {torch.get_num_threads()} thread(s)")
          + f", median of {args.steps} steps after {args.warmup} warmup")
    for model in args.models:
        totals, stages = measure(model, args.steps, args.warmup, device, args.compiled, args.quick)
        print()
        print("\n".join(report(model, totals, stages)))
        if args.compiled:
            print("\n".join(report(model, totals, stages, tracker="compiled_1/8")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
