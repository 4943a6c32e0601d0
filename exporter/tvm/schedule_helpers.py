"""Small ``s_tir`` schedule steps shared by the kernel schedules (binary conv, float ops,
Winograd), so each is written once."""
from __future__ import annotations

from tvm import s_tir


def pick_divisor(n: int, prefs) -> int:
    """The first of ``prefs`` that divides ``n`` (1 if none): tile sizes that need no tail."""
    for d in prefs:
        if d and n % d == 0:
            return d
    return 1


def register_tile(rows_ext: int, vectors: int, rows: int, nvec: int) -> tuple[int, int]:
    """(rows, nvec) of a register tile of ``rows`` x ``nvec`` vector accumulators for an output
    of ``rows_ext`` rows of ``vectors`` vectors each. Where a row holds fewer vectors than
    ``nvec``, more rows take their place: the tile keeps its count of independent accumulators,
    which hides the FMA latency (a 1x1 conv on a 16-wide row had 4 of them on AVX-512)."""
    got = pick_divisor(vectors, [d for d in (nvec, 4, 2, 1) if d <= nvec])
    want = rows * nvec // got
    if rows_ext <= want:
        return rows_ext, got
    return pick_divisor(rows_ext, [d for d in (want, 16, 8, 4, 2) if d <= want]), got


def finish_register_tile(sch: s_tir.Schedule, block, write_back, at, unrolled, vector,
                         lanes: int, reduction) -> list:
    """The common tail of a register-tiled reduction (float conv, matmul, Winograd GEMM): the
    ``local`` accumulator's ``write_back`` moved under loop ``at``, the tile loops ``unrolled``,
    the ``vector`` loop vectorised, the write-back's innermost loop split into unrolled vectors
    of ``lanes``, the init split off at ``reduction``. Returns the write-back's loops above its
    vectorised one."""
    sch.reverse_compute_at(write_back, at)
    for loop in unrolled:
        sch.unroll(loop)
    sch.vectorize(vector)
    loops = sch.get_loops(write_back)
    outer, vec = sch.split(loops[-1], [None, lanes])
    sch.vectorize(vec)
    sch.unroll(outer)
    sch.decompose_reduction(block, reduction)
    return loops[:-1]
