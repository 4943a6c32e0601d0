"""Bounded integer settings, each defined once.

The API, both command lines and the exporter check a setting against the same bound, so they
accept the same values and refuse the rest with the same one-line message. Bounds that are
facts of another module live there (``schedule.TIME_SHIFT``, ``consistency.BACK_PROJECTION``);
the ones that belong to no such module live here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class IntBound:
    """An integer setting ``name`` in ``lo..hi`` (``hi`` None: no upper bound)."""
    name: str
    lo: int
    hi: int | None = None
    wording: str = "in {lo}..{hi}"      # how the message states the range

    @property
    def span(self) -> str:
        """The range as help texts write it: ``1..1000``, ``>= 1``."""
        return f">= {self.lo}" if self.hi is None else f"{self.lo}..{self.hi}"

    def check(self, value: object, name: str | None = None) -> int:
        """``value`` as an int; ValueError ("<name> must be an integer ...") when it is not an
        integer (bools are refused) or lies outside the bound."""
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
                or value < self.lo or (self.hi is not None and value > self.hi):
            where = f">= {self.lo}" if self.hi is None else self.wording.format(lo=self.lo, hi=self.hi)
            raise ValueError(f"{name or self.name} must be an integer {where}, got {value!r}")
        return int(value)

    def with_hi(self, hi: int) -> "IntBound":
        """The same setting with another upper bound (e.g. for another schedule length)."""
        return dataclasses.replace(self, hi=hi)

    def click_type(self) -> Any:
        """A ``click.IntRange`` of the bound, for the command lines."""
        import click
        return click.IntRange(self.lo, self.hi)


STEPS = IntBound("steps", 1, 1000, wording="between {lo} and {hi}")   # DDIM steps per upscale
THREADS = IntBound("threads", 1)                                      # backend threads

__all__ = ["IntBound", "STEPS", "THREADS"]
