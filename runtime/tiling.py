"""Overlapping tiles and their blending weights, for running a fixed-size graph on any image.

The sampler runs the network on every tile at every denoising step and blends the ε estimates
in the overlaps with these weights before the DDIM update, so neighbouring tiles agree on one
ε per pixel and no seam can form (blending only the final images would leave seams).

Weights per tile are separable 1-D windows: 1 in the interior, a raised-cosine ramp from ~0 to 1
across each side that overlaps a neighbour, and 1 right up to the image border (a border pixel
has no other tile to share with). Every ramp value is strictly positive, so the summed weight is
> 0 everywhere and ``blend = Σ w·ε / Σ w`` is well defined. A single tile gets weight 1 exactly,
so tiling an image that fits one tile changes nothing bit for bit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def axis_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering [0, length) with at least ``overlap``."""
    if tile < 1 or length < tile:
        raise ValueError(f"an axis of {length} cannot hold a tile of {tile}: pad the image first")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in 0..{tile - 1}, got {overlap}")
    if length == tile:
        return [0]
    n = math.ceil((length - overlap) / (tile - overlap))
    n = max(n, 2)
    # Evenly spread, first flush with 0 and last flush with the end; rounding keeps the
    # overlap >= the requested one because the spacing only shrinks.
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def _ramp(n: int) -> np.ndarray:
    """Raised cosine rising over n samples, strictly inside (0, 1)."""
    j = np.arange(n, dtype=np.float64)
    return 0.5 - 0.5 * np.cos(np.pi * (j + 0.5) / n)


def axis_windows(starts: list[int], tile: int) -> list[np.ndarray]:
    """The 1-D weight window of each tile along one axis (float32, length ``tile``)."""
    out = []
    for k, s in enumerate(starts):
        w = np.ones(tile, dtype=np.float64)
        if k > 0:
            left = starts[k - 1] + tile - s          # overlap with the previous tile
            if left > 0:
                w[:left] = _ramp(left)
        if k + 1 < len(starts):
            right = s + tile - starts[k + 1]         # overlap with the next tile
            if right > 0:
                w[tile - right:] = np.minimum(w[tile - right:], _ramp(right)[::-1])
        out.append(w.astype(np.float32))
    return out


@dataclass(frozen=True)
class Tile:
    y: int
    x: int
    size: int

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.y, self.y + self.size), slice(self.x, self.x + self.size)


@dataclass(frozen=True)
class TileGrid:
    """Tiles over an H x W image (H, W >= size), with separable blending windows."""
    height: int
    width: int
    size: int
    ys: tuple[int, ...]
    xs: tuple[int, ...]
    wy: tuple[np.ndarray, ...]
    wx: tuple[np.ndarray, ...]

    @classmethod
    def create(cls, height: int, width: int, size: int, overlap: int) -> "TileGrid":
        ys, xs = axis_starts(height, size, overlap), axis_starts(width, size, overlap)
        return cls(height, width, size, tuple(ys), tuple(xs),
                   tuple(axis_windows(ys, size)), tuple(axis_windows(xs, size)))

    def __len__(self) -> int:
        return len(self.ys) * len(self.xs)

    def tiles(self) -> list[tuple[Tile, np.ndarray]]:
        """(tile, weight [size, size] float32) in raster order."""
        return [(Tile(y, x, self.size), np.outer(wy, wx))
                for y, wy in zip(self.ys, self.wy) for x, wx in zip(self.xs, self.wx)]

    def weight_sum(self) -> np.ndarray:
        """Σ of all tile weights per pixel, float32 [H, W] (> 0 everywhere)."""
        acc = np.zeros((self.height, self.width), dtype=np.float32)
        for tile, w in self.tiles():
            acc[tile.slices] += w
        return acc


def default_overlap(tile: int) -> int:
    """A quarter of the tile (a multiple of 8 when possible): wide enough for a smooth ramp."""
    o = tile // 4
    return max(o - o % 8, min(o, 8)) if o >= 8 else o
