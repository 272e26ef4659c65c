"""Formatting of benchmark rows: one-line progress and markdown tables.

``columns`` is a list of (row key, title, format) triples; a missing or None value
prints as "-" (rows written before a column existed lack its key: treated as missing).
"""

from __future__ import annotations


def run_header(device) -> dict:
    """What every results file records first: the device and driver, the host, the date
    and the package version."""
    import datetime
    import os
    import platform

    import pysparsecl
    return {
        "device": f"{device.platform.name.strip()} / {device.name.strip()}",
        "driver": device.driver_version.strip(),
        "host": f"{platform.node()} ({os.cpu_count()} CPUs)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "pysparsecl": pysparsecl.__version__,
    }


def fmt_value(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def format_row(row: dict, columns) -> str:
    return "  ".join(f"{title}={fmt_value(row.get(key), fmt)}" for key, title, fmt in columns
                     if key in row)


def markdown_table(rows, columns, numeric: bool = False, drop_absent: bool = False) -> str:
    """A markdown table; ``numeric`` right-aligns every column.  ``drop_absent`` leaves out
    the columns whose key no row has (e.g. a baseline added after those results were
    taken); a key present with value None (a baseline skipped in that run) still prints."""
    if drop_absent:
        columns = [c for c in columns if any(c[0] in r for r in rows)]
    head = "| " + " | ".join(title for _, title, _ in columns) + " |"
    rule = "|" + ("---:|" if numeric else "---|") * len(columns)
    body = ["| " + " | ".join(fmt_value(r.get(key), fmt) for key, _, fmt in columns) + " |"
            for r in rows]
    return "\n".join([head, rule] + body)


def params_by_class(rows):
    """Markdown lines naming the tile parameters that each (family, shape class) of
    ``rows`` ran with, as the tuning database's lookup gave them (the header lists only
    each family's entry for the device)."""
    used = {(r["family"], r["shape_class"]): r["params"] for r in rows if r.get("shape_class")}
    if not used:
        return []
    return (["Tile parameters by shape class, as looked up for these rows:", ""]
            + [f"- {family} `{cls}`: {params}" for (family, cls), params in sorted(used.items())]
            + [""])


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None (with a note) where
    matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (make bench-deps)")
        return None
    return plt


def save_figure(plt, fig, path, title: str) -> bool:
    """Title, lay out, write ``path`` and close ``fig``; True (the plot exists)."""
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
