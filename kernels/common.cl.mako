## Helpers shared by every pysparsecl kernel family.  Import with
##   <%namespace name="common" file="common.cl.mako"/>
## Internal identifiers carry the PSCL_/pscl_ prefix so they cannot clash with user names.
##
## `make verify` runs every kernel under Oclgrind 21.10's uninitialised-value check, which
## sees the LLVM IR that Oclgrind's own clang makes at -O2 and mishandles four patterns
## (each found in one of our kernels; none costs speed to avoid):
##  1. `freeze`: the plugin aborts the kernel.  LLVM emits it when a kernel computes both
##     x / y and x % y (y not a constant power of two; x from a call: get_global_id, min):
##     write the remainder as x - (x / y) * y.
##  2. A vector shuffle with an undef lane: the plugin crashes.  LLVM makes one of a sum of
##     two lanes of one vector (v.x + v.y: use fma(v.x, 1.0f, v.y), exactly v.x + v.y) and
##     of a vector literal built from lanes of other vectors ((float16)(a.s0, b.s0, ...):
##     assemble it in a private array and vloadN it).
##  3. A shuffle that takes lane 11 of its first operand (e.g. .hi of a float16) marks that
##     lane uninitialised: read lanes of 16-wide vectors with .sN components.  (2 and 3: the
##     plugin compares each mask lane with llvm::Value::UndefValueVal, 11, instead of -1.)
##  4. A store of a vector literal with non-constant lanes, p[i] = (int2)(a, b), becomes a
##     store of an undef vector and lane stores; the former is reported: use vstoreN.

<%def name="vector_type(scalar, width)">${scalar if width == 1 else "%s%d" % (scalar, width)}</%def>

## Component names .s0 .. .sf of an OpenCL vector (a scalar has just itself).
<%def name="component(expr, width, index)">${expr if width == 1 else "%s.s%x" % (expr, index)}</%def>

## typedef + unaligned load/store macros for a vector of `width` elements of `scalar`.
<%def name="vector_helpers(alias, scalar, width)">
typedef ${vector_type(scalar, width)} ${alias};
% if width == 1:
#define PSCL_LOAD_${alias}(i, p) ((p)[(i)])
#define PSCL_STORE_${alias}(v, i, p) ((p)[(i)] = (v))
% else:
#define PSCL_LOAD_${alias}(i, p) vload${width}((i), (p))
#define PSCL_STORE_${alias}(v, i, p) vstore${width}((v), (i), (p))
% endif
</%def>

## x / d for 0 <= x < 2^31 and any 0 < d < 2^31, as (x * m) >> s with m, s from
## pysparsecl.ops._common.udiv_magic(d) (Granlund-Montgomery, one spare bit): exact, and a
## few instructions where GPUs spend ~20 on an integer division by a runtime value.
<%def name="udiv_helper()">
inline uint pscl_udiv(const uint x, const uint m, const uint s)
{
    return (uint)(((ulong)x * m) >> s);
}
</%def>

## part[lid] = the sum of `value` over work-items 0..lid of a work-group of `items` (a power
## of two), Hillis-Steele in local memory; `lid` is the caller's local id.  Ends with a
## barrier, so every item may read part[] after it.
<%def name="inclusive_scan(part, value, items)">
    ${part}[lid] = ${value};
    barrier(CLK_LOCAL_MEM_FENCE);
% for off in [1 << b for b in range(items.bit_length() - 1)]:
    {
        const int t = lid >= ${off} ? ${part}[lid - ${off}] : 0;
        barrier(CLK_LOCAL_MEM_FENCE);
        ${part}[lid] += t;
        barrier(CLK_LOCAL_MEM_FENCE);
    }
% endfor
</%def>

## Sums red[s * stride + index], for each s < slots, over a team of `width` work-items whose
## indices run consecutively (`lane`, 0..width-1, is an item's place in its team): a tree of
## halvings in local memory, after which lane 0 holds the sums.  Every level ends with a
## barrier, so the whole work-group must reach it.
<%def name="tree_sum(red, slots, stride, index, lane, width)">
% for half in [width >> (b + 1) for b in range(width.bit_length() - 1)]:
    if (${lane} < ${half}) {
%   for s in range(slots):
        ${red}[${s * stride} + ${index}] += ${red}[${s * stride} + ${index} + ${half}];
%   endfor
    }
    barrier(CLK_LOCAL_MEM_FENCE);
% endfor
</%def>
