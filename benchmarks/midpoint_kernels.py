"""The midpoint's elementwise pass alone: list-wide ``torch._foreach_*`` kernels against the
compiled kernel (``kernels="compiled"``), on the parameter lists of the overhead benchmark's
models (AdamW with weight decay, state after two steps, 1 CPU thread; process CPU time, the two
forms interleaved, the median over 5 repeats of 50 calls). The compile happens before timing.

Run::

    python -m benchmarks.midpoint_kernels
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.overhead import make_workload
from inrun_shapley.optim.adam import hyper
from inrun_shapley.optim.adam_midpoint import _midpoint_foreach
from inrun_shapley.optim.base import Workspace
from inrun_shapley.optim.fused import fused_available


def kernel_ms(model_name: str, calls: int = 50, repeats: int = 5) -> tuple[int, int, dict[str, float]]:
    """``(tensors, elements, {form: median ms per call})`` for one model's parameter list."""
    model = make_workload(model_name, False, 1, torch.device("cpu")).make_model()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    grads, thetas = [p.grad for p in params], [p.detach() for p in params]
    h, states = hyper(opt.param_groups[0]), [opt.state[p] for p in params]
    step = float(states[0]["step"]) + 1.0
    forms = {
        "foreach": lambda ws=Workspace(): _midpoint_foreach(h, step, grads, thetas, states, True, ws),
        "compiled": lambda ws=Workspace(fused=True): _midpoint_foreach(h, step, grads, thetas, states, True, ws, True),
    }
    for f in forms.values():
        for _ in range(3):
            f()
    times: dict[str, list[float]] = {k: [] for k in forms}
    for _ in range(repeats):
        for name, f in forms.items():
            t = time.process_time()
            for _ in range(calls):
                f()
            times[name].append((time.process_time() - t) / calls * 1e3)
    return len(params), sum(p.numel() for p in params), {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mlp", "transformer"], choices=["mlp", "transformer"])
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(f"command: python -m benchmarks.midpoint_kernels --models {' '.join(args.models)}")
    print(f"torch {torch.__version__}, 1 thread")
    for name in args.models:
        n, elements, ms = kernel_ms(name)
        note = "" if fused_available() is None else f"  (compiled fell back: {fused_available()})"
        print(f"  [{name}] {n} tensors, {elements:,} elements: list-wide {ms['foreach']:.2f} ms, "
              f"compiled {ms['compiled']:.2f} ms ({ms['foreach'] / ms['compiled']:.1f}x){note}")


if __name__ == "__main__":
    main()
