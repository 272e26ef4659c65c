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


def _tune(_args) -> int:
    print("pysparsecl tune: the autotuner is not implemented yet (issue: per-device "
          "autotuning). Kernels use pysparsecl/tuning/database/shipped.json and the spec "
          "defaults; set PYSPARSECL_PARAMS to experiment.")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pysparsecl")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="list OpenCL devices, their limits and whether each works")
    sub.add_parser("tune", help="autotune kernels for a device (placeholder)")
    args = parser.parse_args(argv)
    return {"info": _info, "tune": _tune}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
