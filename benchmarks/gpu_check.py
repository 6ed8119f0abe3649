"""Every GPU check of the tracker's hot path in one command, for the day a CUDA device is there.

Runs, one after the other, each in its own process with its own time limit, and writes each
one's output to ``--out`` (and a summary to stdout):

1. ``pytest -m gpu``: CUDA values equal the CPU reference (float64), a whole tracked step under
   ``torch.cuda.set_sync_debug_mode("error")`` (fp32 and bf16 autocast), the compiled kernels on
   CUDA, fused optimizers under a CUDA ``GradScaler``;
2. ``benchmarks.overhead --device cuda``: the GPT-2-small-size model under bf16 autocast,
   plain / floor / tracker / compiled / fixed-state / val=B, time and peak memory;
3. ``benchmarks.step_stages --device cuda --compiled``: where the tracker's step time goes.

Without CUDA it says so and exits 0 (nothing to check).

Run::

    python -m benchmarks.gpu_check                       # all three, default limits
    python -m benchmarks.gpu_check --only tests --out /tmp/gpu
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

CHECKS = {
    "tests": ([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests", "-p", "no:cacheprovider"], 300),
    "overhead": ([sys.executable, "-m", "benchmarks.overhead", "--device", "cuda", "--steps", "10", "--repeats", "2",
                  "--mem-steps", "3"], 600),
    "stages": ([sys.executable, "-m", "benchmarks.step_stages", "--device", "cuda", "--compiled", "--steps", "10"], 300),
}


def run_check(name: str, cmd: list[str], limit_s: int, out: Path) -> tuple[int | None, float]:
    """Run one check with a time limit; its output goes to ``out/<name>.txt``. Returns ``(exit
    code or None if it ran past the limit, seconds)``."""
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    t0 = time.perf_counter()
    with open(out / f"{name}.txt", "w") as log:
        log.write("command: " + " ".join(cmd[1:] if cmd[0] == sys.executable else cmd) + "\n")
        log.flush()
        try:
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=root, env=env, timeout=limit_s).returncode
        except subprocess.TimeoutExpired:
            code = None
    return code, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=list(CHECKS), default=list(CHECKS), help="which checks to run")
    ap.add_argument("--out", default="gpu_check", help="folder for each check's output (created)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device is available; nothing to check")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"gpu_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}; outputs in {out}/")
    failed = False
    for name in args.only:
        cmd, limit = CHECKS[name]
        code, seconds = run_check(name, cmd, limit, out)
        status = "ran past its limit" if code is None else ("ok" if code == 0 else f"exit {code}")
        failed |= code != 0
        print(f"  {name:<9} {status:<18} {seconds:6.0f} s   {out / (name + '.txt')}")
        tail = (out / f"{name}.txt").read_text().splitlines()[-12:]
        print("\n".join("      " + line for line in tail))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
