"""The autotuner and the user's tuning database."""

import json
import re
import threading

import numpy as np
import pytest

from pysparsecl import tuning
from pysparsecl.__main__ import main
from pysparsecl.ops.conv2d import CONV2D_CSR
from pysparsecl.ops.elementwise import ELEMENTWISE
from pysparsecl.params import ROUTINES, SPECS, Routine
from pysparsecl.testing import problems
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

    def sabotaged(q, rng, quick, shapes):
        (problem,) = real(q, rng, quick, shapes)

        def launch(events, inner=problem.launch):
            params = tuning.lookup(ELEMENTWISE, q.device)
            if params["VEC"] == 16 and params["ITEMS"] != 4:
                raise RuntimeError("simulated build failure")
            out = inner(events)
            return out * 2 if params["VEC"] == 1 else out   # a wrong answer
        return [problems.Problem(problem.label, launch, problem.reference)]

    monkeypatch.setitem(tuner.TUNABLES, "elementwise", sabotaged)
    result = tuner.tune_family("elementwise", queue, budget_s=60, max_candidates=40, reps=1,
                               quick=True, write=False, progress=None)
    errors = [c.error for c in result.tried if c.error]
    assert any("simulated build failure" in e for e in errors)
    assert any("relative error" in e for e in errors)
    assert result.best is not None and result.best.params["VEC"] != 1


def test_candidates_are_checked_against_the_independent_reference(queue, monkeypatch):
    """A wrong spec-default configuration is caught, not taken as the reference that would
    fail every correct candidate."""
    real = tuner.TUNABLES["elementwise"]

    def sabotaged(q, rng, quick, shapes):
        (problem,) = real(q, rng, quick, shapes)

        def launch(events, inner=problem.launch):
            out = inner(events)
            wrong = tuning.lookup(ELEMENTWISE, q.device) == ELEMENTWISE.defaults()
            return out * 2 if wrong else out
        return [problems.Problem(problem.label, launch, problem.reference)]

    monkeypatch.setitem(tuner.TUNABLES, "elementwise", sabotaged)
    result = tuner.tune_family("elementwise", queue, budget_s=60, max_candidates=6, reps=1,
                               quick=True, write=False, progress=None,
                               first=[ELEMENTWISE.defaults()])
    default = [c for c in result.tried if c.params == ELEMENTWISE.defaults()]
    assert default and "relative error" in default[0].error
    assert sum(not c.error for c in result.tried) >= len(result.tried) - 1
    assert result.best.params != ELEMENTWISE.defaults()


def test_unknown_family_and_missing_driver(queue, monkeypatch):
    with pytest.raises(ValueError, match="unknown kernel family"):
        tuner.tune_family("nope", queue)
    monkeypatch.delitem(tuner.TUNABLES, "masked_bn")
    with pytest.raises(ValueError, match="no driver"):
        tuner.tune_family("masked_bn", queue)


def test_every_kernel_family_and_routine_has_a_tuner_driver():
    from pysparsecl.families import modules
    from pysparsecl.ops import conv2d, drs, masked
    families = {m.SPEC.family for m in modules().values()}
    routines = {v.spec.family for m in (conv2d, drs, masked) for v in vars(m).values()
                if isinstance(v, Routine)}
    assert len(families) == 31 and len(routines) == 7
    assert families | routines == set(tuner.TUNABLES)
    assert families | routines <= set(SPECS) and routines == set(ROUTINES)


@pytest.mark.parametrize("family", sorted(tuner.TUNABLES))
def test_every_driver_tunes_its_family(queue, family):
    """Quick problems, two candidates: the driver's problems run, check and time."""
    result = tuner.tune_family(family, queue, budget_s=60, max_candidates=2, reps=1,
                               quick=True, write=False, progress=None)
    assert result.best is not None, [c.error for c in result.tried]
    assert all(t > 0 for t in result.best.times_ms)


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
    with pytest.warns(RuntimeWarning, match="ignoring tuning entry"):
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


def test_shape_class_entries_come_before_the_family_entry(queue):
    generic = dict(CONV2D_CSR.defaults(), UNROLL=1)
    per_class = dict(CONV2D_CSR.defaults(), UNROLL=4)
    tuning.write_user_entry(queue.device, "conv2d_csr", {
        "params": generic, "shapes": {"k3x3-s1x1-c64-px2048-b8": {"params": per_class}}})
    assert tuning.lookup(CONV2D_CSR, queue.device) == generic
    assert tuning.lookup(CONV2D_CSR, queue.device, "k3x3-s1x1-c64-px2048-b8") == per_class
    assert tuning.lookup(CONV2D_CSR, queue.device, "k1x1-s1x1-c64-px2048-b8") == generic


def test_invalid_shape_class_entry_falls_back_to_the_family_entry(queue):
    generic = dict(CONV2D_CSR.defaults(), UNROLL=1)
    tuning.write_user_entry(queue.device, "conv2d_csr", {
        "params": generic, "shapes": {"c": {"params": {"VEC": 3}}}})
    with pytest.warns(RuntimeWarning, match=r"ignoring tuning entry .*\[c\]"):
        assert tuning.lookup(CONV2D_CSR, queue.device, "c") == generic


def test_shipped_shape_class_entries(queue, monkeypatch):
    per_class = dict(CONV2D_CSR.defaults(), UNROLL=4)
    kind = tuning.device_kind(queue.device)
    monkeypatch.setattr(tuning, "_shipped", {"conv2d_csr": {
        kind: {"params": CONV2D_CSR.defaults(), "shapes": {"c": {"params": per_class}}}}})
    assert tuning.lookup(CONV2D_CSR, queue.device, "c") == per_class
    assert tuning.lookup(CONV2D_CSR, queue.device) == CONV2D_CSR.defaults()


def test_conv2d_calls_look_up_their_shape_class(queue, monkeypatch):
    from pysparsecl.ops.conv2d import conv2d_shape_class
    seen = []
    real = tuning.lookup

    def spy(spec, device, shape_class=None, copy=True):
        seen.append((spec.family, shape_class))
        return real(spec, device, shape_class, copy)
    monkeypatch.setattr(tuning, "lookup", spy)
    import numpy as np
    import scipy.sparse as sp

    import pysparsecl as ps
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 9, 9), dtype=np.float32)
    w = sp.random(4, 8 * 9, density=0.3, format="csr", dtype=np.float32, random_state=1)
    ps.conv2d_sparse(x, w, kernel_size=3, stride=2, padding=1, queue=queue)
    assert ("conv2d_csr", conv2d_shape_class(2, 8, (5, 5), 3, 2)) in seen
    assert conv2d_shape_class(2, 8, (5, 5), 3, 2) == "k3x3-s2x2-c8-px16-b2"


def test_tuning_writes_per_class_winners(queue):
    result = tuner.tune_family("conv2d_csr", queue, budget_s=60, max_candidates=3, reps=1,
                               quick=True, progress=None, write=True)
    data = json.loads(tuning.user_database_path(queue.device).read_text())
    entry = data["families"]["conv2d_csr"]
    assert set(entry["shapes"]) == set(result.by_class) and len(result.by_class) == 2
    for shape_class, cand in result.by_class.items():
        assert entry["shapes"][shape_class]["params"] == cand.params
        assert tuning.lookup(CONV2D_CSR, queue.device, shape_class) == cand.params


def test_cli_shapes_file(tmp_path, capsys, queue):
    path = tmp_path / "shapes.json"
    path.write_text(json.dumps({"elementwise": [{"n": 1000}, {"n": 4099}]}))
    assert main(["tune", "--shapes", str(path), "--budget-s", "5", "--max-candidates", "2",
                 "--dry-run"]) == 0
    assert "elementwise on" in capsys.readouterr().out


@pytest.mark.parametrize("content, message", [
    ("{not json", "cannot read shapes file"),
    ('{"nope": [{"n": 1}]}', "unknown families"),
    ('{"elementwise": []}', "non-empty lists"),
    ('{"elementwise": [{"m": 1}]}', "unknown keys"),
    ('{"elementwise": [{"n": -1}]}', "positive integer"),
    ('{"masked_gemm": [{"M": 2, "K": 3, "N": 4, "keep": 2}]}', r"keep must be in \[0, 1\]"),
])
def test_cli_rejects_bad_shapes_files(tmp_path, capsys, content, message):
    path = tmp_path / "shapes.json"
    path.write_text(content)
    assert main(["tune", "--shapes", str(path), "--dry-run"]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_start_configurations_are_tried_after_the_current_one(queue):
    result = tuner.tune_family("elementwise", queue, budget_s=30, max_candidates=2, reps=1,
                               quick=True, write=False, progress=None,
                               first=[{"VEC": 1, "ITEMS": 2}])
    assert [c.params for c in result.tried][1] == ELEMENTWISE.check({"VEC": 1, "ITEMS": 2})


@pytest.mark.parametrize("text, message", [("VEC=1", "lacks 'family:'"),
                                           ("elementwise:VEC=3", "VEC"),
                                           ("nope:VEC=4", "unknown kernel family 'nope'")])
def test_cli_rejects_bad_try_configurations(capsys, text, message):
    assert main(["tune", "--op", "elementwise", "--try", text, "--quick"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("family, entry", [
    ("conv2d_csr", {"N": 2, "C": 4, "H": 7, "W": 6, "K": 3, "stride": 2, "sparsity": 0.5}),
    ("masked_conv", {"N": 2, "C": 4, "H": 7, "W": 6, "K": 3, "kernel": [1, 3], "keep": 0.3}),
])
def test_convolution_shapes_from_a_shapes_file(queue, family, entry):
    result = tuner.tune_family(family, queue, shapes=[entry], budget_s=30, max_candidates=1,
                               reps=1, write=False, progress=None)
    assert result.best is not None and len(result.problems) == 1
    assert result.problems[0].startswith("N2 C4 7x6 K3")
    with pytest.raises(problems.ShapesError, match="stride must be an int or"):
        tuner.tune_family(family, queue, shapes=[dict(entry, stride="2")], write=False,
                          progress=None)


@pytest.mark.parametrize("epilogue", ["bias", "bias+relu", "bias+residual+relu"])
def test_convolution_shapes_with_the_networks_epilogue(queue, epilogue):
    """A conv2d_csr entry may name the epilogue a network fuses into that layer; every
    candidate is then timed and checked with it."""
    entry = {"N": 2, "C": 4, "H": 7, "W": 6, "K": 3, "kernel": 1, "padding": 0,
             "sparsity": 0.5, "epilogue": epilogue}
    result = tuner.tune_family("conv2d_csr", queue, shapes=[entry], budget_s=30,
                               max_candidates=1, reps=1, write=False, progress=None)
    assert result.best is not None and result.problems[0].endswith("+" + epilogue)
    for bad in ("gelu", ["relu"]):
        with pytest.raises(problems.ShapesError, match="epilogue must be one of"):
            tuner.tune_family("conv2d_csr", queue, shapes=[dict(entry, epilogue=bad)],
                              write=False, progress=None)


def test_ship_tuning_keeps_newer_shipped_entries(tmp_path, monkeypatch):
    """scripts/ship_tuning.py copies a tuned database into the shipped one, but a stale
    cache file (measured before the shipped entry) does not undo a newer tuning run."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "scripts" / "ship_tuning.py"
    spec = importlib.util.spec_from_file_location("ship_tuning", path)
    ship = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ship)
    shipped = tmp_path / "shipped.json"
    shipped.write_text(json.dumps({"elementwise": {"dev": {
        "params": {"VEC": 16}, "measured": {"date": "2026-11-27T02:13:15+00:00"}}}}))
    monkeypatch.setattr(ship, "SHIPPED", shipped)

    def tuned(date, vec):
        db = tmp_path / f"dev--1-0-{vec}.json"
        db.write_text(json.dumps({"driver": "1.0", "families": {"elementwise": {
            "params": {"VEC": vec}, "date": date, "total_ms": 1.0, "times_ms": {}}}}))
        return str(db)

    ship.main([tuned("2026-11-27T02:11:46+00:00", 8)])            # older: skipped
    assert json.loads(shipped.read_text())["elementwise"]["dev"]["params"] == {"VEC": 16}
    ship.main([tuned("2026-11-27T02:11:46+00:00", 8), "--force"])
    assert json.loads(shipped.read_text())["elementwise"]["dev"]["params"] == {"VEC": 8}
    ship.main([tuned("2026-11-28T00:00:00+00:00", 4), "--also", "vendor/gpu"])
    entries = json.loads(shipped.read_text())["elementwise"]
    assert entries["dev"]["params"] == entries["vendor/gpu"]["params"] == {"VEC": 4}
    # A database that names its device is keyed by that device, whatever the file's name.
    renamed = tmp_path / "copy_of_a_tuning_run.json"
    renamed.write_text(json.dumps({
        "platform": "Portable Computing Language", "device": "pthread-skylake-AMD EPYC",
        "driver": "3.1", "families": {"elementwise": {
            "params": {"VEC": 2}, "date": "2026-11-29T00:00:00+00:00", "total_ms": 1.0,
            "times_ms": {}}}}))
    ship.main([str(renamed)])
    entries = json.loads(shipped.read_text())["elementwise"]
    assert entries["pocl-pthread-skylake-amd-epyc"]["params"] == {"VEC": 2}
    assert "copy_of_a_tuning_run.json" not in entries


def test_ship_tuning_merges_a_run_over_some_shape_classes(tmp_path, monkeypatch):
    """--merge-shapes --keep-shipped-params: a run over a few shape classes replaces those
    classes' entries and adds its new ones, while the other classes and the family-wide
    parameters (tuned over every class) stay as shipped."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "scripts" / "ship_tuning.py"
    spec = importlib.util.spec_from_file_location("ship_tuning", path)
    ship = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ship)
    shipped = tmp_path / "shipped.json"
    old_measured = {"date": "2026-11-27T00:00:00+00:00", "total_ms": 9.0}
    shipped.write_text(json.dumps({"conv2d_csr": {"dev": {
        "params": {"VEC": 8}, "measured": old_measured,
        "shapes": {"a": {"params": {"VEC": 4}}, "b": {"params": {"VEC": 2}}}}}}))
    monkeypatch.setattr(ship, "SHIPPED", shipped)
    db = tmp_path / "dev--1.json"
    db.write_text(json.dumps({"driver": "1", "families": {"conv2d_csr": {
        "params": {"VEC": 16}, "date": "2026-11-28T00:00:00+00:00", "total_ms": 1.0,
        "times_ms": {}, "shapes": {"b": {"params": {"VEC": 1}},
                                   "c": {"params": {"VEC": 16}}}}}}))
    ship.main([str(db), "--merge-shapes", "--keep-shipped-params"])
    entry = json.loads(shipped.read_text())["conv2d_csr"]["dev"]
    assert entry["params"] == {"VEC": 8} and entry["measured"] == old_measured
    assert {k: v["params"]["VEC"] for k, v in entry["shapes"].items()} == \
        {"a": 4, "b": 1, "c": 16}
    ship.main([str(db), "--merge-shapes", "--force"])     # without: the run's own params
    assert json.loads(shipped.read_text())["conv2d_csr"]["dev"]["params"] == {"VEC": 16}


def test_a_challenger_must_win_every_interleaved_round():
    """The confirmation keeps the configuration in use unless a challenger is faster by
    more than min_gain in the median *and* in every paired round: one slow spell that hit
    only the incumbent's timings does not crown the challenger."""
    def cand(rounds):
        c = tuner.Candidate({"VEC": 1}, times_ms=list(np.median(rounds, axis=0)))
        c.rounds_ms = rounds
        return c
    incumbent = cand([[10.0, 5.0], [10.0, 5.0], [10.0, 5.0]])
    steady = cand([[9.0, 5.0], [9.1, 5.0], [8.9, 5.0]])
    lucky = cand([[9.0, 5.0], [8.0, 5.0], [10.5, 5.0]])     # median faster, lost round 3
    marginal = cand([[9.9, 5.0], [9.9, 5.0], [9.9, 5.0]])  # 0.7% faster overall: under 3%
    assert tuner._keep_unless_beaten(steady, incumbent, [0, 1], 0.03) is steady
    assert tuner._keep_unless_beaten(lucky, incumbent, [0, 1], 0.03) is incumbent
    assert tuner._keep_unless_beaten(marginal, incumbent, [0, 1], 0.03) is incumbent
    assert tuner._keep_unless_beaten(marginal, incumbent, [0], 0.0) is marginal
    assert tuner._keep_unless_beaten(steady, None, [0, 1], 0.03) is steady


def test_problem_weights_set_the_score():
    """A candidate's score is the weighted sum of its times, in the search, per class and in
    every confirmation round: weighting a slow problem down lets a candidate that wins the
    light problem win, though it loses the heavy one by more milliseconds."""
    def cand(times, weights):
        c = tuner.Candidate({"VEC": 1}, times_ms=list(times), weights=list(weights))
        c.rounds_ms = [list(times)] * 3
        return c
    even, light = [1.0, 1.0], [1.0, 0.2]
    incumbent_times, challenger_times = [1.0, 5.0], [0.5, 5.6]   # 6.0 vs 6.1 ms in all
    assert cand(challenger_times, light).total_ms == pytest.approx(0.5 + 0.2 * 5.6)
    assert cand(challenger_times, light).class_ms([1]) == pytest.approx(0.2 * 5.6)
    assert tuner.Candidate({}, times_ms=[2.0, 3.0]).total_ms == 5.0   # no weights: all 1
    incumbent, challenger = cand(incumbent_times, even), cand(challenger_times, even)
    assert tuner._keep_unless_beaten(challenger, incumbent, [0, 1], 0.03) is incumbent
    incumbent, challenger = cand(incumbent_times, light), cand(challenger_times, light)
    assert tuner._keep_unless_beaten(challenger, incumbent, [0, 1], 0.03) is challenger


def test_memoised_values_follow_overrides_and_new_entries(queue, monkeypatch):
    """An op's derived routing value is built once, then served while nothing changes;
    an override, PYSPARSECL_PARAMS and a cleared memo (a new tuning result) all take
    effect at once."""
    device, built = queue.device, []

    def build(look):
        built.append(1)
        return dict(look(CONV2D_CSR))

    def get():
        return tuning.memoised("test-routing", device, "cls-test", build)

    first = get()
    assert get() is first and len(built) == 1
    other = next(u for u in (1, 2, 4) if u != first["UNROLL"])
    with tuning.override("conv2d_csr", UNROLL=other):
        assert get()["UNROLL"] == other and len(built) == 2
    assert get() is first and len(built) == 2
    monkeypatch.setenv("PYSPARSECL_PARAMS", f"conv2d_csr:UNROLL={other}")
    assert get()["UNROLL"] == other and len(built) == 3
    monkeypatch.delenv("PYSPARSECL_PARAMS")
    tuning._memo.clear()                     # what a new tuning result does
    again = get()
    assert again == first and again is not first and len(built) == 4
