"""The CPU's peak rates for the roofline (bench part r), measured by three tiny TVM kernels
compiled for the same target as the model, so they run the instructions the model's kernels
run (LLVM's ``vpshufb`` nibble popcount on AVX2, ``vpopcntq`` on AVX-512, ``cnt`` on NEON,
the target's FMA):

- ``popcount<bits>``: ``acc[f, l] += popcount(a[r, l] ^ w[rep, f, r])`` with the binary conv's
  register tile (filters x 2 vectors of ``bits``-bit words, accumulated at that width, the
  weights broadcast), the activations in L1, the weights streamed from L2 as in the conv.
  Rate: popcount words per second.
- ``fma``: ``acc[i, j] += a[k, i] * b[k, j]``, a 6 x 2-vector float register tile (12
  accumulators, enough to hide the FMA latency) fed from L1: the GEMM micro-kernel, the most
  a float conv can do. Rate: FLOP per second (an FMA is 2).
- ``stream``: ``y = a + b`` over 3 x 4 MiB (past L2, inside L3: the size of the step's feature
  maps). Rate: bytes moved per second.

Each kernel is single-threaded (no parallel loop): a rate is per thread, and the roofline
multiplies it by the thread count (for the stream an optimistic bound: the cores share L3).
Building needs the TVM compiler; measuring (``bench_measure``) only the runtime.
"""
from __future__ import annotations

from dataclasses import dataclass

POPCOUNT_ROWS, POPCOUNT_REPS, POPCOUNT_FILTERS = 256, 64, 4
FMA_ROWS, FMA_DEPTH, FMA_REPS = 6, 256, 256
STREAM_FLOATS = 1 << 20


@dataclass(frozen=True)
class Peak:
    """One microbenchmark: its library's function, its unit and the work of one call."""

    name: str            # "popcount64" | "popcount32" | "fma" | "stream"
    unit: str            # "words" | "flop" | "bytes"
    work: float          # units per call
    inputs: tuple[tuple[tuple[int, ...], str], ...]   # (shape, dtype) of each argument
    output: tuple[tuple[int, ...], str]


def popcount_peak(bits: int, lanes32: int) -> Peak:
    """``lanes32``: 32-bit lanes of the target's vector register (8 in a ymm)."""
    width = 2 * max(1, lanes32 * 32 // bits)
    return Peak(f"popcount{bits}", "words",
                float(POPCOUNT_FILTERS * width * POPCOUNT_ROWS * POPCOUNT_REPS),
                (((POPCOUNT_ROWS, width), f"uint{bits}"),
                 ((POPCOUNT_REPS, POPCOUNT_FILTERS, POPCOUNT_ROWS), f"uint{bits}")),
                ((POPCOUNT_FILTERS, width), f"uint{bits}"))


def fma_peak(lanes32: int) -> Peak:
    rows, cols = FMA_ROWS, 2 * lanes32
    return Peak("fma", "flop", float(2 * rows * cols * FMA_DEPTH * FMA_REPS),
                (((FMA_DEPTH, rows), "float32"), ((FMA_DEPTH, cols), "float32")),
                ((rows, cols), "float32"))


def stream_peak() -> Peak:
    n = STREAM_FLOATS
    return Peak("stream", "bytes", float(3 * 4 * n),
                (((n,), "float32"), ((n,), "float32")), ((n,), "float32"))


def peaks_for(lanes32: int, word_bits) -> list[Peak]:
    """The microbenchmarks for a target with ``lanes32`` float lanes per vector register whose
    binary kernels use words of ``word_bits`` (each measured: narrower words cost more
    instructions per bit on AVX2 and fewer on NEON)."""
    return [*(popcount_peak(b, lanes32) for b in sorted(set(word_bits), reverse=True)),
            fma_peak(lanes32), stream_peak()]


def peak_primfunc(peak: Peak, lanes32: int):
    """The scheduled single-threaded PrimFunc of ``peak`` (global symbol ``peak.name``): the
    two output dimensions innermost, unrolled and vectorised into register accumulators."""
    from tvm import s_tir, te, tirx
    args = [te.placeholder(shape, dtype, name=f"in{i}") for i, (shape, dtype) in
            enumerate(peak.inputs)]
    if peak.name == "stream":
        a, b = args
        out = te.compute(a.shape, lambda i: a[i] + b[i], name="out")
        sch = s_tir.Schedule(te.create_prim_func([a, b, out]))
        (i,) = sch.get_loops(sch.get_sblock("out"))
        _, iv = sch.split(i, [None, 4 * lanes32])
        sch.vectorize(iv)
    else:
        a, w = args
        if peak.name == "fma":
            k, rep = te.reduce_axis((0, FMA_DEPTH), "k"), te.reduce_axis((0, FMA_REPS), "rep")
            # repeated without reassociation (no fast-math): LLVM cannot fold the rep loop
            acc = te.compute(peak.output[0], lambda i, j: te.sum(a[k, i] * w[k, j],
                                                                 axis=[rep, k]), name="acc")
        else:
            dt = peak.output[1]
            r, rep = te.reduce_axis((0, POPCOUNT_ROWS), "r"), te.reduce_axis(
                (0, POPCOUNT_REPS), "rep")
            acc = te.compute(peak.output[0], lambda f, l: te.sum(
                tirx.popcount(a[r, l] ^ w[rep, f, r]).astype(dt), axis=[rep, r]), name="acc")
        vec = peak.output[0][1] // 2
        out = te.compute(acc.shape, lambda i, j: acc[i, j], name="out")
        sch = s_tir.Schedule(te.create_prim_func([a, w, out]))
        blk = sch.get_sblock("acc")
        rows, cols, rep_l, red_l = sch.get_loops(blk)
        co, cv = sch.split(cols, [None, vec])
        sch.reorder(rep_l, red_l, rows, co, cv)
        sch.set_scope(blk, 0, "local")
        sch.unroll(rows)
        sch.unroll(co)
        sch.vectorize(cv)
        sch.decompose_reduction(blk, rep_l)
    return (sch.mod["main"].with_attr("global_symbol", peak.name)
            .with_attr("tirx.is_scheduled", True))
