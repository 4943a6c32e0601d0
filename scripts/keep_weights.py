"""Keep a run's weights compactly: `python scripts/keep_weights.py runs/m2/latest_ema.safetensors OUT`.

Copies a weights-only checkpoint in the compact form (``save_checkpoint(compact=True)``: the
1-bit convs' latent weights as int8, every sign and per-channel alpha kept; the rest float32),
metadata and all, so that a later session continues with ``scripts/train.py --init OUT`` at the
same step count. ``bidiff-m2-x2`` (12.8 M parameters) takes 15.7 MB, under git's 25 MB a file.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from bidiff.models import load_checkpoint, save_checkpoint
from bidiff.models.checkpoint import read_metadata


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="a bidiff .safetensors checkpoint (e.g. a run's latest_ema)")
    parser.add_argument("dst", type=Path, help="where to write the compact copy")
    args = parser.parse_args()
    try:
        model, cfg = load_checkpoint(args.src)
    except ValueError as e:
        raise SystemExit(f"keep_weights: {e}") from None
    meta = {k: v for k, v in read_metadata(args.src).items() if k not in ("format", "config")}
    args.dst.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(args.dst, model, cfg, meta, compact=True)
    print(f"wrote {args.dst} ({args.dst.stat().st_size / 1e6:.1f} MB, step {meta.get('steps', '?')})")


if __name__ == "__main__":
    main()
