"""Y-channel PSNR/SSIM against independent references (hand values, skimage, OpenCV)."""
import math

import numpy as np
import pytest

from bidiff.models.metrics import psnr_y, rgb_to_y, ssim_y


def _pair(seed: int = 0, shape=(40, 48, 3)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ref = rng.random(shape)
    img = np.clip(ref + rng.normal(0, 0.05, shape), 0, 1)
    return img, ref


def test_y_of_black_and_white_is_the_bt601_range():
    assert rgb_to_y(np.zeros((1, 1, 3)))[0, 0] == pytest.approx(16.0)
    assert rgb_to_y(np.ones((1, 1, 3)))[0, 0] == pytest.approx(235.0)


def test_psnr_hand_value():
    # Offsetting all three channels by v moves Y by (65.481 + 128.553 + 24.966) v = 219 v,
    # so MSE = (219 v)^2 and PSNR = 20 log10(255 / (219 v)).
    ref = np.full((8, 8, 3), 0.5)
    v = 0.01
    assert psnr_y(ref + v, ref) == pytest.approx(20 * math.log10(255 / (219 * v)), abs=1e-9)
    assert psnr_y(ref, ref) == math.inf


def test_border_crop_ignores_the_frame():
    img, ref = _pair()
    framed = img.copy()
    framed[:2], framed[-2:], framed[:, :2], framed[:, -2:] = 0, 0, 0, 0
    assert psnr_y(framed, ref, border=2) == pytest.approx(psnr_y(img, ref, border=2))
    assert psnr_y(framed, ref, border=2) != pytest.approx(psnr_y(framed, ref))


def test_psnr_and_ssim_match_skimage_on_the_y_channel():
    from skimage import metrics
    img, ref = _pair(1)
    b = 2
    ya, yb = rgb_to_y(img)[b:-b, b:-b], rgb_to_y(ref)[b:-b, b:-b]
    assert psnr_y(img, ref, border=b) == pytest.approx(
        metrics.peak_signal_noise_ratio(yb, ya, data_range=255), abs=1e-10)
    expected = metrics.structural_similarity(ya, yb, data_range=255, gaussian_weights=True,
                                             sigma=1.5, use_sample_covariance=False)
    # skimage crops the same 5-pixel margin of its 'same' filtering: equal up to rounding.
    assert ssim_y(img, ref, border=b) == pytest.approx(expected, abs=1e-10)


def test_ssim_matches_basicsr_opencv_formula():
    import cv2
    img, ref = _pair(2)
    a, b = rgb_to_y(img), rgb_to_y(ref)
    k = cv2.getGaussianKernel(11, 1.5)
    win = k @ k.T
    f = lambda x: cv2.filter2D(x, -1, win)[5:-5, 5:-5]  # noqa: E731  (BasicSR's _ssim)
    mu1, mu2 = f(a), f(b)
    s1, s2, s12 = f(a * a) - mu1 ** 2, f(b * b) - mu2 ** 2, f(a * b) - mu1 * mu2
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    expected = (((2 * mu1 * mu2 + c1) * (2 * s12 + c2)) /
                ((mu1 ** 2 + mu2 ** 2 + c1) * (s1 + s2 + c2))).mean()
    assert ssim_y(img, ref) == pytest.approx(expected, abs=1e-8)


def test_identical_images_have_ssim_one_and_more_noise_lowers_it():
    ref = np.full((32, 32, 3), 0.5)
    noise = np.random.default_rng(3).normal(0, 1, ref.shape)
    scores = [ssim_y(np.clip(ref + s * noise, 0, 1), ref) for s in (0.0, 0.02, 0.1)]
    assert scores[0] == pytest.approx(1.0)
    assert scores[0] > scores[1] > scores[2]
    assert scores[2] < 0.5


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="one shape"):
        psnr_y(np.zeros((8, 8, 3)), np.zeros((8, 9, 3)))
