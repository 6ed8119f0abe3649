"""Two writers on one log, and readers while a writer compacts (issue 25).

Before the writer lock, two writers on one folder both closed without error and the log then
failed to load (or lost one writer's steps); a reader loading during a compaction could find a
listed file gone. The long version of the contention run is ``python -m benchmarks.reliability``
(benchmarks/RESULTS.md §12).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from inrun_shapley.errors import LogError
from inrun_shapley.log import ShapleyLog, ShapleyLogWriter
from inrun_shapley.log.lock import LOCK_FILE
from tests.log.helpers import assert_totals_match, make_steps

ROOT = Path(__file__).resolve().parents[2]


def test_second_writer_on_an_empty_folder_is_refused_and_nothing_is_lost(tmp_path):
    steps = make_steps(n_steps=8)
    first = ShapleyLogWriter(tmp_path / "log", flush_every=2)
    with pytest.raises(LogError, match=rf"process {os.getpid()} on host .*already open"):
        ShapleyLogWriter(tmp_path / "log", flush_every=2)
    for s in steps:
        first.add_step(*s)
    first.close()
    assert not (tmp_path / "log" / LOCK_FILE).exists()  # a clean close leaves no lock behind
    assert_totals_match(ShapleyLog.load(tmp_path / "log").totals(), steps)


def test_second_writer_resuming_a_log_is_refused(tmp_path):
    steps = make_steps(n_steps=12)
    with ShapleyLogWriter(tmp_path / "log", flush_every=3) as w:
        for s in steps[:4]:
            w.add_step(*s)
    a = ShapleyLogWriter(tmp_path / "log", flush_every=3, resume=True)
    with pytest.raises(LogError, match="already open"):
        ShapleyLogWriter(tmp_path / "log", flush_every=3, resume=True)
    for s in steps[4:]:
        a.add_step(*s)
    a.close()
    b = ShapleyLogWriter(tmp_path / "log", resume=True)  # free again after the close
    b.close()
    assert_totals_match(ShapleyLog.load(tmp_path / "log").totals(), steps)


_HOLD = """
import sys, time, numpy as np
from inrun_shapley.log import ShapleyLogWriter
w = ShapleyLogWriter(sys.argv[1], flush_every=1)
w.add_step(1, np.array([0, 1]), np.array([0.5, -0.5]))
print("ready", flush=True)
time.sleep(60)
"""


def test_lock_of_a_killed_writer_is_taken_over(tmp_path):
    path = tmp_path / "log"
    child = subprocess.Popen([sys.executable, "-c", _HOLD, str(path)], stdout=subprocess.PIPE, text=True,
                             cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert child.stdout.readline().strip() == "ready"
        with pytest.raises(LogError, match=rf"process {child.pid} on host {socket.gethostname()!r}"):
            ShapleyLogWriter(path, resume=True)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert json.loads((path / LOCK_FILE).read_text())["pid"] == child.pid  # the crash left it
    w = ShapleyLogWriter(path, resume=True)
    assert w._lock.took_over["pid"] == child.pid
    assert w.add_step(2, np.array([1, 2]), np.array([1.0, 2.0]))
    w.close()
    log = ShapleyLog.load(path)
    assert log.last_step == 2 and log.counts.tolist() == [1, 2, 1]


def test_lock_written_on_another_host_is_refused_with_what_to_do(tmp_path):
    path = tmp_path / "log"
    ShapleyLogWriter(path).close()
    (path / LOCK_FILE).write_text(json.dumps({"host": "node-7", "pid": 4242, "since": "then"}))
    with pytest.raises(LogError, match=r"process 4242 on host 'node-7'.*another host.*delete .*writer\.lock"):
        ShapleyLogWriter(path, resume=True)
    (path / LOCK_FILE).unlink()
    ShapleyLogWriter(path, resume=True).close()


def test_reader_retries_when_a_compaction_removes_what_it_listed(tmp_path, monkeypatch):
    """Deterministic: the writer commits (and compacts) between the reader's header and its
    first data file."""
    import inrun_shapley.log.reader as reader

    steps = make_steps(n_steps=10)
    w = ShapleyLogWriter(tmp_path / "log", flush_every=0)
    for s in steps[:5]:
        w.add_step(*s)
    w.flush()
    real, calls = reader.read_table, []

    def read_table_while_compacting(root, entry, fields, verify):
        if not calls:
            for s in steps[5:]:
                w.add_step(*s)
            w.flush(compact=True)  # removes the base the reader's header listed
        calls.append(entry["file"])
        return real(root, entry, fields, verify)

    monkeypatch.setattr(reader, "read_table", read_table_while_compacting)
    log = ShapleyLog.load(tmp_path / "log")
    assert_totals_match(log.totals(), steps)
    w.close()


def test_two_writers_and_a_reader_for_a_few_seconds():
    """Short version of the 30 s contention run: nothing lost, every load consistent."""
    from benchmarks.reliability import contention

    c = contention(seconds=3.0)
    assert c["second_rc"] == 3 and "already open" in c["second_said"], c
    assert c["errors"] == [] and c["loads"] >= 3, c
    assert c["wrote"] > 50 and c["final_step"] == c["wrote"], c


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_never_frees_the_parents_lock(tmp_path):
    """DataLoader workers are forked with the writer in memory: whatever they do with it, the
    parent keeps its log locked."""
    w = ShapleyLogWriter(tmp_path / "log")
    pid = os.fork()
    if pid == 0:  # the child drops its copy of the lock, as a finalizer would
        try:
            w._lock.release()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert (tmp_path / "log" / LOCK_FILE).exists()
    with pytest.raises(LogError, match="already open"):
        ShapleyLogWriter(tmp_path / "log", resume=True)
    w.close()
