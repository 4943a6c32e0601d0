"""How much of the error the LR alone decides: `python scripts/projection_floor.py -i data/train`.

For random HR crops, the HR image itself back-projected onto its own LR (3 rounds, as the
runtime does) against the HR image, Y-PSNR with a 2-pixel border: the ceiling of any network
whose output is back-projected, per degradation. It is what `--loss-target projected` leaves
out of the loss (docs/EXPERIMENTS.md, 2026-12-07).
"""
from __future__ import annotations

import argparse

import numpy as np
from PIL import Image

from bidiff.models.data import downsample, jpeg_round_trip, load_images
from bidiff.models.metrics import psnr_y
from bidiff.runtime.consistency import back_project

R = Image.Resampling
# name -> (Pillow downscaler, JPEG quality or None): the `mixed` training downscalers, then JPEG.
CASES = {"bicubic": (R.BICUBIC, None), "lanczos": (R.LANCZOS, None), "box": (R.BOX, None),
         "bilinear": (R.BILINEAR, None), "bicubic+jpeg95": (R.BICUBIC, 95),
         "bicubic+jpeg85": (R.BICUBIC, 85), "bicubic+jpeg70": (R.BICUBIC, 70),
         "bicubic+jpeg50": (R.BICUBIC, 50)}


def projection_floor(images: list[np.ndarray], *, crops: int, size: int, scale: int, rounds: int,
                     seed: int) -> dict[str, float]:
    """Mean Y-PSNR (dB) of BP(HR) against HR per ``CASES`` entry over the same random crops."""
    rng = np.random.default_rng(seed)
    picks = [(i, rng.integers(0, images[i].shape[0] - size), rng.integers(0, images[i].shape[1] - size))
             for i in rng.integers(0, len(images), crops)]
    out = {}
    for name, (resampler, quality) in CASES.items():
        scores = []
        for i, y, x in picks:
            hr = images[i][y:y + size, x:x + size]
            lr = downsample(hr, scale, resampler)
            if quality:
                lr = jpeg_round_trip(lr, quality)
            h = np.moveaxis(hr, -1, 0).astype(np.float32) / 255
            low = np.moveaxis(lr, -1, 0).astype(np.float32) / 255
            bp = np.moveaxis(back_project(h, low, scale, rounds), 0, -1)
            scores.append(psnr_y(bp, np.moveaxis(h, 0, -1), border=2))
        out[name] = float(np.mean(scores))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-i", "--input", default="data/train", help="folder of HR images")
    parser.add_argument("--crops", type=int, default=24, help="random crops (default: 24)")
    parser.add_argument("--size", type=int, default=256, help="crop side in HR pixels (default: 256)")
    parser.add_argument("--rounds", type=int, default=3, help="back-projection rounds (default: 3)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    images = [im for im in load_images(args.input) if min(im.shape[:2]) > args.size]
    if not images:
        raise SystemExit(f"{args.input}: no image larger than {args.size} px on both sides")
    for name, db in projection_floor(images, crops=args.crops, size=args.size, scale=2,
                                     rounds=args.rounds, seed=args.seed).items():
        print(f"{name:16s} {db:6.2f} dB")


if __name__ == "__main__":
    main()
