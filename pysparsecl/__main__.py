"""Command line: ``python -m pysparsecl info | tune | bench``."""

from __future__ import annotations

import argparse
import sys


def _info(_args) -> int:
    from . import __version__, runtime
    infos = runtime.list_devices()
    print(f"pysparsecl {__version__}")
    if not infos:
        print("no OpenCL platforms found (see README, 'Installing')")
        return 1
    chosen = None
    try:
        chosen = runtime.get_queue().device
    except runtime.NoDeviceError as exc:
        print(exc)
    for info in infos:
        mark = "works" if info.works else f"BROKEN: {info.problem}"
        default = " (default)" if chosen is not None and chosen.name.strip() == info.name \
            and chosen.platform.name.strip() == info.platform else ""
        print(f"- [{info.platform}] {info.name}{default}\n"
              f"    {info.kind}, {info.version}, driver {info.driver_version}\n"
              f"    {info.compute_units} compute units, max work-group {info.max_work_group_size}"
              f", global {info.global_mem_mib} MiB, max alloc {info.max_alloc_mib} MiB, "
              f"local {info.local_mem_kib} KiB\n    {mark}")
    return 0 if any(info.works for info in infos) else 1


def _tune(args) -> int:
    import math

    from . import runtime
    from .params import ROUTINES
    from .testing import problems
    from .tuning import tuner, user_database_path
    try:
        shapes = problems.read_shapes_file(args.shapes) if args.shapes else {}
    except problems.ShapesError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    unknown = sorted(set(args.op or ()) - set(tuner.TUNABLES))
    if unknown:
        print(f"error: no tuner driver for {unknown}; tunable: {sorted(tuner.TUNABLES)}",
              file=sys.stderr)
        return 2
    from .params import SPECS, InvalidParamsError, parse_overrides
    tried_first: dict = {}
    try:   # checked before any device work (device limits are checked when tuning)
        for text in args.try_params or ():
            for family, params in parse_overrides(text).items():
                if family not in tuner.TUNABLES:
                    raise InvalidParamsError(f"unknown kernel family {family!r}")
                SPECS[family].check(params)
                tried_first.setdefault(family, []).append(params)
    except InvalidParamsError as exc:
        print(f"error: --try: {exc}", file=sys.stderr)
        return 2
    queue = runtime.queue_for(args.device)
    # Kernel families before the routines that choose between them, which are tuned with
    # the families' new entries.
    families = args.op or sorted(shapes if shapes else tuner.TUNABLES,
                                 key=lambda family: (family in ROUTINES, family))
    for family in families:
        try:
            result = tuner.tune_family(family, queue, budget_s=args.budget_s,
                                       max_candidates=args.max_candidates, seed=args.seed,
                                       quick=args.quick, shapes=shapes.get(family),
                                       first=tried_first.get(family, ()),
                                       write=not (args.dry_run or args.quick))
        except (problems.ShapesError, InvalidParamsError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        failed = [c for c in result.tried if c.error]
        print(f"{family} on {result.device}: {len(result.tried)} configurations in "
              f"{result.seconds:.0f} s, {len(failed)} failed")
        for cand in failed[:5]:
            print(f"  failed {cand.params}: {cand.error}")
        if result.best is None:
            print("  no configuration passed the check; nothing written")
            continue
        before = result.baseline.total_ms if result.baseline else math.inf
        print(f"  best {result.best.total_ms:.3f} ms (was {before:.3f} ms): {result.best.params}")
        for shape_class, cand in sorted(result.by_class.items()):
            if cand is not result.best:
                print(f"  [{shape_class}] {cand.params}")
        if not (args.dry_run or args.quick):
            print(f"  written to {user_database_path(queue.device)}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pysparsecl")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="list OpenCL devices, their limits and whether each works")
    tune = sub.add_parser("tune", help="autotune kernel families for a device")
    tune.add_argument("--op", nargs="+",
                      help="kernel families (default: those in --shapes, else every tunable "
                           "one)")
    tune.add_argument("--shapes", metavar="FILE",
                      help="JSON file of problem shapes per family (see "
                           "pysparsecl/testing/problems.py) instead of the built-in ones")
    tune.add_argument("--device", help="'P:D' indices or a name substring")
    tune.add_argument("--budget-s", type=float, default=120.0,
                      help="seconds per family (default 120)")
    tune.add_argument("--max-candidates", type=int, default=200)
    tune.add_argument("--try", dest="try_params", action="append", metavar="FAMILY:K=V,...",
                      help="a configuration to try first (repeatable; partial ones are "
                           "completed with the defaults), e.g. an earlier sweep's winner")
    tune.add_argument("--seed", type=int, default=0)
    tune.add_argument("--quick", action="store_true",
                      help="small problems, nothing written (a smoke test)")
    tune.add_argument("--dry-run", action="store_true", help="do not write the database")
    args = parser.parse_args(argv)
    return {"info": _info, "tune": _tune}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
