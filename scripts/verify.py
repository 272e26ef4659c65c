#!/usr/bin/env python3
"""Run every kernel family, at several tile configurations, under the Oclgrind simulator.

    python3 scripts/verify.py            # what `make verify` runs
    python3 scripts/verify.py -j 1 --family conv2d_csr --configs 2
    python3 scripts/verify.py --readme   # also run the suite's verification tests and
                                         # write its figures into docs/testing.md (verify-readme)

Each family runs in its own child process whose only OpenCL platform is Oclgrind
(OCL_ICD_VENDORS points at an .icd file naming liboclgrind-rt-icd.so), with

* invalid memory accesses and barrier divergence (always on in Oclgrind),
* OCLGRIND_CHECK_API=1      (API misuse),
* OCLGRIND_DATA_RACES=1     (global and local data races),
* OCLGRIND_UNINITIALIZED=1  (uses of uninitialised values: a branch, an address, a
  builtin's argument or a store to __global/__local memory that depends on a value never
  written; off with --no-uninitialized).  Oclgrind 21.10's plugin has bugs that a kernel
  must steer clear of, listed in kernels/common.cl.mako (e.g. it aborts on LLVM's
  `freeze`, which clang emits when a kernel computes both x / y and x % y), and two in its
  bookkeeping of global memory that this harness works around (_track_definedness).
  Unwritten *outputs* are also caught by the tests, which poison every output with NaN
  (tests/test_canaries.py); Oclgrind does not check what the host reads back.

For every (family, configuration) the child runs tiny workloads that still hit partial
tiles, empty rows, one work-group and several, compares the result with the float64
reference, and captures everything Oclgrind writes to stderr (file descriptor 2) during
that case.  Any Oclgrind diagnostic, any wrong result and any crash of a child fails the
run.  The only text tolerated on stderr is listed in BENIGN (pyopencl querying device
properties Oclgrind does not implement, and compiler warnings).

Prints "N kernel families x configurations run under Oclgrind with zero reports".
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = str(Path(__file__).resolve().parent.parent)
ICD_LIBRARY_CANDIDATES = (
    "/usr/lib/oclgrind/liboclgrind-rt-icd.so",
    "/usr/lib/x86_64-linux-gnu/oclgrind/liboclgrind-rt-icd.so",
    "/usr/local/lib/liboclgrind-rt-icd.so",
)

#: Configurations per family: the spec's defaults and extremes plus this many random ones.
DEFAULT_RANDOM_CONFIGS = 8
SEED = 7
WG_LIMIT = 256  # as tests/conftest.py's SAMPLE_WG_LIMIT

#: stderr blocks that are not Oclgrind diagnostics about our kernels.
BENIGN = (
    # pyopencl asks for optional device properties (e.g. vendor extensions) that Oclgrind
    # does not implement; --check-api reports each refused query.
    re.compile(r"Oclgrind - OpenCL runtime error detected\s*\n\s*Function: clGetDeviceInfo\s*\n"
               r"\s*Error:\s*CL_INVALID_VALUE\s*\n\s*For argument 'param_name'\s*"),
    # Compiler warnings that pyopencl turns into Python warnings or clang prints.
    re.compile(r"^\d+ warnings? generated\.\s*$", re.M),
    re.compile(r"^.*CompilerWarning: Non-empty compiler output.*\n.*\n?", re.M),
)


def find_icd_library() -> str:
    for path in ICD_LIBRARY_CANDIDATES:
        if os.path.isfile(path):
            return path
    raise SystemExit("verify: Oclgrind not found; install it with `apt-get install oclgrind` "
                     "(Debian/Ubuntu), or see https://github.com/jrprice/Oclgrind")


# ---------------------------------------------------------------------------------------------
# Child side: workloads per family

class _Stderr:
    """Capture what C code writes to file descriptor 2, case by case."""

    def __init__(self):
        self.file = tempfile.TemporaryFile(mode="w+b")
        self.saved = os.dup(2)
        os.dup2(self.file.fileno(), 2)
        self.pos = 0

    def take(self) -> str:
        sys.stderr.flush()
        self.file.seek(self.pos)
        data = self.file.read()
        self.pos += len(data)
        return data.decode("utf-8", "replace")

    def restore(self):
        os.dup2(self.saved, 2)


def diagnostics(text: str) -> str:
    for pattern in BENIGN:
        text = pattern.sub("", text)
    return text.strip()


_SELF_TEST = """
__kernel void pscl_verify_self_test(__global float *y, int n) {
    const int i = get_global_id(0);
    y[i + 1] = (float)n;          /* the last work-item writes one past the end */
}

__kernel void pscl_verify_self_test_uninit(__global const float *x, __global float *y) {
    const int i = get_global_id(0);
    y[i] = x[i] > 0.0f ? 1.0f : 0.0f;   /* x was never written */
}
"""


def _self_test(queue, cap) -> None:
    """Make sure Oclgrind's checks are active and that this harness sees their reports."""
    import numpy as np
    import pyopencl as cl

    buf = cl.Buffer(queue.context, cl.mem_flags.READ_WRITE, 16 * 4)
    prg = cl.Program(queue.context, _SELF_TEST).build()
    prg.pscl_verify_self_test(queue, (16,), None, buf, np.int32(16))
    queue.finish()
    report = diagnostics(cap.take())
    if "Invalid write" not in report:
        raise SystemExit("verify: Oclgrind did not report a deliberate out-of-bounds write; "
                         f"its checks are not active (stderr: {report[:500]!r})")
    if os.environ.get("OCLGRIND_UNINITIALIZED") == "1":
        fresh = cl.Buffer(queue.context, cl.mem_flags.READ_WRITE, 16 * 4)
        prg.pscl_verify_self_test_uninit(queue, (16,), None, fresh, buf)
        queue.finish()
        report = diagnostics(cap.take())
        if "ninitialized" not in report:
            raise SystemExit("verify: Oclgrind did not report a deliberate read of an "
                             "unwritten buffer; its uninitialised-value check is not active "
                             f"(stderr: {report[:500]!r})")


def _exact_allocations(queue) -> None:
    """The memory pool rounds allocations up to its bin sizes, which would hide an
    out-of-bounds access just past the end of an array: allocate every buffer at its exact
    size instead."""
    import pyopencl.tools as cl_tools

    from pysparsecl import runtime

    exact = cl_tools.ImmediateAllocator(queue)
    runtime.memory_pool = lambda ctx: exact


# Oclgrind 21.10's Uninitialized plugin keeps a shadow (which bytes are defined) per global
# buffer *index*, and mishandles two things a correct program does (both reproduced with a
# 20-line pyopencl script; a kernel that writes a whole buffer and one that then reads it
# get 60 reports):
#
# 1. It has no memoryAllocated/memoryDeallocated hooks, and Oclgrind gives a released
#    buffer's index to the next buffer, which then inherits the old shadow, sized as the
#    old buffer: kernel stores past that size are dropped and loads past it are reported.
# 2. A store from the host side (clEnqueueWriteBuffer, clEnqueueFillBuffer, which stores
#    the pattern once per repetition, and clEnqueueCopyBuffer[Rect], which stores row by
#    row) re-creates the buffer's shadow with the size of that one store, at offset 0.
#    Only a store of the whole buffer from offset 0 leaves a correct shadow.
#
# With checks of uninitialised values on, the child therefore never releases a buffer, and
# performs every other host-side store with a kernel, whose stores the plugin tracks byte
# by byte (a copy carries the source bytes' state along; bytes outside the region keep
# theirs).  What a host-side store means is unchanged; only how the simulator performs it.
_STORE_KERNELS = """
__kernel void pscl_verify_fill(__global uchar *dst, const ulong offset,
                               __global const uchar *pattern, const uint pattern_size)
{
    const size_t i = get_global_id(0);
    dst[offset + i] = pattern[i % pattern_size];
}

__kernel void pscl_verify_copy(__global uchar *dst, const ulong dst_offset,
                               const ulong dst_row, const ulong dst_slice,
                               __global const uchar *src, const ulong src_offset,
                               const ulong src_row, const ulong src_slice)
{
    const size_t x = get_global_id(0), y = get_global_id(1), z = get_global_id(2);
    dst[dst_offset + x + y * dst_row + z * dst_slice] =
        src[src_offset + x + y * src_row + z * src_slice];
}
"""


def _track_definedness(queue) -> None:
    """Install the two work-arounds described above, for this child process."""
    import numpy as np
    import pyopencl as cl

    kept = []
    plain_buffer = cl.Buffer

    class KeptBuffer(plain_buffer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            kept.append(self)

    # pyopencl.array's default allocation, and the ops', go through cl.Buffer.
    cl.Buffer = KeptBuffer
    from pysparsecl import runtime
    exact = runtime.memory_pool(queue.context)

    def allocate(nbytes):
        kept.append(exact(nbytes))
        return kept[-1]

    runtime.memory_pool = lambda ctx: allocate

    real_copy = cl.enqueue_copy
    programs = {}

    def kernel(q, name):
        key = q.context.int_ptr
        if key not in programs:
            programs[key] = cl.Program(q.context, _STORE_KERNELS).build()
        return getattr(programs[key], name)

    def device_copy(q, dst, dst_origin, dst_pitches, src, src_origin, src_pitches, region,
                    wait_for):
        region = tuple(int(r) for r in region) + (1,) * (3 - len(region))
        if not all(region):
            return cl.enqueue_marker(q, wait_for=wait_for)
        dst_row, dst_slice = (tuple(dst_pitches or ()) + (0, 0))[:2]
        src_row, src_slice = (tuple(src_pitches or ()) + (0, 0))[:2]
        dst_row, src_row = dst_row or region[0], src_row or region[0]
        dst_slice, src_slice = dst_slice or dst_row * region[1], src_slice or src_row * region[1]
        origin = [tuple(o) + (0,) * (3 - len(o)) for o in (dst_origin, src_origin)]
        dst_off = origin[0][0] + origin[0][1] * dst_row + origin[0][2] * dst_slice
        src_off = origin[1][0] + origin[1][1] * src_row + origin[1][2] * src_slice
        u = np.uint64
        return kernel(q, "pscl_verify_copy")(
            q, region, None, dst, u(dst_off), u(dst_row), u(dst_slice),
            src, u(src_off), u(src_row), u(src_slice), wait_for=wait_for)

    def enqueue_copy(q, dest, src, **kw):
        if not isinstance(dest, plain_buffer):
            return real_copy(q, dest, src, **kw)                    # device to host
        wait_for = kw.get("wait_for")
        if isinstance(src, plain_buffer):
            if "region" in kw:
                return device_copy(q, dest, kw.get("dst_origin", (0,)), kw.get("dst_pitches"),
                                   src, kw.get("src_origin", (0,)), kw.get("src_pitches"),
                                   kw["region"], wait_for)
            src_off, dst_off = kw.get("src_offset", 0), kw.get("dst_offset", 0)
            nbytes = kw.get("byte_count") or min(src.size - src_off, dest.size - dst_off)
            return device_copy(q, dest, (dst_off,), None, src, (src_off,), None, (nbytes,),
                               wait_for)
        if "region" in kw:                      # rectangular host writes: the ops use none
            return real_copy(q, dest, src, **kw)
        host = memoryview(src).cast("B")
        if kw.get("dst_offset", 0) == 0 and host.nbytes == dest.size:
            return real_copy(q, dest, src, **kw)                    # whole buffer: tracked
        staged = plain_buffer(q.context, cl.mem_flags.READ_ONLY, max(host.nbytes, 1))
        kept.append(staged)
        real_copy(q, staged, host, wait_for=wait_for)               # blocking, whole buffer
        ev = device_copy(q, dest, (kw.get("dst_offset", 0),), None, staged, (0,), None,
                         (host.nbytes,), None)
        if kw.get("is_blocking", True):
            ev.wait()
        return ev

    def fill(q, mem, pattern, offset, size, wait_for=None):
        pattern = np.ascontiguousarray(pattern).tobytes()
        if not size:
            return cl.enqueue_marker(q, wait_for=wait_for)
        staged = plain_buffer(q.context, cl.mem_flags.READ_ONLY, len(pattern))
        kept.append(staged)
        real_copy(q, staged, np.frombuffer(pattern, np.uint8), wait_for=wait_for)
        return kernel(q, "pscl_verify_fill")(q, (int(size),), None, mem, np.uint64(offset),
                                             staged, np.uint32(len(pattern)))

    cl.enqueue_copy = enqueue_copy
    cl.enqueue_fill_buffer = fill
    cl.enqueue_fill = lambda q, dest, pattern, size, *, offset=0, wait_for=None: fill(
        q, dest, pattern, offset, size, wait_for)


def child(family: str, n_random: int) -> int:
    import warnings

    import numpy as np

    warnings.simplefilter("ignore")  # python-level warnings are not Oclgrind reports
    cap = _Stderr()
    results = []
    try:
        import pyopencl as cl

        import pysparsecl  # noqa: F401  (fills SPECS)
        from pysparsecl import runtime, tuning
        from pysparsecl.params import SPECS

        queue = runtime.get_queue()
        if "oclgrind" not in queue.device.platform.name.lower():
            raise SystemExit(f"verify: expected the Oclgrind platform, got "
                             f"{queue.device.platform.name!r}")
        _exact_allocations(queue)
        if os.environ.get("OCLGRIND_UNINITIALIZED") == "1":
            _track_definedness(queue)
        _self_test(queue, cap)
        from pysparsecl.testing.problems import small_problems
        loads = small_problems()[family]
        configs = SPECS[family].sample(n_random, seed=SEED,
                                       max_work_group_size=min(WG_LIMIT,
                                                               queue.device.max_work_group_size))
        families = [family, "masked_dw"] if family == "masked_dx" else [family]
        # masked_dw shares the backward call with masked_dx: it gets configurations too
        dw_cfgs = SPECS["masked_dw"].sample(n_random, seed=SEED, max_work_group_size=WG_LIMIT)
        for i, params in enumerate(configs):
            for name, run in loads:
                rng = np.random.default_rng([SEED, i])
                error = None
                t0 = time.time()
                try:
                    with tuning.override(family, **params):
                        if family == "masked_dx":
                            with tuning.override("masked_dw", **dw_cfgs[i % len(dw_cfgs)]):
                                run(rng)
                        else:
                            run(rng)
                    queue.finish()
                except Exception:
                    error = traceback.format_exc(limit=4)
                report = diagnostics(cap.take())
                results.append({"family": family, "families": families, "config": params,
                                "workload": name, "error": error, "report": report,
                                "seconds": round(time.time() - t0, 2)})
        del cl
    finally:
        cap.restore()
    print(json.dumps(results))
    return 0


# ---------------------------------------------------------------------------------------------
# Parent side

def run_family(family: str, args, icd_dir: str) -> dict:
    env = dict(os.environ)
    env.update(OCL_ICD_VENDORS=icd_dir, OCLGRIND_CHECK_API="1", OCLGRIND_DATA_RACES="1",
               PYTHONWARNINGS="ignore", OCLGRIND_NUM_THREADS="1", PYOPENCL_NO_CACHE="1")
    env.pop("PYOPENCL_CTX", None)
    # the child imports this checkout's pysparsecl, installed or not
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (REPO, env.get("PYTHONPATH"))))
    if args.uninitialized:
        env["OCLGRIND_UNINITIALIZED"] = "1"
    cmd = [sys.executable, os.path.abspath(__file__), "--child", family,
           "--configs", str(args.configs)]
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                          timeout=args.timeout)
    out = {"family": family, "rc": proc.returncode, "seconds": round(time.time() - t0, 1),
           "stderr": proc.stderr[-4000:], "cases": []}
    if proc.returncode == 0:
        try:
            out["cases"] = json.loads(proc.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            out["rc"] = -999
            out["stderr"] += "\n(could not parse the child's results)\n" + proc.stdout[-2000:]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", action="append", help="only these families (repeatable)")
    parser.add_argument("--configs", type=int, default=DEFAULT_RANDOM_CONFIGS,
                        help="random configurations per family beyond defaults and extremes")
    parser.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--uninitialized", action=argparse.BooleanOptionalAction,
                        default=True,
                        help="Oclgrind's check of uses of uninitialised values (default: on)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per family")
    parser.add_argument("--readme", action="store_true",
                        help="after a clean run, run the verification tests too and write "
                             "all the figures into docs/testing.md's figures block")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child, args.configs)

    sys.path.insert(0, REPO)
    import pysparsecl  # noqa: F401
    from pysparsecl.params import ROUTINES, SPECS

    # masked_dw rides with masked_dx; a routine's settings only choose kernels, each of
    # which is verified under its own family.
    families = args.family or [f for f in SPECS if f != "masked_dw" and f not in ROUTINES]
    icd_dir = tempfile.mkdtemp(prefix="pscl-oclgrind-")
    Path(icd_dir, "oclgrind.icd").write_text(find_icd_library() + "\n")
    t0 = time.time()
    try:
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            results = list(pool.map(lambda f: run_family(f, args, icd_dir), families))
    finally:
        shutil.rmtree(icd_dir, ignore_errors=True)
    failures, clean, kernel_configs = [], 0, set()
    for res in results:
        if res["rc"] != 0:
            hint = ("\n(a crash under the uninitialised-value check: see the Oclgrind 21.10 "
                    "pitfalls in kernels/common.cl.mako, e.g. a vector shuffle with an undef "
                    "lane; --no-uninitialized tells whether it is that plugin)"
                    if args.uninitialized and res["rc"] < 0 else "")
            failures.append(f"[{res['family']}] child process failed (rc={res['rc']}), "
                            f"Oclgrind or the op crashed:\n{res['stderr']}{hint}")
            continue
        configs_ok = {}
        for case in res["cases"]:
            key = json.dumps(case["config"], sort_keys=True)
            ok = not case["error"] and not case["report"]
            configs_ok[key] = configs_ok.get(key, True) and ok
            if case["error"]:
                failures.append(f"[{case['family']} {case['config']}] {case['workload']}: "
                                f"wrong result or error:\n{case['error']}")
            if case["report"]:
                failures.append(f"[{case['family']} {case['config']}] {case['workload']}: "
                                f"Oclgrind report:\n{case['report']}")
        n_ok = sum(configs_ok.values())
        clean += n_ok
        fams = res["cases"][0]["families"] if res["cases"] else [res["family"]]
        for fam in fams:
            kernel_configs.add(fam)
        print(f"  {res['family']:22s} {n_ok}/{len(configs_ok)} configurations clean, "
              f"{len(res['cases'])} cases, {res['seconds']:.0f} s", flush=True)
    checks = "memory access, barrier divergence, API, data races" + (
        ", uninitialised values" if args.uninitialized else "")
    elapsed = time.time() - t0
    for failure in failures:
        print("FAIL " + failure, file=sys.stderr)
    n_families = len(kernel_configs) if not failures else len(families)
    summary = (f"{clean} kernel-family x tile-configuration pairs ({n_families} families) "
               f"run under Oclgrind with zero reports ({checks})")
    print(f"verify: {summary}; {len(failures)} failures; {elapsed:.0f} s")
    if failures:
        return 1
    return write_readme_figures(summary, elapsed) if args.readme else 0


README = Path(REPO) / "docs" / "testing.md"   # where the figures go (the name is historical)
FIGURE_MARKERS = ("<!-- verify:figures:start -->", "<!-- verify:figures:end -->")


def _pytest(*args: str):
    """(passed count, output) of a pytest run over this checkout's tests."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [
        REPO, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           *args], cwd=REPO, env=env, capture_output=True, text=True)
    passed = re.search(r"(\d+) passed", proc.stdout)
    if proc.returncode != 0 or not passed:
        raise RuntimeError(f"pytest {' '.join(args)} failed:\n{proc.stdout[-3000:]}")
    return int(passed.group(1)), proc.stdout


def write_readme_figures(oclgrind_summary: str, oclgrind_s: float) -> int:
    """Run the suite's verification tests and write every figure into docs/testing.md."""
    try:
        n_props, _ = _pytest("tests/test_properties.py")
        n_bad, _ = _pytest("tests/test_bad_inputs.py")
        n_canary, _ = _pytest("tests/test_canaries.py")
        _, out = _pytest("-s", "tests/test_concurrency.py")
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 1
    sys.path.insert(0, str(Path(REPO) / "tests"))
    from test_properties import EXAMPLES  # the "ci" profile unless HYPOTHESIS_PROFILE says
    survived = re.findall(r"^(.*concurrent calls survived)", out, re.M)
    lines = [
        f"- Oclgrind: {oclgrind_summary}, in {oclgrind_s:.0f} s.",
        f"- Properties: {n_props} hypothesis tests over every public op, {EXAMPLES} random "
        f"examples each, all matching the float64 reference.",
        f"- Bad inputs: {n_bad} catalogued cases raise the expected exception and message; "
        f"the library works after each.",
        f"- Canaries: {n_canary} guarded, poisoned outputs intact and fully written.",
        f"- Concurrency: {'; '.join(survived) or 'see tests/test_concurrency.py'}, no program "
        f"built twice.",
    ]
    text = README.read_text()
    start, end = FIGURE_MARKERS
    if start not in text or end not in text:
        print(f"{README} lacks the markers {FIGURE_MARKERS}", file=sys.stderr)
        return 1
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    README.write_text(f"{head}{start}\n" + "\n".join(lines) + f"\n{end}{tail}")
    print("\n".join(lines) + f"\nwrote the figures into {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
