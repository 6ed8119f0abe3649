"""Training-step time and peak memory with the In-Run Shapley tracker vs without (issues 2, 23).

Two models, both trained with AdamW on synthetic data (no download):

* ``mlp``: 784-512-256-10 ReLU MLP, batch 128 (MNIST-sized random inputs);
* ``transformer``: a 2-block causal language model (``TinyTransformerLM`` of
  :mod:`benchmarks.common.models`), d_model 128, 4 heads, seq len 64, vocab 100, batch 32.
  Attention is written with ``nn.Linear`` projections (no ``nn.MultiheadAttention``), so every
  parameterized layer (Embedding, Linear, LayerNorm) has a dedicated capture rule.

Variants, all timed in ONE process, interleaved step by step (the order rotates every step) so
that drift of a shared machine cancels; each number is the median over the measured steps:

1. ``plain``: zero_grad, forward, backward, AdamW step;
2. ``tracker val=B/8``: the same step with a :class:`ShapleyTracker` whose validation gradient
   uses ``val_sample_size = B/8`` rows per step drawn from a 256-row validation set;
3. ``tracker val=B``: validation sample of B rows per step;
4. ``machinery``: the scoring machinery alone, i.e. everything but the validation
   forward/backward. Measured two ways: (a) a tracker (val=B/8) whose
   ``validation.gradient`` is monkeypatched to return a cached gradient: its step time minus
   the plain step; (b) ``tracker val=B/8`` − ``plain`` − ``validation.gradient`` (val=B/8) timed
   on its own, interleaved with the rest;
5. ``torch.func``: the naive alternative, per-sample gradients materialized with
   ``vmap(grad)`` (their mean is the batch gradient the optimizer uses, so no separate
   backward), the same validation gradient (B/8), and ``per-sample grads · M`` with the same
   direction ``M`` (the library's AdamW adapter). Its values are checked against the tracker's.

Peak memory: one subprocess per (model, variant) (two at a time), which runs the warmup steps,
resets the kernel's peak-RSS counter (``/proc/self/clear_refs``), then runs the measured steps
and reads ``VmHWM``; glibc's mmap/trim thresholds are fixed at 64 KiB in those processes so that
freed tensors leave the resident set (otherwise the heap keeps them and the step's peak above
rest reads as ~0). Reported: the process's peak RSS, and the step's working memory
``Δpeak = peak − RSS at rest`` (model, optimizer state and the torch runtime excluded), each as a
ratio to plain. On CUDA: ``torch.cuda.max_memory_allocated`` (peak and peak − allocated at rest).

6. ``floor`` (issue 23): what any exact fixed-direction method must add to a plain step, timed
   with it: the validation forward/backward (B/8 rows) and one forward of every tracked layer on
   its captured inputs (the per-sample products' matmul). ``tracker / floor`` is the tracker's
   own overhead beyond what the method must pay.

Every timing is repeated ``--repeats`` times (3 by default; the variants interleaved each time);
the table shows the median over repeats, and the key ratios their range over the repeats.

``gpt2`` (the CUDA default): GPT-2 small's size (12 blocks, d 768, 12 heads, vocab 50257, 1024
tokens, batch 8) under bf16 autocast, variants plain, floor, tracker (midpoint), fixed-state
first order and tracker val=B.

Run:  python -m benchmarks.overhead                 # full sizes, CPU
      python -m benchmarks.overhead --quick         # tiny sizes, a few steps (smoke test)
      python -m benchmarks.overhead --device cuda   # gpt2; exits 0 with a message if no CUDA device
Options: --models mlp transformer gpt2, --steps N, --warmup N, --repeats N, --no-memory, --threads N (CPU default 1:
on a machine whose cores are shared, multi-threaded kernels stall and the timings mean nothing;
--threads 0 keeps torch's default).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from benchmarks.common import cli
from benchmarks.common.models import TinyTransformerLM, mlp
from inrun_shapley import ShapleyTracker, ValidationObjective
from inrun_shapley.engine.tracked import plan_modules
from inrun_shapley.optim import adapter_for

TARGETS = {"machinery": 0.4, "total_1/8": 1.5, "memory": 1.3, "vs_first_order": 1.05}
FLOOR_TARGET = {"transformer": 1.05, "mlp": 1.15, "gpt2": 1.05}  # tracker / floor (issue 23)
WORKING_SET_TARGET = {"transformer": 1.3, "mlp": 2.0, "gpt2": 1.3}  # step working set, tracker / plain
GPU_VARIANTS = ["plain", "floor_1/8", "tracker_1/8", "compiled_1/8", "fixed_1/8", "tracker_eq"]  # gpt2: no torch.func, no o2
VAL_SET = 256


# ------------------------------------------------------------- workloads
@dataclass
class Workload:
    name: str
    make_model: callable
    batches: list  # list of (x, y) training batches
    val: tuple  # (x, y) validation set
    per_sample_loss: callable  # (logits_fn_output, y) -> [n]
    batch_size: int
    lr: float = 1e-3
    amp: torch.dtype | None = None  # autocast dtype of forward passes (the gpt2 config: bf16 on CUDA)
    device_type: str = "cpu"

    def autocast(self):
        """The forward passes' autocast context (a no-op without ``amp``)."""
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.amp)


def _lm_data(n: int, seq: int, vocab: int, g: torch.Generator):
    """Token sequences from a fixed random bigram chain (so the LM has something to learn)."""
    trans = torch.softmax(torch.randn(vocab, vocab, generator=g) * 3, -1)
    x = torch.empty(n, seq + 1, dtype=torch.long)
    x[:, 0] = torch.randint(0, vocab, (n,), generator=g)
    for t in range(seq):
        x[:, t + 1] = torch.multinomial(trans[x[:, t]], 1, generator=g).squeeze(1)
    return x[:, :-1].contiguous(), x[:, 1:].contiguous()


def _ce_rows(logits, y):
    """Per-sample mean cross entropy over all positions of the row."""
    n = y.shape[0]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none").reshape(n, -1).mean(1)


def make_workload(name: str, quick: bool, n_batches: int, device) -> Workload:
    g = torch.Generator().manual_seed(0)
    if name == "mlp":
        d_in, hidden, n_out, bs = (32, (64, 32), 10, 16) if quick else (784, (512, 256), 10, 128)
        w = torch.randn(d_in, n_out, generator=g)

        def data(n):
            x = torch.randn(n, d_in, generator=g)
            return x, (x @ w + 0.5 * torch.randn(n, n_out, generator=g)).argmax(1)

        def make_model():
            torch.manual_seed(0)
            return mlp(hidden, d_in=d_in, n_out=n_out, activation="relu")

    elif name == "transformer":
        vocab, d, heads, blocks, seq, bs = (50, 32, 2, 1, 16, 16) if quick else (100, 128, 4, 2, 64, 32)

        def data(n):
            return _lm_data(n, seq, vocab, g)

        def make_model():
            torch.manual_seed(0)
            return TinyTransformerLM(vocab, seq, d, heads, blocks)

    elif name == "gpt2":  # GPT-2 small's size (124M-class: 12 blocks, d 768, 12 heads, vocab 50257), bf16 autocast
        vocab, d, heads, blocks, seq, bs = (64, 32, 2, 2, 16, 8) if quick else (50257, 768, 12, 12, 1024, 8)

        def data(n):
            return (torch.randint(0, vocab, (n, seq), generator=g), torch.randint(0, vocab, (n, seq), generator=g))

        def make_model():
            torch.manual_seed(0)
            return TinyTransformerLM(vocab, seq, d, heads, blocks)

    else:
        raise SystemExit(f"unknown model {name!r} (mlp, transformer, gpt2)")
    batches = [tuple(t.to(device) for t in data(bs)) for _ in range(n_batches)]
    val = tuple(t.to(device) for t in data(64 if name == "gpt2" else VAL_SET))
    amp = torch.bfloat16 if name == "gpt2" and device.type == "cuda" else None
    return Workload(name, make_model, batches, val, _ce_rows, bs, amp=amp, device_type=device.type)


# -------------------------------------------------------------- variants
class Variant:
    """One way of running a training step on its own copy of the model and optimizer."""

    label = ""

    def __init__(self, wl: Workload, device, **kw):
        self.wl = wl
        self.model = wl.make_model().to(device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=wl.lr, weight_decay=0.01)
        self.k = 0
        self.values = None

    def loss(self, model, x, y):
        with self.wl.autocast():
            out = model(x)
        return self.wl.per_sample_loss(out.float() if out.dtype in (torch.bfloat16, torch.float16) else out, y)

    def val_loss_fn(self, model, batch):
        return self.loss(model, *batch)

    def next_batch(self):
        b = self.wl.batches[self.k % len(self.wl.batches)]
        ids = torch.arange(self.wl.batch_size) + self.k * self.wl.batch_size
        self.k += 1
        return b, ids

    def step(self):
        raise NotImplementedError


class Plain(Variant):
    label = "plain"

    def step(self):
        (x, y), _ = self.next_batch()
        self.opt.zero_grad(set_to_none=True)
        self.loss(self.model, x, y).mean().backward()
        self.opt.step()


class Tracked(Variant):
    def __init__(self, wl, device, val_rows: int, cached_val: bool = False, estimator: str = "midpoint",
                 order: int = 1, kernels: str = "foreach"):
        super().__init__(wl, device)
        self.label = f"tracker {estimator}{'' if order == 1 else ' o2'} val={val_rows}" + (" cached g_v" if cached_val else "")
        self.tracker = ShapleyTracker(
            self.model, self.opt, val_data=wl.val, val_loss_fn=self.val_loss_fn,
            val_sample_size=val_rows, estimator=estimator, order=order, kernels=kernels,
        )
        if cached_val:  # the scoring machinery alone: no validation forward/backward per step
            params = list(self.tracker._params)
            cached = self.tracker.validation.gradient(self.model, params, 1)

            def gradient(model, params, step, hvp_vectors=None, at=None, point=None, flags=None):
                return cached

            self.tracker.validation.gradient = gradient

    def step(self):
        (x, y), ids = self.next_batch()
        self.opt.zero_grad(set_to_none=True)
        with self.tracker.batch(ids):
            self.loss(self.model, x, y).mean().backward()
        self.opt.step()
        self.values = None if self.tracker.store.last_record is None else self.tracker.store.last_record[2]


class Floor(Variant):
    """What any exact fixed-direction method must add to a plain step (the issue's floor): the
    validation forward/backward (B/8 rows, the tracker's objective, parameters untouched) and one
    forward of every tracked layer on its captured inputs (the cost of the per-sample products'
    matmul), timed on top of the plain step."""

    def __init__(self, wl, device, val_rows: int):
        super().__init__(wl, device)
        self.label = f"floor val={val_rows}"
        self.objective = ValidationObjective(wl.val, self.val_loss_fn, sample_size=val_rows)
        modules, _ = plan_modules(self.model, (), True)
        self.layers = [t.module for t in modules.values()]
        self.params = [p for t in modules.values() for p in t.params.values()]
        self.inputs: list = []
        for m in self.layers:
            m.register_forward_hook(self._keep)

    def _keep(self, module, args, output):
        if torch.is_grad_enabled() and module.training:
            self.inputs.append((module, tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)))

    def step(self):
        (x, y), _ = self.next_batch()
        self.inputs = []
        self.opt.zero_grad(set_to_none=True)
        self.loss(self.model, x, y).mean().backward()
        self.opt.step()
        self.validation_gradient()
        self.layer_forwards()

    def validation_gradient(self):
        """The floor's first part: the validation forward/backward."""
        self.objective.gradient(self.model, self.params, self.k)

    def layer_forwards(self):
        """The floor's second part: one forward of every tracked layer on its captured inputs."""
        with self.wl.autocast():
            with torch.no_grad():
                for module, args in self.inputs:
                    module(*args)
        self.inputs = []


class ValidationOnly(Variant):
    """``validation.gradient`` alone (no training step): what the tracker adds per step for g_v."""

    def __init__(self, wl, device, val_rows: int):
        super().__init__(wl, device)
        self.label = f"validation.gradient val={val_rows}"
        self.objective = ValidationObjective(wl.val, self.val_loss_fn, sample_size=val_rows)
        self.params = list(self.model.parameters())

    def step(self):
        self.k += 1
        self.objective.gradient(self.model, self.params, self.k)


class TorchFunc(Variant):
    """Naive alternative: materialized per-sample gradients (vmap(grad)) dotted with M."""

    def __init__(self, wl, device, val_rows: int):
        super().__init__(wl, device)
        self.label = f"torch.func per-sample val={val_rows}"
        self.objective = ValidationObjective(wl.val, self.val_loss_fn, sample_size=val_rows)
        self.names = [n for n, _ in self.model.named_parameters()]
        self.params = [p for _, p in self.model.named_parameters()]
        self.adapter = adapter_for(self.opt)
        model = self.model

        def one(p, x, y):
            return self.wl.per_sample_loss(functional_call(model, p, (x.unsqueeze(0),)), y.unsqueeze(0))[0]

        self.per_sample_grads = vmap(grad(one), in_dims=(None, 0, 0))

    def step(self):
        (x, y), ids = self.next_batch()
        n = x.shape[0]
        self.opt.zero_grad(set_to_none=True)
        detached = {nm: p.detach() for nm, p in zip(self.names, self.params)}
        per = self.per_sample_grads(detached, x, y)  # {name: [n, *shape]}: ∇ℓ_i
        for nm, p in zip(self.names, self.params):
            p.grad = per[nm].mean(0)  # = Σ_i c_i with c_i = ∇ℓ_i / n
        g_val, _ = self.objective.gradient(self.model, self.params, self.k)  # before the step
        self.opt.step()
        values = torch.zeros(n, dtype=torch.float64, device=x.device)
        group = self.opt.param_groups[0]
        for nm, p, gv in zip(self.names, self.params, g_val):
            t = self.adapter.terms(p.grad, group, self.opt.state[p], {}, None, False, False)
            m = t.sign * t.lr * t.coeff * t.precond * gv
            values += (per[nm].reshape(n, -1) @ m.reshape(-1)).double() / n
        self.values = values.cpu().numpy()


def build_variants(wl: Workload, device, names=None) -> dict[str, Variant]:
    b = wl.batch_size
    small = max(1, b // 8)
    makers = {
        "plain": lambda: Plain(wl, device),
        "floor_1/8": lambda: Floor(wl, device, small),
        "tracker_1/8": lambda: Tracked(wl, device, small),
        "compiled_1/8": lambda: Tracked(wl, device, small, kernels="compiled"),
        "tracker_eq": lambda: Tracked(wl, device, b),
        "fixed_1/8": lambda: Tracked(wl, device, small, estimator="shapley"),
        "fixed_o2_1/8": lambda: Tracked(wl, device, small, estimator="shapley", order=2),
        "tracker_cached": lambda: Tracked(wl, device, small, cached_val=True),
        "val_1/8": lambda: ValidationOnly(wl, device, small),
        "val_eq": lambda: ValidationOnly(wl, device, b),
        "func": lambda: TorchFunc(wl, device, small),
    }
    names = names or list(makers)
    return {n: makers[n]() for n in names}


# --------------------------------------------------------------- timing
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(variants: dict[str, Variant], warmup: int, steps: int, device) -> dict[str, dict[str, list]]:
    """Per variant, the wall-clock and the process CPU time of each measured step."""
    names = list(variants)
    times = {n: {"wall": [], "cpu": []} for n in names}
    for k in range(warmup + steps):
        r = k % len(names)
        for n in names[r:] + names[:r]:  # rotate the order so no variant always runs first
            _sync(device)
            c0, t0 = time.process_time(), time.perf_counter()
            variants[n].step()
            _sync(device)
            t1, c1 = time.perf_counter(), time.process_time()
            if k >= warmup:
                times[n]["wall"].append(t1 - t0)
                times[n]["cpu"].append(c1 - c0)
    return times


def check_agreement(wl: Workload, device) -> float:
    """Max relative difference between the tracker's (fixed-state estimator) and torch.func's values at step 2, in
    fp64 (in fp32 Adam's first-step preconditioner 1/(|g|+eps) amplifies rounding differences
    between the two batch gradients)."""
    def dbl(t):
        return t.double() if t.is_floating_point() else t

    make = wl.make_model
    wl = copy.copy(wl)
    wl.make_model = lambda: make().double()
    wl.batches = [tuple(dbl(t) for t in b) for b in wl.batches]
    wl.val = tuple(dbl(t) for t in wl.val)
    v = build_variants(wl, device, ["fixed_1/8", "func"])  # torch.func forms the fixed-state direction
    v["fixed_1/8"].step()
    v["func"].step()
    v["fixed_1/8"].step()
    v["func"].step()
    a, b = v["fixed_1/8"].values, v["func"].values
    return float(abs(a - b).max() / max(abs(b).max(), 1e-30))


# --------------------------------------------------------------- memory
def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def memory_child(models: list[str], variants: list[str], quick: bool, warmup: int, steps: int, device) -> dict:
    """Runs inside a subprocess: per (model, variant), peak memory of ``steps`` steps after warmup
    (the peak counter is reset before each measurement)."""
    out = {}
    for model, variant in [(m, v) for m in models for v in variants]:
        wl = make_workload(model, quick, max(warmup + steps, 1), device)
        v = build_variants(wl, device, [variant])[variant]
        for _ in range(warmup):
            v.step()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            rest = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            for _ in range(steps):
                v.step()
            torch.cuda.synchronize(device)
            peak, how = torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated"
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
                how = "peak RSS: VmHWM after clear_refs"
            except OSError:
                how = "peak RSS: ru_maxrss, not reset"
            rest = _proc_status("VmRSS")
            for _ in range(steps):
                v.step()
            if how.startswith("peak RSS: VmHWM"):
                peak = _proc_status("VmHWM")
            else:
                import resource

                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        tracker = getattr(v, "tracker", None)
        held = tracker._pipeline.workspace.nbytes if tracker is not None else 0  # CPU buffers kept between steps
        out[f"{model}:{variant}"] = {"rest": rest, "peak": peak, "how": how, "workspace": held}
        del v, wl
        gc.collect()
    return out


def _start_memory_job(models, variants, args) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "benchmarks.overhead", "--memory-child", ",".join(models), ",".join(variants),
           "--device", args.device, "--warmup", str(args.warmup), "--steps", str(args.mem_steps)]
    if args.quick:
        cmd.append("--quick")
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [_repo_root(), os.environ.get("PYTHONPATH")])))
    # Fixed glibc thresholds: every block of 64 KiB or more is mmap'd and unmapped when freed, so
    # the resident set follows the live tensors (with the default dynamic threshold, freed
    # tensors stay cached in the heap and the step's peak above rest reads as ~0).
    env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=_repo_root())


def _collect_memory_jobs(procs, results: dict) -> dict:
    for proc in procs:
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"memory subprocess {proc.args[4:6]} failed:\n{err}")
        for key, r in json.loads(out.strip().splitlines()[-1]).items():
            results[tuple(key.split(":"))] = r
    return results


def measure_memory(models, variants, args) -> dict:
    """One subprocess per (model, variant), two at a time, before any timing."""
    jobs = [([m], [v]) for m in models for v in variants]
    results = {}
    for start in range(0, len(jobs), 2):
        _collect_memory_jobs([_start_memory_job(m, v, args) for m, v in jobs[start : start + 2]], results)
    return results


def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- report
def _mb(x: float) -> str:
    return f"{x / 2**20:8.1f}"


MIN_DPEAK = 2**20  # below 1 MiB the plain step's working set is lost in RSS page granularity


def _ratio(x: float, base: float) -> str:
    return f"{x / base:8.2f}" if base >= MIN_DPEAK else f"{'n/a':>8}"


def _flag(ratio: float, target: float) -> str:
    return "ok  " if ratio <= target else "MISS"


def time_model(model: str, args, device):
    wl = make_workload(model, args.quick, 8, device)
    variants = build_variants(wl, device, GPU_VARIANTS if model == "gpt2" else None)
    runs = []  # one median per variant per repeat (the warmup runs once)
    for r in range(args.repeats):
        times = time_interleaved(variants, args.warmup if r == 0 else 0, args.steps, device)
        runs.append({clock: {n: statistics.median(t[clock]) for n, t in times.items()} for clock in ("wall", "cpu")})
    med = {clock: {n: statistics.median(run[clock][n] for run in runs) for n in variants} for clock in ("wall", "cpu")}
    med["runs"] = runs
    agree = float("nan") if model == "gpt2" else check_agreement(wl, device)
    n_params = sum(q.numel() for q in variants["plain"].model.parameters())
    return med, agree, n_params, wl.batch_size


def report_model(model: str, med: dict, agree: float, n_params: int, b: int, args, mem) -> list[str]:
    # On CPU the ratios are taken on process CPU time (one intra-op thread by default): the
    # machine's other load then inflates no variant's time. Wall-clock ratios are shown beside.
    clock = "wall" if args.device.startswith("cuda") else "cpu"
    other = "cpu" if clock == "wall" else "wall"
    m, mo = med[clock], med[other]
    p, po = m["plain"], mo["plain"]
    lines = [f"[{model}] batch {b}, {n_params:,} parameters, AdamW; median of {args.steps} steps after "
             f"{args.warmup} warmup, variants interleaved; tracker vs torch.func values (fp64): max rel diff {agree:.1e}"]
    header = f"  {'variant':<34} {clock + ' ms':>9} {'x plain':>8} {other + ' ms':>9} {'x plain':>8}"
    if mem:
        header += f" {'peak MB':>9} {'x plain':>8} {'dpeak MB':>9} {'x plain':>8}"
    lines.append(header)
    small = max(1, b // 8)
    rows = [("plain", "plain"), ("floor_1/8", f"floor val={small} (B/8)"), ("tracker_1/8", f"tracker val={small} (B/8)"),
            ("fixed_1/8", f"fixed-state 1st order val={small}"), ("fixed_o2_1/8", f"fixed-state 2nd order val={small}"),
            ("compiled_1/8", f"tracker, kernels=compiled, val={small}"), ("tracker_eq", f"tracker val={b} (B)"), ("tracker_cached", "tracker, cached g_v (machinery)"),
            ("func", f"torch.func per-sample val={small}"),
            ("val_1/8", f"validation.gradient alone, {small}"), ("val_eq", f"validation.gradient alone, {b}")]
    for key, label in rows:
        if key not in m:
            continue
        line = f"  {label:<34} {m[key] * 1e3:9.2f} {m[key] / p:8.2f} {mo[key] * 1e3:9.2f} {mo[key] / po:8.2f}"
        if mem and (model, key) in mem:
            r, r0 = mem[(model, key)], mem[(model, "plain")]
            dp, dp0 = r["peak"] - r["rest"], r0["peak"] - r0["rest"]
            line += f" {_mb(r['peak'])} {r['peak'] / r0['peak']:8.2f} {_mb(dp)} {_ratio(dp, dp0)}"
        lines.append(line)

    runs = med.get("runs", [])

    def spread(num: str, den: str) -> str:
        """The ratio's range over the repeats (each repeat's medians), on the main clock."""
        if len(runs) < 2:
            return ""
        r = [run[clock][num] / run[clock][den] for run in runs]
        return f"  [repeats {min(r):.2f}-{max(r):.2f}]"

    def summary(label, x, xo, target, keys=None):
        return (f"  {label:<60} {x:6.2f}  ({other} {xo:5.2f})  target <= {target}  {_flag(x, target)}"
                + (spread(*keys) if keys else ""))

    lines.append(f"  {'floor / plain, val=B/8, ' + clock:<60} {m['floor_1/8'] / p:6.2f}  ({other} {mo['floor_1/8'] / po:5.2f})"
                 + spread("floor_1/8", "plain"))
    lines.append(f"  {'tracker / plain, val=B/8, ' + clock:<60} {m['tracker_1/8'] / p:6.2f}  "
                 f"({other} {mo['tracker_1/8'] / po:5.2f})" + spread("tracker_1/8", "plain"))
    lines.append(summary(f"tracker / floor, val=B/8, {clock}", m["tracker_1/8"] / m["floor_1/8"],
                         mo["tracker_1/8"] / mo["floor_1/8"], FLOOR_TARGET[model], ("tracker_1/8", "floor_1/8")))
    lines.append(summary(f"midpoint (default) / fixed-state 1st order, val=B/8, {clock}", m["tracker_1/8"] / m["fixed_1/8"],
                         mo["tracker_1/8"] / mo["fixed_1/8"], TARGETS["vs_first_order"], ("tracker_1/8", "fixed_1/8")))
    if "compiled_1/8" in m:
        lines.append(summary(f"kernels=compiled: tracker / floor, val=B/8, {clock}", m["compiled_1/8"] / m["floor_1/8"],
                             mo["compiled_1/8"] / mo["floor_1/8"], FLOOR_TARGET[model], ("compiled_1/8", "floor_1/8")))
        lines.append(summary(f"kernels=compiled: midpoint / fixed-state 1st order, {clock}",
                             m["compiled_1/8"] / m["fixed_1/8"], mo["compiled_1/8"] / mo["fixed_1/8"],
                             TARGETS["vs_first_order"], ("compiled_1/8", "fixed_1/8")))
    if "tracker_cached" not in m:  # the GPU config: the rows above only
        return lines + _memory_lines(model, mem)
    lines.append(summary(f"machinery, {clock}: (cached g_v − plain) / plain",
                         (m["tracker_cached"] - p) / p, (mo["tracker_cached"] - po) / po, TARGETS["machinery"]))
    lines.append(summary(f"machinery, {clock}: (tracker B/8 − validation − plain) / plain",
                         (m["tracker_1/8"] - m["val_1/8"] - p) / p, (mo["tracker_1/8"] - mo["val_1/8"] - po) / po,
                         TARGETS["machinery"]))
    lines.append(summary(f"total with val=B/8, {clock}: tracker / plain", m["tracker_1/8"] / p, mo["tracker_1/8"] / po,
                         TARGETS["total_1/8"]))
    lines.append(f"  {'total with val=B, ' + clock + ': tracker / plain':<60} {m['tracker_eq'] / p:6.2f}  ({other} {mo['tracker_eq'] / po:5.2f})")
    lines.append(f"  {'fixed-state 2nd order / plain, val=B/8, ' + clock:<60} {m['fixed_o2_1/8'] / p:6.2f}  "
                 f"({other} {mo['fixed_o2_1/8'] / po:5.2f})")
    return lines + _memory_lines(model, mem)


def _memory_lines(model: str, mem) -> list[str]:
    if not mem or (model, "tracker_1/8") not in mem:
        return []
    r, r0 = mem[(model, "tracker_1/8")], mem[(model, "plain")]
    pk = r["peak"] / r0["peak"]
    dp, dp0 = r["peak"] - r["rest"], r0["peak"] - r0["rest"]
    target = WORKING_SET_TARGET[model]
    dflag = _flag(dp / dp0, target) if dp0 >= MIN_DPEAK else "n/a "
    lines = [f"  peak memory (B/8) / plain: process {pk:.2f}, step working set {_ratio(dp, dp0).strip()}  "
             f"target <= {target} (working set)  {dflag}  ({r['how']})"]
    if r.get("workspace"):
        held = r["workspace"]
        lines.append(f"  of which held at rest between steps (the CPU workspace, in the process peak, not in the working "
                     f"set): {held / 2**20:.1f} MB; working set counting it: {_ratio(dp + held, dp0).strip()} x plain")
    return lines


def add_workload_args(ap: argparse.ArgumentParser) -> None:
    """The options every benchmark of the step on these workloads shares: models, device, quick
    sizes, measured and warmup steps, threads (see :func:`workload_setup`)."""
    ap.add_argument("--models", nargs="+", default=None, choices=["mlp", "transformer", "gpt2"],
                    help="default: mlp transformer on CPU, gpt2 (GPT-2-small size, bf16 autocast) on CUDA")
    ap.add_argument("--device", default="cpu")
    cli.add_quick(ap, help="tiny sizes and a few steps (smoke test)")
    ap.add_argument("--steps", type=int, default=None, help="measured steps per variant (default 30; 3 with --quick)")
    ap.add_argument("--warmup", type=int, default=None, help="default 5; 1 with --quick")
    cli.add_threads(ap, default=None)  # None: 1 on CPU (stable ratios on a shared machine), torch's default on CUDA


def workload_setup(args: argparse.Namespace, name: str) -> torch.device | None:
    """Fill in :func:`add_workload_args`' defaults and set the threads; the device, or None (after
    saying so) when CUDA was asked for and there is none."""
    args.steps = args.steps or (3 if args.quick else 30)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
    if args.threads is None and args.device == "cpu":
        args.threads = 1  # intra-op threads stall badly when the cores are shared; see --threads
    cli.set_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"{name}: --device cuda requested but no CUDA device is available; skipped")
        return None
    args.models = args.models or (["gpt2"] if device.type == "cuda" else ["mlp", "transformer"])
    return device


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_args(ap)
    ap.add_argument("--repeats", type=int, default=None, help="timing runs per model (the spread of the ratios is shown)")
    ap.add_argument("--mem-steps", type=int, default=None, help="measured steps in each memory subprocess")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--memory-child", nargs=2, metavar=("MODELS", "VARIANTS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.mem_steps = args.mem_steps or (2 if args.quick else 5)
    device = workload_setup(args, "overhead benchmark")
    if device is None:
        return 0

    if args.memory_child:
        models, variants = args.memory_child
        print(json.dumps(memory_child(models.split(","), variants.split(","), args.quick, args.warmup, args.mem_steps, device)))
        return 0

    print(f"command: {cli.command_line('overhead', argv)}")
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f", torch threads: {torch.get_num_threads()}"))
    variants = ["plain", "floor_1/8", "tracker_1/8", "fixed_1/8", "fixed_o2_1/8", "tracker_eq", "func"]
    if args.models == ["gpt2"]:
        variants = GPU_VARIANTS
    mem, quick_job = None, None
    if not args.no_memory:
        if args.quick:  # one subprocess for everything, running while the (meaningless) quick timings run
            quick_job = _start_memory_job(args.models, variants, args)
        else:  # separate subprocesses before the timings, so they do not perturb them
            mem = measure_memory(args.models, variants, args)
    timed = {model: time_model(model, args, device) for model in args.models}
    if quick_job is not None:
        mem = _collect_memory_jobs([quick_job], {})
    for model in args.models:
        print()
        print("\n".join(report_model(model, *timed[model], args, mem)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
