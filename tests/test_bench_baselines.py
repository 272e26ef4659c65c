"""The benchmark's torch baselines (bench/baselines.py), its driver's suite choice and its
table/README helpers.

Small shapes on torch's CPU only: these check that each baseline computes what ours does
and that an unsupported one becomes a note, not that anything is fast.
"""

import json

import numpy as np
import pytest

from bench import readme, report
from bench.__main__ import SUITES, parser, select
from bench.baselines import Torch
from pysparsecl.testing.cases import ConvCase
from pysparsecl.testing.reference import masked_matmul_reference


@pytest.fixture(scope="module")
def torch_b():
    pytest.importorskip("torch")
    return Torch(want_gpu=False)


@pytest.mark.parametrize("n, stride, kernel, padding", [(1, (1, 1), (3, 3), (1, 1)),
                                                        (3, (2, 2), (3, 3), (1, 1)),
                                                        (2, (1, 1), (1, 1), (0, 0))])
def test_csr_conv2d_matches_reference(torch_b, n, stride, kernel, padding):
    case = ConvCase(n, 6, 9, 8, 5, kernel=kernel, stride=stride, padding=padding,
                    sparsity=0.7)
    x, w, csr, _ = case.make_inputs(np.random.default_rng(1))
    ref = case.reference(x, w, None)
    run, diff = torch_b.checked("torch csr", "t", lambda: torch_b.csr_conv2d_fn(case, x, csr),
                                lambda r: r().transpose(0, 1).numpy(), ref)
    assert run is not None and diff < 1e-5
    run()   # the timed form runs again


def test_sddmm_matches_reference_and_rotates(torch_b):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 16), dtype=np.float32)
    w = rng.standard_normal((16, 10), dtype=np.float32)
    masks = [rng.random((4, 10)) < 0.3 for _ in range(3)]
    run = torch_b.sddmm_fn(x, w, torch_b.csr_masks(masks))
    for i, mask in enumerate(masks):
        got = run(i).to_dense().numpy()
        np.testing.assert_allclose(got, masked_matmul_reference(x, w, mask), rtol=1e-5,
                                   atol=1e-5)
    assert run().layout == torch_b.torch.sparse_csr   # the rotating form


def test_unsupported_or_wrong_baseline_is_a_note(torch_b):
    tb = Torch(want_gpu=False)

    def refuse():
        raise RuntimeError("not implemented for this device\nsecond line")
    assert tb.checked("sampled_addmm", "a", refuse, None, np.ones(3)) == (None, None)
    assert tb.checked("torch csr", "b", lambda: None, lambda r: np.zeros(3),
                      np.ones(3)) == (None, None)
    notes = tb.notes
    assert notes.startswith(tb.note)
    assert "sampled_addmm skipped for a (RuntimeError: not implemented for this device)" in notes
    assert "torch csr skipped for b (result differs from ours" in notes


def test_no_torch_skips_everything():
    tb = Torch.__new__(Torch)
    tb.torch, tb.skipped, tb.note = None, {}, "torch not installed"
    assert tb.checked("x", "y", lambda: 1 / 0, None, None) == (None, None)
    assert tb.notes == "torch not installed"


def test_markdown_table_drop_absent():
    cols = [("a", "A", "{}"), ("b", "B", "{}"), ("new", "NEW", "{}")]
    rows = [{"a": 1, "b": None}, {"a": 2, "b": 3}]
    assert "NEW" in report.markdown_table(rows, cols)
    table = report.markdown_table(rows, cols, drop_absent=True)
    assert table.splitlines()[0] == "| A | B |" and "| 1 | - |" in table
    assert "NEW" in report.markdown_table(rows + [{"new": None}], cols, drop_absent=True)


def _old_results(tmp_path):
    old_conv = {"op": "conv2d_sparse", "layer": "L", "N": 1, "sparsity": 0.9,
                "ours_kernel_ms": 1.0, "torch_dense_ms": 2.0, "speedup_vs_torch": 2.0}
    old_dsg = {"op": "masked_gemm", "shape": "2x3x4", "sparsity": 0.9, "ours_kernel_ms": 1.0}
    header = {"device": "D", "driver": "1", "date": "today", "baselines": "torch"}
    (tmp_path / "dev.json").write_text(json.dumps({"header": header,
                                                   "rows": [old_conv, old_dsg]}))
    (tmp_path / "network-dev.json").write_text(json.dumps({"header": header, "rows": [
        {"N": 1, "sparsity": 0.9, "ours_eager_ms": 3.0}]}))
    (tmp_path / "dev-quick.json").write_text("not read")
    return tmp_path


def test_readme_headline_on_results_without_new_fields(tmp_path):
    text = readme.benchmarks_tables(_old_results(tmp_path))
    assert "torch csr" not in text and "sddmm" not in text
    assert "| L | 1 | 0.90 | 1.000 |" in text
    assert "(../bench/results/dev.md)" in text            # relative to docs/
    head = readme.readme_headline(tmp_path)
    assert head.index("Whole network") < head.index("| L | 1 | 0.90 | 1.000 | 2.000 |")
    assert "(bench/results/network-dev.md)" in head and "2x3x4" not in head


def test_update_rewrites_only_the_marked_blocks(tmp_path):
    (tmp_path / "results").mkdir()
    results = _old_results(tmp_path / "results")
    files = {}
    for name, markers in (("README.md", readme.HEADLINE_MARKERS),
                          ("benchmarks.md", readme.TABLES_MARKERS)):
        files[name] = tmp_path / name
        files[name].write_text(f"before\n{markers[0]}\nstale\n{markers[1]}\nafter\n")
    readme.update(results, files["README.md"], files["benchmarks.md"])
    for path in files.values():
        text = path.read_text()
        assert text.startswith("before\n") and text.endswith("after\n")
        assert "stale" not in text and "| 1 | 0.90 | 3.00 |" in text


def test_committed_docs_hold_the_generated_tables():
    """README.md and docs/benchmarks.md hold what ``make bench-readme`` writes from the
    committed results (run it after committing new results)."""
    for path, markers, body in ((readme.README, readme.HEADLINE_MARKERS,
                                 readme.readme_headline()),
                                (readme.BENCHMARKS, readme.TABLES_MARKERS,
                                 readme.benchmarks_tables())):
        text = path.read_text()
        assert f"{markers[0]}\n{body}{markers[1]}" in text, f"{path}: make bench-readme"


def test_driver_suites_and_defaults(monkeypatch):
    from bench import dsg_training, tvm_network, tvm_overhead
    monkeypatch.setattr(dsg_training, "available", lambda: True)
    args = parser().parse_intermixed_args(["network", "--quick", "conv2d", "--batch", "2"])
    assert args.suites == ["network", "conv2d"] and args.quick and args.batch == [2]
    assert args.sparsity is None and args.rounds is None   # each suite's own defaults
    assert select(["network", "conv2d"]) == ["conv2d", "network"]    # SUITES' order
    monkeypatch.setattr(tvm_overhead, "available", lambda: False)
    monkeypatch.setattr(tvm_network, "available", lambda: True)
    assert select([]) == [s for s in SUITES if s != "tvm"]
    monkeypatch.setattr(tvm_network, "available", lambda: False)
    assert select([]) == [s for s in SUITES if s not in ("tvm", "tvm_network")]
    monkeypatch.setattr(tvm_overhead, "available", lambda: True)
    monkeypatch.setattr(tvm_network, "available", lambda: True)
    assert select([]) == list(SUITES)
    with pytest.raises(SystemExit):
        select(["sweep"])


def test_timer_on_the_cpu_is_the_wall_time_of_one_call(torch_b):
    calls = []
    timer = torch_b.timer(lambda: calls.append(1))
    assert timer() >= 0.0 and len(calls) == 1
    assert torch_b.call_timer(lambda: calls.append(1))() >= 0.0 and len(calls) == 2
    assert torch_b.timing_note == "torch by wall time"


class _FakeCuda:
    """Just enough of torch.cuda for Torch.timer: events 12 ms apart; graph capture that
    either works (replay runs the captured calls) or fails like an uncapturable op."""

    def __init__(self, capture_works):
        self.capture_works = capture_works
        self.captured = []

    class Event:
        def __init__(self, enable_timing):
            pass

        def record(self):
            pass

        def synchronize(self):
            pass

        def elapsed_time(self, other):
            return 12.0

    class Stream:
        def wait_stream(self, other):
            pass

    def current_stream(self):
        return self.Stream()

    def stream(self, s):
        import contextlib
        return contextlib.nullcontext()

    def synchronize(self):
        pass

    def CUDAGraph(self):  # noqa: N802 (torch's name)
        fake = self

        class Graph:
            def replay(self):
                for fn in fake.captured:
                    fn()
        return Graph()

    def graph(self, g):
        import contextlib
        if not self.capture_works:
            raise RuntimeError("operation not permitted when stream is capturing")
        return contextlib.nullcontext()


@pytest.mark.parametrize("capture_works", [True, False])
def test_timer_on_cuda_divides_one_replay_by_its_calls(capture_works):
    tb = Torch.__new__(Torch)
    tb.device = "cuda"
    cuda = _FakeCuda(capture_works)
    tb.torch = type("FakeTorch", (), {"cuda": cuda})()
    runs = []
    timer = tb.timer(lambda: runs.append(1), calls=4)
    warmed = len(runs)                       # 3 warm-up calls (+ 4 if captured)
    assert warmed == (7 if capture_works else 3)
    if capture_works:                        # the captured calls are what replay runs
        cuda.captured = [lambda: runs.append(1)] * 4
    assert timer() == pytest.approx(3.0)     # 12 ms between the events / 4 calls
    assert len(runs) == warmed + 4
    assert tb.timing_note.startswith("torch by CUDA-graph replays")


def test_warm_up_runs_once_and_then_for_its_time(monkeypatch):
    from bench import timing

    clock = {"t": 0.0}
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock["t"])
    runs = []

    def run(cost):
        def once():
            runs.append(cost)
            clock["t"] += cost
        return once

    timing.warm_up(run(0.05), min_s=0.01)            # one run outlasts the warm-up
    assert runs == [0.05]
    runs.clear()
    timing.warm_up(run(0.003), min_s=0.01)           # short runs repeat until 10 ms
    assert runs == [0.003] * 4


def test_interleaved_medians_warm_up_every_block_untimed(monkeypatch):
    from bench import timing

    monkeypatch.setattr(timing.time, "sleep", lambda s: None)
    calls = {"a": 0, "b": 0}

    def timer(name, values):
        def timed():
            calls[name] += 1
            return values[calls[name] % len(values)]
        return timed

    warmed = []
    monkeypatch.setattr(timing, "warm_up", lambda run: (warmed.append(run), run()))
    med = timing.interleaved_medians({"a": timer("a", [1.0, 2.0, 3.0]),
                                      "b": timer("b", [5.0])}, rounds=2, block=3)
    assert len(warmed) == 4                           # every block of every round
    assert calls == {"a": 8, "b": 8}                  # (1 warm-up + 3 timed) x 2 rounds
    assert med["b"] == 5.0 and med["a"] == 2.0
