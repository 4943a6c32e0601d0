"""Make an SR image consistent with its LR input: iterative back-projection.

The models are trained on LR = Pillow BICUBIC (antialiased) downscaling of the HR image
(``bidiff.models.data.downsample``), so a good SR output downscales back to the LR image it came
from. A small diffusion model's sample does not quite: it drifts in brightness by ~1/255 and
in low-frequency detail. Back-projection (Irani & Peleg 1991) corrects that drift:

    sr <- sr + up(lr - down(sr))        repeated ``iterations`` times

with down = Pillow's antialiased bicubic (this module's numpy copy, no Pillow needed) and
up = the condition's bicubic (``bicubic.upscale_condition``). High-frequency detail that
downscales to nothing is left as the model drew it. Numpy only: the device imports it.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from .bicubic import resample_axis, upscale_condition
from .bounds import IntBound

MAX_ITERATIONS = 16
BACK_PROJECTION = IntBound("back_projection", 0, MAX_ITERATIONS)   # rounds of back_project
_A = -0.5                       # Pillow's bicubic kernel


def check_back_projection(value: object) -> int:
    """A back-projection iteration count: an integer in 0..MAX_ITERATIONS (ValueError otherwise)."""
    return BACK_PROJECTION.check(value)


def _pillow_bicubic(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    near = ((_A + 2) * x - (_A + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * _A
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


@lru_cache(maxsize=32)
def _axis_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and weights [n_out, K] of Pillow's precompute_coeffs (BICUBIC) on one axis.

    Rows shorter than K (at the borders) are padded with weight-0 taps on index 0.
    """
    scale = n_in / n_out
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    k = int(np.ceil(support)) * 2 + 1
    idx = np.zeros((n_out, k), np.int64)
    wts = np.zeros((n_out, k))
    for xx in range(n_out):
        center = (xx + 0.5) * scale
        # C's (int) cast truncates toward zero; negative starts are clipped to 0 anyway.
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), n_in)
        w = _pillow_bicubic((np.arange(xmin, xmax) - center + 0.5) / filterscale)
        total = w.sum()
        idx[xx, :xmax - xmin] = np.arange(xmin, xmax)
        wts[xx, :xmax - xmin] = w / total if total != 0 else w
    idx.setflags(write=False)
    wts.setflags(write=False)
    return idx, wts


def downscale(image: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """[C, H, W] float -> [C, h, w] float32 like Pillow's ``resize(BICUBIC)`` of mode "F" planes.

    Horizontal pass first, rounded to float32, then vertical, as Pillow does (float64
    accumulation, one channel at a time); it matches Pillow to ~1e-7.
    """
    img = np.asarray(image)
    _, h, w = img.shape
    oh, ow = int(out_hw[0]), int(out_hw[1])
    if not (1 <= oh <= h and 1 <= ow <= w):
        raise ValueError(f"cannot downscale an image of {h}x{w} to {oh}x{ow}")
    rows, cols = _axis_taps(h, oh), _axis_taps(w, ow)
    out = np.empty((img.shape[0], oh, ow), np.float32)
    for c in range(img.shape[0]):
        horiz = resample_axis(img[c].astype(np.float64), 1, *cols).astype(np.float32)
        out[c] = resample_axis(horiz.astype(np.float64), 0, *rows)
    return out


def back_project(sr: np.ndarray, lr: np.ndarray, scale: int, iterations: int) -> np.ndarray:
    """``iterations`` rounds of sr += up(lr - down(sr)); sr [3, h·scale, w·scale], lr [3, h, w].

    Returns a new float32 array (unclamped; callers clamp); ``iterations`` = 0 returns ``sr``.
    """
    iterations = check_back_projection(iterations)
    lr = np.asarray(lr, np.float32)
    _, h, w = lr.shape
    if sr.shape[-2:] != (h * scale, w * scale):
        raise ValueError(f"sr is {sr.shape[-2]}x{sr.shape[-1]}, expected {h * scale}x{w * scale} "
                         f"for an LR image of {h}x{w} at x{scale}")
    out = np.asarray(sr, np.float32)
    for _ in range(iterations):
        out = out + upscale_condition(lr - downscale(out, (h, w)), scale).astype(np.float32)
    return out
