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


def vectorize_write_back(sch: s_tir.Schedule, block, lanes: int) -> list:
    """The write-back of a register tile: its innermost loop split into unrolled vectors of
    ``lanes``; returns the block's loops above that innermost one."""
    loops = sch.get_loops(block)
    outer, vec = sch.split(loops[-1], [None, lanes])
    sch.vectorize(vec)
    sch.unroll(outer)
    return loops[:-1]
