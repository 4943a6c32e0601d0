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
