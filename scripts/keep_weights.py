"""Keep a run's weights compactly: `python scripts/keep_weights.py runs/m2/latest_ema.safetensors OUT`.

Copies a weights-only checkpoint in a compact form, metadata and all: ``--latents int8`` (the
default; the 1-bit convs' latent weights as int8, every sign and per-channel alpha kept, the rest
float32), so that a later session continues with ``scripts/train.py --init OUT`` at the same
step count (``bidiff-m2-x2``, 12.8 M parameters: 15.7 MB, under git's 25 MB a file); or
``--latents signs`` (one bit a weight and alpha: 5.3 MB), the form the package ships, which every
install down to a Raspberry Pi carries and which is exported, not trained.
``--set KEY=VALUE`` records sampler settings a run from scratch lacks (``default_steps``,
``tile`` and the keys of ``SAMPLER_METADATA``), as a checkpoint to export or ship needs them.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from bidiff.models import load_checkpoint, save_checkpoint
from bidiff.exporter.export import check_tile
from bidiff.models.checkpoint import SAMPLER_METADATA, checkpoint_sampler, read_metadata
from bidiff.runtime.bounds import STEPS

SETTABLE = ("default_steps", "tile", *SAMPLER_METADATA)


def _settings(pairs: list[str]) -> dict[str, str]:
    """``--set`` entries, checked as the exporter checks them when it reads the metadata
    (``STEPS``, ``check_tile``; the sampler keys are checked with the whole metadata)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in SETTABLE:
            raise SystemExit(f"keep_weights: --set {pair!r}: expected KEY=VALUE with KEY one of "
                             f"{', '.join(SETTABLE)}")
        number = int(value) if value.isdigit() else value
        try:
            if key == "default_steps":
                STEPS.check(number, "default_steps")
            elif key == "tile":
                check_tile(number)
        except ValueError as e:
            raise SystemExit(f"keep_weights: --set {key}: {e}") from None
        out[key] = value
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="a bidiff .safetensors checkpoint (e.g. a run's latest_ema)")
    parser.add_argument("dst", type=Path, help="where to write the compact copy")
    parser.add_argument("--latents", choices=("int8", "signs"), default="int8",
                        help="int8: training continues from the latent magnitudes (default) | signs: "
                             "only what the forward uses, for the shipped copy")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"set a metadata entry ({', '.join(SETTABLE)}); repeatable")
    args = parser.parse_args()
    try:
        model, cfg = load_checkpoint(args.src)
    except ValueError as e:
        raise SystemExit(f"keep_weights: {e}") from None
    meta = {k: v for k, v in read_metadata(args.src).items() if k not in ("format", "config")}
    meta.update(_settings(args.set))
    try:
        checkpoint_sampler(meta, str(args.src))
    except ValueError as e:
        raise SystemExit(f"keep_weights: {e}") from None
    args.dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        save_checkpoint(args.dst, model, cfg, meta, latents=args.latents)
    except ValueError as e:
        raise SystemExit(f"keep_weights: {e}") from None
    print(f"wrote {args.dst} ({args.dst.stat().st_size / 1e6:.1f} MB, step {meta.get('steps', '?')})")


if __name__ == "__main__":
    main()
