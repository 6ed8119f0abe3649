"""Reliability of the value log: real kills, resume, contention, and flush cost at a million ids.

Three measurements:

* ``kills``: a child process writes a value log step by step (deterministic values, a flush
  every few steps) and is killed with SIGKILL after a random delay, ``--kills`` times. After each
  kill the log must load and hold exactly a prefix of the steps (counts equal, value sums equal to
  1e-12: the log sums flushes in its own order), and a resumed writer must finish the run with
  the totals of an uninterrupted run (same tolerance).
* ``flush``: with ``--ids`` ids already in the log, 50 steps of 256 random ids then one
  ``flush()``, ten times: a flush should cost in proportion to what changed, not to the log's
  size.
* ``contention``: one process writes a log (a flush every 2 steps, compactions every few
  flushes) for ``--seconds``; while it writes, a second process tries to open the same log with
  ``resume=True`` (it must be refused, not merge its steps into the first's files), and this
  process loads the log in a loop: every load must be one committed prefix of the writer's
  steps (counts equal, sums to 1e-12), the prefixes never go back, and the final log holds every
  step the writer wrote.

Run::

    python -m benchmarks.reliability                  # 30 kills, 30 s contention, 1M ids
    python -m benchmarks.reliability --kills 5 --seconds 3 --ids 100000   # quick
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

STEPS, ROWS, FLUSH_EVERY = 400, 64, 3


def step_values(step: int) -> tuple[np.ndarray, np.ndarray]:
    """The ids and values of step ``step`` (a pure function of the step)."""
    rng = np.random.default_rng(step)
    return rng.choice(5000, ROWS, replace=False), rng.normal(size=ROWS)


def write(path: str, resume: bool) -> None:
    """Write steps ``last+1 .. STEPS`` (the child process, and the resume)."""
    from inrun_shapley.log import ShapleyLogWriter

    w = ShapleyLogWriter(path, flush_every=FLUSH_EVERY, resume=resume, record_steps=True)
    for step in range(w.last_step + 1, STEPS + 1):
        ids, vals = step_values(step)
        w.add_step(step, ids, vals)
    w.close()


def reference(last: int) -> tuple[np.ndarray, np.ndarray]:
    """Totals (values, counts) per id after steps 1..last."""
    total, count = np.zeros(5000), np.zeros(5000, dtype=np.int64)
    for step in range(1, last + 1):
        ids, vals = step_values(step)
        np.add.at(total, ids, vals)
        np.add.at(count, ids, 1)
    return total, count


def _dense_totals(log) -> tuple[np.ndarray, np.ndarray]:
    t = log.totals()
    total, count = np.zeros(5000), np.zeros(5000, dtype=np.int64)
    total[t["ids"]], count[t["ids"]] = t["value_sum"], t["count"]
    return total, count


def kills(n: int, seed: int) -> dict:
    from inrun_shapley.log import ShapleyLog

    rng = np.random.default_rng(seed)
    root = Path(tempfile.mkdtemp(prefix="reliability_"))
    full_total, full_count = reference(STEPS)
    survived, prefixes = 0, []
    try:
        for k in range(n):
            path = str(root / f"log{k}")
            child = subprocess.Popen([sys.executable, "-m", "benchmarks.reliability", "--child", path],
                                     cwd=Path(__file__).resolve().parents[1])
            time.sleep(float(rng.uniform(0.6, 1.8)))  # the child imports for ~1 s, then writes for ~0.5 s
            child.send_signal(signal.SIGKILL)
            child.wait()
            if not (Path(path) / "meta.json").exists():  # killed before the first flush committed
                prefixes.append(0)
                write(path, resume=True)  # a re-run with resume=True must start the log afresh
            else:
                log = ShapleyLog.load(path)
                last = log.last_step
                total, count = reference(last)
                got_total, got_count = _dense_totals(log)
                assert np.array_equal(got_count, count) and np.allclose(got_total, total, rtol=0, atol=1e-12), \
                    f"kill {k}: the log after the kill is not the prefix of its {last} steps"
                prefixes.append(last)
                write(path, resume=True)
            got_total, got_count = _dense_totals(ShapleyLog.load(path))
            assert np.array_equal(got_count, full_count) and np.allclose(got_total, full_total, rtol=0, atol=1e-12), \
                f"kill {k}: the resumed run differs from an uninterrupted one"
            survived += 1
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"kills": n, "survived": survived, "prefix_steps": prefixes}


CONTENTION_IDS, CONTENTION_ROWS = 300, 32


def contention_values(step: int) -> tuple[np.ndarray, np.ndarray]:
    """Ids and values of step ``step`` for the contention run (a small id space: frequent
    compactions, the moment a reader used to lose files)."""
    rng = np.random.default_rng(10_000 + step)
    return rng.choice(CONTENTION_IDS, CONTENTION_ROWS, replace=False), rng.normal(size=CONTENTION_ROWS)


def contention_writer(path: str, seconds: float, resume: bool) -> int:
    """A child process: write steps for ``seconds`` and print how many; exit code 3 when the
    log is refused because another writer holds it."""
    from inrun_shapley.errors import LogError
    from inrun_shapley.log import ShapleyLogWriter

    try:
        w = ShapleyLogWriter(path, flush_every=2, resume=resume, record_steps=True)
    except LogError as exc:
        print(f"refused: {exc}", flush=True)
        return 3
    print("writing", flush=True)
    end, step = time.monotonic() + seconds, w.last_step
    while time.monotonic() < end:
        step += 1
        w.add_step(step, *contention_values(step))
        time.sleep(0.002)  # a training step between two logged steps
    w.close()
    print(f"wrote {step}", flush=True)
    return 0


def contention(seconds: float) -> dict:
    """Two writers and one reader on one log for ``seconds``; see the module docstring."""
    from inrun_shapley.log import ShapleyLog

    root = Path(tempfile.mkdtemp(prefix="contention_"))
    path = str(root / "log")
    cwd = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "benchmarks.reliability", "--contention-child", path, "--seconds", str(seconds)]
    total, count, upto = np.zeros(CONTENTION_IDS), np.zeros(CONTENTION_IDS, dtype=np.int64), 0
    loads, last_seen, errors = 0, 0, []
    try:
        first = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, text=True)
        assert first.stdout.readline().strip() == "writing", "the first writer did not start"
        while not (Path(path) / "meta.json").exists():
            time.sleep(0.01)
        second = subprocess.run([*cmd, "--resume"], cwd=cwd, capture_output=True, text=True, timeout=120)
        while True:
            running = first.poll() is None
            try:
                log = ShapleyLog.load(path)
            except Exception as exc:  # every load must succeed: collect, never stop the writer
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            loads += 1
            if log.last_step < last_seen:
                errors.append(f"load {loads}: went back from step {last_seen} to {log.last_step}")
            last_seen = log.last_step
            while upto < last_seen:
                upto += 1
                ids, vals = contention_values(upto)
                np.add.at(total, ids, vals)
                np.add.at(count, ids, 1)
            t = log.totals()
            got_total, got_count = np.zeros(CONTENTION_IDS), np.zeros(CONTENTION_IDS, dtype=np.int64)
            got_total[t["ids"]], got_count[t["ids"]] = t["value_sum"], t["count"]
            if not (np.array_equal(got_count, count) and np.allclose(got_total, total, rtol=0, atol=1e-12)):
                errors.append(f"load {loads}: totals are not those of steps 1..{last_seen}")
            if log.steps is not None and log.steps.shape[0] != last_seen * CONTENTION_ROWS:
                errors.append(f"load {loads}: {log.steps.shape[0]} step records for {last_seen} steps")
            if not running:
                break
        out = first.stdout.read()
        first.wait()
        wrote = int(out.split("wrote")[-1]) if "wrote" in out else -1
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"loads": loads, "errors": errors, "wrote": wrote, "final_step": last_seen,
            "second_rc": second.returncode, "second_said": second.stdout.strip()[:200]}


def flush_cost(n_ids: int) -> dict:
    from inrun_shapley.log import ShapleyLogWriter

    rng = np.random.default_rng(0)
    root = tempfile.mkdtemp(prefix="flush_")
    try:
        w = ShapleyLogWriter(os.path.join(root, "log"), flush_every=0, record_steps=True)
        step = 0
        for start in range(0, n_ids, 65536):  # see every id once
            step += 1
            ids = np.arange(start, min(start + 65536, n_ids))
            w.add_step(step, ids, rng.normal(size=ids.size))
        w.flush()
        times = []
        for _ in range(10):
            for _ in range(50):
                step += 1
                w.add_step(step, rng.choice(n_ids, 256, replace=False), rng.normal(size=256))
            t = time.perf_counter()
            w.flush()
            times.append(time.perf_counter() - t)
        t = time.perf_counter()
        w.close()
        close = time.perf_counter() - t
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"median_ms": 1e3 * float(np.median(times)), "max_ms": 1e3 * max(times), "close_ms": 1e3 * close}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=30)
    ap.add_argument("--ids", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seconds", type=float, default=30.0, help="length of the contention run")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--contention-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        write(args.child, resume=False)
        return
    if args.contention_child:
        sys.exit(contention_writer(args.contention_child, args.seconds, args.resume))
    print(f"command: python -m benchmarks.reliability --kills {args.kills} --seconds {args.seconds:g} --ids {args.ids}")
    c = contention(args.seconds)
    print(f"contention for {args.seconds:g} s: the second writer exited {c['second_rc']} ({c['second_said'][:90]}...); "
          f"{c['loads']} loads while the first wrote, {len(c['errors'])} inconsistent or failed; the writer wrote "
          f"{c['wrote']} steps and the final load holds {c['final_step']}")
    for e in c["errors"][:5]:
        print("  ", e)
    k = kills(args.kills, args.seed)
    print(f"kill -9 at random moments: {k['survived']}/{k['kills']} survived (each load a prefix of the "
          f"steps, each resume equal to an uninterrupted run); steps on disk at the kills: {sorted(k['prefix_steps'])}")
    f = flush_cost(args.ids)
    print(f"flush with {args.ids:,} ids in the log, 50 steps x 256 ids changed: median {f['median_ms']:.1f} ms, "
          f"max {f['max_ms']:.1f} ms; close (compaction) {f['close_ms']:.1f} ms")


if __name__ == "__main__":
    main()
