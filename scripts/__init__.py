"""Maintenance scripts, run from the repository root: ``python -m scripts.ship_tuning``,
``python -m scripts.network_shapes``; ``python scripts/verify.py`` (``make verify``) and
``bash scripts/ensure_opencl_cpu.sh`` (``make install``) run as files."""
