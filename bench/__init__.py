"""pysparsecl's benchmarks, a package run from the repository root.

``python -m bench [SUITE ...] [options]`` is the one driver (``make bench``,
``make bench-quick``, ``make bench-readme``; see bench/__main__.py or ``--help``).  Its
suites live in conv2d, elementwise, masked, drs, network and tvm_overhead; baselines,
timing and report are shared by them, and readme writes the generated tables.
Diagnosis tools, run alone: ``python -m bench.profile_call`` (host time of a call) and
``python -m bench.ptx_loads`` (load widths in NVIDIA's PTX).
"""
