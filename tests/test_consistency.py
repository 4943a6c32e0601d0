"""runtime.consistency: the numpy Pillow-bicubic downscale and back-projection."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bidiff.models.data import downsample
from bidiff.runtime.bicubic import upscale_condition
from bidiff.runtime.consistency import back_project, check_back_projection, downscale

SAMPLE = Path(__file__).resolve().parents[1] / "runtime" / "samples" / "astronaut_128.png"


def pillow_f(img: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(p, np.float32), mode="F")
                                .resize(out_hw[::-1], Image.Resampling.BICUBIC)) for p in img])


@pytest.mark.parametrize("h,w,out_h,out_w", [(128, 128, 64, 64), (37, 54, 18, 27), (64, 100, 16, 25),
                                             (9, 13, 3, 4), (2, 2, 1, 1), (30, 20, 30, 7)])
def test_downscale_is_pillows_bicubic(h: int, w: int, out_h: int, out_w: int) -> None:
    img = np.random.default_rng(h * w).random((3, h, w), dtype=np.float32) * 1.4 - 0.2
    np.testing.assert_allclose(downscale(img, (out_h, out_w)), pillow_f(img, (out_h, out_w)),
                               rtol=0, atol=1e-6)


def test_downscale_of_a_photo_matches_the_training_degradation() -> None:
    """LR for training is Pillow's 8-bit downscale; the float copy agrees to its rounding except
    at a few saturated edges, where the 8-bit path clips its intermediate rows to 0..255."""
    hr = np.asarray(Image.open(SAMPLE).convert("RGB"))
    hr = hr[:hr.shape[0] // 2 * 2, :hr.shape[1] // 2 * 2]
    lr8 = downsample(hr, 2).astype(np.float32) / 255
    ours = downscale(np.moveaxis(hr, -1, 0).astype(np.float32) / 255, lr8.shape[:2])
    diff = np.abs(ours - np.moveaxis(lr8, -1, 0)) * 255
    assert diff.mean() < 0.35 and (diff <= 1.01).mean() > 0.995


def test_back_projection_converges_to_lr_consistency_and_ignores_offsets() -> None:
    rng = np.random.default_rng(0)
    lr = rng.random((3, 12, 10), dtype=np.float32)
    sr = upscale_condition(lr, 2).astype(np.float32) + rng.normal(0, 0.05, (3, 24, 20)).astype(np.float32)
    errs = [np.abs(downscale(back_project(sr, lr, 2, n), (12, 10)) - lr).max() for n in (0, 1, 2, 8)]
    assert errs[0] > 0.02 and all(a > b for a, b in zip(errs, errs[1:])) and errs[-1] < errs[0] / 20
    # down and up both preserve constants, so a brightness offset is removed in one round
    np.testing.assert_allclose(back_project(sr + 0.03, lr, 2, 1), back_project(sr, lr, 2, 1),
                               rtol=0, atol=1e-6)
    assert back_project(sr, lr, 2, 0) is sr


def test_bad_arguments_are_refused() -> None:
    lr = np.zeros((3, 4, 4), np.float32)
    with pytest.raises(ValueError, match=r"^sr is 8x9, expected 8x8 for an LR image of 4x4 at x2$"):
        back_project(np.zeros((3, 8, 9), np.float32), lr, 2, 1)
    for bad in (-1, 17, 1.5, True, "2"):
        with pytest.raises(ValueError, match=r"^back_projection must be an integer in 0\.\.16, got "):
            check_back_projection(bad)
    with pytest.raises(ValueError, match=r"^cannot downscale an image of 4x4 to 5x2$"):
        downscale(lr, (5, 2))
