"""Score a checkpoint against bicubic: `python scripts/eval.py -i data/heldout -o runs/eval`.

Writes results.md (mean and per-image Y PSNR/SSIM), results.json and comparison.png
(bicubic | SR | HR crops) into the output folder.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bidiff.models.evaluate import markdown_table, run_eval


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--checkpoint", type=Path, default=None,
                        help="bidiff .safetensors checkpoint (default: the shipped model)")
    parser.add_argument("-i", "--input", type=Path, default=Path("data/heldout"),
                        help="folder of HR images (default: data/heldout)")
    parser.add_argument("-o", "--output", type=Path, default=Path("runs/eval"),
                        help="output folder (default: runs/eval)")
    parser.add_argument("-s", "--steps", type=int, nargs="+", default=[50, 20, 10],
                        help="sampler step counts (default: 50 20 10)")
    parser.add_argument("--max-side", type=int, default=None,
                        help="centre-crop every HR image to at most this many pixels per side "
                             "(default: whole images; 128-256 keeps a CPU run to minutes)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images (sorted)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
    parser.add_argument("--picture-crop", type=int, default=128,
                        help="crop size of each tile in comparison.png (default: 128)")
    parser.add_argument("--time-shift", type=int, default=None,
                        help="sampler time shift (default: the checkpoint's metadata, else 0)")
    parser.add_argument("--back-projection", type=int, default=None,
                        help="LR-consistency rounds (default: the checkpoint's metadata, else 0)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if any(n < 1 for n in args.steps):
        raise SystemExit(f"--steps must be positive, got {args.steps}")
    result = run_eval(args.checkpoint, args.input, args.output, steps=args.steps, seed=args.seed,
                      max_side=args.max_side, limit=args.limit, picture_crop=args.picture_crop,
                      time_shift=args.time_shift, back_projection=args.back_projection)
    print(markdown_table(result), end="")
    print(f"written to {args.output}/")


if __name__ == "__main__":
    main()
