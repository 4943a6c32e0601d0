"""Measure the sampler settings of a checkpoint on a validation folder (never the held-out one).

    python scripts/tune_sampler.py -c runs/x/latest_ema.safetensors --steps 50 20 10 --write

Exports the checkpoint once (TVM for this host when the compiler is installed, else ONNX), then
samples every validation crop through the device runtime at each step count and time shift,
back-projects each result 0..N times, and prints mean Y PSNR/SSIM against bicubic. ``--write``
stores the choice in the checkpoint's metadata (``time_shift``, ``time_shifts``,
``back_projection``), from where exports and ``scripts/eval.py`` take it (``DDIMScheduler``
and ``consistency`` say why).

Each step count gets its own shift, since the best one moves with the step count (the runtime
takes the nearest measured one, ``schedule.time_shift_for``); ``time_shift`` and the rounds are
those chosen at the checkpoint's default steps. The choice (``choose``) is robust rather than
the bare maximum: each shift is scored by the worst PSNR among itself and its neighbours in
the sweep (each with its best rounds), since the PSNR can fall off a cliff right after its
peak; rounds within 0.01 dB of a shift's best count as ties and the fewest win
(docs/tune-sampler-step5046.md).

Validation crops: every ``--stride``-th photo of the folder, one ``--crop`` px square centred in
its top-left quadrant (away from the centre crops that reports use).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from bidiff import runtime
from bidiff.exporter import export_artifact
from bidiff.models import SHIPPED_CHECKPOINT
from bidiff.models.checkpoint import read_metadata
from bidiff.models.data import list_images, load_rgb, make_pair
from bidiff.models.evaluate import to_uint8
from bidiff.models.metrics import psnr_y, ssim_y
from bidiff.runtime.consistency import back_project
from bidiff.runtime.sampler import sample


def validation_pairs(folder: Path, *, crop: int, stride: int, scale: int) -> list:
    pairs = []
    for path in list_images(folder)[::stride]:
        hr = load_rgb(path)
        h, w = hr.shape[:2]
        y, x = max(0, h // 4 - crop // 2), max(0, w // 4 - crop // 2)
        hr = hr[y:y + crop, x:x + crop]
        pairs.append(make_pair(hr[:hr.shape[0] // scale * scale, :hr.shape[1] // scale * scale], scale))
    return pairs


def score(pairs: list, images: list[np.ndarray], scale: int) -> tuple[float, float]:
    ps, ss = [], []
    for pair, img in zip(pairs, images):
        out, hr = to_uint8(img) / 255, to_uint8(pair.hr[0]) / 255
        ps.append(psnr_y(out, hr, border=scale))
        ss.append(ssim_y(out, hr, border=scale))
    return float(np.mean(ps)), float(np.mean(ss))


def write_sampler(path: Path, settings: dict[str, int | str]) -> None:
    """Rewrite ``path`` with the sampler settings in its metadata (tensors untouched), atomically."""
    with safe_open(str(path), framework="np") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta = {**read_metadata(path), **{k: str(v) for k, v in settings.items()}}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


def choose(rows: dict[tuple[int, int], tuple[float, float]]) -> dict[str, int]:
    """(shift, rounds) -> (PSNR, SSIM) sweep -> the settings to ship (module docstring)."""
    shifts = sorted({shift for shift, _ in rows})
    best_n = {}
    for s in shifts:
        top = max(rows[t, n][0] for t, n in rows if t == s)
        best_n[s] = min(n for t, n in rows if t == s and rows[t, n][0] >= top - 0.01)
    psnr = [rows[s, best_n[s]][0] for s in shifts]
    worst = [min(psnr[max(0, i - 1):i + 2]) for i in range(len(shifts))]
    shift = shifts[max(range(len(shifts)), key=lambda i: (worst[i], psnr[i]))]
    return {"time_shift": shift, "back_projection": best_n[shift]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--checkpoint", type=Path, default=SHIPPED_CHECKPOINT)
    parser.add_argument("-i", "--input", type=Path, default=Path("data/validation"),
                        help="validation photos, never trained on (default: data/validation)")
    parser.add_argument("--shifts", type=int, nargs="+", default=[0, 80, 120, 160, 200, 240, 280, 320])
    parser.add_argument("--back-projections", type=int, nargs="+", default=[0, 1, 2, 4],
                        help="back-projection rounds to try on every sample (default: 0 1 2 4)")
    parser.add_argument("--steps", type=int, nargs="+", default=[50],
                        help="step counts, each tuned for its own shift (default: 50); the "
                             "checkpoint's default_steps must be one of them")
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--stride", type=int, default=1, help="every N-th photo (default: 1)")
    parser.add_argument("--target", default="x86_64", help="export target (default: x86_64; onnx "
                        "when the TVM compiler is missing)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--write", action="store_true",
                        help="store the chosen settings in the checkpoint's metadata")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        target = args.target if importlib.util.find_spec("tvm") is not None else "onnx"
        export_artifact(args.checkpoint, target=target, out=Path(tmp) / "a", progress=False,
                        measure_float=False)
        with runtime.load(Path(tmp) / "a", threads=args.threads) as up:
            reference = up.manifest.default_steps
            if reference not in args.steps:
                raise SystemExit(f"--steps must include the checkpoint's default steps ({reference})")
            scale = up.scale
            pairs = validation_pairs(args.input, crop=args.crop, stride=args.stride, scale=scale)
            bicubic = score(pairs, [p.cond[0] for p in pairs], scale)
            rows: dict[int, dict[tuple[int, int], tuple[float, float]]] = {}
            for steps in args.steps:
                rows[steps] = {}
                for shift in args.shifts:
                    made = [sample(up.backend, p.lr[0], scale=scale, formulation=up.formulation,
                                   steps=steps, seed=0, time_shift=shift,
                                   timestep_spacing=up.manifest.timestep_spacing,
                                   group_of=lambda t: up.manifest.group_for(t).index) for p in pairs]
                    for n in args.back_projections:
                        r = rows[steps][shift, n] = score(
                            pairs, [np.clip(back_project(m, p.lr[0], scale, n), 0, 1)
                                    for m, p in zip(made, pairs)], scale)
                        print(f"steps {steps:3d}, time_shift {shift:4d}, back-projection {n:2d}: "
                              f"{r[0]:.2f} dB / {r[1]:.4f}", flush=True)
    print(f"\n{len(pairs)} crops of {args.crop} px from {args.input}, backend {up.backend_name}; "
          f"bicubic {bicubic[0]:.2f} dB / {bicubic[1]:.4f}\n\n"
          "| steps | time shift | back-projection | PSNR (dB, Y) | SSIM (Y) |\n|---|---|---|---|---|")
    for steps, table in rows.items():
        for (shift, n), (p, s) in table.items():
            print(f"| {steps} | {shift} | {n} | {p:.2f} | {s:.4f} |")
    chosen = {steps: choose(table) for steps, table in rows.items()}
    settings = {**chosen[reference],
                "time_shifts": json.dumps({str(k): v["time_shift"] for k, v in chosen.items()})}
    print(f"\nchosen: time_shift {settings['time_shift']}, back_projection "
          f"{settings['back_projection']} at {reference} steps; time_shifts {settings['time_shifts']}")
    if args.write:
        write_sampler(args.checkpoint, settings)
        print(f"written to {args.checkpoint} metadata")


if __name__ == "__main__":
    main()
