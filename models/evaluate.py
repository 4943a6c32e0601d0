"""Evaluate a checkpoint against bicubic on a folder of HR photos (Y-channel PSNR/SSIM).

Protocol: each HR image is (optionally) centre-cropped to at most ``max_side`` per side and
trimmed to a multiple of the scale; LR = Pillow BICUBIC downscale (``models.data``), the
baseline is the shared INTER_CUBIC condition itself, and the model samples with the reference
DDIM sampler at each requested step count from one fixed seed. Outputs are rounded to 8 bits
(as saved images) before PSNR/SSIM on Y with border = scale (``models.metrics``).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from bidiff.models import ModelConfig
from bidiff.models.checkpoint import checkpoint_sampler, read_metadata
from bidiff.models.data import list_images, load_rgb, make_pair
from bidiff.models.layers import HardBinaryConv
from bidiff.models.metrics import psnr_y, ssim_y
from bidiff.models.sampler import sample
from bidiff.runtime.consistency import back_project
from bidiff.runtime.schedule import check_time_shifts, time_shift_for


@dataclass
class EvalResult:
    """Per-image scores {method: {image: [psnr, ssim]}}; methods are 'bicubic' and '<n> steps'."""
    scores: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    info: dict[str, str] = field(default_factory=dict)

    def mean(self, method: str) -> tuple[float, float]:
        vals = np.array(list(self.scores[method].values()))
        return float(vals[:, 0].mean()), float(vals[:, 1].mean())


def center_crop(hr: np.ndarray, *, max_side: int | None, multiple: int) -> np.ndarray:
    """Centre crop to at most max_side per side, then down to a multiple of ``multiple``."""
    h, w = hr.shape[:2]
    ch, cw = (min(h, max_side), min(w, max_side)) if max_side else (h, w)
    ch, cw = ch - ch % multiple, cw - cw % multiple
    y, x = (h - ch) // 2, (w - cw) // 2
    return hr[y:y + ch, x:x + cw]


def to_uint8(chw: np.ndarray) -> np.ndarray:
    """[3, H, W] float in [0, 1] -> HWC uint8, rounded as an image file would store it."""
    return (np.clip(np.moveaxis(chw, 0, -1), 0, 1) * 255).round().astype(np.uint8)


def model_size(model: torch.nn.Module) -> dict[str, int]:
    binary = sum(m.weight.numel() for m in model.modules() if isinstance(m, HardBinaryConv))
    total = sum(t.numel() for t in model.state_dict().values())
    return {"stored_numbers": total, "binary_weights": binary, "full_precision": total - binary}


Runner = Callable[..., np.ndarray]
"""runner(lr [3, h, w] float32, *, steps, seed, time_shift, back_projection) -> image [3, H, W]
in [0, 1]: another sampler to score, e.g. ``functools.partial(bidiff.runtime.sampler.sample,
backend, scale=..., formulation=...)``."""


def evaluate(model: torch.nn.Module, config: ModelConfig, images: Sequence[tuple[str, np.ndarray]],
             *, steps: Sequence[int] = (50, 20, 10), seed: int = 0,
             max_side: int | None = None, time_shift: int | Mapping[int, int] = 0,
             back_projection: int = 0, runner: Runner | None = None,
             ) -> tuple[EvalResult, dict[str, np.ndarray]]:
    """Score bicubic and the model on HWC uint8 HR ``images``; also return the images made.

    ``time_shift``: one shift for every step count, or {steps: shift}. With ``back_projection``
    the table also scores bicubic back-projected the same way: the honest baseline for what the
    model itself adds. ``runner``: sample through it (e.g. the device runtime on an exported
    artifact, tile by tile, as users run the model) instead of the PyTorch sampler, which runs
    each image whole; crops of one size then go as one batch (the same noise seed per batch).
    """
    scale = config.scale
    pairs = {name: make_pair(center_crop(hr, max_side=max_side, multiple=scale), scale)
             for name, hr in images}
    result = EvalResult()
    outputs: dict[str, np.ndarray] = {}
    by_shape: dict[tuple[int, ...], list[str]] = {}
    for name, pair in pairs.items():
        by_shape.setdefault(pair.hr.shape, []).append(name)
    methods: list[tuple[str, int | None]] = [("bicubic", None)]
    if back_projection:
        methods.append((f"bicubic + back-projection x{back_projection}", 0))
    methods += [(f"{n} steps", n) for n in steps]
    model.eval()
    for method, n in methods:
        result.scores[method] = {}
        for names in by_shape.values():
            cond = np.concatenate([pairs[k].cond for k in names])
            lr = np.concatenate([pairs[k].lr for k in names])
            if n is None:
                made = cond
            elif n == 0:                     # bicubic + back-projection
                made = np.clip([back_project(c, low, scale, back_projection) for c, low in zip(cond, lr)], 0, 1)
            else:
                kw = dict(steps=n, seed=seed, back_projection=back_projection,
                          time_shift=time_shift[n] if isinstance(time_shift, Mapping) else time_shift)
                if runner is not None:
                    made = np.stack([runner(low, **kw) for low in lr])
                else:
                    made = sample(model, torch.from_numpy(cond), formulation=config.formulation,
                                  lr=lr, **kw).image.numpy()
            for k, img in zip(names, made):
                out, hr = to_uint8(img), to_uint8(pairs[k].hr[0])
                outputs[f"{k}/{method}"] = out
                outputs[f"{k}/HR"] = hr
                result.scores[method][k] = [psnr_y(out / 255, hr / 255, border=scale),
                                            ssim_y(out / 255, hr / 255, border=scale)]
    return result, outputs


def markdown_table(result: EvalResult) -> str:
    """Mean table (one row per method), then a per-image PSNR/SSIM table."""
    methods = list(result.scores)
    lines = ["| method | PSNR (dB, Y) | SSIM (Y) |", "|---|---|---|"]
    for m in methods:
        p, s = result.mean(m)
        lines.append(f"| {m} | {p:.2f} | {s:.4f} |")
    names = list(result.scores[methods[0]])
    lines += ["", "| image | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for k in names:
        cells = [f"{result.scores[m][k][0]:.2f} / {result.scores[m][k][1]:.3f}" for m in methods]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def comparison_picture(outputs: dict[str, np.ndarray], names: Sequence[str], sr_method: str,
                       *, crop: int = 128, gap: int = 4) -> Image.Image:
    """Rows of centre crops: bicubic | SR (``sr_method``) | HR, one row per image."""
    rows = []
    for k in names:
        tiles = [outputs[f"{k}/{m}"] for m in ("bicubic", sr_method, "HR")]
        tiles = [center_crop(t, max_side=crop, multiple=1) for t in tiles]
        h, w = tiles[0].shape[:2]
        row = np.full((h, 3 * w + 2 * gap, 3), 255, np.uint8)
        for i, t in enumerate(tiles):
            row[:, i * (w + gap):i * (w + gap) + w] = t
        rows.append(row)
    width = max(r.shape[1] for r in rows)
    sheet = np.full((sum(r.shape[0] for r in rows) + gap * (len(rows) - 1), width, 3), 255, np.uint8)
    y = 0
    for r in rows:
        sheet[y:y + r.shape[0], :r.shape[1]] = r
        y += r.shape[0] + gap
    return Image.fromarray(sheet)


def run_eval(checkpoint: str | Path | None, folder: str | Path, out_dir: str | Path, *,
             steps: Sequence[int] = (50, 20, 10), seed: int = 0, max_side: int | None = None,
             limit: int | None = None, picture_crop: int = 128,
             time_shift: int | None = None, back_projection: int | None = None,
             runner: Runner | None = None, runner_name: str = "") -> EvalResult:
    """Evaluate a checkpoint (None: the shipped one) on a folder; write results.md/.json and
    comparison.png into ``out_dir``. ``time_shift``, ``back_projection``: None = the
    checkpoint's (``checkpoint_sampler``; the shift for each step count as
    ``Manifest.time_shift_for`` picks it), as an artifact exported from it would sample.
    ``runner``: see ``evaluate``; ``runner_name`` says what it is in results.md."""
    from bidiff.models import SHIPPED_CHECKPOINT, load_checkpoint

    path = Path(checkpoint) if checkpoint else SHIPPED_CHECKPOINT
    model, config = load_checkpoint(path)
    files = list_images(folder)[:limit]
    images = [(p.stem, load_rgb(p)) for p in files]
    meta = read_metadata(path) if path.suffix == ".safetensors" else {}
    tuned = checkpoint_sampler(meta, path.name)
    table = check_time_shifts(tuned["time_shifts"])
    shifts = {n: time_shift_for(n, table, tuned["time_shift"]) if time_shift is None else time_shift
              for n in steps}
    back_projection = tuned["back_projection"] if back_projection is None else back_projection
    t0 = time.monotonic()
    result, outputs = evaluate(model, config, images, steps=steps, seed=seed, max_side=max_side,
                               time_shift=shifts, back_projection=back_projection, runner=runner)
    result.info = {"checkpoint": str(path), "config": config.name,
                   "formulation": config.formulation.type, "folder": str(folder),
                   "max_side": str(max_side), "seed": str(seed),
                   "time_shift": ", ".join(f"{n} steps: {v}" for n, v in shifts.items()),
                   "back_projection": str(back_projection),
                   "sampler": runner_name if runner is not None else "PyTorch, whole images",
                   "eval_seconds": f"{time.monotonic() - t0:.0f}",
                   **{k: meta[k] for k in ("steps", "train_seconds", "hardware", "weights") if k in meta},
                   **{k: str(v) for k, v in model_size(model).items()}}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    header = "\n".join(f"- {k}: {v}" for k, v in result.info.items())
    (out / "results.md").write_text(header + "\n\n" + markdown_table(result))
    (out / "results.json").write_text(json.dumps(asdict(result), indent=1) + "\n")
    sr_method = f"{max(steps)} steps" if steps else "bicubic"
    comparison_picture(outputs, [name for name, _ in images], sr_method,
                       crop=picture_crop).save(out / "comparison.png")
    return result
