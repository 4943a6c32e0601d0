"""The one definition of bidiff's binary convolution and its bit conventions.

``BinaryConv2d(x, w_packed, scale, threshold)``:

    y[n, f, i, j] = scale[f] * sum_{c, di, dj} s(x[n, c, i+di-p, j+dj-p]) * s_w[f, c, di, dj]

with s(v) = +1 if v >= threshold[c] else -1 (threshold defaults to 0), and taps that fall in the
zero padding contributing 0 (the official model pads the already-binarised input with zeros).

Bit conventions (every kernel, the exporter and the runtime import these):
- words are ``uint32`` (``WORD_BITS`` = 32): 32-channel layers waste nothing, and two
  consecutive words read as one little-endian ``uint64`` keep channel c at bit c % 64, so a
  64-bit kernel can use the same packed buffer;
- channel c lives in word c // 32, bit c % 32 (LSB first);
- bit 1 means +1, bit 0 means -1; padding bits past the last channel are 0 in weights and
  activations alike, so they never count as a mismatch in ``popcount(a ^ w)``;
- packed weights have shape [F, kh, kw, ceil(C / 32)] (channels innermost);
- a weight that is exactly 0.0 packs as +1 (v >= 0 -> +1, the same rule as activations); the
  official PyTorch code would use sign(0) = 0 there. docs/MODEL.md: trained checkpoints have
  essentially no exact zeros; the deploy path of ``bidiff.models`` applies the same rule so
  the difference is measured, not guessed.

The reference below is deliberately plain numpy (float64 sums of +-1 are exact); fast kernels
(TVM xor + popcount) are tested against it.
"""
from __future__ import annotations

import numpy as np

OP_DOMAIN = "bidiff"
OP_NAME = "BinaryConv2d"
OP_VERSION = 1
WORD_BITS = 32
WORD_DTYPE = np.uint32


def num_words(channels: int) -> int:
    return (int(channels) + WORD_BITS - 1) // WORD_BITS


def pack_bits(positive: np.ndarray, axis: int = -1) -> np.ndarray:
    """Pack a boolean array (True = +1) along ``axis`` into uint32 words, LSB first.

    The packed axis moves to the end: [..., C] -> [..., ceil(C/32)].
    """
    b = np.moveaxis(np.asarray(positive, dtype=bool), axis, -1)
    c = b.shape[-1]
    pad = num_words(c) * WORD_BITS - c
    if pad:
        b = np.concatenate([b, np.zeros(b.shape[:-1] + (pad,), dtype=bool)], axis=-1)
    bits = b.reshape(b.shape[:-1] + (-1, WORD_BITS)).astype(np.uint64)
    weights = np.left_shift(np.uint64(1), np.arange(WORD_BITS, dtype=np.uint64))
    return (bits * weights).sum(axis=-1).astype(WORD_DTYPE)


def unpack_bits(words: np.ndarray, channels: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: [..., W] uint32 -> [..., channels] bool (True = +1)."""
    w = np.asarray(words, dtype=WORD_DTYPE)[..., None]
    bits = (w >> np.arange(WORD_BITS, dtype=WORD_DTYPE)) & WORD_DTYPE(1)
    return bits.reshape(w.shape[:-2] + (-1,))[..., :channels].astype(bool)


def pack_weights(weight: np.ndarray) -> np.ndarray:
    """[F, C, kh, kw] float -> [F, kh, kw, ceil(C/32)] uint32 (bit 1 <-> w >= 0)."""
    w = np.asarray(weight)
    if w.ndim != 4:
        raise ValueError(f"binary conv weights must be [F, C, kh, kw], got shape {w.shape}")
    return pack_bits(np.transpose(w >= 0, (0, 2, 3, 1)), axis=-1)


def unpack_weights(packed: np.ndarray, channels: int) -> np.ndarray:
    """[F, kh, kw, W] uint32 -> [F, C, kh, kw] float32 of +-1."""
    pos = unpack_bits(packed, channels)
    return np.where(np.transpose(pos, (0, 3, 1, 2)), 1.0, -1.0).astype(np.float32)


def weight_scale(weight: np.ndarray) -> np.ndarray:
    """alpha_f = mean |W_f| over (C, kh, kw), float32 (HardBinaryConv's scaling factor)."""
    w = np.asarray(weight, dtype=np.float32)
    return np.abs(w).reshape(w.shape[0], -1).mean(axis=1, dtype=np.float64).astype(np.float32)


def binary_conv2d_reference(x: np.ndarray, w_packed: np.ndarray, scale: np.ndarray, *,
                            channels: int, kernel: int, threshold: np.ndarray | None = None,
                            stride: int = 1, pad: int | None = None) -> np.ndarray:
    """The reference BinaryConv2d (NCHW float32 in, NCHW float32 out)."""
    x = np.asarray(x, dtype=np.float32)
    n, c, h, w = x.shape
    if c != channels:
        raise ValueError(f"input has {c} channels, the binary conv expects {channels}")
    f, kh, kw, nw = w_packed.shape
    if (kh, kw) != (kernel, kernel) or nw != num_words(channels):
        raise ValueError(f"packed weights {w_packed.shape} do not fit kernel {kernel} / {channels} channels")
    p = kernel // 2 if pad is None else int(pad)
    thr = np.zeros((c,), np.float32) if threshold is None else np.asarray(threshold, np.float32).reshape(c)
    s = np.where(x >= thr[None, :, None, None], 1.0, -1.0)
    s = np.pad(s, ((0, 0), (0, 0), (p, p), (p, p)))        # padding contributes 0
    ho = (h + 2 * p - kernel) // stride + 1
    wo = (w + 2 * p - kernel) // stride + 1
    wt = unpack_weights(w_packed, channels).astype(np.float64)
    acc = np.zeros((n, f, ho, wo), np.float64)
    for di in range(kernel):
        for dj in range(kernel):
            patch = s[:, :, di:di + stride * ho:stride, dj:dj + stride * wo:stride]
            acc += np.einsum("nchw,fc->nfhw", patch, wt[:, :, di, dj])
    return (acc * np.asarray(scale, np.float64)[None, :, None, None]).astype(np.float32)
