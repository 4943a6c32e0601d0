"""runtime.sampler + runtime.tiling with fake in-memory backends (numpy functions of x_t, cond, t).

The references here are written from the DDIM formulas directly (not through DDIMScheduler's
code path) where the test is about the loop, so they cannot share a bug with it.
"""
from __future__ import annotations

import numpy as np
import pytest

from bidiff.runtime import schedule
from bidiff.runtime.bicubic import upscale_condition
from bidiff.runtime.consistency import back_project, downscale
from bidiff.runtime.formulation import Formulation
from bidiff.runtime.sampler import sample
from bidiff.runtime.tiling import TileGrid, axis_starts, axis_windows, default_overlap

OFFICIAL = Formulation()
AC = schedule.alphas_cumprod().astype(np.float64)


class PointwiseModel:
    """eps = 0.3 x_t + (0.2 + 0.1 k) cond - 0.05 + 1e-5 t: depends on the group and t, pointwise."""
    name = "fake"

    def __init__(self, tile: int | None) -> None:
        self.tile, self.calls = tile, []        # tile None: any shape (the untiled reference)

    def run(self, group, x_t, cond, t):
        assert t.dtype == np.int64 and x_t.shape == cond.shape
        assert self.tile is None or x_t.shape == (1, 3, self.tile, self.tile)
        self.calls.append((group, int(t[0, 0])))
        return (np.float32(0.3) * x_t + np.float32(0.2 + 0.1 * group) * cond
                - np.float32(0.05) + np.float32(1e-5) * t.astype(np.float32)[..., None, None]).astype(np.float32)


class BlurIdealModel:
    """The ideal ε for x0 = 3x3 box blur of cond with ZERO padding at the tile edge: a model with
    a receptive field, so a tile's border pixels are wrong (as a real network's are). Pasting
    tiles shows dark seams; blending ε must hide them."""
    name = "blur"

    def __init__(self, tile: int) -> None:
        self.tile = tile

    def run(self, group, x_t, cond, t):
        p = np.pad(cond.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
        s = self.tile
        x0 = sum(p[..., i:i + s, j:j + s] for i in range(3) for j in range(3)) / 9
        a = AC[int(t[0, 0])]
        return ((x_t - np.sqrt(a) * x0) / np.sqrt(1 - a)).astype(np.float32)


def lr_image(h: int, w: int, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).random((3, h, w), dtype=np.float32)


def reference_ddim(model, lr: np.ndarray, *, scale: int, steps: int, seed: int,
                   time_shift: int = 0) -> np.ndarray:
    """Untiled DDIM written out from the paper's formulas, float32, one network call per step
    (at t - time_shift, floored at 0; the update itself uses t)."""
    cond = upscale_condition(lr, scale).astype(np.float32)
    x = np.random.default_rng(seed).standard_normal(cond.shape, dtype=np.float32)
    ratio = 2000 // steps
    ts = [i * ratio for i in range(steps)][::-1]
    for i, t in enumerate(ts):
        tn = max(t - time_shift, 0)
        eps = model.run(min(tn * 5 // 2000, 4), x[None], cond[None], np.array([[tn]], np.int64))[0]
        a_t = np.float32(AC[t])
        a_p = np.float32(AC[ts[i + 1]]) if i + 1 < len(ts) else np.float32(1)
        x0 = np.clip((x - np.sqrt(np.float32(1) - a_t) * eps) / np.sqrt(a_t), -1, 1)
        x = (np.sqrt(a_p) * x0 + np.sqrt(np.float32(1) - a_p) * eps).astype(np.float32)
    return np.clip(x0, 0, 1)


def test_axis_tiling_covers_and_overlaps() -> None:
    for length, tile, ov in [(32, 32, 8), (33, 32, 8), (100, 32, 8), (96, 32, 0), (1000, 64, 16)]:
        st = axis_starts(length, tile, ov)
        assert st[0] == 0 and st[-1] == length - tile and st == sorted(set(st))
        assert all(b - a <= tile - ov for a, b in zip(st, st[1:]))              # overlap >= ov
        ws = axis_windows(st, tile)
        total = np.zeros(length)
        for s, w in zip(st, ws):
            assert w.min() > 0 and w.max() == 1
            total[s:s + tile] += w
        assert total.min() > 0.5
    grid = TileGrid.create(32, 32, 32, 8)
    (tile, w), = grid.tiles()
    assert (w == 1).all()                                                       # one tile: weight 1


@pytest.mark.parametrize("tile", [32, 64, 128])
@pytest.mark.parametrize("align", [1, 4, 8])
def test_tile_plan_covers_evenly_with_the_least_tiles(tile: int, align: int) -> None:
    """Every length from one tile to 6: first and last tile flush with the edges (every pixel
    covered), every overlap >= the minimum, strides within 1 px of each other (unaligned) or on
    the alignment grid, and no fewer tiles could keep the minimum overlap."""
    for ov in sorted({default_overlap(tile), 0, tile // 4}):
        for length in range(tile, 6 * tile + 1):
            st = axis_starts(length, tile, ov, align)
            strides = np.diff(st)
            assert st[0] == 0 and st[-1] == length - tile
            assert (strides > 0).all() and (strides <= tile - ov).all(), (length, ov, st)
            if len(st) < 3:
                continue
            least = axis_starts(length, tile, ov)
            assert (length - tile) / (len(least) - 2) > tile - ov          # one fewer: too far apart
            if align == 1:
                assert st == least and strides.max() - strides.min() <= 1
            else:
                assert all(s % align == 0 for s in st[:-1]), (length, ov, st)
                assert len(st) <= len(least) + 1 and strides.max() - strides.min() <= 2 * align


def test_tile_plan_for_a_640x480_input() -> None:
    """1280 x 960 at tile 128: 12 x 9 tiles (overlaps 16-24), not 13 x 10 at the former
    quarter-tile minimum, which an explicit overlap=32 still gives."""
    grid = TileGrid.create(960, 1280, 128, default_overlap(128), align=4)
    assert default_overlap(128) == 16 and (len(grid.ys), len(grid.xs)) == (9, 12)
    overlaps = [128 - d for d in np.diff(grid.xs).tolist() + np.diff(grid.ys).tolist()]
    assert 16 <= min(overlaps) and max(overlaps) <= 24
    assert len(TileGrid.create(960, 1280, 128, 32, align=4)) == 130


def test_blend_weights_ramp_across_the_whole_overlap() -> None:
    """Neighbouring ramps are mirror images over the actual (not the minimum) overlap, so the
    weights sum to 1 everywhere the overlaps are at most half a tile: no pixel is weighted
    towards one tile's border."""
    for h, w in [(960, 1280), (200, 130), (128, 300)]:
        grid = TileGrid.create(h, w, 128, default_overlap(128), align=4)
        np.testing.assert_allclose(grid.weight_sum(), 1, rtol=0, atol=1e-6)
    grid = TileGrid.create(300, 128, 128, 16)
    ov = 128 - grid.ys[1]                                            # 3 tiles, overlaps of 42
    (_, w), *_ = grid.tiles()
    assert ov > 16 and (w[-ov:, 0] < 1).all() and (w[:-ov, 0] == 1).all()


def test_single_tile_equals_untiled_loop_bitwise() -> None:
    lr, steps = lr_image(16, 16), 7
    m = PointwiseModel(32)
    got = sample(m, lr, scale=2, formulation=OFFICIAL, steps=steps, seed=5)
    # the plain loop: whole image, DDIMScheduler directly
    cond = upscale_condition(lr, 2).astype(np.float32)
    x = np.random.default_rng(5).standard_normal(cond.shape, dtype=np.float32)
    sch = schedule.DDIMScheduler()
    for i, t in enumerate(sch.set_timesteps(steps)):
        out = sch.step(m.run(schedule.timestep_group(int(t)), x[None], cond[None],
                             np.array([[t]], np.int64))[0], i, x)
        x = out.prev_sample
    assert np.array_equal(got, np.clip(out.pred_original_sample, 0, 1))
    # and every step called the group its t falls in
    assert [g for g, t in m.calls[:steps]] == [min(t * 5 // 2000, 4) for _, t in m.calls[:steps]]


@pytest.mark.parametrize("steps,shift", [(50, 160), (7, 400), (3, 1999)])
def test_time_shift_asks_the_network_at_an_earlier_timestep(steps: int, shift: int) -> None:
    """time_shift moves only the network's t (and so its expert group), never the update."""
    lr, m = lr_image(16, 16), PointwiseModel(32)
    got = sample(m, lr, scale=2, formulation=OFFICIAL, steps=steps, seed=1, time_shift=shift)
    ts = [i * (2000 // steps) for i in range(steps)][::-1]
    assert m.calls == [(min(max(t - shift, 0) * 5 // 2000, 4), max(t - shift, 0)) for t in ts]
    ref = reference_ddim(PointwiseModel(32), lr, scale=2, steps=steps, seed=1, time_shift=shift)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4)
    plain = sample(PointwiseModel(32), lr, scale=2, formulation=OFFICIAL, steps=steps, seed=1)
    assert np.abs(got - plain).max() > 1e-3


@pytest.mark.parametrize("steps", [1, 3, 50])
def test_loop_matches_independent_reference(steps: int) -> None:
    lr = lr_image(16, 16)
    got = sample(PointwiseModel(32), lr, scale=2, formulation=OFFICIAL, steps=steps, seed=1)
    ref = reference_ddim(PointwiseModel(32), lr, scale=2, steps=steps, seed=1)
    # float32 with a different order of operations: a few ulp per step
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=0)


def test_tiled_pointwise_equals_untiled() -> None:
    """3x2 tiles of a pointwise model blend identical ε values: only rounding may differ."""
    lr = lr_image(40, 28)                                                       # HR 80 x 56
    tiled = sample(PointwiseModel(32), lr, scale=2, formulation=OFFICIAL, steps=4, seed=2,
                   overlap=8)
    whole = reference_ddim(PointwiseModel(None), lr, scale=2, steps=4, seed=2)
    grid = TileGrid.create(80, 56, 32, 8)
    assert (len(grid.ys), len(grid.xs)) == (3, 2)
    np.testing.assert_allclose(tiled, whole, atol=2e-5)


def _seam_error(overlap: int) -> float:
    yy, xx = np.mgrid[0:60, 0:40].astype(np.float32)
    lr = np.stack([0.2 + 0.6 * xx / 39, 0.2 + 0.6 * yy / 59, 0.5 + 0 * xx])      # smooth gradients
    hr_h, hr_w = 120, 80                                           # exactly 3 x 2 tiles of 40
    tiled = sample(BlurIdealModel(40), lr, scale=2, formulation=OFFICIAL, steps=3, seed=0,
                   overlap=overlap)
    grid = TileGrid.create(hr_h, hr_w, 40, overlap)
    assert (len(grid.ys), len(grid.xs)) == ((3, 2) if overlap == 0 else (4, 3))
    whole = sample(BlurIdealModel(max(hr_h, hr_w)), lr, scale=2, formulation=OFFICIAL, steps=3, seed=0)
    # the error of the vertical / horizontal gradient: a seam is a jump in it at a tile border.
    # The outer 2 pixels are left out: there the untiled run sees reflect padding, not zeros.
    tiled, whole = tiled[:, 2:-2, 2:-2], whole[:, 2:-2, 2:-2]
    gy = np.abs(np.diff(tiled, axis=1) - np.diff(whole, axis=1))
    gx = np.abs(np.diff(tiled, axis=2) - np.diff(whole, axis=2))
    return float(max(gy.max(), gx.max()))


def test_no_seam_on_3x2_tiles() -> None:
    pasted, blended = _seam_error(0), _seam_error(10)
    assert pasted > 0.05              # the test can see a seam: pasted tiles show the zero padding
    assert blended < 4e-3, blended    # blended ε: the tile edge's weight is ~0.006 of a 10-px ramp


def test_same_seed_same_bytes_and_small_images_padded() -> None:
    lr = lr_image(5, 7)                                                         # HR 10 x 14 < tile
    a = sample(PointwiseModel(32), lr, scale=2, formulation=OFFICIAL, steps=3, seed=9)
    b = sample(PointwiseModel(32), lr, scale=2, formulation=OFFICIAL, steps=3, seed=9)
    c = sample(PointwiseModel(32), lr, scale=2, formulation=OFFICIAL, steps=3, seed=10)
    assert a.shape == (3, 10, 14) and a.tobytes() == b.tobytes() and not np.array_equal(a, c)


def test_residual_formulation_and_progress() -> None:
    class Ideal:   # x0 = 0 residual: the result is the bicubic condition itself
        tile = 32

        def run(self, group, x_t, cond, t):
            return (x_t / np.sqrt(1 - AC[int(t[0, 0])])).astype(np.float32)
    lr = lr_image(40, 20)
    seen = []
    out = sample(Ideal(), lr, scale=2, formulation=Formulation("residual", 4.0), steps=2, seed=0,
                 progress=lambda d, n: seen.append((d, n)))
    np.testing.assert_allclose(out, np.clip(upscale_condition(lr, 2), 0, 1), atol=1e-6)
    n = seen[-1][1]
    assert seen == [(i, n) for i in range(1, n + 1)] and n == 2 * len(TileGrid.create(80, 40, 32, 8))


def test_banded_ddim_update_is_bit_identical(monkeypatch) -> None:
    """The in-place band-by-band DDIM update gives the bits of one whole-image update."""
    import bidiff.runtime.sampler as S
    lr = lr_image(40, 28)
    whole = sample(PointwiseModel(32), lr, scale=2, formulation=Formulation("residual", 4.0), steps=3, seed=4)
    monkeypatch.setattr(S, "BAND_PIXELS", 56 * 7 + 3)          # bands of 7 rows, ragged last band
    banded = S.sample(PointwiseModel(32), lr, scale=2, formulation=Formulation("residual", 4.0), steps=3, seed=4)
    assert banded.tobytes() == whole.tobytes() and banded.flags.c_contiguous


def test_back_projection_corrects_the_result_towards_the_lr_image() -> None:
    """back_projection=n is consistency.back_project(n) of the sampled image before the clamp,
    and each round brings the result's Pillow-bicubic downscale closer to the LR input."""
    lr = 0.2 + 0.6 * lr_image(16, 16)              # keeps the blurred x0 inside [0, 1] (no clamp)
    made = {n: sample(BlurIdealModel(32), lr, scale=2, formulation=OFFICIAL, steps=5, seed=2,
                      back_projection=n) for n in (0, 1, 3)}
    for n in (1, 3):
        np.testing.assert_allclose(made[n], np.clip(back_project(made[0], lr, 2, n), 0, 1),
                                   rtol=0, atol=1e-6)
    err = [np.abs(downscale(made[n], (16, 16)) - lr).max() for n in (0, 1, 3)]
    assert err[0] > 0.05 and err[0] > 2 * err[1] > 4 * err[2]
    with pytest.raises(ValueError, match=r"^back_projection must be an integer in 0\.\.16, got 17$"):
        sample(BlurIdealModel(32), lr, scale=2, formulation=OFFICIAL, steps=1, back_projection=17)
