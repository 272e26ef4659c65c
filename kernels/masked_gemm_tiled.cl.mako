## masked_gemm_tiled (pysparsecl/families/masked_gemm_tiled.py): the GPU-shaped masked GEMM
## (SDDMM-like).  A work-group owns a TILE_M x TILE output tile: x and W^T are staged
## through local memory KC columns at a time, and each work-item accumulates a few selected
## outputs of one row in registers.
##
## LAYOUT == "conv" (masked_conv_tiled, pysparsecl/families/masked_conv_tiled.py) renders
## the same kernel as an implicit GEMM for conv2d_masked: row i is output pixel
## (n, oh, ow) = i over N x OH x OW, column j is output channel, and reduction index
## kk = (r * S + s) * C + c reads the zero-padded NHWC input (masked_conv's "pack") at the
## window of pixel i, so the im2col matrix is never formed.  The weight, packed (K, R, S, C),
## is W^T as it stands.  Output and mask are (N, K, OH, OW); MASK "channel" is a per-image
## channel mask (N, K, 1, 1).
<%namespace name="common" file="common.cl.mako"/>\
<%namespace name="m" file="masked_common.cl.mako"/>\
<%!
def staging(tile_m, tile, items, kc, aligned):
    """How the tiled GEMM's work-group stages a KC-column chunk of its x and wt rows: floats
    per load, loads per row, rows per pass of the group, and each item's loads of x and wt
    (the px* / pw* registers)."""
    width = 4 if aligned else 1
    per_row = kc // width
    step = items // per_row
    return dict(width=width, per_row=per_row, step=step, nx=-(-tile_m // step),
                nw=-(-tile // step), ptype="float4" if aligned else "float")


def out_index(layout, i, j):
    """The output element of GEMM entry (i, j), as a long expression."""
    if layout == "conv":
        return "pscl_conv_dst(%s, %s, N, P)" % (i, j)
    return "((long)(%s) * N + (%s))" % (i, j)


def sel_index(layout, mask, i, j):
    """The selection element of GEMM entry (i, j): a channel mask has one per plane."""
    if mask == "channel":
        return "((long)((%s) / P) * N + (%s))" % (i, j)
    return out_index(layout, i, j)
%>\
% if LAYOUT == "conv":
// Output (and window mask) element of output pixel i = n * P + p and channel j: NCHW.
inline long pscl_conv_dst(const int i, const int j, const int n_out, const int P)
{
    const int n = i / P;
    return ((long)n * n_out + j) * P + (i - n * P);
}

% endif
${gemm_tiled_kernel()}

<%def name="gemm_tiled_kernel()">
<%
    TM, TN, P, UN, IT = TILE_M, TILE, GROUP, UNITS, WG
    words = TN // 32            # selection bits per tile row, in uints
    g4 = KC // 4                # float4s per staged row
    cap = IT * UN               # units per round
    st = staging(TM, TN, IT, KC, ALIGNED)
    sel_t = "int" if MASK == "slot" else "uchar"
    picked = ">= 0" if MASK == "slot" else "!= 0"
    written_zeros = MASK not in ("slot", "all") and SPLITK == 1   # zeros where unselected
    chunks = TN // 16           # 16-entry pieces of a tile row (one 16-bit word each)
    # One local buffer, used in turn for the selection bits and the scan (side by side),
    # a round's units and the staged chunks: LDS_F4 float4s (masked.gemm_local_bytes).
    lds_f4 = LDS_F4
%>\
// Tiled masked product (GPU-shaped, SDDMM-like).  A work-group owns the TILE_M x TILE
// output tile (i0.., j0..) and, with SPLITK > 1, one slice of K.  Work-item r < TILE_M
// reads the selection of tile row r into registers (a bit per entry) and cuts it into
// "units": up to GROUP selected columns of the row, so that each x value read feeds GROUP
// FMAs.  The selection is read by the whole group, coalesced, 16 entries per work-item
// and step (one 16-byte load of a bool mask when MASK_ALIGNED), into 16-bit words in
// local memory that the row owners then collect.  (Read row by row by the owners, a
// 4096 x 1024 mask with nothing selected kept the H100 busy 47 us; read this way, 19 us.)
// An exclusive scan over the rows places each row's units, in order, without atomics.
// Each work-item owns UNITS units per round (a tile with more units than
// WG * UNITS runs the K loop once per round).  The K loop stages x[tile rows, chunk]
// and wt[tile columns, chunk] in local memory KC columns at a time, with coalesced loads
// issued one chunk ahead; the sums stay in registers.
//
// Bank conflicts: the columns of a work-item's units are arbitrary, so neighbouring items
// would hit the same bank in lock-step.  Each item instead walks the chunk's float4s
// starting at its own offset (item id mod KC / 4): at every step the items of a
// quarter-warp read distinct float4 slots, whatever rows or columns they hold.
__kernel __attribute__((reqd_work_group_size(${IT}, 1, 1)))
void pscl_masked_gemm_tiled(${ARGS["pscl_masked_gemm_tiled"]})
{
    __local float4 lds[${lds_f4}];
    __local float4 *xs = lds;                // x[i0 + r, k0 + k] at r * KC + k
    __local float4 *ws = lds + ${TM * g4};   // wt[j0 + c, k0 + k] at c * KC + k
    __local float *xs1 = (__local float *)xs;
    __local float *ws1 = (__local float *)ws;
    __local int *scan = (__local int *)lds;
    __local uchar *urow = (__local uchar *)lds;
    __local uchar *ucnt = urow + ${cap};
    __local uchar *ucol = ucnt + ${cap};
    const int lid = get_local_id(0);
    const int j0 = get_group_id(0) * ${TN};
    const int i0 = get_group_id(1) * ${TM};
    const int kb = get_group_id(2) * k_len;
    const int ke = min(K, kb + k_len);

% if MASK == "all":
    // Every entry is selected (a dense product: the convolution search's projection of
    // the windows): the tile is computed whole, blocked in registers.
    const int sk = (lid & ${st["per_row"] - 1}) * ${st["width"]};
    const int sr = lid >> ${st["per_row"].bit_length() - 1};
    const int rot = lid & ${g4 - 1};
${x_row_bases()}
    const int dense = 1;
${dense_tile()}
% else:
    // The tile's selection, 16 entries per step: bit e of mbits[r * ${chunks} + q] is entry
    // (i0 + r, j0 + 16 q + e).  Outside the matrix: no bits.
    __local ushort *mbits = (__local ushort *)(scan + ${IT});   // beside the scan's ints
% if LAYOUT == "conv":
    // Neighbouring output pixels are neighbours in the mask: read a byte per entry along
    // the rows (coalesced), then pack each row's bytes into the words.
    __local uchar *sel8 = (__local uchar *)(mbits + ${TM * chunks});   // [q * TILE_M + r]
    for (int e = lid; e < ${TM * TN}; e += ${IT}) {
        const int i = i0 + (e & ${TM - 1}), j = j0 + (e >> ${TM.bit_length() - 1});
        sel8[e] = i < M && j < N && sel[sel_off + ${sel_index(LAYOUT, MASK, "i", "j")}] != 0;
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int c = lid; c < ${TM * chunks}; c += ${IT}) {
        const int r = c >> ${chunks.bit_length() - 1};
        const int q = (c & ${chunks - 1}) * 16;
        uint m = 0;
%   for e in range(16):
        m |= (uint)sel8[(q + ${e}) * ${TM} + r] << ${e};
%   endfor
        mbits[c] = (ushort)m;
    }
% else:
    for (int c = lid; c < ${TM * chunks}; c += ${IT}) {
        const int i = i0 + (c >> ${chunks.bit_length() - 1});
        const int j = j0 + (c & ${chunks - 1}) * 16;
        uint m = 0;
        if (i < M && j < N) {
            const __global ${sel_t} *s = sel + sel_off + (long)i * N + j;
% if MASK_ALIGNED:
            // N and the mask's offset are multiples of 16 entries: whole aligned vectors.
%   if MASK == "bool":
            const uchar16 v = *(const __global uchar16 *)s;
%     for e in range(16):
            m |= (uint)(v.s${"%x" % e} != 0) << ${e};
%     endfor
%   else:
%     for h in range(4):
            const int4 v${h} = *(const __global int4 *)(s + ${4 * h});
%       for e, comp in enumerate("xyzw"):
            m |= (uint)(v${h}.${comp} >= 0) << ${4 * h + e};
%       endfor
%     endfor
%   endif
% else:
            const int n = min(16, N - j);
            for (int e = 0; e < n; ++e)
                m |= (uint)(s[e] ${picked}) << e;
% endif
        }
        mbits[c] = (ushort)m;
    }
% endif
    barrier(CLK_LOCAL_MEM_FENCE);
% if written_zeros:
    // Dense output: zeros where nothing is selected (the owners write the rest), an entry
    // per work-item and step so that the stores coalesce (along a row of the GEMM's
    // output, along a column of the convolution's).
    for (int e = lid; e < ${TM * TN}; e += ${IT}) {
%   if LAYOUT == "conv":
        const int r = e & ${TM - 1}, q = e >> ${TM.bit_length() - 1};
%   else:
        const int r = e >> ${TN.bit_length() - 1}, q = e & ${TN - 1};
%   endif
        const int i = i0 + r, j = j0 + q;
        if (i < M && j < N && !((mbits[r * ${chunks} + (q >> 4)] >> (q & 15)) & 1))
            out[out_off + ${out_index(LAYOUT, "i", "j")}] = 0.0f;
    }
% endif
    // Work-item r < TILE_M: the selection of tile row r, a bit per entry, in registers.
% for w in range(words):
    uint b${w} = 0;
% endfor
    if (lid < ${TM}) {
% for w in range(words):
        b${w} = (uint)mbits[lid * ${chunks} + ${2 * w}]
            | ((uint)mbits[lid * ${chunks} + ${2 * w + 1}] << 16);
% endfor
    }
    const int cnt = ${" + ".join("popcount(b%d)" % w for w in range(words))};
    const int nu = (cnt + ${P - 1}) >> ${P.bit_length() - 1};  // units of this row
    ${common.inclusive_scan("scan", "nu", IT)}
    const int first_unit = scan[lid] - nu;
    const int n_units = scan[${IT - 1}];

    // This work-item's part of the staging: rows sr + n * step, columns sk .. sk + width.
    const int sk = (lid & ${st["per_row"] - 1}) * ${st["width"]};   // bit operations: common.cl.mako, 1
    const int sr = lid >> ${st["per_row"].bit_length() - 1};
    const int rot = lid & ${g4 - 1};
${x_row_bases()}
% if DENSE:
    // The same for the whole group.  A dense tile then skips the unit loop below rather than
    // returning early: with an early return here, PoCL 3.1 left outputs of the *sparse*
    // tiles unwritten.
    const int dense = n_units * ${P * 100} >= ${DENSE * TM * TN};
${dense_tile()}
% endif

    for (int base = 0; base < ${"(dense ? 0 : n_units)" if DENSE else "n_units"}; base += ${cap}) {
        barrier(CLK_LOCAL_MEM_FENCE);         // the scan, or the last chunk, is consumed
        // The units of this round: row owners write those inside [base, base + cap).
        if (nu > 0 && first_unit < base + ${cap} && first_unit + nu > base) {
            int n = 0;
% for w in range(words):
            for (uint b = b${w}; b; ) {
                const uint low = b & (0u - b);
                b ^= low;
                const int u = first_unit + (n >> ${P.bit_length() - 1}) - base;
                if (u >= 0 && u < ${cap}) {
                    ucol[u * ${P} + (n & ${P - 1})] = (uchar)(${32 * w} + 31 - (int)clz(low));
                    if ((n & ${P - 1}) == 0) {
                        urow[u] = (uchar)lid;
                        ucnt[u] = (uchar)min(${P}, cnt - n);
                    }
                }
                ++n;
            }
% endfor
        }
        barrier(CLK_LOCAL_MEM_FENCE);
% for s in range(UN):
        const int un${s} = lid + ${s * IT};
        const int n${s} = base + un${s} < n_units ? ucnt[un${s}] : 0;
        const int r${s} = n${s} ? urow[un${s}] : 0;
        const int xo${s} = r${s} * ${g4};
%   for q in range(P):
        const int c${s}_${q} = ${q} < n${s} ? ucol[un${s} * ${P} + ${q}] : 0;
        const int wo${s}_${q} = c${s}_${q} * ${g4};
        float acc${s}_${q} = 0.0f;
%   endfor
% endfor

        // The K loop; the first chunk is loaded here, each next one during the FMAs.
${stage_registers()}
        ${stage_load("kb")}
        for (int k0 = kb; k0 < ke; k0 += ${KC}) {
            barrier(CLK_LOCAL_MEM_FENCE);     // the units, or the previous chunk, are read
${stage_store()}
            barrier(CLK_LOCAL_MEM_FENCE);
            if (k0 + ${KC} < ke) {
                ${stage_load("k0 + %d" % KC)}
            }
% for g in range(g4):
            {
                const int kk = (${g} + rot) & ${g4 - 1};
%   for s in range(UN):
                if (n${s}) {
                    const float4 xv = xs[xo${s} + kk];
%     for q in range(P):
                    if (${q} < n${s}) {
                        const float4 wv = ws[wo${s}_${q} + kk];
                        acc${s}_${q} = fma(xv.x, wv.x, acc${s}_${q});
                        acc${s}_${q} = fma(xv.y, wv.y, acc${s}_${q});
                        acc${s}_${q} = fma(xv.z, wv.z, acc${s}_${q});
                        acc${s}_${q} = fma(xv.w, wv.w, acc${s}_${q});
                    }
%     endfor
                }
%   endfor
            }
% endfor
        }
% for s in range(UN):
%   for q in range(P):
        if (${q} < n${s}) {
            const long i = i0 + r${s}, j = j0 + c${s}_${q};
%     if MASK == "slot":
            const long dst = i * out_cols + sel[sel_off + i * N + j];
%     else:
            const long dst = ${out_index(LAYOUT, "i", "j")};
%     endif
%     if SPLITK > 1:
            part[get_group_id(2) * part_stride + dst] = acc${s}_${q};
%     else:
            out[out_off + dst] = acc${s}_${q};
%     endif
        }
%   endfor
% endfor
    }
% endif
}
% if SPLITK > 1:

// The sum of the K slices' partial products, in slice order (deterministic); a bool mask's
// unselected outputs get zeros.
__kernel void pscl_gemm_splitk_sum(${ARGS["pscl_gemm_splitk_sum"]})
{
    const long e = get_global_id(0);
    if (e >= total)
        return;
% if MASK not in ("slot", "all"):
    if (!sel[sel_off + ${"e / P" if MASK == "channel" else "e"}]) {
        out[out_off + e] = 0.0f;
        return;
    }
% endif
    float s = part[e];
    for (int t = 1; t < n_slices; ++t)
        s += part[t * part_stride + e];
    out[out_off + e] = s;
}
% endif
</%def>


## DENSE > 0: a tile whose units cover at least DENSE% of its entries is computed whole, as
## a dense product blocked in registers, and only its selected entries are written.  There
## every LDS value feeds DR (or DC) FMAs instead of about one, which beats skipping the
## unselected work once the tile is dense enough.  The choice is per tile and inside the
## kernel, since the host does not know how dense a device mask is.
<%def name="dense_tile()">
<%
    TM, TN, IT, P = TILE_M, TILE, WG, GROUP
    g4 = KC // 4
    per_item = TM * TN // IT     # outputs per work-item
    DC = min(8, per_item)        # columns per work-item: dc + c * n_col
    DR = per_item // DC          # rows per work-item: dr + r * n_row
    n_col = TN // DC
    n_row = IT // n_col
%>    if (dense) {
        // Work-item (dr, dc) owns rows dr + r * ${n_row} and columns dc + c * ${n_col}: the
        // neighbours of a row write neighbouring outputs.
        const int dc = lid & ${n_col - 1};
        const int dr = lid >> ${n_col.bit_length() - 1};
% for r in range(DR):
%   for c in range(DC):
        float d${r}_${c} = 0.0f;
%   endfor
% endfor
${stage_registers()}
        ${stage_load("kb")}
        for (int k0 = kb; k0 < ke; k0 += ${KC}) {
            barrier(CLK_LOCAL_MEM_FENCE);     // the scan, or the previous chunk, is read
${stage_store()}
            barrier(CLK_LOCAL_MEM_FENCE);
            if (k0 + ${KC} < ke) {
                ${stage_load("k0 + %d" % KC)}
            }
% for g in range(g4):
            {
                const int kk = (${g} + rot) & ${g4 - 1};   // bank-conflict free, as above
%   for r in range(DR):
                const float4 xv${r} = xs[(dr + ${r * n_row}) * ${g4} + kk];
%   endfor
%   for c in range(DC):
                {
                    const float4 wv = ws[(dc + ${c * n_col}) * ${g4} + kk];
%     for r in range(DR):
                    d${r}_${c} = fma(xv${r}.x, wv.x, d${r}_${c});
                    d${r}_${c} = fma(xv${r}.y, wv.y, d${r}_${c});
                    d${r}_${c} = fma(xv${r}.z, wv.z, d${r}_${c});
                    d${r}_${c} = fma(xv${r}.w, wv.w, d${r}_${c});
%     endfor
                }
%   endfor
            }
% endfor
        }
% for r in range(DR):
%   for c in range(DC):
        {
            const long i = i0 + dr + ${r * n_row}, j = j0 + dc + ${c * n_col};
            if (i < M && j < N) {
%     if MASK == "slot":
                const int s = sel[sel_off + i * N + j];
                const long dst = i * out_cols + s;
                if (s >= 0)
%     elif MASK == "all":
                const long dst = i * out_cols + j;    // (M, out_cols) row-major
%     else:
                const long dst = ${out_index(LAYOUT, "i", "j")};
                if (sel[sel_off + ${sel_index(LAYOUT, MASK, "i", "j")}])
%     endif
%     if SPLITK > 1:
                    part[get_group_id(2) * part_stride + dst] = d${r}_${c};
%     else:
                    out[out_off + dst] = d${r}_${c};
%     endif
            }
        }
%   endfor
% endfor
    }
</%def>


## Where each x row this work-item stages starts (xrb*, -1 outside the matrix): a row of x,
## or the corner of output pixel i's window in the packed input.
<%def name="x_row_bases()">
<% st = staging(TILE_M, TILE, WG, KC, ALIGNED) %>\
% for n in range(st["nx"]):
    long xrb${n} = -1;
    {
        const int i = i0 + sr + ${n * st["step"]};
        if (${"sr + %d < %d && " % (n * st["step"], TILE_M) if TILE_M % st["step"] else ""}i < M) {
%   if LAYOUT == "conv":
            const int img = i / P, p = i - img * P;
            const int oh = p / OW, ow = p - oh * OW;
            xrb${n} = (((long)img * Hp + (long)oh * str_h) * Wp + (long)ow * str_w) * C;
%   else:
            xrb${n} = x_off + (long)i * ldx;
%   endif
        }
    }
% endfor
</%def>


## The registers that carry a chunk from its load to its store (px*: x, pw*: wt).
<%def name="stage_registers()">
<% st = staging(TILE_M, TILE, WG, KC, ALIGNED) %>\
% for n in range(st["nx"]):
        ${st["ptype"]} px${n};
% endfor
% for n in range(st["nw"]):
        ${st["ptype"]} pw${n};
% endfor
</%def>


## Store the chunk in px*, pw* to local memory: x rows at xs, wt rows at ws, KC floats each.
<%def name="stage_store()">
<% st = staging(TILE_M, TILE, WG, KC, ALIGNED); step, per_row = st["step"], st["per_row"] %>\
% for name, dst, n_rows, count in (("px", "xs", TILE_M, st["nx"]), ("pw", "ws", TILE, st["nw"])):
%   for n in range(count):
%     if n_rows % step:
            if (sr + ${n * step} < ${n_rows})
%     endif
            ${dst if ALIGNED else dst + "1"}[(sr + ${n * step}) * ${per_row} + (lid & ${per_row - 1})] = ${name}${n};
%   endfor
% endfor
</%def>


## Load one chunk (columns kb.. of the tile's x rows and wt rows) into px*, pw*: zeros
## past the matrix edges, so the FMAs need no bounds.  ALIGNED: whole float4s (every row
## and kb start at a multiple of 4 floats, and so does K).
<%def name="stage_load(kb)">
<%
    st = staging(TILE_M, TILE, WG, KC, ALIGNED)
    step, ptype = st["step"], st["ptype"]
%>\
            {
                const int kq = ${kb} + sk;
% if LAYOUT == "conv":
                // Column kq is channel c of tap (r, s) (C % 4 == 0 when ALIGNED: a float4
                // stays inside one tap): its offset from a window's corner.
                long kx = 0;
                if (kq < ke) {
                    const int tap = kq / C, c = kq - tap * C;
                    const int r = tap / S, s = tap - r * S;
                    kx = ((long)r * dil_h * Wp + (long)s * dil_w) * C + c;
                }
% else:
                const int kx = kq;
% endif
% for n in range(st["nx"]):
                px${n} = xrb${n} >= 0 && kq < ke ?
                    *(const __global ${ptype} *)(x + xrb${n} + kx) : (${ptype})(0.0f);
% endfor
% for n in range(st["nw"]):
                {
                    const int j = j0 + sr + ${n * step};
                    pw${n} = ${"sr + %d < %d && " % (n * step, TILE) if TILE % step else ""}j < N && kq < ke ?
                        *(const __global ${ptype} *)(wt + (long)j * ldw + kq) : (${ptype})(0.0f);
                }
% endfor
            }
</%def>
