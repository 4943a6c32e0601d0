"""runtime.ensemble: the geometric self-ensemble, with fake x0 models (numpy functions)."""
from __future__ import annotations

import numpy as np
import pytest

from bidiff.runtime.bicubic import upscale_condition
from bidiff.runtime.consistency import back_project
from bidiff.runtime.ensemble import sample_ensemble, transform, untransform
from bidiff.runtime.formulation import Formulation
from bidiff.runtime.sampler import sample

X0 = Formulation("residual", 4.0, "sample")
ONE_STEP = dict(scale=2, formulation=X0, steps=1, timestep_spacing="trailing")


class RampModel:
    """x0 = a ramp along the tile's columns (and, with ``rows``, its rows): biased to one
    orientation, as a real network is a little."""
    name = "ramp"
    input_multiple = 1

    def __init__(self, tile: int, rows: bool = False) -> None:
        self.tile, self.rows, self.calls = tile, rows, 0

    def run(self, group, x_t, cond, t):
        self.calls += 1
        ramp = np.float32(0.4) * np.arange(self.tile, dtype=np.float32) / self.tile
        x0 = np.broadcast_to(ramp, x_t.shape) + (ramp[:, None] if self.rows else 0)
        return np.ascontiguousarray(x0, dtype=np.float32)


class PointwiseModel(RampModel):
    """x0 = 0.8 cond - 0.3: no orientation at all, so every pass gives the same image."""

    def run(self, group, x_t, cond, t):
        self.calls += 1
        return (np.float32(0.8) * cond - np.float32(0.3)).astype(np.float32)


def _lr(h: int, w: int) -> np.ndarray:
    return (0.2 + 0.4 * np.random.default_rng(1).random((3, h, w))).astype(np.float32)


def test_transforms_invert_on_non_square_arrays():
    a = np.arange(2 * 3 * 5).reshape(2, 3, 5)
    for turns in range(4):
        for mirror in (False, True):
            assert np.array_equal(untransform(transform(a, turns, mirror), turns, mirror), a)
    assert np.array_equal(transform(a, 0, True), a[..., ::-1])
    assert transform(a, 1, False).shape == (2, 5, 3)


def test_one_pass_is_the_sampler_itself():
    lr = _lr(8, 12)
    want = sample(RampModel(16), lr, back_projection=2, **ONE_STEP)
    assert np.array_equal(sample_ensemble(RampModel(16), lr, ensemble=1, back_projection=2, **ONE_STEP), want)


def test_averaging_cancels_the_orientation_bias():
    """One 16x16 tile: a single pass adds ramp / 4 = 0.1 j / 16 to the condition; the mirrored
    pass adds the reversed ramp, so the mean of the two adds 0.1 (j + 15 - j) / 32 = 3 / 64."""
    lr = _lr(8, 8)
    cond = upscale_condition(lr, 2)
    one = sample_ensemble(RampModel(16), lr, ensemble=1, **ONE_STEP)
    np.testing.assert_allclose(one, cond + np.arange(16, dtype=np.float32) / 160, atol=1e-6)
    model = RampModel(16)
    two = sample_ensemble(model, lr, ensemble=2, **ONE_STEP)
    np.testing.assert_allclose(two, cond + np.float32(3 / 64), atol=1e-6)
    assert model.calls == 2
    # ramps along rows and columns: all 8 passes leave a flat offset, twice that ...
    eight = sample_ensemble(RampModel(16, rows=True), lr, ensemble=8, **ONE_STEP)
    np.testing.assert_allclose(eight, cond + np.float32(3 / 32), atol=1e-6)
    # ... while 4 (the image, its mirror, a quarter turn of each) flatten the columns only
    four = sample_ensemble(RampModel(16, rows=True), lr, ensemble=4, **ONE_STEP)
    assert np.ptp(four - cond) > 0.02
    # back-projection runs once, on the mean
    bp = sample_ensemble(RampModel(16), lr, ensemble=2, back_projection=3, **ONE_STEP)
    np.testing.assert_allclose(bp, np.clip(back_project(two, lr, 2, 3), 0, 1), atol=1e-6)


def test_every_pass_is_tiled_alike_and_counted():
    """A 20x12 input (40x24 out, several tiles, the turned passes 24x40): a model with no
    orientation gives the plain result; progress counts every network call of every pass."""
    lr = _lr(12, 20)
    plain = sample(PointwiseModel(16), lr, back_projection=3, **ONE_STEP)
    seen = []
    model = PointwiseModel(16)
    got = sample_ensemble(model, lr, ensemble=8, back_projection=3,
                          progress=lambda done, total: seen.append((done, total)), **ONE_STEP)
    np.testing.assert_allclose(got, plain, atol=1e-5)
    assert len(seen) == model.calls and seen[-1] == (model.calls, model.calls)
    assert [d for d, _ in seen] == list(range(1, model.calls + 1))
    with pytest.raises(ValueError, match="ensemble must be one of 1, 2, 4, 8, got 3"):
        sample_ensemble(model, lr, ensemble=3, **ONE_STEP)


class CorrectingRampModel(RampModel):
    """x0 = 0, and an LR correction = a ramp along the tile's columns (channels 3-5)."""

    def run(self, group, x_t, cond, t):
        self.calls += 1
        ramp = np.float32(0.4) * np.arange(self.tile, dtype=np.float32) / self.tile
        corr = np.broadcast_to(ramp, x_t.shape)
        return np.ascontiguousarray(np.concatenate([np.zeros_like(x_t), corr], 1), dtype=np.float32)


def test_lr_corrections_are_averaged_like_the_images():
    """A correcting model's passes each aim back-projection at their own corrected LR; the
    ensemble aims at the mean of those (untransformed), so the mirrored ramps cancel to a flat
    offset: the same as back-projecting onto lr + that offset."""
    from bidiff.runtime.consistency import downscale
    form = Formulation("residual", 4.0, "sample", lr_correction=True)
    kw = dict(ONE_STEP, formulation=form)
    lr = _lr(8, 8)
    cond = upscale_condition(lr, 2)
    ramp = np.broadcast_to(np.float32(0.4) * np.arange(16, dtype=np.float32) / 16, (3, 16, 16))
    one = sample_ensemble(CorrectingRampModel(16), lr, ensemble=1, back_projection=2, **kw)
    np.testing.assert_allclose(one, np.clip(back_project(cond, lr + downscale(ramp, (8, 8)) / 4, 2, 2), 0, 1),
                               atol=1e-6)
    two = sample_ensemble(CorrectingRampModel(16), lr, ensemble=2, back_projection=2, **kw)
    mean_aim = lr + (downscale(ramp, (8, 8)) + downscale(ramp[..., ::-1], (8, 8))) / 8
    np.testing.assert_allclose(two, np.clip(back_project(cond, mean_aim, 2, 2), 0, 1), atol=1e-6)
    assert not np.allclose(one, two, atol=1e-3)
