"""Training pairs: random HR patches, their LR and the shared bicubic condition.

The degradation is ``bicubic`` (Pillow BICUBIC downscaling, antialiased, rounded to 8-bit like a
saved image: what the first models trained on) or one of ``MIXES``: per patch one of Pillow's
antialiased bicubic, Lanczos, box (area) or bilinear downscalers, then with the mix's probability
a JPEG round trip at a quality drawn from its range, so a model does not depend on one
downscaler (users' photos come from many). ``mixed`` is what the shipped models trained on;
``mixed-jpeg`` shows JPEG in half the patches, down to quality 50 (measured worse under every
degradation, JPEG included: docs/EXPERIMENTS.md); ``jpeg-only`` JPEGs every patch at
``mixed``'s qualities, a probe of what a network given only JPEG inputs makes of them (how much
a model that knew its input was JPEG could gain there); ``no-jpeg`` only ``mixed``'s downscalers,
the probe's converse. The condition is
``bidiff.runtime.bicubic``'s INTER_CUBIC-compatible upscaling, the same function the device
runs. Images are preloaded as uint8 arrays because decoding PNGs every step would cost more
than the patch itself.
"""
from __future__ import annotations

import io
import multiprocessing
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageFilter

from bidiff.runtime.bicubic import upscale_condition

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MIXED_RESAMPLERS = (Image.Resampling.BICUBIC, Image.Resampling.LANCZOS, Image.Resampling.BOX,
                    Image.Resampling.BILINEAR)


@dataclass(frozen=True)
class Mix:
    """A training degradation mix: the share of JPEG'd patches and their quality range."""
    jpeg_probability: float
    jpeg_quality: tuple[int, int]   # inclusive range


MIXES = {"mixed": Mix(0.3, (70, 95)), "mixed-jpeg": Mix(0.5, (50, 95)),
         "jpeg-only": Mix(1.0, (70, 95)), "no-jpeg": Mix(0.0, (70, 95))}
DEGRADATIONS = ("bicubic", *MIXES)


@dataclass(frozen=True)
class Batch:
    """float32 NCHW arrays in [0, 1] (cond is unclamped and may overshoot slightly)."""
    hr: np.ndarray
    lr: np.ndarray
    cond: np.ndarray
    jpeg: np.ndarray | None = None    # [N] bool: the LR went through JPEG (training batches)


def list_images(folder: str | Path) -> list[Path]:
    """Image files of a folder in sorted order; a missing or empty folder is a user error."""
    folder = Path(folder)
    files = sorted(p for p in folder.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES) \
        if folder.is_dir() else []
    if not files:
        raise SystemExit(f"no images in {folder} (run scripts/prepare_data.py first?)")
    return files


def load_rgb(path: str | Path) -> np.ndarray:
    """HWC uint8 RGB (greyscale and alpha images converted)."""
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def load_images(folder: str | Path) -> list[np.ndarray]:
    return [load_rgb(p) for p in list_images(folder)]


def downsample(hr: np.ndarray, scale: int,
               resample: Image.Resampling = Image.Resampling.BICUBIC) -> np.ndarray:
    """LR = Pillow (antialiased) downscale of an HWC uint8 image by ``scale``."""
    h, w = hr.shape[:2]
    if h % scale or w % scale:
        raise ValueError(f"HR size {h}x{w} is not a multiple of the scale {scale}")
    img = Image.fromarray(hr).resize((w // scale, h // scale), resample)
    return np.asarray(img, dtype=np.uint8)


def jpeg_round_trip(img: np.ndarray, quality: int) -> np.ndarray:
    """HWC uint8 -> JPEG at ``quality`` (Pillow, 4:2:0) -> HWC uint8."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as dec:
        return np.asarray(dec.convert("RGB"), dtype=np.uint8)


EVAL_DEGRADATIONS = ("bicubic", "lanczos", "bicubic+jpeg85")
"""How scripts/eval.py makes LR images: Pillow BICUBIC (the first models' training degradation),
Pillow LANCZOS, and Pillow BICUBIC followed by a JPEG round trip at quality 85."""

STRESS_DEGRADATIONS = ("box", "blur0.8+bicubic", "bicubic+noise2", "bicubic+jpeg55",
                       "lanczos+jpeg95")
"""Robustness probes (``eval.py --degradations``): box (area) downscaling and a light JPEG,
both inside the ``mixed`` training distribution, and three it never shows — a Gaussian blur of
sigma 0.8 px before bicubic downscaling (a soft lens), Gaussian noise of sigma 2 (of 255) on the
LR (sensor noise, seeded so reruns agree) and JPEG quality 55 (below ``mixed``'s range)."""


def eval_downsample(hr: np.ndarray, scale: int, degradation: str) -> np.ndarray:
    """The LR of an HWC uint8 HR image under one of ``EVAL_DEGRADATIONS`` or
    ``STRESS_DEGRADATIONS``: the name's ``+``-separated parts applied in order (``blurS``
    before the downscaler, ``noiseS`` and ``jpegQ`` after it)."""
    if degradation not in EVAL_DEGRADATIONS + STRESS_DEGRADATIONS:
        raise ValueError(f"unknown degradation {degradation!r}; valid: "
                         f"{', '.join(EVAL_DEGRADATIONS + STRESS_DEGRADATIONS)}")
    img = hr
    for part in degradation.split("+"):
        if part in _DOWNSCALERS:
            img = downsample(img, scale, _DOWNSCALERS[part])
        elif part.startswith("blur"):
            img = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(float(part[4:]))))
        elif part.startswith("noise"):
            noisy = img + np.random.default_rng(0).normal(0.0, float(part[5:]), img.shape)
            img = np.clip(noisy, 0, 255).round().astype(np.uint8)
        else:
            img = jpeg_round_trip(img, int(part.removeprefix("jpeg")))
    return img


_DOWNSCALERS = {"bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
                "box": Image.Resampling.BOX}


def degrade(hr: np.ndarray, scale: int, degradation: str,
            rng: np.random.Generator) -> tuple[np.ndarray, bool]:
    """The LR of one HWC uint8 HR patch under ``degradation`` (see the module docstring), and
    whether it went through JPEG (a loss may treat such patches apart: models.train)."""
    if degradation == "bicubic":
        return downsample(hr, scale), False
    if degradation not in MIXES:
        raise ValueError(f"unknown degradation {degradation!r}; valid: {', '.join(DEGRADATIONS)}")
    mix = MIXES[degradation]
    lr = downsample(hr, scale, MIXED_RESAMPLERS[rng.integers(0, len(MIXED_RESAMPLERS))])
    if rng.random() < mix.jpeg_probability:
        return jpeg_round_trip(lr, rng.integers(mix.jpeg_quality[0], mix.jpeg_quality[1] + 1)), True
    return lr, False


def make_pair(hr: np.ndarray, scale: int, degradation: str = "bicubic") -> Batch:
    """A one-image Batch (HR, LR, condition) from an HWC uint8 HR image (LR made by one of
    ``EVAL_DEGRADATIONS``)."""
    lr = np.moveaxis(eval_downsample(hr, scale, degradation), -1, 0)[None].astype(np.float32) / 255
    return Batch(hr=np.moveaxis(hr, -1, 0)[None].astype(np.float32) / 255, lr=lr,
                 cond=upscale_condition(lr, scale))


def random_patch(image: np.ndarray, patch: int, rng: np.random.Generator,
                 zoom: float = 1.0) -> np.ndarray:
    """A random patch x patch crop under one of the 8 flips/rotations (HWC uint8).

    ``zoom`` < 1 shows the photo at a random scale z in [zoom, 1] (log-uniform): a square of
    about patch / z pixels, as far as the image allows, downscaled to the patch with Pillow's
    antialiased bicubic. Why: 112 photos show each texture at one scale; zooming out shows it at
    many and makes the HR sharper per pixel, as small or downscaled photos are. Never zooms in,
    which would make a blurred HR. ``zoom`` = 1 draws nothing extra, so such runs see the same
    patches as before the option existed.
    """
    if not 0 < zoom <= 1:
        raise ValueError(f"zoom {zoom} is outside (0, 1]")
    h, w = image.shape[:2]
    if h < patch or w < patch:
        raise ValueError(f"image of {h}x{w} is smaller than the {patch}px patch")
    side = patch
    if zoom < 1:
        side = min(h, w, round(patch / float(np.exp(rng.uniform(np.log(zoom), 0.0)))))
    y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    crop = image[y:y + side, x:x + side]
    if side != patch:
        crop = np.asarray(Image.fromarray(crop).resize((patch, patch), Image.Resampling.BICUBIC))
    k, flip = rng.integers(0, 4), rng.integers(0, 2)
    crop = np.rot90(crop, k)
    return np.ascontiguousarray(crop[:, ::-1] if flip else crop)


def sample_batch(images: Sequence[np.ndarray], n: int, *, patch: int, scale: int,
                 rng: np.random.Generator, degradation: str = "bicubic", zoom: float = 1.0) -> Batch:
    """n random training pairs; images are drawn uniformly so small photos are not drowned out."""
    if patch % scale:
        raise ValueError(f"patch {patch} is not a multiple of the scale {scale}")
    hr = np.stack([random_patch(images[i], patch, rng, zoom)
                   for i in rng.integers(0, len(images), n)])
    pairs = [degrade(p, scale, degradation, rng) for p in hr]
    lr = np.moveaxis(np.stack([p[0] for p in pairs]), -1, 1).astype(np.float32) / 255
    return Batch(hr=np.moveaxis(hr, -1, 1).astype(np.float32) / 255, lr=lr,
                 cond=upscale_condition(lr, scale), jpeg=np.array([p[1] for p in pairs]))


def step_rng(seed: int, step: int) -> np.random.Generator:
    """The data RNG of optimizer step ``step``: a pure function of (seed, step), so batches can
    be made ahead in other processes and a resumed run sees the same batches."""
    return np.random.default_rng([seed, step])


_WORKER_IMAGES: Sequence[np.ndarray] = ()


def _set_worker_images(images: Sequence[np.ndarray]) -> None:
    global _WORKER_IMAGES
    _WORKER_IMAGES = images


def _worker_batch(n: int, patch: int, scale: int, seed: int, degradation: str, zoom: float,
                  step: int) -> Batch:
    return sample_batch(_WORKER_IMAGES, n, patch=patch, scale=scale, rng=step_rng(seed, step),
                        degradation=degradation, zoom=zoom)


class BatchStream:
    """Training batches for steps ``start, start + 1, ...``, made ``workers`` processes ahead.

    Why: on a GPU the bicubic pair-making on the CPU (about 20 ms for 16 patches of 64 px)
    costs more than the optimizer step. ``workers=0`` makes each batch inline; any worker count
    yields the same batches, since each is a function of (seed, step) alone. Workers are
    spawned (not forked) because the trainer may already hold CUDA and OpenMP threads.
    """

    def __init__(self, images: Sequence[np.ndarray], n: int, *, patch: int, scale: int,
                 seed: int, start: int, workers: int = 0, degradation: str = "bicubic",
                 zoom: float = 1.0) -> None:
        self._args = (n, patch, scale, seed, degradation, zoom)
        self._images = images
        self._next = start  # step of the batch __next__ returns
        self._ahead = start  # step of the next batch handed to a worker
        self._pool: ProcessPoolExecutor | None = None
        self._queue: deque[Future[Batch]] = deque()
        if workers > 0:
            self._pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_set_worker_images, initargs=(images,))
            for _ in range(2 * workers):
                self._submit()

    def _submit(self) -> None:
        assert self._pool is not None
        self._queue.append(self._pool.submit(_worker_batch, *self._args, self._ahead))
        self._ahead += 1

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if self._pool is None:
            n, patch, scale, seed, degradation, zoom = self._args
            batch = sample_batch(self._images, n, patch=patch, scale=scale,
                                 rng=step_rng(seed, self._next), degradation=degradation, zoom=zoom)
        else:
            batch = self._queue.popleft().result()
            self._submit()
        self._next += 1
        return batch

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
