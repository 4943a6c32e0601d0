"""Pack what a lent-GPU call carries: `python scripts/pack_carry.py` -> build/carry.

Why: a device call carries at most 64 MiB of untracked files, and data/train's PNGs (63.5 MiB)
plus the image teachers (3.9 MiB) do not fit. Lossless WebP stores the same pixels in about
70 % of the bytes, and ``models.data.list_images`` reads it in the same sorted order, so a run
on build/carry/train sees the very data stream a run on data/train sees. Every file is decoded
back and compared with its source before the folder is published; on any failure (or an
oversized result) nothing is written. Usage on the device: docs/TRAINING.md.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from bidiff.models.data import list_images, load_rgb

CARRY_LIMIT = 64 * 2**20     # bytes a device call may carry (/work/.library/device/README.md)


def pack(train: Path, teachers: Path, out: Path, *, limit: int = CARRY_LIMIT) -> int:
    """Write ``out``/train (lossless WebP of every training image) and ``out``/teachers (a
    copy); returns the bytes written. Raises SystemExit with one line on a user error."""
    if not (teachers / "teacher.json").is_file():
        raise SystemExit(f"no teachers in {teachers} (run scripts/prepare_data.py --teachers first)")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (staging / "train").mkdir()
        sources = list_images(train)
        for src in sources:
            pixels = load_rgb(src)
            dst = staging / "train" / (src.stem + ".webp")
            Image.fromarray(pixels).save(dst, "WEBP", lossless=True, quality=100, method=6)
            if not np.array_equal(load_rgb(dst), pixels):
                raise SystemExit(f"{dst.name}: lossless WebP did not give back the pixels of {src}")
        if [p.stem for p in list_images(staging / "train")] != [p.stem for p in sources]:
            raise SystemExit(f"the .webp names of {train} sort in another order than the originals "
                             f"(a dot in a file name?): rename them, or the data stream would change")
        shutil.copytree(teachers, staging / "teachers")
        size = sum(p.stat().st_size for p in staging.rglob("*") if p.is_file())
        if size > limit:
            raise SystemExit(f"packed data is {size / 2**20:.1f} MiB, over the {limit / 2**20:.0f} MiB "
                             f"a device call carries: carry the training images in two calls")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
        return size
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=Path, default=Path("data/train"))
    parser.add_argument("--teachers", type=Path, default=Path("data/teachers"))
    parser.add_argument("--out", type=Path, default=Path("build/carry"))
    args = parser.parse_args()
    size = pack(args.train, args.teachers, args.out)
    print(f"{args.out}: {size / 2**20:.1f} MiB (carry it: run(carry=['{args.out}']))")


if __name__ == "__main__":
    main()
