"""The autotuner and the user's tuning database."""

import json
import threading

import pytest

from pysparsecl import tuning
from pysparsecl.__main__ import main
from pysparsecl.ops.elementwise import ELEMENTWISE
from pysparsecl.tuning import tuner


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PYSPARSECL_CACHE_DIR", str(tmp_path))
    tuning._memo.clear()
    yield
    tuning._memo.clear()


def test_tuning_writes_the_best_configuration_and_lookup_uses_it(queue):
    result = tuner.tune_family("elementwise", queue, budget_s=30, max_candidates=4, reps=2,
                               quick=True, progress=None)
    assert len(result.tried) == 4 and result.best is not None
    assert result.baseline.params == result.tried[0].params  # the configuration in use
    # The winner was re-timed against the configuration in use and beat it, or is it.
    assert result.best is result.baseline or result.best.total_ms < result.baseline.total_ms
    data = json.loads(tuning.user_database_path(queue.device).read_text())
    assert data["families"]["elementwise"]["params"] == result.best.params
    assert tuning.lookup(ELEMENTWISE, queue.device) == result.best.params


def test_failing_and_wrong_candidates_score_infinitely_slow(queue, monkeypatch):
    real = tuner.TUNABLES["elementwise"]

    def sabotaged(q, rng, quick):
        problems = real(q, rng, quick)

        def launch(events, inner=problems[0][1]):
            params = tuning.lookup(ELEMENTWISE, q.device)
            if params["VEC"] == 16 and params["ITEMS"] != 4:
                raise RuntimeError("simulated build failure")
            out = inner(events)
            return out * 2 if params["VEC"] == 1 else out   # a wrong answer
        return [(problems[0][0], launch)]

    monkeypatch.setitem(tuner.TUNABLES, "elementwise", sabotaged)
    result = tuner.tune_family("elementwise", queue, budget_s=60, max_candidates=40, reps=1,
                               quick=True, write=False, progress=None)
    errors = [c.error for c in result.tried if c.error]
    assert any("simulated build failure" in e for e in errors)
    assert any("relative error" in e for e in errors)
    assert result.best is not None and result.best.params["VEC"] != 1


def test_unknown_family_and_missing_driver(queue):
    with pytest.raises(ValueError, match="unknown kernel family"):
        tuner.tune_family("nope", queue)
    with pytest.raises(ValueError, match="no driver"):
        tuner.tune_family("masked_bn", queue)


def test_corrupt_database_is_ignored_then_replaced(queue):
    path = tuning.user_database_path(queue.device)
    path.parent.mkdir(parents=True)
    path.write_text("{truncated")
    with pytest.warns(RuntimeWarning, match="unreadable tuning database"):
        params = tuning.lookup(ELEMENTWISE, queue.device)
    assert ELEMENTWISE.check(params) == params
    with pytest.warns(RuntimeWarning):
        tuning.write_user_entry(queue.device, "elementwise", {"params": ELEMENTWISE.defaults()})
    assert json.loads(path.read_text())["families"]["elementwise"]["params"] == \
        ELEMENTWISE.defaults()


def test_invalid_tuned_entry_falls_back_with_a_warning(queue):
    tuning.write_user_entry(queue.device, "elementwise", {"params": {"VEC": 3}})
    with pytest.warns(RuntimeWarning, match="ignoring tuned entry"):
        params = tuning.lookup(ELEMENTWISE, queue.device)
    assert params["VEC"] != 3


def test_concurrent_writers_never_corrupt_the_database(queue):
    def write(i):
        for _ in range(20):
            tuning.write_user_entry(queue.device, f"family{i}", {"params": {"I": i}})
    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    data = json.loads(tuning.user_database_path(queue.device).read_text())
    assert {f"family{i}" for i in range(8)} <= set(data["families"])
    assert not list(tuning.user_database_path(queue.device).parent.glob("*.tmp"))


def test_cli_smoke(capsys):
    assert main(["tune", "--op", "elementwise", "--quick", "--budget-s", "5",
                 "--max-candidates", "2"]) == 0
    assert "elementwise on" in capsys.readouterr().out


_WRITER = r"""
import sys
import pyopencl as cl
from pysparsecl import runtime, tuning
device = runtime.working_devices(warn=False)[0]
for i in range(25):
    tuning.write_user_entry(device, f"{sys.argv[1]}{i % 3}", {"params": {"I": i}})
"""


def test_two_processes_writing_never_corrupt_the_database(queue, tmp_path):
    """Atomic replacement: readers and concurrent writers only ever see whole files."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, PYSPARSECL_CACHE_DIR=str(tmp_path))
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, name], env=env)
             for name in ("a", "b")]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    path = tuning.user_database_path(queue.device)
    data = json.loads(path.read_text())
    assert data["families"] and not list(path.parent.glob("*.tmp"))
