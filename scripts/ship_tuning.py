#!/usr/bin/env python3
"""Copy tuned entries from user tuning databases into the shipped database.

    python -m scripts.ship_tuning DB.json [DB.json ...] [--also nvidia/gpu] [--dry-run]

Each DB.json is a file ``python -m pysparsecl tune`` wrote (``<device slug>--<driver>.json``
in the tuning cache directory).  Its families' entries -- parameters, per-shape-class
parameters and what the tuner measured -- go into
``pysparsecl/tuning/database/shipped.json`` under the device slug, and, with ``--also
KEY``, under KEY as well (e.g. ``nvidia/gpu``, the fallback for the vendor's other GPUs).
Entries are written as the tuner measured them, never edited by hand.  An entry measured
earlier than the one already shipped is skipped (a stale cache file must not undo a newer
tuning run) unless ``--force`` is given.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pysparsecl.tuning import names_slug

ROOT = Path(__file__).resolve().parent.parent

SHIPPED = ROOT / "pysparsecl" / "tuning" / "database" / "shipped.json"


def shipped_entry(tuned: dict, driver: str) -> dict:
    """The shipped form of one family's tuned entry."""
    entry = {"params": tuned["params"], "measured": {
        "by": "python -m pysparsecl tune", "date": tuned.get("date"), "driver": driver,
        "total_ms": tuned.get("total_ms"), "baseline_ms": tuned.get("baseline_ms"),
        "problems_ms": tuned.get("times_ms"),
        "candidates_tried": tuned.get("candidates_tried")}}
    if tuned.get("shapes"):
        entry["shapes"] = tuned["shapes"]
    return entry


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("databases", nargs="+", type=Path)
    parser.add_argument("--also", action="append", default=[], metavar="KEY",
                        help="also write the entries under KEY (e.g. nvidia/gpu)")
    parser.add_argument("--force", action="store_true",
                        help="replace shipped entries even with older measurements")
    parser.add_argument("--keep-shipped-shapes", action="store_true",
                        help="keep the shipped entry's shape classes over the new ones "
                             "(for runs whose candidates did not include the shipped "
                             "per-class winners, as before the tuner tried them first)")
    parser.add_argument("--merge-shapes", action="store_true",
                        help="keep the shipped entry's shape classes that the new run did "
                             "not tune (the new run's win where both have one)")
    parser.add_argument("--keep-shipped-params", action="store_true",
                        help="keep the shipped entry's family-wide parameters and their "
                             "measurement (for a run over some shape classes only, with "
                             "--merge-shapes: its per-class entries carry their own times)")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    shipped = json.loads(SHIPPED.read_text())
    for path in args.databases:
        data = json.loads(path.read_text())
        # The device the database names (a renamed or copied file keeps its key); older
        # files without those fields are keyed by their name, <device slug>--<driver>.json.
        slug = (names_slug(data["platform"], data["device"])
                if data.get("platform") and data.get("device") else path.name.split("--")[0])
        for family, tuned in sorted(data.get("families", {}).items()):
            if tuned.get("quick"):
                print(f"skip {family} from {path.name}: a --quick run", file=sys.stderr)
                continue
            entry = shipped_entry(tuned, data.get("driver", ""))
            for key in [slug] + args.also:
                current = shipped.get(family, {}).get(key, {}).get("measured", {})
                if (not args.force and current.get("date") and entry["measured"]["date"]
                        and entry["measured"]["date"] < current["date"]):
                    print(f"skip {family}/{key}: {path.name} was measured "
                          f"{entry['measured']['date']}, before the shipped entry "
                          f"({current['date']}); --force replaces it", file=sys.stderr)
                    continue
                old = shipped.get(family, {}).get(key, {})
                old_shapes = old.get("shapes", {})
                if args.keep_shipped_params and "params" in old:
                    entry = dict(entry, params=old["params"],
                                 measured=old.get("measured", entry["measured"]))
                if args.keep_shipped_shapes and old_shapes:
                    entry = dict(entry, shapes={**entry.get("shapes", {}), **old_shapes})
                elif args.merge_shapes and old_shapes:
                    entry = dict(entry, shapes={**old_shapes, **entry.get("shapes", {})})
                shipped.setdefault(family, {})[key] = entry
                print(f"{family}/{key}: {entry['params']}"
                      f" (+{len(entry.get('shapes', {}))} shape classes)")
    if not args.dry_run:
        SHIPPED.write_text(json.dumps(shipped, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
