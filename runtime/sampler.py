"""Tiled DDIM sampling over a backend: the device-side counterpart of ``bidiff.models.sampler``.

1. cond = bicubic x scale of the LR image (``bicubic.upscale_condition``), reflect-padded up to
   one tile where the image is smaller than a tile.
2. x_T ~ N(0, 1), float32, of the padded HR size, from ``np.random.default_rng(seed)``.
3. For each DDIM timestep t (``schedule.DDIMScheduler``, η = 0, the artifact's timestep
   spacing), the network timestep t' = max(0, t - time_shift) (0 unless the model was tuned
   with one) and its group k = group_of(t') (the artifact's group table; default
   ``schedule.timestep_group``): run the network on every tile (one at a time; several at
   once over RPC servers, ``pool``), blend its outputs (ε, or x0 for an x0-predicting model)
   in tile order in the overlaps with the tile windows (``tiling``), then take one DDIM step on
   the whole image.
4. image = ``Formulation.to_image(x0, cond)`` cropped to the HR size, back-projected onto the
   LR image ``back_projection`` times (``consistency``; 0 unless the model was tuned with it)
   and clamped to [0, 1]. A model with an LR correction (``Formulation.lr_correction``)
   outputs three more channels, blended like the rest; the last step's, downscaled, move the
   LR that back-projection aims at.

Memory: the whole-image buffers are x_t, cond, the ε accumulator and the inverse weight sum
(3.33 arrays of 3 x H x W float32; one more for an LR correction's channels); tiles are
processed one at a time and the DDIM update runs in place band by band, so nothing else grows
with the image area (the bicubic condition's float64 work buffers come and go before sampling
starts; back-projection, after the loop, raised the measured peak of a 1024² output by about
two 3 x H x W buffers: README, peak memory).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from typing import Any, Protocol

import numpy as np

from . import schedule
from .consistency import back_project, check_back_projection, downscale
from .bicubic import upscale_condition
from .formulation import Formulation
from .tiling import TileGrid, default_overlap

BAND_PIXELS = 1 << 18                    # pixels per band of the in-place DDIM update

Progress = Callable[[int, int], None]
"""progress(done, total): network evaluations done so far out of steps x tiles."""
StepHook = Callable[[int, int, np.ndarray, np.ndarray], None]
"""on_step(index, t, x_t, eps): the padded x_t a step starts from and its blended ε (read-only
views, valid during the call), for step-by-step comparisons with a reference sampler."""


class EpsModel(Protocol):
    """What the sampler needs from a backend: the network output (ε or x0, as the model's
    ``Formulation.prediction`` says) for one tile of one group. A model may also have
    ``run_tiles(group, t, n, tile_input)`` with :func:`run_in_turn`'s contract (outputs in
    tile order, so the blend adds them in the same order and gives the same bits) to evaluate
    one step's tiles concurrently."""
    tile: int

    def run(self, group: int, x_t: np.ndarray, cond: np.ndarray, t: np.ndarray) -> np.ndarray:
        """x_t, cond float32 [1, 3, S, S], t int64 [1, 1] -> output float32 [1, C, S, S]
        (C = ``Formulation.output_channels``)."""


TileInput = Callable[[int], tuple[np.ndarray, np.ndarray]]
"""tile_input(k) -> (x_t, cond) of tile k of the current step, float32 [1, 3, S, S] copies."""


def run_in_turn(model: EpsModel, group: int, t: np.ndarray, n: int,
                tile_input: TileInput) -> Iterator[np.ndarray]:
    """A step's ``n`` tile outputs in tile order, one network call at a time: what the sampler
    does unless the model has a ``run_tiles`` of its own (``pool``: several servers at once).
    Lazy, so only one tile's inputs exist at a time."""
    for k in range(n):
        yield model.run(group, *tile_input(k), t)


def pad_to_tile(cond: np.ndarray, tile: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Reflect-pad a [3, H, W] condition at the bottom/right so both sides are >= ``tile``."""
    _, h, w = cond.shape
    ph, pw = max(0, tile - h), max(0, tile - w)
    if ph == 0 and pw == 0:
        return cond, (h, w)
    # numpy's reflect repeats the reflection when the pad exceeds the side; sides are >= 2 here.
    return np.pad(cond, ((0, 0), (0, ph), (0, pw)), mode="reflect"), (h, w)


def sample(model: EpsModel, lr: np.ndarray, *, scale: int, formulation: Formulation,
           back_projection: int = 0, **kw: Any) -> np.ndarray:
    """Super-resolve ``lr`` (float32 [3, h, w] in [0, 1]) -> float32 [3, h·scale, w·scale] in [0, 1].

    ``kw``: ``sample_unprojected``'s settings. Deterministic: the same inputs, seed and backend
    give identical bytes.
    """
    back_projection = check_back_projection(back_projection)
    img, aim = sample_unprojected(model, lr, scale=scale, formulation=formulation, **kw)
    if back_projection:
        img = back_project(img, aim, scale, back_projection)
    img = np.clip(img, 0, 1, out=img if img.dtype == np.float32 else None)
    return np.ascontiguousarray(img, dtype=np.float32)      # a copy only when it was cropped


def sample_unprojected(model: EpsModel, lr: np.ndarray, *, scale: int, formulation: Formulation,
                       steps: int = 50, seed: int = 0, overlap: int | None = None,
                       time_shift: int = 0, timestep_spacing: str = "leading",
                       group_of: Callable[[int], int] = schedule.timestep_group,
                       progress: Progress | None = None,
                       on_step: StepHook | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The sampled image before back-projection and clamping (float32 [3, h·scale, w·scale]),
    and the LR back-projection aims at: ``lr`` itself, or ``lr`` corrected by the model.

    ``overlap`` (HR pixels between neighbouring tiles, at least) defaults to an eighth of the tile.
    """
    lr = np.ascontiguousarray(lr, dtype=np.float32)
    if lr.ndim != 3 or lr.shape[0] != 3:
        raise ValueError(f"lr must be [3, h, w], got {lr.shape}")
    tile = int(model.tile)
    sched = schedule.DDIMScheduler(time_shift=time_shift, timestep_spacing=timestep_spacing,
                                   prediction_type=formulation.prediction)
    timesteps = sched.set_timesteps(steps)

    cond, (hr_h, hr_w) = pad_to_tile(upscale_condition(lr, scale), tile)
    cond = np.ascontiguousarray(cond, dtype=np.float32)
    _, H, W = cond.shape
    x_t = np.random.default_rng(seed).standard_normal((3, H, W), dtype=np.float32)

    grid = TileGrid.create(H, W, tile, default_overlap(tile) if overlap is None else overlap,
                           align=int(getattr(model, "input_multiple", 1)))   # tiles in phase
    tiles = grid.tiles()
    inv_wsum = (np.float32(1) / grid.weight_sum())[None]          # [1, H, W]
    single = len(tiles) == 1
    out_all = np.empty((formulation.output_channels, H, W), np.float32)
    eps = out_all[:3]
    t_buf = np.empty((1, 1), dtype=np.int64)
    total, done = len(timesteps) * len(tiles), 0
    band = max(1, BAND_PIXELS // W)          # rows per DDIM-update band

    def tile_input(k: int) -> tuple[np.ndarray, np.ndarray]:
        ys, xs = tiles[k][0].slices
        return (np.ascontiguousarray(x_t[None, :, ys, xs]),
                np.ascontiguousarray(cond[None, :, ys, xs]))
    run_tiles = getattr(model, "run_tiles", None) or partial(run_in_turn, model)

    for i, t in enumerate(timesteps):
        t_net = int(sched.model_timesteps[i])
        group = int(group_of(t_net))
        t_buf[0, 0] = t_net
        if not single:
            out_all.fill(0)
        for e, (tl, w) in zip(run_tiles(group, t_buf, len(tiles), tile_input), tiles):
            ys, xs = tl.slices
            if single:
                out_all[...] = e[0]
            else:
                out_all[:, ys, xs] += w * e[0]
            done += 1
            if progress is not None:
                progress(done, total)
        if not single:
            out_all *= inv_wsum
        if on_step is not None:
            on_step(i, int(t), x_t, eps)
        # The DDIM update is elementwise, so it runs band by band in place: the same bits as one
        # whole-image call, without whole-image temporaries. After the last step x_t holds x0
        # (there abar_prev = 1, so prev_sample equals pred_original_sample anyway).
        last = i == len(timesteps) - 1
        for y0 in range(0, H, band):
            rows = slice(y0, y0 + band)
            out = sched.step(eps[:, rows], i, x_t[:, rows])
            x_t[:, rows] = out.pred_original_sample if last else out.prev_sample
    aim = lr
    if formulation.lr_correction:
        aim = formulation.lr_target(lr, downscale(out_all[3:, :hr_h, :hr_w], lr.shape[1:]))
    del out_all, eps, inv_wsum

    img = formulation.to_image(x_t[:, :hr_h, :hr_w], cond[:, :hr_h, :hr_w])
    return img, np.ascontiguousarray(aim, dtype=np.float32)
