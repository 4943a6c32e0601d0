"""Image input/output for the runtime: decode safely, split colour and alpha, return the same kind.

What the sampler sees is always RGB float32 [3, H, W] in [0, 1]. Inputs are normalised like so:

- colour: grey (``L``, ``1``, ``I;16``, ``I``, ``F``), palette (``P``), ``CMYK``, ``YCbCr`` ... are
  converted to RGB; 16-bit values are scaled by 1/65535 (so precision is kept up to the model).
  Pillow decodes 16-bit *RGB* PNGs as 8-bit RGB; pass such images as uint16 arrays (e.g. read
  with another library) to keep 16 bits.
- alpha: ``RGBA``, ``LA``, ``PA`` and palette/grey images with a ``transparency`` entry keep their
  alpha channel; it is upscaled with plain bicubic (the same kernel as the condition) and clamped
  to [0, 1], then reattached to the result. The diffusion model only sees the colour.
- numpy arrays: H x W (grey), H x W x 1, H x W x 3 or H x W x 4 (RGBA); dtype uint8, uint16 or
  float (assumed in [0, 1], clipped). The result is an H' x W' x 3 (x 4 with alpha) array of the
  same dtype (float inputs give float32).
- PIL images in -> PIL out: mode ``RGB``, or ``RGBA`` when the input had alpha (8 bits per channel,
  since Pillow has no 16-bit RGB mode). Paths are decoded to PIL (EXIF orientation applied) and
  give PIL out.

Errors are ``ImageError`` (a ``ValueError``) with a one-line message. Pillow's decompression-bomb
limit (``Image.MAX_IMAGE_PIXELS``, ~89.5 M pixels) is enforced as an error; set the environment
variable ``BIDIFF_MAX_PIXELS`` (an integer, 0 = no limit) to raise it.
"""
from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .bicubic import resize_bicubic

MIN_SIDE = 4            # smaller inputs carry too little to pad by reflection meaningfully
MAX_PIXELS_ENV = "BIDIFF_MAX_PIXELS"
_PIL_LIMIT_LOCK = threading.Lock()   # Image.MAX_IMAGE_PIXELS and warnings filters are global

Kind = Literal["pil", "uint8", "uint16", "float"]


class ImageError(ValueError):
    """An unreadable or unusable image; the message is one line and says what to do."""


@dataclass(frozen=True)
class ImageInput:
    rgb: np.ndarray             # float32 [3, H, W] in [0, 1]
    alpha: np.ndarray | None    # float32 [H, W] in [0, 1], or None
    kind: Kind                  # what to give back
    channels: int               # array inputs: 3 or 4 channels out (grey arrays give 3)

    @property
    def size(self) -> tuple[int, int]:
        return self.rgb.shape[1], self.rgb.shape[2]


def max_pixels() -> int | None:
    """The decompression-bomb limit in pixels (None: no limit)."""
    env = os.environ.get(MAX_PIXELS_ENV)
    if env is not None and env.strip():
        try:
            n = int(env)
        except ValueError:
            raise ImageError(f"{MAX_PIXELS_ENV}={env!r} is not an integer (0 = no limit)") from None
        return None if n <= 0 else n
    return Image.MAX_IMAGE_PIXELS


def _check_pixels(w: int, h: int, name: str, limit: int | None) -> None:
    if limit is not None and w * h > limit:
        raise ImageError(f"{name} is {w}x{h} = {w * h} pixels, over the decompression-bomb limit of "
                         f"{limit}: if you trust it, set {MAX_PIXELS_ENV}={w * h} (or 0 for no limit)")


def _check_side(h: int, w: int, name: str) -> None:
    if h < MIN_SIDE or w < MIN_SIDE:
        raise ImageError(f"{name} is {w}x{h}; bidiff needs at least {MIN_SIDE}x{MIN_SIDE} pixels")


def open_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image file, turning every failure into a one-line ImageError."""
    p = Path(path)
    name = str(p)
    if not p.exists():
        raise ImageError(f"{name} does not exist")
    if p.is_dir():
        raise ImageError(f"{name} is a directory, not an image")
    try:
        if p.stat().st_size == 0:
            raise ImageError(f"{name} is empty (0 bytes)")
        limit = max_pixels()
        with _PIL_LIMIT_LOCK, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            saved = Image.MAX_IMAGE_PIXELS
            try:
                # Pillow's own check is replaced by ours (same default limit), which runs on the
                # header's size before anything is decoded and names the exact pixel count.
                Image.MAX_IMAGE_PIXELS = None
                im = Image.open(p)
                _check_pixels(im.width, im.height, name, limit)
                im.load()
            finally:
                Image.MAX_IMAGE_PIXELS = saved
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{name} exceeds the decompression-bomb limit of {limit} pixels: "
                         f"if you trust it, set {MAX_PIXELS_ENV} to a larger value (0 = no limit)") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name} is not an image Pillow can read (wrong extension or not an image file)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        if "truncated" in msg.lower() or isinstance(e, EOFError):
            raise ImageError(f"{name} is truncated or damaged ({msg})") from None
        raise ImageError(f"{name} cannot be decoded ({msg})") from None
    return im


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info


def from_pil(im: Image.Image, *, name: str = "image") -> ImageInput:
    _check_side(im.height, im.width, name)
    alpha = None
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im)
        if im.mode == "F":
            grey = np.clip(a.astype(np.float32), 0, 1)
        else:
            grey = np.clip(a.astype(np.float64) / 65535.0, 0, 1).astype(np.float32)
        rgb = np.broadcast_to(grey, (3,) + grey.shape).copy()
    elif _has_alpha(im):
        a = np.asarray(im.convert("RGBA"), dtype=np.float32) / np.float32(255)
        rgb = np.ascontiguousarray(np.moveaxis(a[..., :3], -1, 0))
        alpha = np.ascontiguousarray(a[..., 3])
    else:
        a = np.asarray(im.convert("RGB"), dtype=np.float32) / np.float32(255)
        rgb = np.ascontiguousarray(np.moveaxis(a, -1, 0))
    return ImageInput(rgb=rgb, alpha=alpha, kind="pil", channels=4 if alpha is not None else 3)


def from_array(arr: np.ndarray, *, name: str = "array") -> ImageInput:
    a = np.asarray(arr)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        a = np.stack([a, a, a], axis=-1)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ImageError(f"{name} has shape {a.shape}; expected H x W, H x W x 3 or H x W x 4")
    _check_side(a.shape[0], a.shape[1], name)
    if a.dtype == np.uint8:
        kind: Kind = "uint8"
        f = a.astype(np.float32) / np.float32(255)
    elif a.dtype == np.uint16:
        kind = "uint16"
        f = (a.astype(np.float64) / 65535.0).astype(np.float32)
    elif np.issubdtype(a.dtype, np.floating):
        kind = "float"
        if not np.all(np.isfinite(a)):
            raise ImageError(f"{name} contains NaN or infinite values")
        f = np.clip(a, 0, 1).astype(np.float32)
    else:
        raise ImageError(f"{name} has dtype {a.dtype}; expected uint8, uint16 or float")
    rgb = np.ascontiguousarray(np.moveaxis(f[..., :3], -1, 0))
    alpha = np.ascontiguousarray(f[..., 3]) if a.shape[2] == 4 else None
    return ImageInput(rgb=rgb, alpha=alpha, kind=kind, channels=a.shape[2])


def load_input(image: Any) -> ImageInput:
    """A PIL image, a path or a numpy array -> ImageInput (see the module docstring)."""
    if isinstance(image, Image.Image):
        return from_pil(image)
    if isinstance(image, (str, os.PathLike)):
        # Files: honour the EXIF orientation, as viewers do (an in-memory PIL image is taken as is).
        return from_pil(ImageOps.exif_transpose(open_image(image)), name=str(image))
    if isinstance(image, np.ndarray):
        return from_array(image)
    raise ImageError(f"cannot upscale a {type(image).__name__}; pass a PIL image, a path or a numpy array")


def upscale_alpha(alpha: np.ndarray, scale: int) -> np.ndarray:
    """Plain bicubic x``scale`` of an alpha plane, clamped to [0, 1]."""
    h, w = alpha.shape
    return np.clip(resize_bicubic(alpha, (h * scale, w * scale)), 0, 1)


def _quantize(hwc: np.ndarray, dtype: type) -> np.ndarray:
    """[0, 1] floats -> round(x * max) in ``dtype``, a band of rows at a time (no big temporaries)."""
    top = np.float32(np.iinfo(dtype).max)
    out = np.empty(hwc.shape, dtype=dtype)
    step = max(1, (1 << 18) // max(1, hwc.shape[1]))
    for y in range(0, hwc.shape[0], step):
        band = np.clip(hwc[y:y + step], 0, 1) * top
        out[y:y + step] = np.round(band, out=band)
    return out


def to_output(rgb: np.ndarray, alpha: np.ndarray | None, inp: ImageInput) -> Any:
    """RGB float [3, H, W] in [0, 1] (+ alpha [H, W]) -> the kind ``inp`` came as."""
    hwc = np.moveaxis(rgb, 0, -1)                     # a view
    if alpha is not None:
        hwc = np.concatenate([hwc, alpha[..., None]], axis=-1)
    if inp.kind == "pil":
        return Image.fromarray(_quantize(hwc, np.uint8))      # H x W x 3 -> RGB, x 4 -> RGBA
    if inp.kind == "uint8":
        return _quantize(hwc, np.uint8)
    if inp.kind == "uint16":
        return _quantize(hwc, np.uint16)
    return np.clip(hwc, 0, 1).astype(np.float32, copy=False)


def save_image(im: Image.Image, path: str | os.PathLike) -> None:
    """Write atomically: a temp file in the same folder, then rename over ``path``."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    fmt = Image.registered_extensions().get(p.suffix.lower())
    if fmt is None:
        raise ImageError(f"cannot write {p.suffix or 'files without an extension'}: use .png, .jpg, .webp or .tif")
    if fmt == "JPEG" and im.mode == "RGBA":
        raise ImageError(f"{p.name}: JPEG has no alpha channel; write a .png")
    try:
        with open(tmp, "wb") as f:
            im.save(f, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except OSError as e:
        raise ImageError(f"cannot write {p} ({' '.join(str(e).split())})") from None
    finally:
        if tmp.exists():
            tmp.unlink()
