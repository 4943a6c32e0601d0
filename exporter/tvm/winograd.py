"""Winograd F(4x4, 3x3) for the full-precision 3x3 convs (stride 1, 'same' padding).

The official config's full-precision decoder convs already ran at ~140 GMAC/s on AVX-512 with
the direct schedule, close to the FMA peak of two cores, and were half of its step. Winograd
F(4, 3) computes a 4 x 4 output tile from a 6 x 6 input tile with 36 multiplies per channel
pair instead of 144, so the same FMA rate does the layer in about a third of the arithmetic
(Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016).

Weights are constants, so their transform ``U = G g G^T`` is done once in numpy
(:func:`transform_weights`). The TE compute has five stages, all spatial except the GEMM:

1. ``wino_pad``: the input with a zero border (right/bottom up to whole tiles), its columns
   split into the 4 phases of the tile grid (one strided read per input value; the other
   strided access is the output's store, 4 columns apart);
2. ``wino_row``: ``B^T d`` along rows, for every (channel, tile row, tap column, tile column);
3. ``wino_input``: ``(B^T d) B`` along columns -> ``V[xi, nu, tile row, c, tile col]``;
4. ``wino_gemm``: ``M[xi, nu, tile row, k, tile col] = sum_c U[xi, nu, k, c] V[...]``;
5. ``wino_col`` / ``wino_output``: ``A^T M A`` back to NCHW (the output block, so elementwise
   epilogues such as bias and residual adds fuse into it).

The transforms are written with the zero coefficients skipped and one expression per matrix
row, chosen by a ``Select`` on the row index; the schedule unrolls that index, so each row
compiles to its few adds and multiplies. The schedule (:func:`schedule_winograd`) processes one
tile row at a time (parallel): its input transform, then per block of output channels the GEMM
in a register tile and the output transform, so V and M never leave the cache.
"""
from __future__ import annotations

import hashlib

import numpy as np
import tvm
from tvm import relax, s_tir, te, tirx

from bidiff.exporter.tvm.schedule_helpers import finish_register_tile, pick_divisor, register_tile

M_OUT = 4            # output tile (F(4, 3))
ALPHA = M_OUT + 2    # input tile

B_T = np.array([[4, 0, -5, 0, 1, 0],
                [0, -4, -4, 1, 1, 0],
                [0, 4, -4, -1, 1, 0],
                [0, -2, -1, 2, 1, 0],
                [0, 2, -1, -2, 1, 0],
                [0, 4, 0, -5, 0, 1]], np.float64)
G = np.array([[1 / 4, 0, 0],
              [-1 / 6, -1 / 6, -1 / 6],
              [-1 / 6, 1 / 6, -1 / 6],
              [1 / 24, 1 / 12, 1 / 6],
              [1 / 24, -1 / 12, 1 / 6],
              [0, 0, 1]], np.float64)
A_T = np.array([[1, 1, 1, 1, 1, 0],
                [0, 1, -1, 2, -2, 0],
                [0, 1, 1, 4, 4, 0],
                [0, 1, -1, 8, -8, 1]], np.float64)

BLOCK_NAMES = ("wino_pad", "wino_row", "wino_input", "wino_gemm", "wino_col", "wino_output")


def transform_weights(w: np.ndarray) -> np.ndarray:
    """``U[xi, nu, k, c] = (G w[k, c] G^T)[xi, nu]`` for weights ``w`` [K, C, 3, 3] (float32)."""
    if w.ndim != 4 or w.shape[2:] != (3, 3):
        raise ValueError(f"Winograd F(4,3) needs 3x3 weights [K, C, 3, 3], got {w.shape}")
    u = np.einsum("xa,kcab,yb->xykc", G, w.astype(np.float64), G, optimize=True)
    return np.ascontiguousarray(u.astype(np.float32))


def _row_combination(matrix: np.ndarray, row, term):
    """``sum_j matrix[row, j] * term(j)`` for a symbolic ``row``: one zero-skipping expression
    per matrix row, selected by ``row`` (folds to a single row once ``row`` is unrolled)."""
    def expr(r: int):
        out = None
        for j, coef in enumerate(matrix[r]):
            if coef == 0:
                continue
            t = term(j)
            t = t if coef == 1 else -t if coef == -1 else t * tirx.const(float(coef), "float32")
            out = t if out is None else out + t
        return out

    result = expr(matrix.shape[0] - 1)
    for r in range(matrix.shape[0] - 2, -1, -1):
        result = tirx.Select(row == r, expr(r), result)
    return result


def winograd_conv2d_compute(x: te.Tensor, u: te.Tensor) -> te.Tensor:
    """Stride-1 'same' 3x3 conv of ``x`` [1, C, H, W] with transformed weights ``u``
    [6, 6, K, C] (:func:`transform_weights`); returns [1, K, H, W]."""
    _, c, h, w = (int(d) for d in x.shape)
    k = int(u.shape[2])
    nh, nw = -(-h // M_OUT), -(-w // M_OUT)
    ph = nh * M_OUT + 2
    zero = tirx.const(0.0, "float32")
    # zero border and columns split by phase: pad[c, y, r, q] = padded[c, y, 4q + r], so that
    # the row transform reads tile columns (4 apart) as contiguous vectors. A Select over a
    # clamped, always valid read has no branch per element (2.5x faster here than if_then_else).
    def clamp(v, hi):
        return tirx.max(tirx.min(v, hi), 0)

    pad = te.compute(
        (c, ph, M_OUT, nw + 1),
        lambda ci, y, r, q: tirx.Select(
            tirx.all(y >= 1, y <= h, q * M_OUT + r >= 1, q * M_OUT + r <= w),
            x[0, ci, clamp(y - 1, h - 1), clamp(q * M_OUT + r - 1, w - 1)], zero),
        name="wino_pad")
    row = te.compute(
        (c, nh, ALPHA, ALPHA, nw),
        lambda ci, ty, xi, b, tx: _row_combination(
            B_T, xi, lambda a: pad[ci, ty * M_OUT + a, b % M_OUT, tx + b // M_OUT]),
        name="wino_row")
    v = te.compute(
        (ALPHA, ALPHA, nh, c, nw),
        lambda xi, nu, ty, ci, tx: _row_combination(B_T, nu, lambda b: row[ci, ty, xi, b, tx]),
        name="wino_input")
    rc = te.reduce_axis((0, c), name="rc")
    gemm = te.compute(
        (ALPHA, ALPHA, nh, k, nw),
        lambda xi, nu, ty, ko, tx: te.sum(u[xi, nu, ko, rc] * v[xi, nu, ty, rc, tx], axis=rc),
        name="wino_gemm")
    col = te.compute(
        (k, nh, M_OUT, ALPHA, nw),
        lambda ko, ty, i, nu, tx: _row_combination(A_T, i, lambda xi: gemm[xi, nu, ty, ko, tx]),
        name="wino_col")
    return te.compute(
        (1, k, h, w),
        lambda n, ko, y, xx: _row_combination(
            A_T, xx % M_OUT, lambda nu: col[ko, y // M_OUT, y % M_OUT, nu, xx // M_OUT]),
        name="wino_output")


def applicable(c: int, k: int, h: int, w: int) -> bool:
    """Whether a 3x3 conv of this shape goes through Winograd: enough channels for the GEMM to
    dominate the transforms, and whole 4 x 4 tiles at least 8 tiles wide (vectors over them)."""
    return c >= 16 and k >= 16 and h % M_OUT == 0 and w % M_OUT == 0 and w >= 8 * M_OUT \
        and h >= 2 * M_OUT


# relax OpPatternKind::kOutEWiseFusable: elementwise consumers (bias, residual adds) fuse into it
_OUT_EWISE_FUSABLE = 4


class LegalizeWinograd:
    """LegalizeOps rule for ``relax.nn.conv2d``: eligible 3x3 convs with constant weights become
    :func:`winograd_conv2d_compute` (weights transformed here, once per distinct weight tensor,
    so the groups of a library share them; one PrimFunc per layer shape, so FuseOps can share
    the fused kernels as it does for TVM's own conv2d), everything else TVM's own
    legalization."""

    def __init__(self):
        self._weights: dict[tuple, relax.Expr] = {}
        self._funcs: dict[tuple, tvm.ir.GlobalVar] = {}
        self._default = tvm.ir.Op.get("relax.nn.conv2d").get_attr("FLegalize")

    @staticmethod
    def _eligible(call: relax.Call) -> bool:
        x, w = call.args
        a = call.attrs
        if not isinstance(w, tvm.ir.expr.Constant) or x.ty.dtype != "float32" \
                or w.ty.dtype != "float32" or x.ty.shape is None:
            return False
        if (a.data_layout, a.kernel_layout, a.out_layout) != ("NCHW", "OIHW", "NCHW") \
                or str(a.out_dtype) not in ("", "float32", "void", "None") or int(a.groups) != 1 \
                or [int(v) for v in a.strides] != [1, 1] or [int(v) for v in a.dilation] != [1, 1] \
                or [int(v) for v in a.padding] != [1, 1, 1, 1]:
            return False
        try:
            n, c, h, wd = (int(d) for d in x.ty.shape.values)
        except TypeError:
            return False
        kf, kc, kh, kw = (int(d) for d in w.value.shape)
        return n == 1 and kc == c and (kh, kw) == (3, 3) and applicable(c, kf, h, wd)

    def __call__(self, bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        if not self._eligible(call):
            return self._default(bb, call)
        w = np.ascontiguousarray(call.args[1].value.numpy())
        key = (w.shape, hashlib.sha256(w.tobytes()).hexdigest())
        if key not in self._weights:
            self._weights[key] = relax.const(transform_weights(w))
        x, u = call.args[0], self._weights[key]
        shape = (tuple(int(d) for d in x.ty.shape.values), tuple(w.shape))
        gv = self._funcs.get(shape)
        if gv is not None and gv in bb.get().get_global_vars():   # one kernel per layer shape
            return relax.call_tir(gv, [x, u], out_ty=call.ty)
        out = bb.call_te(winograd_conv2d_compute, x, u, primfunc_name_hint="winograd_conv2d")
        gv = out.args[0]
        bb.update_func(gv, bb.get()[gv].with_attr("op_pattern", _OUT_EWISE_FUSABLE))
        self._funcs[shape] = gv
        return out


def schedule_winograd(sch: s_tir.Schedule, lanes: int, rows: int, nvec: int) -> None:
    """Schedule a PrimFunc holding :func:`winograd_conv2d_compute` (any fused epilogue already
    inlined into ``wino_output``). ``lanes``: f32 lanes per vector register; the GEMM's
    register tile is ``rows`` output channels x ``nvec`` vectors of tile columns."""
    out = sch.get_sblock("wino_output")
    gemm_block = sch.get(sch.get_sblock("wino_gemm"))
    k = int(gemm_block.iter_vars[3].dom.extent)
    nw = int(gemm_block.iter_vars[4].dom.extent)
    lanes = pick_divisor(nw, [d for d in (lanes, 8, 4) if d <= lanes])
    rows, nvec = register_tile(k, nw // lanes, rows, nvec)

    # output: (tile row) parallel > (channel block) > channel, i, j > tile columns (vector)
    n, ko, y, xx = sch.get_loops(out)
    ty, i = sch.split(y, [None, M_OUT])
    tx, j = sch.split(xx, [None, M_OUT])
    kb, ki = sch.split(ko, [None, rows])
    sch.reorder(n, ty, kb, ki, i, j, tx)
    par = sch.fuse(n, ty)
    sch.parallel(par)
    txo, txv = sch.split(tx, [None, lanes])
    sch.vectorize(txv)
    sch.unroll(j)
    sch.unroll(i)

    col = sch.get_sblock("wino_col")
    sch.compute_at(col, kb)
    gemm = sch.get_sblock("wino_gemm")
    sch.compute_at(gemm, kb)
    v = sch.get_sblock("wino_input")
    sch.compute_at(v, par)
    row = sch.get_sblock("wino_row")
    sch.compute_at(row, par)

    # wino_col: ko, ty, i, nu, tx -> unroll i (row select), vector tx
    # (loops of extent 1, e.g. the tile row, are dropped by compute_at)
    c_ko, c_i, c_nu, c_tx = sch.get_loops(col)[2:]
    sch.reorder(c_ko, c_nu, c_i, c_tx)
    c_txo, c_txv = sch.split(c_tx, [None, lanes])
    sch.vectorize(c_txv)
    sch.unroll(c_i)

    # GEMM: xi, nu, (ty), k, tx, rc -> xi, nu, txo, rc, k (unrolled), txn (unrolled), txv
    g_xi, g_nu, g_k, g_tx, g_rc = sch.get_loops(gemm)[2:]
    g_txo, g_txn, g_txv = sch.split(g_tx, [None, nvec, lanes])
    acc = sch.cache_write(gemm, 0, "local")
    sch.reorder(g_xi, g_nu, g_txo, g_rc, g_k, g_txn, g_txv)
    finish_register_tile(sch, gemm, acc, g_txo, (g_k, g_txn), g_txv, lanes, g_rc)

    # input transforms: per channel, the row-selecting index unrolled, vector over tile columns
    v_xi, v_nu, v_c, v_tx = sch.get_loops(v)[1:]
    sch.reorder(v_c, v_xi, v_nu, v_tx)
    sch.unroll(v_nu)
    sch.vectorize(sch.split(v_tx, [None, lanes])[1])
    r_c, r_xi, r_b, r_tx = sch.get_loops(row)[1:]
    sch.reorder(r_c, r_b, r_xi, r_tx)
    sch.unroll(r_xi)
    sch.vectorize(sch.split(r_tx, [None, lanes])[1])

    pad = sch.get_sblock("wino_pad")
    p_c, p_y, p_r, p_q = sch.get_loops(pad)
    sch.reorder(p_c, p_y, p_q, p_r)          # read along the input row, write 4 phases
    sch.unroll(p_r)
    sch.parallel(sch.fuse(p_c, p_y))
