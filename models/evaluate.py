"""Evaluate a checkpoint against bicubic on a folder of HR photos (Y-channel PSNR/SSIM).

Protocol: each HR image is (optionally) centre-cropped to at most ``max_side`` per side and
trimmed to a multiple of the scale; its LR is made by each requested degradation
(``models.data.EVAL_DEGRADATIONS``: Pillow bicubic, Pillow Lanczos, bicubic + JPEG 85); the
baselines are the shared INTER_CUBIC condition itself and, when the model back-projects, the
same condition back-projected as the model's output is (the honest baseline: what the network
adds beyond a few lines of numpy); the model samples with the reference DDIM sampler (or a
``runner``) with each requested sampler setting, from one fixed seed. Outputs are rounded to 8
bits (as saved images) before PSNR/SSIM on Y with border = scale (``models.metrics``).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

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
from bidiff.runtime.schedule import check_time_shifts, check_timestep_spacing, time_shift_for

BICUBIC = "bicubic"


@dataclass(frozen=True)
class SamplerSetting:
    """One way of sampling the model, a row of the results table."""
    label: str
    steps: int
    timestep_spacing: str = "leading"
    time_shift: int = 0
    back_projection: int = 0


@dataclass
class EvalResult:
    """Per-image scores {degradation: {method: {image: [psnr, ssim]}}}."""
    scores: dict[str, dict[str, dict[str, list[float]]]] = field(default_factory=dict)
    info: dict[str, str] = field(default_factory=dict)

    @property
    def methods(self) -> list[str]:
        return list(next(iter(self.scores.values()))) if self.scores else []

    def mean(self, method: str, degradation: str | None = None) -> tuple[float, float]:
        """Mean PSNR / SSIM of ``method`` under one degradation, or over all of them."""
        degs = [degradation] if degradation else list(self.scores)
        vals = np.array([v for d in degs for v in self.scores[d][method].values()])
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
"""runner(lr [3, h, w] float32, *, steps, seed, time_shift, back_projection, timestep_spacing)
-> image [3, H, W] in [0, 1]: another sampler to score, e.g. ``functools.partial(
bidiff.runtime.sampler.sample, backend, scale=..., formulation=...)``."""


def evaluate(model: torch.nn.Module, config: ModelConfig, images: Sequence[tuple[str, np.ndarray]],
             samplers: Sequence[SamplerSetting], *, degradations: Sequence[str] = (BICUBIC,),
             seed: int = 0, max_side: int | None = None, runner: Runner | None = None,
             ) -> tuple[EvalResult, dict[str, np.ndarray]]:
    """Score bicubic and the model's ``samplers`` on HWC uint8 HR ``images`` under each
    degradation; also return the images made (keys ``degradation/image/method``).

    Every back-projection count used by a sampler also scores bicubic back-projected the same
    way. ``runner``: sample through it (e.g. the device runtime on an exported artifact, tile
    by tile, as users run the model) instead of the PyTorch sampler, which runs each image
    whole; crops of one size then go as one batch (the same noise seed per batch).
    """
    scale = config.scale
    crops = [(name, center_crop(hr, max_side=max_side, multiple=scale)) for name, hr in images]
    methods: list[tuple[str, SamplerSetting | int | None]] = [(BICUBIC, None)]
    for bp in sorted({s.back_projection for s in samplers if s.back_projection}):
        methods.append((f"bicubic + back-projection x{bp}", bp))
    methods += [(s.label, s) for s in samplers]
    result = EvalResult()
    outputs: dict[str, np.ndarray] = {}
    model.eval()
    for deg in degradations:
        pairs = {name: make_pair(hr, scale, deg) for name, hr in crops}
        by_shape: dict[tuple[int, ...], list[str]] = {}
        for name, pair in pairs.items():
            by_shape.setdefault(pair.hr.shape, []).append(name)
        result.scores[deg] = {}
        for method, how in methods:
            scores = result.scores[deg][method] = {}
            for names in by_shape.values():
                cond = np.concatenate([pairs[k].cond for k in names])
                lr = np.concatenate([pairs[k].lr for k in names])
                if how is None:
                    made = cond
                elif isinstance(how, int):                     # bicubic + back-projection
                    made = np.clip([back_project(c, low, scale, how) for c, low in zip(cond, lr)], 0, 1)
                else:
                    kw = dict(steps=how.steps, seed=seed, back_projection=how.back_projection,
                              time_shift=how.time_shift, timestep_spacing=how.timestep_spacing)
                    if runner is not None:
                        made = np.stack([runner(low, **kw) for low in lr])
                    else:
                        made = sample(model, torch.from_numpy(cond), formulation=config.formulation,
                                      lr=lr, **kw).image.numpy()
                for k, img in zip(names, made):
                    out, hr = to_uint8(img), to_uint8(pairs[k].hr[0])
                    outputs[f"{deg}/{k}/{method}"] = out
                    outputs[f"{deg}/{k}/HR"] = hr
                    scores[k] = [psnr_y(out / 255, hr / 255, border=scale),
                                 ssim_y(out / 255, hr / 255, border=scale)]
    return result, outputs


def markdown_table(result: EvalResult) -> str:
    """Means (PSNR / SSIM per degradation, mean PSNR over them, and the margin over the best
    bicubic baseline), then per-image PSNR / SSIM tables, one per degradation."""
    methods, degs = result.methods, list(result.scores)
    baselines = [m for m in methods if m.startswith(BICUBIC)]
    base = max((result.mean(m)[0], m) for m in baselines)[1]
    lines = ["| method | " + " | ".join(f"{d} LR" for d in degs) + " | mean PSNR | vs " + base + " |",
             "|---" * (len(degs) + 3) + "|"]
    for m in methods:
        cells = [f"{result.mean(m, d)[0]:.2f} / {result.mean(m, d)[1]:.4f}" for d in degs]
        margin = result.mean(m)[0] - result.mean(base)[0]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {result.mean(m)[0]:.2f} | {margin:+.2f} dB |")
    for d in degs:
        names = list(result.scores[d][methods[0]])
        lines += ["", f"{d} LR, per image (PSNR / SSIM):", "",
                  "| image | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
        for k in names:
            cells = [f"{result.scores[d][m][k][0]:.2f} / {result.scores[d][m][k][1]:.3f}" for m in methods]
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def comparison_picture(outputs: dict[str, np.ndarray], names: Sequence[str], sr_method: str,
                       *, crop: int = 128, gap: int = 4) -> Image.Image:
    """Rows of centre crops: bicubic | SR (``sr_method``) | HR, one row per image."""
    rows = []
    for k in names:
        tiles = [outputs[f"{k}/{m}"] for m in (BICUBIC, sr_method, "HR")]
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


def checkpoint_samplers(meta: dict[str, str], source: str, steps: Sequence[int], *,
                        time_shift: int | None = None, back_projection: int | None = None,
                        timestep_spacing: str | None = None,
                        paper: bool = False) -> list[SamplerSetting]:
    """The rows to score: the checkpoint's own sampler (its spacing, the shift measured for each
    step count, its back-projection; ``time_shift`` / ``back_projection`` /
    ``timestep_spacing`` override) at each of
    ``steps``, and with ``paper`` the paper's sampler (50 leading DDIM steps, no time shift)
    with the same back-projection."""
    tuned = checkpoint_sampler(meta, source)
    table = check_time_shifts(tuned["time_shifts"])
    bp = tuned["back_projection"] if back_projection is None else back_projection
    spacing = tuned["timestep_spacing"] if timestep_spacing is None else check_timestep_spacing(timestep_spacing)
    rows = [SamplerSetting(f"{n} steps", n, spacing,
                           time_shift_for(n, table, tuned["time_shift"]) if time_shift is None else time_shift,
                           bp) for n in steps]
    if paper:
        rows.append(SamplerSetting("paper's sampler (50 leading steps)", 50, "leading", 0, bp))
    return rows


def run_eval(checkpoint: str | Path | None, folder: str | Path, out_dir: str | Path, *,
             steps: Sequence[int] | None = None, seed: int = 0, max_side: int | None = None,
             limit: int | None = None, picture_crop: int = 128,
             time_shift: int | None = None, back_projection: int | None = None,
             timestep_spacing: str | None = None,
             degradations: Sequence[str] = (BICUBIC,), paper: bool = False,
             runner: Runner | None = None, runner_name: str = "") -> EvalResult:
    """Evaluate a checkpoint (None: the shipped one) on a folder; write results.md/.json and
    comparison.png (first degradation) into ``out_dir``. ``steps``: None = the checkpoint's
    ``default_steps`` and twice that. ``time_shift``, ``back_projection``, ``timestep_spacing``: None = the
    checkpoint's (``checkpoint_sampler``; the shift for each step count as
    ``Manifest.time_shift_for`` picks it), as an artifact exported from it would sample.
    ``paper``: also score the paper's 50-step sampler. ``runner``: see ``evaluate``;
    ``runner_name`` says what it is in results.md."""
    from bidiff.models import SHIPPED_CHECKPOINT, load_checkpoint

    path = Path(checkpoint) if checkpoint else SHIPPED_CHECKPOINT
    model, config = load_checkpoint(path)
    files = list_images(folder)[:limit]
    images = [(p.stem, load_rgb(p)) for p in files]
    meta = read_metadata(path) if path.suffix == ".safetensors" else {}
    if steps is None:
        default = int(meta.get("default_steps", 50))
        steps = (default, 2 * default)
    samplers = checkpoint_samplers(meta, path.name, steps, time_shift=time_shift,
                                   back_projection=back_projection,
                                   timestep_spacing=timestep_spacing, paper=paper)
    t0 = time.monotonic()
    result, outputs = evaluate(model, config, images, samplers, degradations=degradations,
                               seed=seed, max_side=max_side, runner=runner)
    result.info = {"checkpoint": str(path), "config": config.name,
                   "formulation": json.dumps(config.formulation.to_dict()), "folder": str(folder),
                   "images": str(len(images)), "max_side": str(max_side), "seed": str(seed),
                   "degradations": ", ".join(degradations),
                   "samplers": "; ".join(f"{s.label}: {s.timestep_spacing}, shift {s.time_shift}, "
                                         f"back-projection x{s.back_projection}" for s in samplers),
                   "sampler": runner_name if runner is not None else "PyTorch, whole images",
                   "eval_seconds": f"{time.monotonic() - t0:.0f}",
                   **{k: meta[k] for k in ("steps", "train_seconds", "hardware", "weights") if k in meta},
                   **{k: str(v) for k, v in model_size(model).items()}}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    header = "\n".join(f"- {k}: {v}" for k, v in result.info.items())
    (out / "results.md").write_text(header + "\n\n" + markdown_table(result))
    (out / "results.json").write_text(json.dumps(asdict(result), indent=1) + "\n")
    sr_method = samplers[0].label if samplers else BICUBIC
    first = [f"{degradations[0]}/{name}" for name, _ in images]
    comparison_picture(outputs, first, sr_method, crop=picture_crop).save(out / "comparison.png")
    return result
