## Elementwise binary ops with NumPy broadcasting, an optional mask, and the fusions a
## residual block needs (axpby, add + ReLU).  They are bandwidth-bound, so each kernel
## moves every byte once: inputs read once, the output written once, nothing staged.
##
## One template, two kernels; the wrapper (pysparsecl/families/elementwise.py) picks one and
## renders it for the dtypes and broadcasting pattern at hand:
##   pscl_ew_fast     the whole output is one contiguous run and every operand is either
##                    contiguous over it, one element in device memory, or a host scalar
##                    (a kernel argument): VEC-wide loads/stores, ITEMS vectors per
##                    work-item, grid-stride over work-groups.
##   pscl_ew_strided  anything else (broadcasting, slices, transposes).  The wrapper merges
##                    dimensions to NDIM <= 8; NDRange dim 1 walks the outer "rows"
##                    (unravelled once per row), dim 0 the innermost dimension, with the
##                    same vector body as the fast path while every operand's innermost
##                    stride is 0 or 1.
##
## Parameters (all given by the wrapper; tile parameters are declared once, in ELEMENTWISE):
##   OP         "add" | "mul" | "axpby" | "add_relu" | "relu_grad" | "copy" (one operand)
##   TR         OpenCL scalar type of the result, in which the arithmetic runs
##   OPERANDS   ((name, kind, ctype, inner), ...): kind "array" | "scalar" (a kernel
##              argument already in TR); inner, the innermost stride: "0" (read once per
##              row, or once in the fast path), "1" (vector loads) or "n" (any, scalar)
##   MASK       0: none; 1: the result is 0 where the mask is false; 2: `out` keeps its value
##   MASK_INNER, OUT_INNER   the mask's and the output's innermost stride class
##   PATH       "fast" | "strided";  NDIM: the merged rank (1 on the fast path)
##   IDX        "int" or "long": the index type, 64-bit only when an extent needs it
##   ALIGNED    1: every contiguous pointer starts on a VEC boundary (fast path)
##   RESTRICT   1: no operand shares memory with `out`
##   ARGS       the kernel's parameters, declared in elementwise.py (kernel_args): per
##              array a pointer, its element offset <name>_off and, on the strided path,
##              its strides <name>_s<d> but a 0/1 innermost one; pscl_u_<name> per scalar
##              operand; pscl_alpha, pscl_beta (axpby); n, or d<d> and n_rows (strided)
<%namespace name="common" file="common.cl.mako"/>\
<%!
    FLOATS = ("half", "float", "double")
    # Integer type of a vector comparison's result, per element type (same element size).
    COND_TYPE = {"half": "short", "float": "int", "double": "long", "int": "int",
                 "long": "long", "uchar": "char"}

    def vt(scalar, n):
        return scalar if n == 1 else "%s%d" % (scalar, n)
%>\
<%
    arrays = [o for o in OPERANDS if o[1] == "array"]
    types = {TR} | {o[2] for o in arrays}
    is_float = TR in FLOATS
    restrict = "restrict " if RESTRICT else ""
    last = NDIM - 1
    # Innermost stride class of everything the kernel addresses.
    inner = {"out": OUT_INNER, "m": MASK_INNER}
    inner.update({o[0]: o[3] for o in arrays})
    # The strided kernel's vector width: VEC while every innermost stride is 0 or 1.
    svec = VEC if all(c in ("0", "1") for c in inner.values()) else 1
    width = VEC if PATH == "fast" else svec
%>\
% if "double" in types:
#pragma OPENCL EXTENSION cl_khr_fp64 : enable
% endif
% if "half" in types:
#pragma OPENCL EXTENSION cl_khr_fp16 : enable
% endif

// Tile parameters: declared once, in pysparsecl/families/elementwise.py.
#define PSCL_VEC ${VEC}
#define PSCL_ITEMS ${ITEMS}
#define PSCL_WG ${WG}
// Derived: the vector width this kernel uses (1 when an operand is strided innermost).
#define PSCL_WIDTH ${width}
typedef ${IDX} pscl_idx;
typedef ${common.vector_type(TR, width)} pscl_rv;

## The operation on two values of width n already converted to TR.  Integers wrap modulo
## 2^bits like NumPy: the arithmetic runs in the unsigned type, where overflow is defined.
<%def name="combine(n)">\
<%
    t = vt(TR, n)
    u = vt("u" + TR, n)
    def wrap(expr_u):
        return "as_%s(%s)" % (t, expr_u)
    def as_u(x):
        return "as_%s(%s)" % (u, x)
    ax = "pscl_x_a"
    bx = "pscl_x_b"
%>\
% if OP == "copy":
${ax}\
% elif is_float and OP == "add":
${ax} + ${bx}\
% elif is_float and OP == "mul":
${ax} * ${bx}\
% elif is_float and OP == "axpby":
pscl_alpha * ${ax} + pscl_beta * ${bx}\
% elif is_float and OP == "add_relu":
## NaN < 0 is false, so NaN propagates, as np.maximum and torch.relu do.
(${ax} + ${bx} < (${t})0) ? (${t})0 : ${ax} + ${bx}\
% elif OP == "relu_grad":
## a where b > 0 (b, a ReLU's output; NaN is not > 0), else 0: ReLU's backward.
(${bx} > (${t})0) ? ${ax} : (${t})0\
% elif OP == "add":
${wrap(as_u(ax) + " + " + as_u(bx))}\
% elif OP == "mul":
${wrap(as_u(ax) + " * " + as_u(bx))}\
% elif OP == "axpby":
${wrap("as_u%s(pscl_alpha) * %s + as_u%s(pscl_beta) * %s" % (TR, as_u(ax), TR, as_u(bx)))}\
% elif OP == "add_relu":
max(${wrap(as_u(ax) + " + " + as_u(bx))}, (${t})0)\
% endif
</%def>\

## Where element (n == 1) or vector (n > 1) `i` of `name` lives, read as `ctype` (a
## stride "0" operand never comes here: it was read once into pscl_u_<name>).
<%def name="ref(name, ctype, n, i)">\
% if n == 1 and inner[name] == "n":
pscl_p_${name}[(${i}) * ${name}_s${last}]\
% elif n == 1:
pscl_p_${name}[${i}]\
% elif ALIGNED and PATH == "fast":
((__global ${vt(ctype, n)} *)pscl_p_${name})[${i}]\
% else:
vload${n}(${i}, pscl_p_${name})\
% endif
</%def>\

## One vector (n == width) or one element (n == 1, the tails), at index `i`.
<%def name="element(n, i)">\
<% t = "pscl_rv" if n > 1 else TR %>\
        {
% for (name, kind, ctype, cls) in OPERANDS:
%   if kind == "scalar" or cls == "0":
            const ${t} pscl_x_${name} = (${t})(pscl_u_${name});
%   elif ctype == TR:
            const ${t} pscl_x_${name} = ${ref(name, ctype, n, i)};
%   else:
            const ${t} pscl_x_${name} = convert_${vt(TR, n)}(${ref(name, ctype, n, i)});
%   endif
% endfor
            ${t} pscl_r = ${combine(n)};
% if MASK:
<%
    old = "(%s)0" % t if MASK == 1 else capture(ref, "out", TR, n, i)
    c = vt(COND_TYPE[TR], n)
%>\
%   if MASK_INNER == "0":
            pscl_r = pscl_u_m ? pscl_r : ${old};
%   else:
            pscl_r = (convert_${c}(${ref("m", "uchar", n, i)}) != (${c})0) ? pscl_r : ${old};
%   endif
% endif
% if n > 1 and not (ALIGNED and PATH == "fast"):
            vstore${n}(pscl_r, ${i}, pscl_p_out);
% else:
            ${ref("out", TR, n, i)} = pscl_r;
% endif
        }
</%def>\

## Pointers (stride classes "1" and "n") or once-read values (class "0") of every array,
## from the element offsets in pscl_row_<name>.
<%def name="bind()">\
% for (name, kind, ctype, cls) in arrays:
%   if cls == "0":
        const ${TR} pscl_u_${name} = (${TR})(${name}[pscl_row_${name}]);
%   else:
        __global const ${ctype} *${restrict}pscl_p_${name} = ${name} + pscl_row_${name};
%   endif
% endfor
% if MASK and MASK_INNER == "0":
        const uchar pscl_u_m = m[pscl_row_m];
% elif MASK:
        __global const uchar *${restrict}pscl_p_m = m + pscl_row_m;
% endif
        __global ${TR} *${restrict}pscl_p_out = out + pscl_row_out;
</%def>\

<%
    names = ["out"] + [o[0] for o in arrays] + (["m"] if MASK else [])
    # A work-item's vectors: WG (or local_size(0)) apart when INTERLEAVE (neighbouring
    # items touch neighbouring memory: coalesced on GPUs), else adjacent (one sequential
    # stream per item, what a CPU prefetcher wants).
    if INTERLEAVE:
        v_expr = "pscl_base + pscl_k * pscl_ls + pscl_lid"
    else:
        v_expr = "pscl_base + pscl_lid * PSCL_ITEMS + pscl_k"
%>\
% if PATH == "fast":
// Work-group g covers vectors [g, g + 1) * WG * ITEMS, then jumps a whole grid ahead.
// The last n % VEC elements are done by work-item 0.
__kernel __attribute__((reqd_work_group_size(PSCL_WG, 1, 1)))
void pscl_ew_fast(${ARGS["pscl_ew_fast"]})
{
% for name in names:
    const pscl_idx pscl_row_${name} = ${name}_off;
% endfor
${bind()}\
    const pscl_idx pscl_nvec = n / PSCL_WIDTH;
    const pscl_idx pscl_lid = get_local_id(0);
    const pscl_idx pscl_ls = PSCL_WG;
    const pscl_idx pscl_step = (pscl_idx)get_num_groups(0) * PSCL_WG * PSCL_ITEMS;
    for (pscl_idx pscl_base = (pscl_idx)get_group_id(0) * PSCL_WG * PSCL_ITEMS;
         pscl_base < pscl_nvec; pscl_base += pscl_step) {
        if (pscl_base + PSCL_WG * PSCL_ITEMS <= pscl_nvec) {
            // A whole block: no bounds test in the hot loop.
            for (int pscl_k = 0; pscl_k < PSCL_ITEMS; ++pscl_k) {
                const pscl_idx pscl_v = ${v_expr};
${element(width, "pscl_v")}\
            }
        } else {
            for (int pscl_k = 0; pscl_k < PSCL_ITEMS; ++pscl_k) {
                const pscl_idx pscl_v = ${v_expr};
                if (pscl_v < pscl_nvec)
${element(width, "pscl_v")}\
            }
        }
    }
% if width > 1:
    if (get_global_id(0) == 0) {
        for (pscl_idx pscl_i = pscl_nvec * PSCL_WIDTH; pscl_i < n; ++pscl_i)
${element(1, "pscl_i")}\
    }
% endif
}
% else:
// Dimension d has extent d<d> and, per array, stride <name>_s<d> in elements (0 where it
// is broadcast).  The innermost dimension runs along NDRange dim 0: ITEMS vectors of
// PSCL_WIDTH elements per item, plus a scalar tail per row done by the dim-0 item 0.  The
// other dimensions, flattened into rows, run along dim 1, grid-stride so that dim 1
// stays within every device's limit on work-groups.
__kernel void pscl_ew_strided(${ARGS["pscl_ew_strided"]})
{
    const pscl_idx pscl_nvec = d${last} / PSCL_WIDTH;
    const pscl_idx pscl_lid = get_local_id(0);
    const pscl_idx pscl_ls = get_local_size(0);
    const pscl_idx pscl_base = (pscl_idx)get_group_id(0) * pscl_ls * PSCL_ITEMS;
    for (pscl_idx pscl_row = get_global_id(1); pscl_row < n_rows;
         pscl_row += (pscl_idx)get_global_size(1)) {
% for name in names:
        pscl_idx pscl_row_${name} = ${name}_off;
% endfor
% if NDIM > 1:
        pscl_idx pscl_rem = pscl_row;
% endif
% for d in reversed(range(NDIM - 1)):
        {
%   if d > 0:
            const pscl_idx pscl_q = pscl_rem / d${d};
            const pscl_idx pscl_j = pscl_rem - pscl_q * d${d};
            pscl_rem = pscl_q;
%   else:
            const pscl_idx pscl_j = pscl_rem;
%   endif
%   for name in names:
            pscl_row_${name} += pscl_j * ${name}_s${d};
%   endfor
        }
% endfor
${bind()}\
        for (int pscl_k = 0; pscl_k < PSCL_ITEMS; ++pscl_k) {
            const pscl_idx pscl_v = ${v_expr};
            if (pscl_v < pscl_nvec)
${element(width, "pscl_v")}\
        }
% if width > 1:
        if (get_global_id(0) == 0) {
            for (pscl_idx pscl_i = pscl_nvec * PSCL_WIDTH; pscl_i < d${last}; ++pscl_i)
${element(1, "pscl_i")}\
        }
% endif
    }
}
% endif
