"""PSNR and SSIM on the BT.601 Y channel, as BasicSR reports them for super-resolution papers.

``calculate_psnr/ssim(..., test_y_channel=True)`` in BasicSR: Y = 16 + 65.481 R + 128.553 G +
24.966 B (RGB in [0, 1], Y in 8-bit units), ``border`` pixels cropped on every side (= the
scale), SSIM with an 11 x 11 Gaussian window (sigma 1.5) over the valid region, constants
(0.01 * 255)^2 and (0.03 * 255)^2. Inputs are float RGB HWC images in [0, 1]; callers that
compare saved images should round to 8 bits first, as BasicSR's ``tensor2img`` does.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

_Y_WEIGHTS = np.array([65.481, 128.553, 24.966])
_C1 = (0.01 * 255) ** 2
_C2 = (0.03 * 255) ** 2


def rgb_to_y(rgb: np.ndarray) -> np.ndarray:
    """BT.601 luma of an HWC RGB image in [0, 1], in 8-bit units (16..235), float64."""
    return np.asarray(rgb, dtype=np.float64) @ _Y_WEIGHTS + 16.0


def _y_cropped(img: np.ndarray, border: int) -> np.ndarray:
    y = rgb_to_y(img)
    return y[border:y.shape[0] - border, border:y.shape[1] - border] if border else y


def _check(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape or a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"expected two HWC RGB images of one shape, got {a.shape} and {b.shape}")


def psnr_y(img: np.ndarray, ref: np.ndarray, *, border: int = 0) -> float:
    """PSNR (dB, peak 255) between the Y channels; inf for identical images."""
    _check(img, ref)
    mse = np.mean((_y_cropped(img, border) - _y_cropped(ref, border)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size) - (size - 1) / 2
    g = np.exp(-x ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def _filter_valid(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable 'valid' correlation with the 1-D window g on both axes."""
    x = sliding_window_view(x, g.size, axis=0) @ g
    return sliding_window_view(x, g.size, axis=1) @ g


def ssim_y(img: np.ndarray, ref: np.ndarray, *, border: int = 0) -> float:
    """Mean SSIM between the Y channels (11x11 Gaussian window, sigma 1.5, valid region)."""
    _check(img, ref)
    a, b = _y_cropped(img, border), _y_cropped(ref, border)
    g = _gaussian_window()
    if min(a.shape) < g.size:
        raise ValueError(f"image of {a.shape[0]}x{a.shape[1]} after cropping is smaller than the SSIM window")
    mu_a, mu_b = _filter_valid(a, g), _filter_valid(b, g)
    var_a = _filter_valid(a * a, g) - mu_a ** 2
    var_b = _filter_valid(b * b, g) - mu_b ** 2
    cov = _filter_valid(a * b, g) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + _C1) * (2 * cov + _C2)) / \
        ((mu_a ** 2 + mu_b ** 2 + _C1) * (var_a + var_b + _C2))
    return float(ssim_map.mean())
