"""Schedules for the float ops of a legalized Relax module, applied as one module pass.

TVM's default Relax CPU pipeline lowers float ops to plain unscheduled loops (a 3x3 conv runs
~100x slower than onnxruntime; docs/tvm-notes.md). :class:`ScheduleFloatOps` runs after LegalizeOps /
FuseOps / FuseTIR and schedules every PrimFunc that is not already scheduled (our binary-conv
kernels are), picking a rule by block names and block kinds:

- ``winograd`` (float 3x3 convs with constant weights and enough channels, which
  :class:`.winograd.LegalizeWinograd` legalizes into Winograd F(4, 3)): one tile row per
  parallel iteration, the GEMM in a register tile, the epilogue inlined into the output
  transform (:func:`.winograd.schedule_winograd`);
- ``conv2d_nchw`` (the other float convs, NCHW kept): weights repacked to
  [O/ob, I, kh, kw, ob] by a ``cache_read`` + ``transform_layout``; accumulation in a
  ``local`` tile of ob output channels x (nvec x lanes) columns, the fused epilogue (bias,
  activation, residual) inlined into the write-back; loop order n, y, xo, fo, rc, ry, rx, fi,
  xi, xv; parallel over rows; a 1x1 conv reads its input from per-row panels;
- blocks with a reduction (GroupNorm statistics, matmul, softmax, ...): spatial producers
  inlined, parallel over the spatial loops of each reduction, the output epilogue parallel and
  vectorised;
- everything else (elementwise, reshape, concat, pixel shuffle): producers inlined, the output
  block fused, parallel and vectorised.

``sigmoid`` is legalized as ``1 / (1 + fast_exp(-x))`` (:func:`legalize_fast_sigmoid`) so Swish
vectorises; precise ``expf`` calls stay scalar. The rule used is recorded on each PrimFunc as
the attribute ``bidiff.schedule`` (tests assert it).
"""
from __future__ import annotations

import logging

import tvm
from tvm import relax, s_tir, te, tirx, topi
from tvm.relax.backend.cpu_generic import pipeline as cpu_pipeline

from bidiff.exporter.tvm import winograd
from bidiff.exporter.tvm.binary_conv import KernelVariant, select_variant
from bidiff.exporter.tvm.schedule_helpers import finish_register_tile, pick_divisor, register_tile

SCHEDULE_ATTR = "bidiff.schedule"
_log = logging.getLogger(__name__)

# f32 lanes per vector register, and (ob, nvec) register tiles of the 3x3 and 1x1 convs
_LANES = {KernelVariant.X86_AVX512: 16, KernelVariant.X86_AVX2: 8, KernelVariant.ARM_NEON: 4,
          KernelVariant.GENERIC: 4}
_CONV_TILES = {  # variant: {kernel size 1 or >1: (ob, nvec)}
    KernelVariant.X86_AVX512: {3: (4, 4), 1: (4, 4)},
    KernelVariant.X86_AVX2: {3: (4, 2), 1: (4, 2)},
    KernelVariant.ARM_NEON: {3: (4, 4), 1: (4, 4)},
    KernelVariant.GENERIC: {3: (4, 2), 1: (4, 2)},
}
_WINOGRAD_TILES = {  # variant: (output channels, vectors of tile columns) of the Winograd GEMM
    KernelVariant.X86_AVX512: (8, 2), KernelVariant.X86_AVX2: (4, 2),
    KernelVariant.ARM_NEON: (4, 4), KernelVariant.GENERIC: (4, 2),
}
_MATMUL_TILES = {  # variant: (rows, nvec) register tile of a matmul
    KernelVariant.X86_AVX512: (8, 2), KernelVariant.X86_AVX2: (4, 2),
    KernelVariant.ARM_NEON: (4, 2), KernelVariant.GENERIC: (4, 2),
}


# ---------------------------------------------------------------------------------- sigmoid
def _fast_sigmoid_te(x: te.Tensor) -> te.Tensor:
    e = topi.fast_exp(topi.negative(x))
    return te.compute(x.shape, lambda *i: tirx.const(1.0, x.dtype) / (tirx.const(1.0, x.dtype)
                                                                       + e(*i)),
                      name="fast_sigmoid")


def legalize_fast_sigmoid(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """LegalizeOps rule for ``relax.sigmoid`` on float32: 1 / (1 + fast_exp(-x))."""
    x = call.args[0]
    if x.ty.dtype != "float32":
        return bb.call_te(topi.sigmoid, x)
    return bb.call_te(_fast_sigmoid_te, x, primfunc_name_hint="fast_sigmoid")


_SOFTMAX_BLOCKS = ("softmax_pmax", "softmax_max", "softmax_shift", "T_fast_exp", "softmax_psum",
                   "softmax_sum", "softmax_inv", "softmax_norm")
_SOFTMAX_PARTIALS = 16      # lanes of the max / sum partials (a vector of each CPU's width)


def _row_softmax_te(x: te.Tensor) -> te.Tensor:
    """Softmax over the last axis as max, exp(x - max) (fast_exp), sum, scale by 1 / sum, the
    max and sum each over ``_SOFTMAX_PARTIALS`` interleaved partials first (so they vectorise):
    the ``softmax`` rule runs all of it per row in one parallel pass, exp once, kept in a row
    buffer (topi's fast_softmax is three parallel passes and computes exp twice)."""
    *lead, n = x.shape
    lanes = pick_divisor(int(n), (_SOFTMAX_PARTIALS, 8, 4))

    def reduce(src, op, name):
        ko = te.reduce_axis((0, n // lanes), name="ko")
        part = te.compute((*lead, lanes), lambda *i: op(src[(*i[:-1], ko * lanes + i[-1])],
                                                          axis=ko), name=f"softmax_p{name}")
        kl = te.reduce_axis((0, lanes), name="kl")
        return te.compute(tuple(lead), lambda *i: op(part[(*i, kl)], axis=kl),
                          name=f"softmax_{name}")
    mx = reduce(x, te.max, "max")
    e = topi.fast_exp(te.compute(x.shape, lambda *i: x[i] - mx[i[:-1]], name="softmax_shift"))
    total = reduce(e, te.sum, "sum")
    inv = te.compute(tuple(lead), lambda *i: tirx.const(1.0, x.dtype) / total[i],
                     name="softmax_inv")          # one division per row, not per element
    return te.compute(x.shape, lambda *i: e[i] * inv[i[:-1]], name="softmax_norm")


def legalize_fast_softmax(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """LegalizeOps rule for ``relax.nn.softmax`` on float32: over the last axis the one-pass
    :func:`_row_softmax_te`, else topi's fast_softmax (both with fast_exp)."""
    x = call.args[0]
    axis = int(call.attrs.axis)
    if x.ty.dtype != "float32":
        return bb.call_te(topi.nn.softmax, x, axis)
    if axis in (-1, len(x.ty.shape) - 1):
        return bb.call_te(_row_softmax_te, x, primfunc_name_hint="row_softmax")
    return bb.call_te(topi.nn.fast_softmax, x, axis, primfunc_name_hint="fast_softmax")


LEGALIZE = {"relax.sigmoid": legalize_fast_sigmoid, "relax.nn.softmax": legalize_fast_softmax}


# ---------------------------------------------------------------------------------- helpers
def _is_reduction(sch: s_tir.Schedule, block) -> bool:
    return any(int(iv.iter_type) == 2 for iv in sch.get(block).iter_vars)


def _extent(sch: s_tir.Schedule, loop) -> int | None:
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else None


def _root_blocks(sch: s_tir.Schedule):
    return list(sch.get_child_blocks(sch.get_sblock("root")))


def _inline_spatial_producers(sch: s_tir.Schedule, keep=()) -> None:
    """compute_inline every spatial block that is not an output (and not in ``keep``)."""
    outputs = {sch.get(b).name_hint for b in sch.get_output_blocks(sch.get_sblock("root"))}
    for blk in _root_blocks(sch):
        name = sch.get(blk).name_hint
        if name in outputs or name in keep or _is_reduction(sch, blk):
            continue
        try:
            sch.compute_inline(blk)
        except Exception:  # noqa: BLE001 - not inlinable (e.g. read at several shifted points)
            pass


# Below this many output elements a block runs on one thread: waking the pool costs more than
# the work (parameter reshapes, ones/zeros, per-channel vectors, the timestep MLP's vectors).
MIN_PARALLEL_ELEMENTS = 16384


def _work(sch: s_tir.Schedule, loops) -> int | None:
    total = 1
    for lp in loops:
        ext = _extent(sch, lp)
        if ext is None:
            return None
        total *= ext
    return total


def _is_one(expr) -> bool:
    return isinstance(expr, tirx.IntImm) and int(expr) == 1


def _inner_contiguous(sch: s_tir.Schedule, blk) -> bool:
    """Whether every buffer the block reads is indexed by its innermost iteration variable in
    the last dimension (else vectorising the inner loop turns loads into gathers)."""
    block = sch.get(blk)
    if not block.iter_vars:
        return True
    last = block.iter_vars[-1].var.name
    for r in block.reads:
        if not r.region:
            continue
        idx = str(r.region[-1].min)
        if last not in idx or int(r.region[-1].extent) != 1:
            if len(r.region) == 1 and not _is_one(r.region[0].extent):
                continue                 # a whole small vector (per-channel params)
            if all(_is_one(d.extent) and last not in str(d.min) for d in r.region):
                continue                 # a broadcast scalar
            return False
    return True


def _parallel_vectorize(sch: s_tir.Schedule, blk, lanes: int) -> None:
    """Spatial block: fuse the outer loops in parallel, vectorise the innermost by ``lanes``."""
    loops = sch.get_loops(blk)
    if not loops:
        return
    work = _work(sch, loops)
    serial = work is not None and work < MIN_PARALLEL_ELEMENTS
    if not _inner_contiguous(sch, blk):
        if _tile_transpose(sch, blk, loops, serial):
            return
        lanes = 1 << 30                  # a transpose-like read: gathers cost more than scalars
    inner = loops[-1]
    ext = _extent(sch, inner)
    outer = loops[:-1]
    if ext is not None and ext % lanes == 0 and ext >= lanes:
        io, iv = sch.split(inner, [None, lanes])
        sch.vectorize(iv)
        # the row loop stays inside each parallel iteration: folded into the parallel loop,
        # every vector paid for div/mod index arithmetic (an add ran at 2.5x onnxruntime's time)
        if not outer:
            outer = [io]
    if outer and not serial:
        fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
        sch.parallel(fused)


_TRANSPOSE_TILE = 16


def _tile_transpose(sch: s_tir.Schedule, blk, loops, serial: bool) -> bool:
    """A transpose-like block over two inner loops (y, x) whose source is contiguous along y:
    walk it in 16 x 16 tiles, so the rows read and the rows written both stay in L1 (the
    untiled loop strides a whole source row per element; 8 ms for the 1024 x 1024 attention
    matrix). Returns False (nothing changed) where the extents do not split into tiles."""
    if len(loops) < 2:
        return False
    y, x = loops[-2], loops[-1]
    ey, ex = _extent(sch, y), _extent(sch, x)
    if ey is None or ex is None or ey % _TRANSPOSE_TILE or ex % _TRANSPOSE_TILE:
        return False
    yo, yi = sch.split(y, [None, _TRANSPOSE_TILE])
    xo, xi = sch.split(x, [None, _TRANSPOSE_TILE])
    sch.reorder(yo, xo, yi, xi)
    if not serial:
        sch.parallel(sch.fuse(*loops[:-2], yo) if len(loops) > 2 else yo)
    return True


def _parallel_reduction(sch: s_tir.Schedule, blk, lanes: int = 1) -> None:
    """Reduction block: parallel over its leading spatial loops (if any extent > 1 and the
    block is big enough), the innermost reduction vectorised where it can be."""
    block = sch.get(blk)
    loops = sch.get_loops(blk)
    n_spatial = 0
    for iv in block.iter_vars:
        if int(iv.iter_type) != 0:
            break
        n_spatial += 1
    spatial = loops[:n_spatial]
    if not spatial:
        return
    work = _work(sch, loops)
    fused = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
    ext = _extent(sch, fused)
    if (ext is None or ext > 1) and (work is None or work >= MIN_PARALLEL_ELEMENTS):
        sch.parallel(fused)
    if lanes > 1:
        _vectorize_inner_reduction(sch, blk, lanes)


def _vectorize_inner_reduction(sch: s_tir.Schedule, blk, lanes: int) -> None:
    """A reduction over one innermost, contiguously read axis (softmax's max and sum, row sums)
    accumulates ``lanes`` partial results in a vector (``rfactor``), then folds them: the
    scalar loop ran ~7 ns per element for the 1024 x 1024 attention softmax."""
    block = sch.get(blk)
    n_red = sum(1 for iv in block.iter_vars if int(iv.iter_type) == 2)
    loops = sch.get_loops(blk)
    if any(int(iv.iter_type) != 2 for iv in block.iter_vars[len(block.iter_vars) - n_red:]) \
            or len(loops) < n_red or not _inner_contiguous(sch, blk):
        return
    inner = sch.fuse(*loops[-n_red:]) if n_red > 1 else loops[-1]   # GroupNorm: (c, y, x)
    ext = _extent(sch, inner)
    if ext is None or ext % lanes or ext < 4 * lanes:
        return
    _, ki = sch.split(inner, [None, lanes])
    rf = sch.rfactor(ki, factor_axis=len(block.iter_vars) - n_red)   # partials [..., lanes]
    rf_loops = sch.get_loops(rf)
    sch.vectorize(rf_loops[-1])
    if len(rf_loops) > 2:                       # fold each row's partials right after its loop,
        sch.reverse_compute_at(blk, rf_loops[-3])   # so they can stay in a register
        for i in range(len(sch.get(rf).writes)):   # GroupNorm: sum and sum of squares
            sch.set_scope(rf, i, "local")


def _block_exists(sch: s_tir.Schedule, name: str) -> bool:
    try:
        sch.get_sblock(name)
        return True
    except Exception:  # noqa: BLE001
        return False


def _inline_epilogue(sch: s_tir.Schedule, after: list[str]) -> None:
    """Fold the blocks after a cache_write into its write-back: first inline the intermediate
    ones into their consumers (a value read twice, e.g. x in x * sigmoid(x), must not be
    reverse-inlined: TVM 0.27 then leaves a dangling buffer), then reverse-inline what is left,
    which must be a single output block. Raises if that is not possible."""
    for name in after[:-1]:
        try:
            sch.compute_inline(sch.get_sblock(name))
        except Exception:  # noqa: BLE001 - checked below
            pass
    left = [n for n in after if _block_exists(sch, n)]
    if len(left) > 1:
        raise ValueError(f"epilogue blocks {left} do not fold into one")
    for name in left:
        sch.reverse_compute_inline(sch.get_sblock(name))


# ---------------------------------------------------------------------------------- rules
def schedule_conv2d_nchw(sch: s_tir.Schedule, variant: KernelVariant) -> None:
    conv = sch.get_sblock("conv2d_nchw")
    block = sch.get(conv)
    n_, f_, h_, w_ = (int(iv.dom.extent) for iv in block.iter_vars[:4])
    kh = int(block.iter_vars[5].dom.extent)
    lanes = _LANES[variant]
    ob, nvec = _CONV_TILES[variant][3 if kh > 1 else 1]
    lanes = pick_divisor(w_, [d for d in (lanes, 8, 4) if d <= lanes])
    ob, nvec = register_tile(f_, w_ // lanes, ob, nvec)

    # consumers of the conv (bias add, activations, residual) -> inlined into the write-back
    root_names = [sch.get(b).name_hint for b in _root_blocks(sch)]
    after = root_names[root_names.index("conv2d_nchw") + 1:]
    before = root_names[:root_names.index("conv2d_nchw")]
    for name in before:                      # pad_temp etc.: keep, parallel
        blk = sch.get_sblock(name)
        if kh == 1 and name == "pad_temp":   # a plain copy for 1x1 convs
            try:
                sch.compute_inline(blk)
                continue
            except Exception:  # noqa: BLE001
                pass
        if not _is_reduction(sch, blk):
            loops = sch.get_loops(blk)
            sch.parallel(sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0])

    # weights: repack [O, I, kh, kw] -> [O/ob, I, kh, kw, ob] (contiguous ob-vector per tap)
    reads = [r.source.name for r in block.reads]
    w_idx = next(i for i, r in enumerate(block.reads) if len(r.source.shape) == 4
                 and "pad" not in reads[i] and int(r.source.shape[0]) == f_
                 and int(r.source.shape[2]) == kh)
    if ob > 1 and f_ % ob == 0:
        wblk = sch.cache_read(conv, w_idx, "global")
        sch.transform_layout(wblk, ("write", 0),
                             lambda o, i, y, x: (o // ob, i, y, x, o % ob))
        wl = sch.get_loops(wblk)
        sch.parallel(wl[0])

    x_pack = _pack_pointwise_input(sch, conv, nvec * lanes) if kh == 1 else None
    wb = sch.cache_write(conv, 0, "local")
    _inline_epilogue(sch, after)

    nn, ff, yy, xx, rc, ry, rx = sch.get_loops(conv)
    fo, fi = sch.split(ff, [None, ob])
    xo, xi, xv = sch.split(xx, [None, nvec, lanes])
    if kh == 1 and f_ > h_ * w_ and f_ // ob >= 4:
        # more weights than input (a 1x1 conv at the bottleneck: 512 -> 1536 at 16x16): each
        # thread keeps its filter block's weights in cache and walks the whole (small) input;
        # row-parallel, every row streamed all the weights (3 MB) from L2 / L3 again
        sch.reorder(fo, nn, yy, xo, rc, ry, rx, fi, xi, xv)
        sch.parallel(fo)
        if x_pack is not None:
            pl = sch.get_loops(x_pack)
            sch.parallel(sch.fuse(*pl[:2]))
            sch.vectorize(sch.split(pl[-1], [None, lanes])[1])
        at = xo
    else:
        sch.reorder(nn, yy, xo, fo, rc, ry, rx, fi, xi, xv)
        row = sch.fuse(nn, yy)
        sch.parallel(row)
        if x_pack is not None:
            sch.compute_at(x_pack, row)
            px = sch.get_loops(x_pack)[-1]
            sch.vectorize(sch.split(px, [None, lanes])[1])
        at = fo
    # write-back tile: ob filters x (nvec * lanes) columns
    wf = finish_register_tile(sch, conv, wb, at, (fi, xi, rx), xv, lanes, rc)[-1]
    sch.unroll(wf)


def schedule_winograd(sch: s_tir.Schedule, variant: KernelVariant) -> None:
    """A fused PrimFunc around :func:`.winograd.winograd_conv2d_compute` (epilogue inlined)."""
    names = [sch.get(b).name_hint for b in _root_blocks(sch)]
    first, last = names.index(winograd.BLOCK_NAMES[0]), names.index(winograd.BLOCK_NAMES[-1])
    for name in names[:first]:                   # e.g. an injective op fused before the conv
        sch.compute_inline(sch.get_sblock(name))
    _inline_epilogue(sch, names[last + 1:])
    rows, nvec = _WINOGRAD_TILES[variant]
    winograd.schedule_winograd(sch, _LANES[variant], rows, nvec)


def _pack_pointwise_input(sch: s_tir.Schedule, conv, width: int):
    """A 1x1 conv reads, for each output column tile, ``width`` floats from every input channel:
    C rows one plane (H*W floats, a multiple of 4 KiB) apart, which all fall into the same L1
    sets. Repack each input row to [W / width, C, width] (done per output row, next to its use)
    so that the channel loop reads one contiguous panel. Returns the packing block, or None
    where the conv does not read its input plainly (a padded or strided 1x1)."""
    block = sch.get(conv)
    h_ext, w_ext = (int(iv.dom.extent) for iv in block.iter_vars[2:4])
    if w_ext % width:
        return None
    x_var = block.iter_vars[3].var
    for idx, region in enumerate(block.reads):
        dims, shape = region.region, region.source.shape
        # the input read at [n, c, y (+ ry), x (+ rx)]: same H, W as the output (stride 1, no pad)
        if len(dims) == 4 and x_var.name in str(dims[3].min) and "*" not in str(dims[3].min) \
                and (int(shape[2]), int(shape[3])) == (h_ext, w_ext) \
                and not region.source.same_as(block.writes[0].source):
            pack = sch.cache_read(conv, idx, "global")
            sch.transform_layout(pack, ("write", 0), lambda n, c, y, x: (
                n, y, x // width, c, x % width))
            return pack
    return None


def schedule_matmul(sch: s_tir.Schedule, variant: KernelVariant) -> None:
    """``matmul`` (A[..., i, k] x B[..., k, j], B contiguous along j): register tile of
    ``ib`` rows x (nvec x lanes) columns, accumulation in ``local``, epilogue inlined into the
    write-back, parallel over (batch, row tiles)."""
    mm = sch.get_sblock("matmul")
    block = sch.get(mm)
    n_sp = sum(1 for iv in block.iter_vars if int(iv.iter_type) == 0)
    n_red = len(block.iter_vars) - n_sp
    if n_sp < 2 or n_red != 1:
        raise ValueError("matmul rule: expected [..., i, j] x k")
    loops = sch.get_loops(mm)
    i_ext = int(block.iter_vars[n_sp - 2].dom.extent)
    j_ext = int(block.iter_vars[n_sp - 1].dom.extent)
    lanes = pick_divisor(j_ext, [d for d in (_LANES[variant], 8, 4) if d <= _LANES[variant]])
    ib, nvec = _MATMUL_TILES[variant]
    ib, nvec = register_tile(i_ext, j_ext // lanes, ib, nvec)
    root_names = [sch.get(b).name_hint for b in _root_blocks(sch)]
    after = root_names[root_names.index("matmul") + 1:]
    for name in root_names[:root_names.index("matmul")]:
        try:
            sch.compute_inline(sch.get_sblock(name))
        except Exception:  # noqa: BLE001
            _parallel_vectorize(sch, sch.get_sblock(name), _LANES[variant])
    _pack_matmul_rhs(sch, mm, n_sp, nvec * lanes, i_ext // ib)
    wb = sch.cache_write(mm, 0, "local")
    _inline_epilogue(sch, after)     # all of it, or the generic rule takes over
    loops = sch.get_loops(mm)
    batch, (i, j, k) = loops[:n_sp - 2], loops[n_sp - 2:]
    io, ii = sch.split(i, [None, ib])
    jo, jn, jv = sch.split(j, [None, nvec, lanes])
    sch.reorder(*batch, io, jo, k, ii, jn, jv)
    outer = sch.fuse(*batch, io) if batch else io
    work = _work(sch, sch.get_loops(mm))
    if work is None or work >= MIN_PARALLEL_ELEMENTS:
        sch.parallel(outer)
    finish_register_tile(sch, mm, wb, jo, (ii, jn), jv, lanes, k)


def _pack_matmul_rhs(sch: s_tir.Schedule, mm, n_sp: int, width: int, row_tiles: int) -> None:
    """Repack B[..., k, j] into column panels [..., j / width, k, width] when several row tiles
    reuse them: the inner loop then reads one contiguous panel instead of ``width`` floats from
    each of k rows. Rows 4 KiB apart (1024 floats: the attention matrices) all map to the same
    L1 sets, which made the bottleneck attention's matmuls L2-bound."""
    block = sch.get(mm)
    j_var = block.iter_vars[n_sp - 1].var
    k_var = block.iter_vars[n_sp].var
    k_ext = int(block.iter_vars[n_sp].dom.extent)
    if row_tiles < 4 or k_ext < 16:
        return
    for idx, region in enumerate(block.reads):
        dims = region.region
        if len(dims) < 2 or region.source.same_as(block.writes[0].source):
            continue
        last, second = str(dims[-1].min), str(dims[-2].min)
        if last == j_var.name and second == k_var.name:
            nb = len(dims) - 2
            packed = sch.cache_read(mm, idx, "global")
            sch.transform_layout(packed, ("write", 0), lambda *ax: (
                *ax[:nb], ax[nb + 1] // width, ax[nb], ax[nb + 1] % width))
            ploops = sch.get_loops(packed)
            sch.parallel(sch.fuse(*ploops[:-1]) if len(ploops) > 2 else ploops[0])
            return


def schedule_row_softmax(sch: s_tir.Schedule, variant: KernelVariant) -> None:
    """:func:`_row_softmax_te` (plus fused neighbours): parallel over rows, each row's max,
    exp, sum and scaling inside its iteration, the exp row and the partials in local buffers,
    vectorised."""
    lanes = _LANES[variant]
    names = [sch.get(b).name_hint for b in _root_blocks(sch)]
    for name in names[:names.index("softmax_pmax")]:         # e.g. a fused scaling before it
        sch.compute_inline(sch.get_sblock(name))
    sch.compute_inline(sch.get_sblock("softmax_shift"))
    norm = sch.get_sblock("softmax_norm")
    _inline_epilogue(sch, names[names.index("softmax_norm") + 1:])
    loops = sch.get_loops(norm)
    row = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
    sch.parallel(row)
    for name in ("softmax_inv", "softmax_sum", "softmax_psum", "T_fast_exp", "softmax_max",
                 "softmax_pmax"):
        sch.compute_at(sch.get_sblock(name), row)
    for name in ("T_fast_exp", "softmax_pmax", "softmax_psum"):
        sch.set_scope(sch.get_sblock(name), 0, "local")
    for name in ("softmax_pmax", "softmax_psum"):            # (lane, ko) -> ko, lane (vector)
        blk = sch.get_sblock(name)
        if int(sch.get(blk).iter_vars[-2].dom.extent) > 1:   # (a row of 7: one partial)
            lane, ko = sch.get_loops(blk)[-2:]
            sch.reorder(ko, lane)
            sch.vectorize(lane)
    for blk in (sch.get_sblock("T_fast_exp"), norm):
        inner = sch.get_loops(blk)[-1]
        if (_extent(sch, inner) or 0) % lanes == 0:
            sch.vectorize(sch.split(inner, [None, lanes])[1])


def schedule_with_reduction(sch: s_tir.Schedule, variant: KernelVariant, *,
                            vector_reductions: bool = True) -> None:
    _inline_spatial_producers(sch)
    for blk in _root_blocks(sch):
        if _is_reduction(sch, blk):
            _parallel_reduction(sch, blk, _LANES[variant] if vector_reductions else 1)
        else:
            _parallel_vectorize(sch, blk, _LANES[variant])


def schedule_elementwise(sch: s_tir.Schedule, variant: KernelVariant) -> None:
    _inline_spatial_producers(sch)
    for blk in _root_blocks(sch):
        _parallel_vectorize(sch, blk, _LANES[variant])


def schedule_primfunc(func: tirx.PrimFunc, variant: KernelVariant,
                      target: tvm.target.Target | None = None) -> tuple[tirx.PrimFunc, str]:
    """Schedule one legalized PrimFunc; returns (function, rule name). Falls back rule by rule
    (conv -> reduction -> elementwise -> unscheduled) if a schedule primitive refuses."""
    sch0 = s_tir.Schedule(func)
    names = {sch0.get(b).name_hint for b in _root_blocks(sch0)} if _has_root(sch0) else set()
    has_red = _has_root(sch0) and any(_is_reduction(sch0, b) for b in _root_blocks(sch0))
    rules = []
    if "wino_gemm" in names:
        rules.append(("winograd", schedule_winograd))
    if "conv2d_nchw" in names:
        rules.append(("conv2d_nchw", schedule_conv2d_nchw))
    if "matmul" in names:
        rules.append(("matmul", schedule_matmul))
    if set(_SOFTMAX_BLOCKS) <= names:
        rules.append(("softmax", schedule_row_softmax))
    if has_red:
        rules.append(("reduction", schedule_with_reduction))
        rules.append(("reduction", lambda s, v: schedule_with_reduction(s, v, vector_reductions=False)))
    else:
        rules.append(("elementwise", schedule_elementwise))
    for rule_name, rule in rules:
        sch = s_tir.Schedule(func)
        try:
            rule(sch, variant)
            _check_lowers(sch.mod["main"], target)
        except Exception as e:  # noqa: BLE001 - try the next, more generic rule
            _log.debug("schedule rule %s failed: %s", rule_name, e)
            continue
        return sch.mod["main"], rule_name
    return func, "unscheduled"


def _check_lowers(func: tirx.PrimFunc, target) -> None:
    """Run the buffer-lowering part of TVM's s_tir pipeline (no code generation) on a scheduled
    function, so a schedule that TVM accepts but cannot lower (e.g. a dangling buffer after an
    inline) falls back to the next rule instead of failing the whole build."""
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    st = s_tir.transform
    seq = tvm.transform.Sequential([
        st.CanonicalizeLoop(), st.LowerInitBlock(), st.PlanAndUpdateBufferAllocationLocation(),
        st.ConvertBlocksToOpaque(), st.CompactBufferAllocation(), st.LowerMatchBuffer(),
        st.LowerOpaqueBlock(), tirx.transform.FlattenBuffer(),
        tirx.transform.VectorizeLoop(True)])
    if target is not None:
        with target:
            seq(mod)
    else:
        seq(mod)


def _has_root(sch: s_tir.Schedule) -> bool:
    try:
        sch.get_sblock("root")
        return True
    except Exception:  # noqa: BLE001
        return False


@tvm.transform.module_pass(opt_level=0, name="bidiff.ScheduleFloatOps")
class ScheduleFloatOps:
    """Schedule every PrimFunc not marked ``tirx.is_scheduled`` for ``target``."""

    def __init__(self, target: tvm.target.Target):
        self.variant = select_variant(target)
        self.target = target

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        updates = {}
        for gv, func in mod.functions.items():
            if not isinstance(func, tirx.PrimFunc):
                continue
            if func.attrs is not None and func.attrs.get("tirx.is_scheduled", False):
                continue
            new, rule = schedule_primfunc(func, self.variant, self.target)
            updates[gv] = new.with_attr("tirx.is_scheduled", True).with_attr(SCHEDULE_ATTR, rule)
        for gv, func in updates.items():
            mod[gv] = func
        return mod


def relax_pipeline(target: tvm.target.Target) -> tvm.transform.Pass:
    """``cpu_generic``'s pipeline with fast sigmoid legalization and :class:`ScheduleFloatOps`
    placed after FuseTIR (before the dataflow lowering)."""

    @tvm.transform.module_pass(opt_level=0, name="bidiff.relax_pipeline")
    def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:
            seq = tvm.transform.Sequential(
                cpu_pipeline.library_dispatch_passes(target)
                + [relax.transform.LegalizeOps(
                    {**LEGALIZE, "relax.nn.conv2d": winograd.LegalizeWinograd()}),
                   relax.transform.AnnotateTIROpPattern(),
                   # no FoldConstant: it JIT-compiles every constant subexpression one by one
                   # (18 s of a 30 s build for the tiny config); what it would fold here are
                   # parameter reshapes, which cost microseconds per call
                   relax.transform.FuseOps(),
                   relax.transform.FuseTIR()]
                + [ScheduleFloatOps(target)]
                + cpu_pipeline.dataflow_lower_passes(target)
                + cpu_pipeline.finalize_passes(target))
            return seq(mod)

    return _pipeline
