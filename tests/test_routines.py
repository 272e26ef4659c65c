"""Routine choice: which kernel an op runs is decided by its routine's settings, looked up
like tile parameters, and every lookup ends at a ``cpu`` or ``gpu`` default entry."""

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

import pysparsecl as ps
from pysparsecl import runtime, tuning
from pysparsecl.families import modules
from pysparsecl.ops.conv2d import CONV2D_ROUTINE
from pysparsecl.ops.drs import DRS_ROUTINE, keep_count
from pysparsecl.ops.masked import MASKED_GEMM_ROUTINE, MASKED_VMM_ROUTINE
from pysparsecl.params import ROUTINES, SPECS, routine_of
from pysparsecl.testing.reference import (
    conv2d_reference,
    masked_matmul_backward_reference,
    masked_matmul_reference,
    relative_error,
)

SHIPPED = Path(tuning.__file__).resolve().parent / "database" / "shipped.json"


def test_every_family_and_routine_has_cpu_and_gpu_default_entries():
    """CLBlast's rule: a device absent from the database still gets entries for its type,
    never the spec defaults of another device type."""
    shipped = json.loads(SHIPPED.read_text())
    # The package's own families and routines (tests may register toy specs in SPECS).
    package = {m.SPEC.family for m in modules().values()} | set(ROUTINES)
    assert set(shipped) == package
    for family in package:
        spec = SPECS[family]
        for kind in ("cpu", "gpu"):
            assert kind in shipped[family], (family, kind)
            spec.check(shipped[family][kind]["params"])   # raises if invalid


def test_gpu_entries_choose_the_gpu_shaped_kernels():
    shipped = json.loads(SHIPPED.read_text())
    for family, routine in ROUTINES.items():
        cpu, gpu = (routine.spec.check(shipped[family][k]["params"]) for k in ("cpu", "gpu"))
        for choice in routine.choices:
            assert cpu[choice] == 0 and gpu[choice] == 1, (family, choice)


@pytest.fixture
def unknown_device_of_kind(monkeypatch):
    """Make this session's device look like an unknown device of the given type: no slug
    or vendor entry, no user database, only the shipped ``cpu``/``gpu`` entries."""
    def pretend(kind):
        monkeypatch.setattr(tuning, "device_slug", lambda device: "unknown-device")
        monkeypatch.setattr(tuning, "vendor_slug", lambda device: "unknown-vendor")
        monkeypatch.setattr(tuning, "device_kind", lambda device: kind)
        monkeypatch.setattr(tuning, "read_user_database", lambda device: {})
        monkeypatch.setattr(tuning, "_memo", {})
    return pretend


@pytest.fixture
def rendered_kinds(monkeypatch):
    """The template and KIND of every kernel the ops render, in call order."""
    seen = []
    real = runtime.kernels

    def spy(ctx, template_name, names, options=(), **params):
        seen.append((template_name, params.get("KIND") or params.get("PACK"), names))
        return real(ctx, template_name, names, options, **params)

    monkeypatch.setattr(runtime, "kernels", spy)
    return seen


@pytest.mark.parametrize("kind, expected", [
    ("gpu", {"vmm_split", "gemm_tiled", "project_split", "topk_team", "flat",
             "compact_tiled", "compact_dw_tiled"}),
    ("cpu", {"vmm", "gemm", "project", "topk", "fused", "rows", "compact", "compact_dw"}),
])
def test_an_unknown_device_runs_the_kernels_of_its_type(queue, rng, unknown_device_of_kind,
                                                        rendered_kinds, kind, expected):
    """Every op with a routine, on a device that the database does not know: the GPU-shaped
    kernels on a GPU, the CPU-shaped ones on a CPU, with correct results either way."""
    unknown_device_of_kind(kind)
    x = rng.standard_normal((1, 300), dtype=np.float32)
    w = rng.standard_normal((300, 200), dtype=np.float32)
    mask = rng.random((1, 200)) < 0.2
    assert relative_error(ps.masked_matmul(x, w, mask, queue=queue),
                          masked_matmul_reference(x, w, mask)) < 1e-4
    x = rng.standard_normal((40, 300), dtype=np.float32)
    mask = rng.random((40, 200)) < 0.2
    assert relative_error(ps.masked_matmul(x, w, mask, queue=queue),
                          masked_matmul_reference(x, w, mask)) < 1e-4
    idx = np.sort(np.argsort(rng.random((40, 300)), axis=1)[:, :20], axis=1).astype(np.int32)
    xc = ps.CompactRows.from_dense(x, idx)      # 7% of x: the routine gathers
    assert relative_error(ps.masked_matmul(xc, w, mask, queue=queue),
                          masked_matmul_reference(xc.to_dense(), w, mask)) < 1e-4
    dy = rng.standard_normal(mask.shape, dtype=np.float32)
    assert relative_error(ps.masked_matmul_backward(dy, xc, w, mask, queue=queue)[1],
                          masked_matmul_backward_reference(dy, xc.to_dense(), w,
                                                           mask)[1]) < 1e-4
    proj = ps.SparseRandomProjection(300, k=40, seed=7, queue=queue)
    for rows in (2, 40):      # a few rows take the one-launch kernel where it is enabled
        m = ps.drs_mask(x[:rows], w, 0.9, projection=proj)
        assert m.shape == (rows, 200) and (m.sum(1) == keep_count(0.9, 200)).all()
    csr = sp.csr_matrix(np.where(rng.random((4, 27)) < 0.3, 1.0, 0.0).astype(np.float32))
    xc = rng.standard_normal((2, 3, 6, 6), dtype=np.float32)
    assert relative_error(ps.conv2d_sparse(xc, csr, kernel_size=3, padding=1, queue=queue),
                          conv2d_reference(xc, csr.toarray().reshape(4, 3, 3, 3), None,
                                           padding=(1, 1))) < 1e-4
    kinds = {k for template, k, _ in rendered_kinds
             if template.startswith(("masked_", "drs_", "conv2d_"))}
    assert expected <= kinds
    other = {"gpu": {"vmm", "gemm", "project", "topk", "fused", "rows", "compact",
                     "compact_dw"},
             "cpu": {"vmm_split", "gemm_tiled", "project_split", "topk_team", "flat",
                     "compact_tiled", "compact_dw_tiled"}}[kind]
    assert not kinds & other, kinds & other


def test_overriding_a_variant_chooses_it(queue):
    """An override of a variant's parameters makes its routine choose that variant; an
    explicit override of the routine's own settings is merged with it."""
    device = queue.device
    with tuning.override("masked_gemm_tiled", TILE=32):
        assert tuning.lookup(MASKED_GEMM_ROUTINE.spec, device)["KERNEL"] == 1
        with tuning.override("masked_gemm"):
            assert tuning.lookup(MASKED_GEMM_ROUTINE.spec, device)["KERNEL"] == 0
    with tuning.override("masked_vmm_split"), \
            tuning.override("masked_vmm_routine", LIST_IN_KERNEL_MAX_N=0):
        settings = tuning.lookup(MASKED_VMM_ROUTINE.spec, device)
        assert settings["KERNEL"] == 1 and settings["LIST_IN_KERNEL_MAX_N"] == 0
    with tuning.override("drs_fused"):
        assert tuning.lookup(DRS_ROUTINE.spec, device)["FUSED_MAX_ROWS"] == \
            max(DRS_ROUTINE.spec._by_name["FUSED_MAX_ROWS"].candidates)


def test_routine_bookkeeping():
    assert routine_of("masked_vmm_split") is MASKED_VMM_ROUTINE
    assert routine_of("conv2d_pack_flat") is CONV2D_ROUTINE
    assert routine_of("drs_fused") is DRS_ROUTINE
    assert routine_of("conv2d_csr") is None
    with pytest.raises(KeyError, match="conv2d_csr"):
        MASKED_GEMM_ROUTINE.selecting("conv2d_csr")
    for routine in ROUTINES.values():
        for family in routine.families:
            assert family in SPECS
