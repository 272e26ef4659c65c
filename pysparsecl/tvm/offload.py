"""The Relax transformation that offloads a pruned network's sparse convolutions to
pysparsecl: :func:`offload_sparse_conv2d`."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import scipy.sparse as sp
import tvm
from tvm import relax

from ..ops.conv2d import fold_batchnorm
from . import CONV2D_CONSTANT, register, weight_token

__all__ = ["offload_sparse_conv2d", "OffloadDecision"]

logger = logging.getLogger("pysparsecl.tvm")

_CONV2D = tvm.ir.Op.get("relax.nn.conv2d")
_ADD = tvm.ir.Op.get("relax.add")
_RELU = tvm.ir.Op.get("relax.nn.relu")
_BATCH_NORM = tvm.ir.Op.get("relax.nn.batch_norm")
_RESHAPE = tvm.ir.Op.get("relax.reshape")
_EXPAND_DIMS = tvm.ir.Op.get("relax.expand_dims")
_PERMUTE_DIMS = tvm.ir.Op.get("relax.permute_dims")
_MATMUL = tvm.ir.Op.get("relax.matmul")


@dataclass
class OffloadDecision:
    """What :func:`offload_sparse_conv2d` did with one ``R.nn.conv2d`` (``op`` "conv2d")
    or ``R.matmul`` by a constant (``op`` "matmul"): ``var`` names the binding,
    ``offloaded`` says whether it became a pysparsecl call, ``reason`` why not (or what
    was fused into it: bias, batch_norm, residual, relu)."""
    op: str
    function: str
    var: str
    offloaded: bool
    reason: str
    sparsity: Optional[float] = None
    fused: Tuple[str, ...] = ()


@dataclass
class _Plan:
    """One offloaded convolution (a matmul is a 1x1 one): its epilogue chain, the binding
    whose value the call replaces (the chain's end) and the bindings it makes dead (the
    chain's inside)."""
    call: relax.Call                 # the conv2d or matmul
    weight: np.ndarray               # float32 (K, C/groups, R, S)
    strides: Tuple[int, int] = (1, 1)
    padding: Tuple[int, int] = (0, 0)
    dilation: Tuple[int, int] = (1, 1)
    groups: int = 1
    linear: bool = False             # a matmul: (..., C) in, (..., K) out
    bias: Optional[np.ndarray] = None
    residual: Optional[relax.Expr] = None
    relu: bool = False
    end: Optional[relax.Var] = None
    inner: List[relax.Var] = field(default_factory=list)
    fused: List[str] = field(default_factory=list)


def offload_sparse_conv2d(mod: tvm.IRModule, *, min_sparsity: float = 0.5,
                          fuse_epilogue: bool = True, linear: bool = True,
                          decisions: Optional[list] = None) -> tvm.IRModule:
    """Replace a Relax module's sparse convolutions with calls of pysparsecl's kernels.

    Every ``R.nn.conv2d`` (NCHW data, OIHW kernel, NCHW float32 output) whose weight is
    a constant with at least ``min_sparsity`` of its entries zero becomes an
    ``R.call_dps_packed("pysparsecl.conv2d_sparse_constant", ...)``: the weight is held as
    three CSR constants, the conv's stride, padding, dilation and groups are carried
    over, and the packed function runs :func:`pysparsecl.conv2d_sparse` on pysparsecl's
    default OpenCL device, preparing each constant weight once, on its first call.

    With ``linear`` (the default), a ``R.matmul(x, W)`` whose ``W`` (C, K) is such a
    constant (directly, or through ``R.permute_dims``: a linear layer) becomes the same
    call as a 1x1 convolution of ``x`` viewed as (M, C, 1, 1), between two reshapes.

    With ``fuse_epilogue`` (the default) the operations that follow a convolution and
    are its only users join its epilogue, in this order: adds of constant per-channel
    biases, an inference ``R.nn.batch_norm`` with constant statistics (folded into the
    weight and bias with :func:`pysparsecl.fold_batchnorm`), one add of another tensor of
    the output's shape (a residual), and a ``R.nn.relu``.  A matmul fuses biases and a
    ReLU.  Where two convolutions meet in one residual add (a projection shortcut), the
    first in program order takes the add and the other's output is its residual.

    Left as TVM ops, each with its reason logged at debug level on the
    ``pysparsecl.tvm`` logger (and appended to ``decisions`` as an
    :class:`OffloadDecision`, when a list is given): convolutions whose weight is not a
    constant, is denser than ``min_sparsity``, or is not float32; other layouts, dtypes,
    asymmetric padding, and shapes that are not static.  Parameters that are function
    inputs are not constants: bind them first, ``relax.transform.BindParams("main",
    params)(mod)``; :func:`tvm.relax.frontend.torch.from_exported_program` with
    ``keep_params_as_input=False`` already makes them constants.

    Parameters
    ----------
    mod : tvm.IRModule with Relax functions (all of them are transformed).
    min_sparsity : float in [0, 1]: the least share of zero weights to offload a conv.
    fuse_epilogue : bool: fuse bias, BatchNorm, residual and ReLU into the calls.
    linear : bool: offload sparse matmuls by a constant too.
    decisions : list, optional: receives one :class:`OffloadDecision` per conv (and
        per matmul by a constant, with ``linear``).

    Returns
    -------
    A new IRModule (``mod`` is not changed; it is returned itself when no call is
    offloaded); compile it as usual, e.g. with
    ``tvm.compile(mod, target="llvm")``, and run it in ``relax.VirtualMachine``.
    """
    if not isinstance(mod, tvm.IRModule):
        raise TypeError(f"mod must be a tvm.IRModule, got {type(mod).__name__}")
    if isinstance(min_sparsity, bool) or not isinstance(min_sparsity, (int, float)) or \
            not 0.0 <= min_sparsity <= 1.0:
        raise ValueError(f"min_sparsity must be a number in [0, 1], got {min_sparsity!r}")
    for flag, flag_name in ((fuse_epilogue, "fuse_epilogue"), (linear, "linear")):
        if not isinstance(flag, bool):
            raise TypeError(f"{flag_name} must be a bool, got {type(flag).__name__}")
    if decisions is not None and not isinstance(decisions, list):
        raise TypeError(f"decisions must be a list or None, got {type(decisions).__name__}")
    register()
    # Bindings nobody reads would count as users and stop a fusion (the ONNX frontend
    # reads all three outputs of a batch_norm): plan on a copy without them.
    cleaned = _clean(mod)
    out = tvm.IRModule(dict(cleaned.functions), attrs=cleaned.attrs)
    changed = False
    for gvar, func in cleaned.functions.items():
        if not isinstance(func, relax.Function):
            continue
        found: List[OffloadDecision] = []
        plans = _plan_function(func, gvar.name_hint, float(min_sparsity), fuse_epilogue,
                               linear, found)
        for d in found:
            logger.debug("%s.%s: %s (%s)", d.function, d.var,
                         f"{d.op} offloaded" if d.offloaded else f"left as a TVM {d.op}",
                         d.reason)
        if decisions is not None:
            decisions.extend(found)
        if plans:
            out[gvar] = _Rewriter(out, plans).visit_expr(func)
            changed = True
    # Drop the chains' leftovers (a bias's reshape); with nothing offloaded, ``mod``.
    return _clean(out) if changed else mod


def _clean(mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` without unused bindings, nor bindings that only forward a tuple's field
    (as the torch frontend's max_pool2d reads its values beside unused indices)."""
    return relax.transform.DeadCodeElimination()(relax.transform.CanonicalizeBindings()(mod))


# --------------------------------------------------------------------------- analysis

def _bindings(func: relax.Function):
    body = func.body
    if not isinstance(body, relax.SeqExpr):
        return []
    return [b for block in body.blocks for b in block.bindings
            if isinstance(b, relax.VarBinding)]


@relax.expr_functor.visitor
class _UseCounter(relax.PyExprVisitor):
    """How often each variable is used (definitions are not uses)."""

    def __init__(self):
        super().__init__()
        self.counts: Dict[relax.Var, int] = {}

    def visit_var_(self, var):
        self.counts[var] = self.counts.get(var, 0) + 1

    def visit_dataflow_var_(self, var):
        self.counts[var] = self.counts.get(var, 0) + 1


def _static_shape(expr) -> Optional[Tuple[int, ...]]:
    ty = getattr(expr, "ty", None)
    if not isinstance(ty, relax.TensorType) or not isinstance(ty.shape, relax.ShapeExpr):
        return None
    try:
        return tuple(int(d) for d in ty.shape.values)
    except TypeError:
        return None


def _dtype(expr) -> Optional[str]:
    ty = getattr(expr, "ty", None)
    return str(ty.dtype) if isinstance(ty, relax.TensorType) else None


def _constant(expr, values: Dict[relax.Var, relax.Expr], depth: int = 0
              ) -> Optional[np.ndarray]:
    """The value of ``expr`` when it is a constant, or a variable bound to one through
    reshapes, expand_dims and permute_dims (as frontends shape a bias or transpose a
    linear layer's weight), else None."""
    if depth > 8:
        return None
    if isinstance(expr, tvm.ir.GenericConst):
        value = expr.value
        return value.numpy() if hasattr(value, "numpy") else None
    if isinstance(expr, relax.Var) and expr in values:
        return _constant(values[expr], values, depth + 1)
    if isinstance(expr, relax.Call) and expr.op in (_RESHAPE, _EXPAND_DIMS, _PERMUTE_DIMS):
        inner = _constant(expr.args[0], values, depth + 1)
        if inner is None:
            return None
        if expr.op == _PERMUTE_DIMS:
            axes = expr.attrs.axes
            return np.transpose(inner, None if axes is None else [int(a) for a in axes])
        shape = _static_shape(expr)
        if shape is not None and inner.size == int(np.prod(shape)):
            return inner.reshape(shape)
    return None


def _channel_vector(value: Optional[np.ndarray], n_out: int, linear: bool
                    ) -> Optional[np.ndarray]:
    """A constant that broadcasts along the output channels only (axis 1 of an NCHW
    tensor, the last axis of a matmul's output), as (K,)."""
    if value is None or value.dtype != np.float32:
        return None
    shapes = ((n_out,), (1, n_out)) if linear else \
        ((n_out,), (n_out, 1, 1), (1, n_out, 1, 1))
    if value.shape in shapes:
        return value.reshape(n_out)
    return None


def _conv_plan(call: relax.Call, values) -> Tuple[Optional[_Plan], str]:
    """The plan of a conv2d that pysparsecl can run, else (None, the reason)."""
    attrs = call.attrs
    layouts = (str(attrs.data_layout), str(attrs.kernel_layout),
               str(attrs.out_layout) or str(attrs.data_layout))
    if layouts != ("NCHW", "OIHW", "NCHW"):
        return None, f"layouts {layouts} are not (NCHW, OIHW, NCHW)"
    data, weight_expr = call.args
    if _dtype(data) != "float32" or _dtype(call) != "float32":
        return None, f"dtypes {_dtype(data)} -> {_dtype(call)} are not float32"
    if _static_shape(data) is None or _static_shape(call) is None:
        return None, "the shapes are not static"
    pad = [int(p) for p in attrs.padding]
    if len(pad) == 4 and (pad[0] != pad[2] or pad[1] != pad[3]):
        return None, f"padding {pad} is asymmetric"
    weight = _constant(weight_expr, values)
    if weight is None:
        return None, ("the weight is not a constant (bind parameters first: "
                      "relax.transform.BindParams)")
    if weight.dtype != np.float32 or weight.ndim != 4:
        return None, f"the weight is {weight.dtype} {weight.shape}, not float32 OIHW"
    return _Plan(call, weight, strides=tuple(int(v) for v in attrs.strides),
                 padding=(pad[0], pad[1]), dilation=tuple(int(v) for v in attrs.dilation),
                 groups=int(attrs.groups)), ""


def _matmul_plan(call: relax.Call, values) -> Tuple[Optional[_Plan], str]:
    """The plan of ``x @ W`` with a constant 2-D ``W`` (a linear layer), else (None, the
    reason); a matmul of two variables is not a candidate (reason "")."""
    x, w_expr = call.args
    weight = _constant(w_expr, values)
    if weight is None:
        return None, ""
    x_shape = _static_shape(x)
    if weight.ndim != 2 or x_shape is None or len(x_shape) < 1 or \
            _static_shape(call) is None:
        return None, f"not (..., C) @ (C, K) with static shapes: {x_shape} @ {weight.shape}"
    if _dtype(x) != "float32" or _dtype(call) != "float32" or weight.dtype != np.float32:
        return None, f"dtypes {_dtype(x)} @ {weight.dtype} -> {_dtype(call)} are not float32"
    k = weight.shape[1]
    return _Plan(call, np.ascontiguousarray(weight.T).reshape(k, -1, 1, 1), linear=True), ""


def _plan_function(func: relax.Function, fname: str, min_sparsity: float, fuse: bool,
                   linear: bool, decisions: List[OffloadDecision]) -> Dict[relax.Var, _Plan]:
    bindings = _bindings(func)
    values = {b.var: b.value for b in bindings}
    counter = _UseCounter()
    counter.visit_expr(func)
    uses = counter.counts
    # The binding that uses a variable as a direct argument (enough for the epilogue's ops).
    user: Dict[relax.Var, relax.VarBinding] = {}
    for b in bindings:
        v = b.value
        args = v.args if isinstance(v, relax.Call) else \
            [v.tuple_value] if isinstance(v, relax.TupleGetItem) else []
        for a in args:
            if isinstance(a, relax.Var):
                user.setdefault(a, b)

    plans: Dict[relax.Var, _Plan] = {}
    claimed: set = set()          # bindings already in a chain (a residual add has two
    for b in bindings:            # convs before it: the first one in order takes it)
        call = b.value
        if not isinstance(call, relax.Call):
            continue
        if call.op == _CONV2D:
            op, (plan, reason) = "conv2d", _conv_plan(call, values)
        elif call.op == _MATMUL and linear:
            op, (plan, reason) = "matmul", _matmul_plan(call, values)
            if plan is None and not reason:
                continue
        else:
            continue
        name = str(b.var.name)
        sparsity = None
        if plan is not None:
            sparsity = float(np.count_nonzero(plan.weight == 0)) / max(plan.weight.size, 1)
            if sparsity < min_sparsity:
                plan, reason = None, (f"sparsity {sparsity:.3f} is below min_sparsity "
                                      f"{min_sparsity}")
        if plan is None:
            decisions.append(OffloadDecision(op, fname, name, False, reason, sparsity))
            continue
        end = b.var
        if fuse:
            end = _grow_epilogue(plan, end, uses, user, values, claimed)
        plan.end = end
        plans[end] = plan
        decisions.append(OffloadDecision(
            op, fname, name, True,
            "fused " + ", ".join(plan.fused) if plan.fused else "offloaded", sparsity,
            tuple(plan.fused)))
    return plans


def _grow_epilogue(plan: _Plan, cur: relax.Var, uses, user, values, claimed: set
                   ) -> relax.Var:
    """Extend the plan along ``cur``'s single users, skipping none and taking no binding
    in ``claimed`` (to which it adds its own); returns the chain's last variable."""
    out_shape = _static_shape(plan.call)
    n_out = out_shape[-1] if plan.linear else out_shape[1]
    while uses.get(cur, 0) == 1 and cur in user and user[cur].var not in claimed:
        b = user[cur]
        v = b.value
        if not isinstance(v, relax.Call):
            break
        if v.op == _ADD and plan.residual is None and not plan.relu:
            other = v.args[1] if v.args[0].same_as(cur) else v.args[0]
            bias = _channel_vector(_constant(other, values), n_out, plan.linear)
            if bias is not None:
                plan.bias = bias if plan.bias is None else plan.bias + bias
                plan.fused.append("bias")
            elif not plan.linear and isinstance(other, relax.Var) and \
                    _static_shape(other) == out_shape and _dtype(other) == "float32" and \
                    _static_shape(v) == out_shape:
                plan.residual = other
                plan.fused.append("residual")
            else:
                break
        elif v.op == _BATCH_NORM and not plan.linear and plan.residual is None and \
                not plan.relu:
            tuple_var = b.var
            item = user.get(tuple_var)
            if uses.get(tuple_var, 0) != 1 or item is None or \
                    not isinstance(item.value, relax.TupleGetItem) or \
                    int(item.value.index) != 0 or not _fold_batchnorm(plan, v, values, n_out):
                break
            plan.inner.append(cur)
            plan.inner.append(tuple_var)
            claimed.update((tuple_var, item.var))
            cur = item.var
            plan.fused.append("batch_norm")
            continue
        elif v.op == _RELU:
            plan.relu = True
            plan.fused.append("relu")
        else:
            break
        plan.inner.append(cur)
        cur = b.var
        claimed.add(cur)
        if plan.relu:
            break
    return cur


def _fold_batchnorm(plan: _Plan, call: relax.Call, values, n_out: int) -> bool:
    """Fold an inference batch_norm on the conv's output into the plan's weight and bias;
    False (and no change) when it is not one with constant statistics."""
    attrs = call.attrs
    if int(attrs.axis) not in (1, -3) or bool(getattr(attrs, "training", False)):
        return False
    stats = [_constant(a, values) for a in call.args[1:5]]
    if any(s is None or s.shape != (n_out,) for s in stats):
        return False
    gamma, beta, mean, var = stats
    if not bool(attrs.scale):
        gamma = np.ones(n_out, np.float32)
    if not bool(attrs.center):
        beta = np.zeros(n_out, np.float32)
    k = plan.weight.shape[0]
    csr = sp.csr_matrix(plan.weight.reshape(k, -1))
    try:
        folded, bias = fold_batchnorm(csr, plan.bias, gamma, beta, mean, var,
                                      float(attrs.epsilon))
    except ValueError:
        return False
    plan.weight = folded.toarray().reshape(plan.weight.shape)
    plan.bias = bias
    return True


# --------------------------------------------------------------------------- rewrite

def _offloaded_call(plan: _Plan, x: relax.Expr, out_shape) -> relax.Call:
    """The packed call computing ``plan`` on the NCHW ``x`` into ``out_shape``."""
    k, _, r, s = plan.weight.shape
    csr = sp.csr_matrix(plan.weight.reshape(k, -1))
    csr.sort_indices()
    data = csr.data.astype(np.float32)
    indices, indptr = csr.indices.astype(np.int32), csr.indptr.astype(np.int32)
    args = [x, relax.const(data), relax.const(indices), relax.const(indptr)]
    if plan.bias is not None:
        args.append(relax.const(np.ascontiguousarray(plan.bias, np.float32)))
    if plan.residual is not None:
        args.append(plan.residual)
    scalars = [r, s, *plan.strides, *plan.padding, *plan.dilation, plan.groups,
               int(plan.relu), weight_token(data, indices, indptr)]
    args += [relax.prim_value(tvm.tirx.IntImm("int64", v)) for v in scalars]
    return relax.call_dps_packed(CONV2D_CONSTANT, args,
                                 out_ty=relax.TensorType(out_shape, "float32"))


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    """Emits each plan's call at its chain's end and drops the chain's inner bindings
    (whose only users were in the chain)."""

    def __init__(self, mod, plans: Dict[relax.Var, _Plan]):
        super().__init__(mod)
        self.plans = plans
        self.dropped = {v for p in plans.values() for v in p.inner}

    def visit_var_binding_(self, binding):
        if binding.var in self.dropped:
            return
        plan = self.plans.get(binding.var)
        if plan is None:
            super().visit_var_binding_(binding)
            return
        out_shape = _static_shape(plan.call)
        if plan.linear:
            # (..., C) @ (C, K) as a 1x1 convolution of (M, C, 1, 1); reshapes are views.
            k = out_shape[-1]
            m = int(np.prod(out_shape[:-1]))
            x = self.builder_.emit(relax.op.reshape(self.visit_expr(plan.call.args[0]),
                                                    (m, plan.weight.shape[1], 1, 1)))
            y = self.builder_.emit(_offloaded_call(plan, x, (m, k, 1, 1)))
            value = relax.op.reshape(y, out_shape)
        else:   # the call's x and residual are the original variables: remapped here
            value = self.visit_expr(_offloaded_call(plan, plan.call.args[0], out_shape))
        self.builder_.emit_normalized(relax.VarBinding(binding.var,
                                                       self.builder_.normalize(value)))
