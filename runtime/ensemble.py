"""Geometric self-ensemble: sample the image under flips and rotations, average the results.

The 1-step x0 model is in effect a deterministic function of the condition (averaging 4 noise
seeds gains +0.005 dB), so what is left to average away is the network's orientation bias:
running it on 2, 4 or 8 of the input's flips / rotations, undoing each on the output and taking
the mean (the "self-ensemble" of SR papers, EDSR+) gains a few hundredths of a dB for N times
the network calls (docs/EXPERIMENTS.md). Back-projection then runs once, on the mean: it is affine,
so that equals averaging back-projected outputs except where they were clipped. A model's LR
corrections (``Formulation.lr_correction``) are averaged the same way, at the LR's size.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .consistency import back_project, check_back_projection

if TYPE_CHECKING:
    from .sampler import EpsModel, Progress

ENSEMBLES = (1, 2, 4, 8)
# (quarter turns, mirror) in the order used: 2 = the image and its mirror, 4 adds a quarter turn
_ORDER = ((0, False), (0, True), (1, False), (1, True), (2, False), (2, True), (3, False), (3, True))


def check_ensemble(value: object) -> int:
    if isinstance(value, bool) or value not in ENSEMBLES:
        raise ValueError(f"ensemble must be one of {', '.join(map(str, ENSEMBLES))}, got {value!r}")
    return int(value)


def transform(a: np.ndarray, turns: int, mirror: bool) -> np.ndarray:
    """Rotate the last two axes by ``turns`` quarter turns, then mirror the last one."""
    a = np.rot90(a, turns, axes=(-2, -1))
    return a[..., ::-1] if mirror else a


def untransform(a: np.ndarray, turns: int, mirror: bool) -> np.ndarray:
    """The inverse of ``transform``."""
    return np.rot90(a[..., ::-1] if mirror else a, -turns, axes=(-2, -1))


def sample_ensemble(model: EpsModel, lr: np.ndarray, *, scale: int, ensemble: int = 1,
                    back_projection: int = 0, progress: Progress | None = None,
                    **kw: Any) -> np.ndarray:
    """``sampler.sample`` averaged over ``ensemble`` (1, 2, 4 or 8) flips / rotations of ``lr``;
    1 is ``sample`` itself. Every pass uses the same seed and settings (``kw``); ``progress``
    counts the network evaluations of all passes."""
    from .sampler import sample, sample_unprojected   # lazily: the CLI reads ENSEMBLES alone
    n = check_ensemble(ensemble)
    back_projection = check_back_projection(back_projection)
    if n == 1:
        return sample(model, lr, scale=scale, back_projection=back_projection, progress=progress, **kw)
    lr = np.asarray(lr, dtype=np.float32)
    total = np.zeros((3, lr.shape[1] * scale, lr.shape[2] * scale), np.float32)
    aims = np.zeros_like(lr)
    for i, (turns, mirror) in enumerate(_ORDER[:n]):
        report = None if progress is None else (
            lambda done, of, i=i: progress(i * of + done, n * of))
        out, aim = sample_unprojected(model, np.ascontiguousarray(transform(lr, turns, mirror)),
                                      scale=scale, progress=report, **kw)
        total += untransform(np.clip(out, 0, 1), turns, mirror)
        aims += untransform(aim, turns, mirror)
    img = total / np.float32(n)
    if back_projection:
        corrected = kw["formulation"].lr_correction
        img = back_project(img, aims / np.float32(n) if corrected else lr, scale, back_projection)
    return np.ascontiguousarray(np.clip(img, 0, 1), dtype=np.float32)
