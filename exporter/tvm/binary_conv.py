"""Bit-serial ``BinaryConv2d`` for TVM: one TE compute, hand ``s_tir`` schedules per CPU family.

The arithmetic is the one of :func:`bidiff.runtime.binary_op.binary_conv2d_reference`
(bit conventions are imported from there, never restated):

1. ``pack``: activation bits ``x[c] >= threshold[c]`` packed along channels into words (their
   size per variant: :func:`word_bits`), layout ``[N, words, H, W]`` so that the inner loop over
   output columns reads contiguous words;
2. ``pad``: the packed words with a zero border (only the packed words are padded, C/32 times
   smaller than the float input);
3. ``bconv``: ``acc = sum over valid taps and words of popcount(a ^ w)`` (taps in the zero
   padding are masked out), then ``y = scale[f] * (C * n_valid - 2 * acc)`` where ``n_valid`` is
   the number of in-image taps of the output pixel;
4. optional epilogue (``EPILOGUE_RPRELU``): ``y = PReLU(y + b0, slope) + b1`` and/or the identity
   shortcut ``y += x`` (BIConv = TaA(conv(sign(TaR(x)))) + x, TaR folded into ``threshold``).

Padding bits past the last channel are 0 in weights and activations, so they never count as a
mismatch. Kernel variants are named in :class:`KernelVariant` and chosen for a target in one
place, :func:`select_variant`.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import tvm
from tvm import s_tir, te, tirx

from bidiff.exporter.tvm.schedule_helpers import pick_divisor
from bidiff.runtime.binary_op import WORD_BITS, num_words


class KernelVariant(enum.Enum):
    """The binary-conv schedules; :func:`select_variant` is the only place that picks one."""

    X86_AVX512 = "x86_avx512"      # AVX-512 VPOPCNTDQ: vpopcntd / vpopcntq on zmm registers
    X86_AVX2 = "x86_avx2"          # AVX2: LLVM's nibble-lookup (vpshufb) popcount on ymm
    ARM_NEON = "arm_neon"          # AArch64 NEON: cnt.16b + pairwise adds
    GENERIC = "generic"            # any other LLVM target: parallel, no vector width assumptions


# Register budget per variant: (output channels per tile, vectors per tile, lanes per vector of
# 32-bit words). ob * nvec accumulators stay in registers (32 zmm / 16 ymm / 32 q registers).
_TILES: dict[KernelVariant, tuple[int, int, int]] = {
    KernelVariant.X86_AVX512: (8, 2, 16),
    KernelVariant.X86_AVX2: (4, 2, 8),
    KernelVariant.ARM_NEON: (4, 2, 4),
    KernelVariant.GENERIC: (4, 1, 4),
}


def vector_lanes32(variant: KernelVariant) -> int:
    """32-bit lanes per vector register the variant's schedule assumes (8 for AVX2's ymm)."""
    return _TILES[variant][2]


def select_variant(target: tvm.target.Target) -> KernelVariant:
    """Pick the binary-conv schedule for an LLVM ``target`` (by its triple and CPU features)."""
    triple = str(target.attrs.get("mtriple", "") or "")
    if triple.startswith("x86_64"):
        if tvm.target.codegen.target_has_features("avx512vpopcntdq", target) and \
                tvm.target.codegen.target_has_features("avx512f", target):
            return KernelVariant.X86_AVX512
        if tvm.target.codegen.target_has_features("avx2", target):
            return KernelVariant.X86_AVX2
        return KernelVariant.GENERIC
    if triple.startswith("aarch64"):
        return KernelVariant.ARM_NEON
    return KernelVariant.GENERIC


EPILOGUES = ("none", "rprelu")


@dataclass(frozen=True)
class BinaryConvShape:
    """Static shape and options of one binary conv layer (stride 1, 'same' padding)."""

    channels: int
    filters: int
    height: int
    width: int
    kernel: int = 3
    epilogue: str = "none"          # "none" | "rprelu" (y = PReLU(y + b0, slope) + b1)
    residual: bool = False          # add the conv's own input x (needs filters == channels)
    batch: int = 1
    # a channel Gather or Split folded into the kernel (CS-Fusion's odd/even mix, CP-Down's
    # halves): conv input channel c is channel channel_map[c] of x, which has source_channels
    # channels; () = x as it is
    channel_map: tuple[int, ...] = ()
    source_channels: int = 0
    addend: bool = False            # add an [N, F, H, W] input last (a ResBlock's skip, ...)

    def __post_init__(self):
        if self.kernel not in (1, 3):
            raise ValueError(f"binary conv kernel must be 1 or 3, got {self.kernel}")
        if self.epilogue not in EPILOGUES:
            raise ValueError(f"unknown epilogue {self.epilogue!r}; valid: {', '.join(EPILOGUES)}")
        if self.residual and self.filters != self.channels:
            raise ValueError(f"identity residual needs filters == channels, got "
                             f"{self.filters} != {self.channels}")
        if self.channel_map:
            if len(self.channel_map) != self.channels or \
                    not all(0 <= i < self.source_channels for i in self.channel_map):
                raise ValueError(f"channel_map needs {self.channels} indices into "
                                 f"{self.source_channels} channels")
            if len(affine_pieces(self.channel_map)) > MAX_MAP_PIECES:
                raise ValueError(f"channel_map is not piecewise affine in at most "
                                 f"{MAX_MAP_PIECES} pieces")

    @property
    def pad(self) -> int:
        return self.kernel // 2


def word_bits(shape: BinaryConvShape, variant: KernelVariant) -> int:
    """Bits per packed word of the kernel for ``shape`` under ``variant``.

    x86 and generic: 64 when the channels fill 64-bit words exactly (word k = uint32 words
    2k | 2k+1 << 32), else the 32-bit words as packed; AVX2 / AVX-512 reduce a vector of 64-bit
    popcounts with one ``vpsadbw`` / have ``vpopcntq``. NEON: 16 bits, because ``cnt`` counts
    bytes and every widening step is another pairwise add: a uint16 lane's count is ``cnt`` plus
    one ``uaddlp`` (fused with the accumulate into ``uadalp`` where no padding mask sits between,
    as in the 1x1 kernels), a uint64 lane's ``cnt`` plus three ``uaddlp``. A uint16 sum holds
    9 * C <= 65535 (C <= 7281 channels); wider layers keep 32 bits.
    """
    if variant is KernelVariant.ARM_NEON and shape.kernel ** 2 * shape.channels <= 0xFFFF:
        return 16
    return 64 if shape.channels % 64 == 0 else WORD_BITS


def _num_words(shape: BinaryConvShape, bits: int) -> int:
    return (shape.channels + bits - 1) // bits


MAX_MAP_PIECES = 4


def affine_pieces(index: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """``index`` as runs ``(start, first value, stride)``: index[c] = value + stride * (c - start)
    until the next run. A channel Gather folds into the kernel as a few compares per packed
    word instead of a lookup table (CS-Fusion's halves are 2 runs of stride 2)."""
    pieces: list[tuple[int, int, int]] = []
    c = 0
    while c < len(index):
        stride = index[c + 1] - index[c] if c + 1 < len(index) else 1
        end = c + 1
        while end < len(index) and index[end] - index[end - 1] == stride:
            end += 1
        pieces.append((c, index[c], stride))
        c = end
    return pieces


def _channel_source(shape: BinaryConvShape, c):
    """The channel of x that conv input channel ``c`` (an expression) reads."""
    if not shape.channel_map:
        return c
    pieces = affine_pieces(shape.channel_map)
    ends = [start for start, _, _ in pieces[1:]]
    start, value, stride = pieces[-1]
    src = value + stride * (c - start)
    for (start, value, stride), end in zip(reversed(pieces[:-1]), reversed(ends)):
        src = tirx.Select(c < end, value + stride * (c - start), src)
    return src


def _round_up(v: int, m: int) -> int:
    return (v + m - 1) // m * m


def binary_conv_compute(shape: BinaryConvShape, *, col_multiple: int = 1,
                        word: int = WORD_BITS):
    """TE compute; returns (inputs list, output tensor). Inputs are, in order:
    ``x`` f32 [N,C,H,W], ``w_packed`` u32 [F,k,k,ceil(C/32)], ``scale`` f32 [F],
    ``threshold`` f32 [C], then ``b0, slope, b1`` f32 [F] for the RPReLU epilogue, then
    ``addend`` f32 [N,F,H,W] with ``shape.addend``.

    ``col_multiple``: the accumulation runs over a width rounded up to this multiple (extra
    columns read zero words and are never stored), so the column loop vectorises for any W.
    ``word``: bits per packed word (:func:`word_bits`); the popcounts are summed at that width.
    """
    n_, c_, h_, w_, f_, k = (shape.batch, shape.channels, shape.height, shape.width,
                             shape.filters, shape.kernel)
    p = shape.pad
    wb = word
    nwords = _num_words(shape, wb)
    wdt = f"uint{wb}"
    wc = _round_up(w_, col_multiple)

    x = te.placeholder((n_, shape.source_channels if shape.channel_map else c_, h_, w_),
                       "float32", name="x")
    w32 = te.placeholder((f_, k, k, num_words(c_)), "uint32", name="w_packed")
    scale = te.placeholder((f_,), "float32", name="scale")
    thr = te.placeholder((c_,), "float32", name="threshold")
    extra = []
    if shape.epilogue == "rprelu":
        extra = [te.placeholder((f_,), "float32", name=nm) for nm in ("b0", "slope", "b1")]
    if shape.addend:
        extra.append(te.placeholder((n_, f_, h_, w_), "float32", name="addend"))

    def pack_word(n, wd, y, xx):
        val = tirx.const(0, wdt)
        for b in range(wb):
            c = wd * wb + b
            # channel index clamped so the load stays in bounds; the bit is masked instead
            cc = tirx.min(c, c_ - 1) if (nwords * wb > c_) else c
            bit = tirx.Select(x[n, _channel_source(shape, cc), y, xx] >= thr[cc],
                              tirx.const(1 << b, wdt),
                              tirx.const(0, wdt))
            if nwords * wb > c_:
                bit = tirx.Select(c < c_, bit, tirx.const(0, wdt))
            val = val | bit
        return val

    packed = te.compute((n_, nwords, h_, w_), pack_word, name="pack")

    hp, wp = h_ + 2 * p, wc + 2 * p
    if p or wc != w_:
        padded = te.compute(
            (n_, nwords, hp, wp),
            lambda n, wd, yy, xx: tirx.if_then_else(
                tirx.all(yy >= p, yy < h_ + p, xx >= p, xx < w_ + p),
                packed[n, wd, yy - p, xx - p], tirx.const(0, wdt)),
            name="pad")
    else:
        padded = packed

    if wb == 64:
        wq = te.compute(
            (f_, k, k, nwords),
            lambda f, i, j, q: w32[f, i, j, 2 * q].astype(wdt)
            | (w32[f, i, j, 2 * q + 1].astype(wdt) << tirx.const(32, wdt)),
            name="wpack64")
    elif wb == 16:
        wq = te.compute(
            (f_, k, k, nwords),
            lambda f, i, j, q: ((w32[f, i, j, q // 2] >> ((q % 2) * 16).astype("uint32"))
                                & tirx.const(0xFFFF, "uint32")).astype(wdt),
            name="wsplit16")
    else:
        wq = w32

    rw = te.reduce_axis((0, nwords), name="rw")
    ry = te.reduce_axis((0, k), name="ry")
    rx = te.reduce_axis((0, k), name="rx")

    def tap(n, f, y, xx):
        pc = tirx.popcount(padded[n, rw, y + ry, xx + rx] ^ wq[f, ry, rx, rw])
        if p == 0:
            return te.sum(pc, axis=[rw, ry, rx])
        yy, xi = y + ry - p, xx + rx - p
        valid = tirx.all(yy >= 0, yy < h_, xi >= 0, xi < w_)
        return te.sum(tirx.Select(valid, pc, tirx.const(0, wdt)), axis=[rw, ry, rx])

    acc = te.compute((n_, f_, h_, wc), tap, name="bconv")

    def n_valid(y, xx):
        if p == 0:
            return tirx.const(1, "int32")
        rows = tirx.min(y + p, h_ - 1) - tirx.max(y - p, 0) + 1
        cols = tirx.min(xx + p, w_ - 1) - tirx.max(xx - p, 0) + 1
        return rows * cols

    def epi(n, f, y, xx):
        dot = n_valid(y, xx) * c_ - 2 * acc[n, f, y, xx].astype("int32")
        v = scale[f] * dot.astype("float32")
        if shape.epilogue == "rprelu":
            b0, slope, b1 = extra[:3]
            v = v + b0[f]
            v = tirx.Select(v >= tirx.const(0.0, "float32"), v, slope[f] * v) + b1[f]
        if shape.residual:
            v = v + x[n, _channel_source(shape, f), y, xx]
        if shape.addend:
            v = v + extra[-1][n, f, y, xx]
        return v

    out = te.compute((n_, f_, h_, w_), epi, name="epilogue")
    return [x, w32, scale, thr, *extra], out


MIN_PARALLEL_WORK = 65536
WRITE_BACK_BLOCK_BYTES = 4096
ROW_WRITE_BACK_BYTES = 32768


def schedule_binary_conv(func: tirx.PrimFunc, shape: BinaryConvShape,
                         variant: KernelVariant) -> tirx.PrimFunc:
    """Hand schedule: tile (filters x columns) with register accumulators, parallel over rows."""
    ob, nvec, lanes32 = _TILES[variant]
    wb = word_bits(shape, variant)
    vec = lanes32 * 32 // wb                          # lanes of one register in words
    if variant is KernelVariant.X86_AVX512 and wb == 32:
        nvec = 1                                      # 16 lanes x 8 filters = 8 zmm already
        ob = 8
    ob = pick_divisor(shape.filters, tuple(d for d in (ob, 8, 4, 2) if d <= ob))
    tile_x = vec * nvec
    sch = s_tir.Schedule(func)
    # small layers (the low-resolution levels of a tile) run on one thread: waking the pool
    # costs more than ~64K word operations
    work = (shape.filters * shape.height * shape.width * shape.kernel ** 2
            * _num_words(shape, 64))
    par = sch.parallel if work >= MIN_PARALLEL_WORK else (lambda loop: None)

    # pack: parallel over (n, word, row), vectorised over columns
    blk = sch.get_sblock("pack")
    n, wd, y, xx = sch.get_loops(blk)
    par(sch.fuse(n, wd, y))
    pv = pick_divisor(shape.width, (16, 8, 4))
    if pv > 1:
        _, xv = sch.split(xx, [None, pv])
        sch.vectorize(xv)

    try:
        pad = sch.get_sblock("pad")
    except Exception:   # noqa: BLE001 - no padding stage for 1x1 kernels on aligned widths
        pad = None
    if pad is not None:
        n, wd, y, xx = sch.get_loops(pad)
        par(sch.fuse(n, wd, y))

    if wb in (16, 64):
        wblk = sch.get_sblock("wpack64" if wb == 64 else "wsplit16")
        sch.fuse(*sch.get_loops(wblk))       # F*k*k*words: tiny, one thread

    conv = sch.get_sblock("bconv")
    n, f, y, xx, rw, ry, rx = sch.get_loops(conv)
    fo, fi = sch.split(f, [None, ob])
    xo, xi, xv = sch.split(xx, [None, nvec, vec])
    sch.reorder(n, y, xo, fo, rw, ry, rx, fi, xi, xv)
    row_wb = shape.filters * _round_up(shape.width, tile_x) * 4 <= ROW_WRITE_BACK_BYTES
    outer = sch.fuse(n, y) if row_wb else sch.fuse(n, y, xo)
    par(outer)
    sch.set_scope(conv, 0, "local")
    epi = sch.get_sblock("epilogue")
    # Write back after all filter tiles of a column tile when their accumulators fit in 4 KB:
    # the write-back then walks the filter planes one after another instead of touching ob
    # planes (64 KB apart at 128x128) of the output and the residual input at once. AVX2, 1
    # thread, kernel alone: 16 and 32 channels at 128x128 1.2-1.5x faster, 64 at 64x64 the
    # same; the shipped model's step 3-9% faster in 5 of 6 interleaved A/B runs.
    # Better still, when a whole row's accumulators fit in 32 KB: write back once per row, so
    # each plane's row is read and written in one contiguous run (a column tile's write-back
    # touches every plane's 64 bytes, all in the same L1 sets). AVX2, 2 threads, kernel alone:
    # 512@16x16 / 256@32x32 0.89 / 0.75 of the time, 32@128x128 1x1 0.81, others the same;
    # shipped step 0.95 / 0.91, official 0.97 (interleaved A/B, both libraries in one process).
    wb_all = shape.filters * tile_x * 4 <= WRITE_BACK_BLOCK_BYTES
    sch.reverse_compute_at(epi, outer if wb_all or row_wb else fo)
    sch.unroll(ry)
    sch.unroll(rx)
    sch.unroll(fi)
    sch.unroll(xi)
    sch.vectorize(xv)
    # epilogue tile: filters x columns; vectorise the columns when the tile is never clipped
    e_loops = sch.get_loops(epi)
    ef, ex = e_loops[-2], e_loops[-1]
    if shape.width % tile_x == 0:
        ex_o, ex_v = sch.split(ex, [None, lanes32])
        if not row_wb:
            sch.unroll(ex_o)
        sch.vectorize(ex_v)
    if not row_wb:
        sch.unroll(ef)
    sch.decompose_reduction(conv, rw)
    return sch.mod["main"]


def col_multiple_for(shape: BinaryConvShape, variant: KernelVariant) -> int:
    ob, nvec, lanes32 = _TILES[variant]
    wb = word_bits(shape, variant)
    if variant is KernelVariant.X86_AVX512 and wb == 32:
        nvec = 1
    return lanes32 * 32 // wb * nvec


def binary_conv_primfunc(shape: BinaryConvShape, variant: KernelVariant, *,
                         name: str = "bidiff_binary_conv2d") -> tirx.PrimFunc:
    """The scheduled PrimFunc (``tirx.is_scheduled``), global symbol ``name``."""
    inputs, out = binary_conv_compute(shape, col_multiple=col_multiple_for(shape, variant),
                                      word=word_bits(shape, variant))
    func = te.create_prim_func([*inputs, out])
    func = schedule_binary_conv(func, shape, variant)
    # op_pattern 8 = kOpaque: FuseOps must not fuse neighbours into the hand-scheduled kernel
    return (func.with_attr("global_symbol", name).with_attr("tirx.is_scheduled", True)
            .with_attr("op_pattern", 8))
