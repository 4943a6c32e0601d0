"""How fast an artifact runs on this machine: what ``bidiff bench`` measures and prints.

One denoising step is one network call on one tile, so that is what is timed, per backend, on
random inputs at the artifact's tile, in interleaved rounds (:func:`interleaved`, which
``scripts/bench.py`` uses too). A whole upscale is estimated from it: the
sampler makes ``tiles x steps`` network calls (:func:`network_calls`, the same tiling as
``sampler.sample``). The estimate leaves out everything else (bicubic condition, blending, DDIM
updates, back-projection, image I/O), so :func:`time_upscale` runs one real upscale, file to
file, and splits its wall time into the network and the rest.
"""
from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .artifact import Artifact
from .backends import Backend
from .tiling import TileGrid, default_overlap

SAMPLE_PHOTO = Path(__file__).resolve().parent / "samples" / "astronaut_128.png"

PAUSE_S = 0.05      # before each timed block (interleaved)


@dataclass(frozen=True)
class StepTime:
    backend: str
    median_ms: float
    min_ms: float
    calls: int          # timed calls in all


def network_calls(width: int, height: int, *, scale: int, tile: int, steps: int,
                  overlap: int | None = None, align: int = 1) -> tuple[int, int]:
    """(tiles, network calls) for upscaling a ``width`` x ``height`` input ``steps`` steps
    (align: the artifact's ``input_multiple``, as the sampler uses it)."""
    h, w = max(height * scale, tile), max(width * scale, tile)     # sampler.pad_to_tile
    grid = TileGrid.create(h, w, tile, default_overlap(tile) if overlap is None else overlap,
                           align=align)
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


class TimedBackend:
    """A backend that records the time spent inside ``run``: the network, and nothing else."""

    def __init__(self, backend: Backend) -> None:
        self.inner = backend
        self.name, self.tile = backend.name, backend.tile
        self.input_multiple = getattr(backend, "input_multiple", 1)
        self.network_s, self.calls = 0.0, 0
        self.first_start: float | None = None
        self.last_end: float | None = None

    def run(self, group: int, x_t: np.ndarray, cond: np.ndarray, t: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        out = self.inner.run(group, x_t, cond, t)
        t1 = time.perf_counter()
        if self.first_start is None:
            self.first_start = t0
        self.last_end, self.network_s, self.calls = t1, self.network_s + t1 - t0, self.calls + 1
        return out

    def close(self) -> None:
        self.inner.close()


@dataclass(frozen=True)
class UpscaleTime:
    """One upscale, PNG file to PNG file; the parts add up to ``wall_s``."""
    backend: str
    steps: int
    calls: int
    wall_s: float
    network_s: float      # inside the backend's run()
    decode_s: float       # reading and decoding the input file
    before_s: float       # to the first network call: input to float, bicubic condition, x_T
    between_s: float      # between network calls: tile copies, blending, DDIM updates
    after_s: float        # after the last one: its blend and DDIM update, back-projection, output
    encode_s: float       # encoding and writing the result

    @property
    def outside_s(self) -> float:
        return self.wall_s - self.network_s

    def parts(self) -> list[tuple[str, float]]:
        return [("decode the input", self.decode_s),
                ("input to float, bicubic condition, noise", self.before_s),
                ("tile copies, blending, DDIM updates", self.between_s),
                ("last update, back-projection, output", self.after_s),
                ("encode and write the result", self.encode_s)]


def time_upscale(artifact: Artifact, backend: Backend, width: int, height: int, *, steps: int,
                 seed: int = 0) -> UpscaleTime:
    """Upscale the sample photo, resized to ``width`` x ``height``, from a PNG file to a PNG file
    once, at ``steps`` steps and the artifact's other sampler defaults (as ``bidiff upscale``).

    Every group's network runs once first (untimed): onnxruntime opens a session on a group's
    first call, a one-off cost that is neither the network's steady speed nor the rest."""
    from PIL import Image

    from . import images
    from .api import Upscaler

    x = np.zeros((1, 3, backend.tile, backend.tile), np.float32)
    for k in range(len(artifact.manifest.groups)):
        backend.run(k, x, x, np.zeros((1, 1), np.int64))
    timed = TimedBackend(backend)
    up = Upscaler(artifact, timed)
    with tempfile.TemporaryDirectory(prefix="bidiff-bench-") as tmp:
        src, dst = Path(tmp) / "in.png", Path(tmp) / "out.png"
        with Image.open(SAMPLE_PHOTO) as im:
            im.convert("RGB").resize((width, height), Image.BICUBIC).save(src)
        t0 = time.perf_counter()
        im = images.open_image(src)
        t1 = time.perf_counter()
        out = up.upscale(im, steps=steps, seed=seed)
        t2 = time.perf_counter()
        images.save_image(out, dst)
        t3 = time.perf_counter()
    first, last = timed.first_start, timed.last_end
    return UpscaleTime(backend.name, steps, timed.calls, wall_s=t3 - t0, network_s=timed.network_s,
                       decode_s=t1 - t0, before_s=first - t1,
                       between_s=last - first - timed.network_s, after_s=t2 - last,
                       encode_s=t3 - t2)


def time_remote_steps(remote, *, rounds: int = 7, calls: int = 3, group: int = 0) -> list[StepTime]:
    """One network call on an RPC server (``rpc.RemoteBackend``), two ways: on the server alone
    (TVM's ``time_evaluator``: what the device can do) and as the sampler here sees it (the
    round trip, with the tile's transfers: what a pool gets out of it)."""
    device = remote.device_times_ms(group, rounds, calls)
    trip = time_steps({"round trip from here": remote}, tile=remote.tile, rounds=rounds,
                      calls=calls, group=group)
    return [StepTime("on the server", float(np.median(device)), float(np.min(device)),
                     rounds * calls)] + trip
