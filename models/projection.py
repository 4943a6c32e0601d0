"""Back-projection as a differentiable PyTorch op, for training on the image users get.

The runtime back-projects every sample onto its LR input (``bidiff.runtime.consistency``):
sr <- sr + up(lr - down(sr)). That step fixes whatever part of an error downscales to
something, so a loss taken after it spends the network's capacity on the part it cannot fix
(the detail bicubic loses). Both resamplers are linear and separable, so on a fixed patch size
they are two small matrices per axis, built here from the runtime's own tap tables (one
definition of the arithmetic).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from bidiff.runtime import bicubic, consistency


def _dense(idx: np.ndarray, wts: np.ndarray, n_in: int) -> np.ndarray:
    m = np.zeros((idx.shape[0], n_in))
    np.add.at(m, (np.arange(idx.shape[0])[:, None].repeat(idx.shape[1], 1), idx), wts)
    return m


@lru_cache(maxsize=16)
def _matrices(h: int, w: int, scale: int) -> tuple[np.ndarray, ...]:
    """down_h [h/s, h], down_w [w/s, w], up_h [h, h/s], up_w [w, w/s] (float64)."""
    lh, lw = h // scale, w // scale
    return (_dense(*consistency._axis_taps(h, lh), h), _dense(*consistency._axis_taps(w, lw), w),
            _dense(*bicubic._axis_taps(lh, h), lh), _dense(*bicubic._axis_taps(lw, w), lw))


def downscale(image: torch.Tensor, scale: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, C, H/s, W/s]: back-projection's antialiased bicubic ``down``
    (equals ``consistency.downscale`` up to float rounding), differentiable."""
    h, w = image.shape[-2:]
    if h % scale or w % scale:
        raise ValueError(f"cannot downscale {h}x{w} by {scale}")
    dh, dw = (torch.as_tensor(m, dtype=image.dtype, device=image.device) for m in _matrices(h, w, scale)[:2])
    return dh @ image @ dw.T


def back_project(sr: torch.Tensor, lr: torch.Tensor, scale: int, iterations: int) -> torch.Tensor:
    """``iterations`` rounds of sr + up(lr - down(sr)) on [B, C, H, W] / [B, C, H/s, W/s] tensors,
    differentiable in ``sr`` (equals ``consistency.back_project`` up to float rounding)."""
    h, w = sr.shape[-2:]
    if lr.shape[-2:] != (h // scale, w // scale) or h % scale or w % scale:
        raise ValueError(f"sr {tuple(sr.shape)} and lr {tuple(lr.shape)} do not match at x{scale}")
    dh, dw, uh, uw = (torch.as_tensor(m, dtype=sr.dtype, device=sr.device) for m in _matrices(h, w, scale))
    out = sr
    for _ in range(iterations):
        out = out + uh @ (lr - dh @ out @ dw.T) @ uw.T
    return out
