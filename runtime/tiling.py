"""Overlapping tiles and their blending weights, for running a fixed-size graph on any image.

The sampler runs the network on every tile at every denoising step and blends the ε estimates
in the overlaps with these weights before the DDIM update, so neighbouring tiles agree on one
ε per pixel and no seam can form (blending only the final images would leave seams).

Weights per tile are separable 1-D windows: 1 in the interior, a raised-cosine ramp from ~0 to 1
across each side that overlaps a neighbour, and 1 right up to the image border (a border pixel
has no other tile to share with). Every ramp value is strictly positive, so the summed weight is
> 0 everywhere and ``blend = Σ w·ε / Σ w`` is well defined. A single tile gets weight 1 exactly,
so tiling an image that fits one tile changes nothing bit for bit.

The plan, per axis: the fewest tiles whose even spacing keeps every overlap >= a minimum
(``default_overlap``: an eighth of the tile, unless the caller names one), first and last flush
with the edges, and the others starting on the network's input multiple (``TileGrid.create``).
Strides differ by at most 1 px unaligned, by at most two alignment steps aligned; the overlap
the spacing leaves over widens the ramps rather than adding tiles. A 1280 x 960 output at tile
128 takes 12 x 9 = 108 tiles (130 at the former quarter-tile minimum; 80 would be no overlap).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def axis_starts(length: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Start offsets of the fewest tiles of size ``tile`` that cover [0, length) evenly with
    every overlap >= ``overlap``; all but the last (flush with the end) are multiples of
    ``align`` (the network's downsampling factor: see ``TileGrid.create``)."""
    if tile < 1 or length < tile:
        raise ValueError(f"an axis of {length} cannot hold a tile of {tile}: pad the image first")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in 0..{tile - 1}, got {overlap}")
    if align < 1:
        raise ValueError(f"align must be >= 1, got {align}")
    if length == tile:
        return [0]
    last, most = length - tile, tile - overlap        # the last start; the largest stride
    # Evenly spread, then snapped to the alignment grid. Unsnapped (align 1), the spacing
    # last / (n - 1) is <= most and so is its rounding: the first n tried fits. Snapping moves
    # a start by <= align / 2, so a tile more may be needed; where no spacing of at least
    # ``align`` fits, alignment is dropped.
    for n in range(max(2, math.ceil((length - overlap) / most)), last // align + 2):
        starts = [align * round(i * last / (n - 1) / align) for i in range(n - 1)] + [last]
        strides = [b - a for a, b in zip(starts, starts[1:])]
        if min(strides) > 0 and max(strides) <= most:
            return starts
    return axis_starts(length, tile, overlap)


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
    def create(cls, height: int, width: int, size: int, overlap: int, align: int = 1) -> "TileGrid":
        """Tiles of ``size`` with overlaps >= ``overlap``. align: the network's input multiple
        (``Manifest.input_multiple``): a tile starting off that grid sees the image at another
        phase of its downsampling, so its ε disagrees with its neighbours' (the shipped model:
        twice the interior difference of an aligned tile)."""
        ys, xs = axis_starts(height, size, overlap, align), axis_starts(width, size, overlap, align)
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
    """The least overlap when the caller names none: an eighth of the tile (16 px of 128), at
    least 8 px where the tile allows it. The error a ramp hides sits in a few pixels, not a
    share of the tile: the shipped model's ε on a 128 tile differs from the whole image's by
    0.22 (mean |Δ|) at the tile's edge, 0.04 one pixel in and, from 4 px in, by its interior
    0.012 (statistics over the tile), and a 16-px ramp weights the edge pixel 0.002.
    tests/test_runtime_e2e.py bounds the tiled-vs-whole difference on the tiny model."""
    return max(tile // 8, min(8, tile // 4))
