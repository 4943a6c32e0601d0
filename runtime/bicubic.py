"""Bicubic resampling exactly as OpenCV's ``cv2.resize(..., interpolation=INTER_CUBIC)``.

The model is conditioned on this upsampling (MODEL.md): Keys kernel with a = -0.75, half-pixel
centres, replicated borders, no clamping. Training, export and the device all call this one
function so the condition is the same everywhere; OpenCV itself is not a dependency.
"""
from __future__ import annotations

import numpy as np

_A = -0.75


def _cubic_weights(frac: np.ndarray) -> np.ndarray:
    """The four Keys weights for taps at offsets -1, 0, 1, 2 (OpenCV's interpolateCubic)."""
    x = frac
    w0 = ((_A * (x + 1) - 5 * _A) * (x + 1) + 8 * _A) * (x + 1) - 4 * _A
    w1 = ((_A + 2) * x - (_A + 3)) * x * x + 1
    w2 = ((_A + 2) * (1 - x) - (_A + 3)) * (1 - x) * (1 - x) + 1
    w3 = 1 - w0 - w1 - w2
    return np.stack([w0, w1, w2, w3], axis=-1)


def _axis_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Dense [n_out, n_in] interpolation matrix along one axis (borders replicated)."""
    scale = n_in / n_out
    pos = (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5
    base = np.floor(pos).astype(np.int64)
    # OpenCV rounds the fractional offset to float32 before computing the weights.
    w = _cubic_weights((pos - base).astype(np.float32).astype(np.float64))
    m = np.zeros((n_out, n_in), dtype=np.float64)
    rows = np.arange(n_out)
    for k in range(4):
        np.add.at(m, (rows, np.clip(base + k - 1, 0, n_in - 1)), w[:, k])
    return m


def resize_bicubic(image: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Resize an H x W x C (or H x W) float image to ``out_hw`` like OpenCV INTER_CUBIC.

    Computed in float64 and returned as float32 (OpenCV's float path differs by ~1e-7).
    """
    img = np.asarray(image, dtype=np.float64)
    h, w = img.shape[:2]
    oh, ow = int(out_hw[0]), int(out_hw[1])
    if h < 1 or w < 1 or oh < 1 or ow < 1:
        raise ValueError(f"cannot resize an image of {h}x{w} to {oh}x{ow}")
    mh, mw = _axis_matrix(h, oh), _axis_matrix(w, ow)
    out = np.tensordot(mh, img, axes=(1, 0))                       # [oh, w, ...]
    out = np.moveaxis(np.tensordot(mw, out, axes=(1, 1)), 0, 1)    # [oh, ow, ...]
    return out.astype(np.float32)


def upscale_condition(lr_chw: np.ndarray, scale: int) -> np.ndarray:
    """The diffusion condition: bicubic x``scale`` of a [..., C, H, W] float image in [0, 1]."""
    lr = np.asarray(lr_chw)
    *lead, c, h, w = lr.shape
    hwc = np.moveaxis(lr.reshape(-1, c, h, w), 1, -1)             # [N, H, W, C]
    out = np.stack([resize_bicubic(x, (h * scale, w * scale)) for x in hwc])
    return np.moveaxis(out, -1, 1).reshape(*lead, c, h * scale, w * scale)
