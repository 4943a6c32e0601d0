"""Bicubic resampling exactly as OpenCV's ``cv2.resize(..., interpolation=INTER_CUBIC)``.

The model is conditioned on this upsampling (docs/MODEL.md): Keys kernel with a = -0.75, half-pixel
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


def _axis_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices [n_out, 4] (borders replicated) and weights [n_out, 4] along one axis."""
    scale = n_in / n_out
    pos = (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5
    base = np.floor(pos).astype(np.int64)
    # OpenCV rounds the fractional offset to float32 before computing the weights.
    w = _cubic_weights((pos - base).astype(np.float32).astype(np.float64))
    idx = np.clip(base[:, None] + np.arange(-1, 3)[None, :], 0, n_in - 1)
    return idx, w


def resample_axis(img: np.ndarray, axis: int, idx: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Separable resampling along ``axis``: out[i] = sum_k img[idx[i, k]] * w[i, k]."""
    shape = [1] * img.ndim
    shape[axis] = -1
    out = np.take(img, idx[:, 0], axis=axis) * w[:, 0].reshape(shape)
    for k in range(1, idx.shape[1]):
        out += np.take(img, idx[:, k], axis=axis) * w[:, k].reshape(shape)
    return out


def resize_bicubic(image: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Resize an H x W x C (or H x W) float image to ``out_hw`` like OpenCV INTER_CUBIC.

    Four taps per axis, accumulated in float64 one channel at a time (so the working memory
    is a few single-channel buffers) and returned as float32; OpenCV's float path differs by
    ~1e-7.
    """
    img = np.asarray(image)
    h, w = img.shape[:2]
    oh, ow = int(out_hw[0]), int(out_hw[1])
    if h < 1 or w < 1 or oh < 1 or ow < 1:
        raise ValueError(f"cannot resize an image of {h}x{w} to {oh}x{ow}")
    rows, cols = _axis_taps(h, oh), _axis_taps(w, ow)
    chans = img.reshape(h, w, -1)
    out = np.empty((oh, ow, chans.shape[2]), np.float32)
    for c in range(chans.shape[2]):
        plane = chans[:, :, c].astype(np.float64)
        out[:, :, c] = resample_axis(resample_axis(plane, 0, *rows), 1, *cols)
    return out.reshape((oh, ow) + img.shape[2:])


def upscale_condition(lr_chw: np.ndarray, scale: int) -> np.ndarray:
    """The diffusion condition: bicubic x``scale`` of a [..., C, H, W] float image in [0, 1]."""
    lr = np.asarray(lr_chw)
    *lead, c, h, w = lr.shape
    hwc = np.moveaxis(lr.reshape(-1, c, h, w), 1, -1)             # [N, H, W, C]
    out = np.stack([resize_bicubic(x, (h * scale, w * scale)) for x in hwc])
    return np.moveaxis(out, -1, 1).reshape(*lead, c, h * scale, w * scale)
