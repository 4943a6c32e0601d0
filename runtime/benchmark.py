"""How fast an artifact runs on this machine: what ``bidiff bench`` measures and prints.

One denoising step is one network call on one tile, so that is what is timed, per backend, on
random inputs at the artifact's tile, in interleaved rounds (:func:`interleaved`, which
``scripts/bench.py`` uses too). A whole upscale is estimated from it: the
sampler makes ``tiles x steps`` network calls (:func:`network_calls`, the same tiling as
``sampler.sample``); the DDIM updates, the bicubic condition and back-projection are left out
(they are small next to the network).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .backends import Backend
from .tiling import TileGrid, default_overlap

PAUSE_S = 0.05      # before each timed block (interleaved)


@dataclass(frozen=True)
class StepTime:
    backend: str
    median_ms: float
    min_ms: float
    calls: int          # timed calls in all


def network_calls(width: int, height: int, *, scale: int, tile: int, steps: int,
                  overlap: int | None = None) -> tuple[int, int]:
    """(tiles, network calls) for upscaling a ``width`` x ``height`` input ``steps`` steps."""
    h, w = max(height * scale, tile), max(width * scale, tile)     # sampler.pad_to_tile
    grid = TileGrid.create(h, w, tile, default_overlap(tile) if overlap is None else overlap)
    return len(grid), len(grid) * steps


def interleaved(contenders: dict[str, Callable[[], object]], rounds: int,
                calls: dict[str, int]) -> dict[str, list[float]]:
    """Milliseconds per call of each contender, one sample (a block of ``calls[name]`` calls)
    per round.

    Every contender runs once per round, in turn, so machine load hits them all alike. The
    order rotates from round to round: on 2 cores, whichever ran right after onnxruntime's block
    measured up to 2x slower. Each block follows a pause, which lets the previous contender's
    spinning pool threads go idle, and one untimed call, which wakes this one's."""
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            time.sleep(PAUSE_S)
            fn, n = contenders[name], calls[name]
            fn()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            samples[name].append((time.perf_counter() - t0) / n * 1e3)
    return samples


def time_steps(backends: dict[str, Backend], *, tile: int, rounds: int = 7, calls: int = 3,
               group: int = 0, seed: int = 0) -> list[StepTime]:
    """Median and best time of one network call per backend, ``rounds`` rounds of ``calls``."""
    if rounds < 1 or calls < 1:
        raise ValueError(f"rounds and calls must be >= 1, got {rounds}, {calls}")
    rng = np.random.default_rng(seed)
    x_t = rng.standard_normal((1, 3, tile, tile), dtype=np.float32)
    cond = rng.random((1, 3, tile, tile), dtype=np.float32)
    t = np.array([[999]], dtype=np.int64)
    steps = {name: (lambda b=b: b.run(group, x_t, cond, t)) for name, b in backends.items()}
    samples = interleaved(steps, rounds, dict.fromkeys(steps, calls))
    return [StepTime(name, float(np.median(v)), float(np.min(v)), rounds * calls)
            for name, v in samples.items()]


def format_duration(seconds: float) -> str:
    """1.2 s, 45 s, 3 min 20 s, 2 h 05 min."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    m, s = divmod(round(seconds), 60)
    if m < 60:
        return f"{m} min {s:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"
