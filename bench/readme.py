"""The benchmark tables of README.md and docs/benchmarks.md, generated from bench/results.

``python -m bench --readme`` (``make bench-readme``) rewrites two marked blocks from the
committed results files, never typed by hand:

- README.md's headline block: the whole-network tables, the ResNet-50-through-TVM
  tables, then per device the per-layer conv2d_sparse rows at 90% sparsity and the
  largest batch, in a few columns;
- docs/benchmarks.md's tables block: the same two network tables, then per device the
  per-layer rows at 90%/95% (conv2d_sparse), the elementwise add at >= 16 M elements and
  the DSG rows at 90%, in every column, with the plots.

Links are written relative to the file they go into.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import conv2d, dsg_training, elementwise, masked, network, report, tvm_network

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
README = ROOT / "README.md"
BENCHMARKS = ROOT / "docs" / "benchmarks.md"
HEADLINE_MARKERS = ("<!-- bench:headline:start -->", "<!-- bench:headline:end -->")
TABLES_MARKERS = ("<!-- bench:tables:start -->", "<!-- bench:tables:end -->")

#: The README's per-layer columns (the full set is in docs/benchmarks.md).
HEADLINE_COLUMNS = ("layer", "N", "sparsity", "ours_kernel_ms", "ours_call_ms",
                    "torch_dense_ms", "speedup_vs_torch", "call_speedup_vs_torch",
                    "speedup_vs_torch_csr", "speedup_vs_scipy")


def _results(results_dir: Path, pattern: str, skip=()):
    """(stem, data) of each committed results file matching ``pattern`` (not -quick)."""
    for path in sorted(results_dir.glob(pattern)):
        if path.stem.endswith("-quick") or path.stem.startswith(skip):
            continue
        yield path.stem, json.loads(path.read_text())


def _device_tables(results_dir: Path, pattern: str, heading: list, facts, table,
                   prefix: str, plot: bool = False) -> list:
    """Markdown lines for one suite's results files (``pattern``), a block per device:
    its header line (``facts(header)``, then the file's link), ``table(data)`` and, with
    ``plot``, the figure beside the file; [] when there is no such file."""
    found = list(_results(results_dir, pattern))
    if not found:
        return []
    parts = list(heading)
    for stem, data in found:
        h = data["header"]
        parts += [f"**{h['device']}** ({facts(h)}; [bench/results/{stem}.md]"
                  f"({prefix}bench/results/{stem}.md))", "", table(data), ""]
        if plot and (results_dir / f"{stem}.png").exists():
            parts += [f"![{heading[0][4:]}, {h['device']}]"
                      f"({prefix}bench/results/{stem}.png)", ""]
    return parts


def network_tables(results_dir: Path = RESULTS, prefix: str = "") -> list:
    """Markdown lines: the whole-network results of every device."""
    return _device_tables(
        results_dir, "network-*.json",
        ["### Whole network: ResNet-50, res2 input to logits", "", network.NOTE, ""],
        lambda h: f"driver {h['driver']}; {h['date']}; baseline: {h['baselines']}",
        lambda data: network.markdown_table(data["rows"]), prefix)


def tvm_network_tables(results_dir: Path = RESULTS, prefix: str = "") -> list:
    """Markdown lines: ResNet-50 through TVM, with and without the offload, per device."""
    return _device_tables(
        results_dir, "tvm-network-*.json",
        ["### Whole network through TVM: ResNet-50 with offload_sparse_conv2d", "",
         tvm_network.NOTE, ""],
        lambda h: f"{h['date']}; TVM {h['tvm']}; baselines: {h['baselines']}",
        lambda data: tvm_network.markdown_table(data["rows"]), prefix)


def dsg_training_tables(results_dir: Path = RESULTS, prefix: str = "") -> list:
    """Markdown lines: DSG training (accuracy per mask and sparsity on the digits, step
    times), per device, with the plot."""
    return _device_tables(
        results_dir, "dsg-training-*.json",
        ["### DSG training: an MLP and a CNN on the digits", ""],
        lambda h: f"{h['date']}; {h['model']}; baseline: {h['baselines']}",
        lambda data: dsg_training.markdown_tables(data["rows"], data["steps"]), prefix,
        plot=True)


#: The propagated grid's columns in the README (the full table is in the results file).
PROPAGATED_README = ("shape", "x_sparsity", "sparsity", "propagated_ms", "output_only_ms",
                     "torch_dense_ms", "speedup_vs_output_only", "speedup_vs_torch",
                     "projection_speedup", "search_speedup")


def propagated_tables(results_dir: Path = RESULTS, prefix: str = "") -> list:
    """Markdown lines: per device, the product of a compact x against the dense-input
    one where input and output are equally sparse (90% and 95%)."""
    parts = []
    for stem, data in _layer_files(results_dir):
        rows = [r for r in data.get("rows", []) if r.get("op") == "propagated"
                and r["x_sparsity"] == r["sparsity"] and r["sparsity"] in (0.9, 0.95)]
        if not rows:
            continue
        if not parts:
            parts = ["### Sparsity carried across layers: the product of a compact x", "",
                     masked.PROPAGATED_NOTE, ""]
        h = data["header"]
        columns = [c for c in masked.PROPAGATED_COLUMNS if c[0] in PROPAGATED_README]
        parts += [f"**{h['device']}** ({h['date']}; every input x output sparsity: "
                  f"[bench/results/{stem}.md]({prefix}bench/results/{stem}.md))", "",
                  report.markdown_table(rows, columns, drop_absent=True), ""]
    return parts


def _layer_files(results_dir: Path):
    return _results(results_dir, "*.json",
                    skip=("sweep", "tvm-overhead", "tvm-network", "network", "dsg-training"))


def layer_tables(results_dir: Path = RESULTS, prefix: str = "") -> list:
    """Markdown lines: per device, the per-layer rows at 90%/95% sparsity (conv2d at the
    largest batch), elementwise add from 16 M elements and DSG at 90%, with the plot."""
    parts = ["### Per layer", ""]
    for stem, data in _layer_files(results_dir):
        h = data["header"]
        timing = f"; timing: {h['timing']}" if h.get("timing") else ""
        parts += [f"**{h['device']}** (driver {h['driver']}; {h['date']}; baselines: "
                  f"{h['baselines']}{timing}; full tables: [bench/results/{stem}.md]"
                  f"({prefix}bench/results/{stem}.md))", ""]
        conv = [r for r in data.get("rows", []) if r.get("op") == "conv2d_sparse"]
        if conv:
            batch = max(r["N"] for r in conv)
            parts += [conv2d.markdown_table([r for r in conv if r["N"] == batch
                                             and r["sparsity"] in (0.9, 0.95)]), ""]
        add = [r for r in data.get("rows", []) if r.get("op") == "elementwise_add"
               and r["n"] >= 16 * 2**20]
        if add:
            parts += [elementwise.markdown_table(add), ""]
        dsg = [r for r in data.get("rows", []) if r.get("op", "").startswith(("masked",
                                                                             "conv2d_masked"))
               and r["sparsity"] == 0.9]
        if dsg:
            parts += [masked.markdown_table(dsg), ""]
        grid = masked.propagated_table(data.get("rows", []))
        if grid:
            parts += ["A compact x (sparsity carried across layers), input x output "
                      "sparsity:", "", grid, ""]
        if (results_dir / f"{stem}.png").exists():
            parts += [f"![conv2d_sparse speedup on {h['device']}]"
                      f"({prefix}bench/results/{stem}.png)", ""]
    return parts


def headline_layers(results_dir: Path = RESULTS, prefix: str = "") -> list:
    """Markdown lines: per device, conv2d_sparse at 90% and the largest batch, in the
    README's few columns."""
    columns = [c for c in conv2d.COLUMNS if c[0] in HEADLINE_COLUMNS]
    parts = ["### Per layer: conv2d_sparse at 90% sparsity", ""]
    for stem, data in _layer_files(results_dir):
        conv = [r for r in data.get("rows", []) if r.get("op") == "conv2d_sparse"]
        if not conv:
            continue
        h = data["header"]
        batch = max(r["N"] for r in conv)
        parts += [f"**{h['device']}** ({h['date']}; full tables: "
                  f"[bench/results/{stem}.md]({prefix}bench/results/{stem}.md))", "",
                  report.markdown_table([r for r in conv if r["N"] == batch
                                         and r["sparsity"] == 0.9], columns,
                                        drop_absent=True), ""]
    return parts


def readme_headline(results_dir: Path = RESULTS) -> str:
    """README.md's block: whole network first, then the per-layer headline."""
    return "\n".join(network_tables(results_dir) + tvm_network_tables(results_dir) +
                     dsg_training_tables(results_dir) + propagated_tables(results_dir) +
                     headline_layers(results_dir) + [
        "Every column, the elementwise and DSG tables and the plots: "
        "[docs/benchmarks.md](docs/benchmarks.md#results).", ""])


def benchmarks_tables(results_dir: Path = RESULTS) -> str:
    """docs/benchmarks.md's block: whole network, then every per-layer table."""
    return "\n".join(network_tables(results_dir, "../") +
                     tvm_network_tables(results_dir, "../") +
                     dsg_training_tables(results_dir, "../") + layer_tables(results_dir, "../"))


def replace_block(path: Path, markers, body: str) -> None:
    """Rewrite the text between ``markers`` in ``path`` with ``body``."""
    text = path.read_text()
    start, end = markers
    if start not in text or end not in text:
        raise SystemExit(f"{path} lacks the markers {markers}")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{start}\n{body}{end}{tail}")


def update(results_dir: Path = RESULTS, readme: Path = README,
           benchmarks: Path = BENCHMARKS) -> None:
    """Rewrite both blocks from ``results_dir`` (never by hand)."""
    replace_block(readme, HEADLINE_MARKERS, readme_headline(results_dir))
    replace_block(benchmarks, TABLES_MARKERS, benchmarks_tables(results_dir))
    print(f"wrote the tables from {results_dir} into {readme} and {benchmarks}")
