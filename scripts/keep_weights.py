"""Keep a run's weights compactly: `python scripts/keep_weights.py runs/m2/latest_ema.safetensors OUT`.

Copies a weights-only checkpoint as float16 (half the bytes of a model still in training; the
signs and scales of the binary weights survive it), metadata and all, so that a later session
continues with ``scripts/train.py --init OUT`` at the same step count. Small enough for git
(≤ 25 MB a file) up to about 12 M parameters: ``bidiff-m2-x2`` is just over.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bidiff.models import load_checkpoint, save_checkpoint
from bidiff.models.checkpoint import read_metadata


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="a bidiff .safetensors checkpoint (e.g. a run's latest_ema)")
    parser.add_argument("dst", type=Path, help="where to write the float16 copy")
    args = parser.parse_args()
    try:
        model, cfg = load_checkpoint(args.src)
    except ValueError as e:
        raise SystemExit(f"keep_weights: {e}") from None
    meta = {k: v for k, v in read_metadata(args.src).items() if k not in ("format", "config")}
    args.dst.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(args.dst, model, cfg, meta, dtype=torch.float16)
    print(f"wrote {args.dst} ({args.dst.stat().st_size / 1e6:.1f} MB, step {meta.get('steps', '?')})")


if __name__ == "__main__":
    main()
