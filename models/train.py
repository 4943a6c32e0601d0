"""Training loop for BI-DiffSR: the official objective, made resumable and unattended.

Objective (official): eps-prediction with an L1 loss, T = 2000 linear schedule
(``bidiff.runtime.schedule``), ONE timestep per batch (the network picks its expert group from
t[0]), x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, Adam betas (0.9, 0.99). What x0 is comes
from the model config's formulation (``official``: the HR image; ``residual``:
4 (HR - condition)), and so does what the loss compares: eps, or x0 itself for a model whose
``prediction`` is ``sample``.

Additions for a small model on few cores (documented in docs/TRAINING.md; ``t_min`` measured in
docs/EXPERIMENTS.md): an EMA of the weights whose decay warms up as min(decay, (1 + n) / (10 + n))
so early exports are not dominated by the random init, a linear LR warm-up and an optional cosine
decay, and ``t_min``: timesteps drawn from t_min..T-1 only, so a few-step x0 sampler that visits
only the top of the schedule (1 step at trailing spacing: t = 1999) is trained on what it will see.

A run directory holds ``state.pt`` (everything needed to continue bit for bit: weights, EMA,
optimizer, step, all RNG states, the configs), ``latest_ema.safetensors`` /
``latest_raw.safetensors`` (weights-only checkpoints via ``save_checkpoint``), periodic
``ema-<step>.safetensors`` snapshots and ``log.jsonl``. Files are replaced atomically, so a
run killed at any moment resumes from its last checkpoint; SIGINT/SIGTERM finish the current
step and checkpoint before returning.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import platform
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from torch import nn

from bidiff.models import ModelConfig, create_model, get_config, load_checkpoint, save_checkpoint
from bidiff.models.checkpoint import SAMPLER_METADATA, read_metadata
from bidiff.models.data import DEGRADATIONS, BatchStream, load_images
from bidiff.models.layers import HardBinaryConv
from bidiff.models.projection import back_project, downscale
from bidiff.models.teachers import load_image_teacher
from bidiff.runtime.consistency import check_back_projection
from bidiff.runtime.schedule import NUM_TRAIN_TIMESTEPS, alphas_cumprod

STATE_FILE = "state.pt"
LOG_FILE = "log.jsonl"


# RGB difference -> (luma, blue-difference, red-difference) difference, BT.601 (JPEG's YCbCr).
_YCBCR = torch.tensor([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
# Weight of each chroma channel against luma in the ``-luma`` losses (their Y row is the scored
# Y of models.metrics up to its 219/255 studio-range factor): the eye (and the Y-PSNR that scores
# super-resolution) resolves colour at about half the resolution of brightness, the reason JPEG
# keeps a quarter of the chroma samples.
CHROMA_WEIGHT = 0.25


def _luma(d: torch.Tensor, power: int) -> torch.Tensor:
    """Mean |d|^power of an NCHW RGB difference taken in YCbCr, each chroma channel weighted
    CHROMA_WEIGHT (a grey difference scores what the same distance in RGB scores)."""
    ycc = torch.einsum("kc,nchw->nkhw", _YCBCR.to(d), d).abs().pow(power)
    return ycc[:, 0].mean() + CHROMA_WEIGHT * ycc[:, 1:].mean(dim=(0, 2, 3)).sum()


# Per-pixel distances the loss can take; L1 is the official objective.
LOSSES = {"l1": lambda d: d.abs().mean(), "l2": lambda d: d.square().mean(),
          "l1-luma": lambda d: _luma(d, 1), "l2-luma": lambda d: _luma(d, 2)}

# Arithmetic of the network's forward and backward in training. bf16 autocast runs the convs on
# AMX / AVX-512-BF16 units where a CPU has them: 1.8x the steps per hour on this project's Intel
# VMs, gradients within cos 0.97 of fp32's (docs/TRAINING.md). The loss, the back-projection,
# Adam and the saved weights stay float32 either way.
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
FIRST_X_T = ("noise", "zeros")
# What a back-projected prediction is compared with: the HR image, or the HR image put through
# the same back-projection onto the same LR (the best image the runtime can output from it), or
# per patch: the HR for those whose LR went through JPEG, the projected HR for the others.
LOSS_TARGETS = ("hr", "projected", "split")
# Which parameters the optimizer moves: all, or all but the 1-bit convs' latent weights (their
# signs then stay those of the weights the run started from).
TRAIN_PARAMS = ("all", "full-precision")


def precision_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context of ``precision`` on ``device`` (a no-op for fp32)."""
    fast = PRECISIONS[precision]
    return torch.autocast(device.type, dtype=fast) if fast else contextlib.nullcontext()


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of a run; saved in its state so a resume continues the same run."""
    model: str = "bidiff-s2-x2"
    data: str = "data/train"
    steps: int = 100_000
    batch: int = 16
    patch: int = 64
    lr: float = 2e-4
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    warmup_steps: int = 500
    decay_start: int = 0
    min_lr: float = 1e-6
    degradation: str = "bicubic"
    loss_back_projection: int = 0
    t_min: int = 0
    ema_decay: float = 0.999
    seed: int = 0
    log_every: int = 50
    checkpoint_minutes: float = 15.0
    teacher: str = ""
    distil_weight: float = 1.0
    image_teacher: str = ""
    loss: Literal["l1", "l2", "l1-luma", "l2-luma"] = "l1"
    precision: Literal["fp32", "bf16"] = "fp32"
    refine_t: int = -1
    first_x_t: Literal["noise", "zeros"] = "noise"
    loss_target: Literal["hr", "projected", "split"] = "hr"
    train_params: Literal["all", "full-precision"] = "all"
    zoom: float = 1.0
    head_lr_scale: float = 1.0
    correction_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"unknown lr_schedule {self.lr_schedule!r}; valid: constant, cosine")
        check_back_projection(self.loss_back_projection)
        if self.degradation not in DEGRADATIONS:
            raise ValueError(f"unknown degradation {self.degradation!r}; valid: {', '.join(DEGRADATIONS)}")
        if not 0 <= self.t_min < NUM_TRAIN_TIMESTEPS:
            raise ValueError(f"t_min {self.t_min} is outside 0..{NUM_TRAIN_TIMESTEPS - 1}")
        if self.distil_weight < 0:
            raise ValueError(f"distil_weight {self.distil_weight} is negative")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; valid: {', '.join(LOSSES)}")
        if not -1 <= self.refine_t < NUM_TRAIN_TIMESTEPS:
            raise ValueError(f"refine_t {self.refine_t} is outside -1..{NUM_TRAIN_TIMESTEPS - 1} (-1: off)")
        if self.refine_t >= 0 and self.teacher:
            raise ValueError("refine_t and teacher cannot be combined")
        if self.image_teacher and (self.teacher or self.refine_t >= 0):
            raise ValueError("image_teacher cannot be combined with teacher or refine_t")
        if self.image_teacher and not self.loss_back_projection:
            raise ValueError("image_teacher needs loss_back_projection > 0 (its guide is an image)")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; valid: {', '.join(PRECISIONS)}")
        if self.first_x_t not in FIRST_X_T:
            raise ValueError(f"unknown first_x_t {self.first_x_t!r}; valid: {', '.join(FIRST_X_T)}")
        if self.loss_target not in LOSS_TARGETS:
            raise ValueError(f"unknown loss_target {self.loss_target!r}; valid: {', '.join(LOSS_TARGETS)}")
        if self.loss_target != "hr" and not self.loss_back_projection:
            raise ValueError(f"loss_target {self.loss_target!r} needs loss_back_projection > 0")
        if self.train_params not in TRAIN_PARAMS:
            raise ValueError(f"unknown train_params {self.train_params!r}; valid: {', '.join(TRAIN_PARAMS)}")
        if not 0 < self.zoom <= 1:
            raise ValueError(f"zoom {self.zoom} is outside (0, 1]")
        if not self.head_lr_scale > 0:
            raise ValueError(f"head_lr_scale {self.head_lr_scale} must be positive")
        if self.correction_weight < 0:
            raise ValueError(f"correction_weight {self.correction_weight} is negative")


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """LR for optimizer step ``step`` (0-based): linear warm-up, then constant or cosine.

    The cosine runs from ``max(decay_start, warmup_steps)`` to ``steps``, so a run trained at
    a constant LR can be annealed later by resuming with a cosine schedule.
    """
    lr = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    start = max(cfg.decay_start, cfg.warmup_steps)
    if cfg.lr_schedule == "cosine" and step >= start:
        progress = min(1.0, (step - start) / max(1, cfg.steps - start))
        lr = cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    return lr


def ema_decay(updates: int, max_decay: float) -> float:
    """Warm-up decay min(max_decay, (1 + n) / (10 + n)) for the n-th EMA update."""
    return min(max_decay, (1 + updates) / (10 + updates))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    ema_params = list(ema.parameters())
    torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


def diffusion_loss(model: nn.Module, hr: torch.Tensor, cond: torch.Tensor, t: int,
                   noise: torch.Tensor, model_config: ModelConfig,
                   abar: torch.Tensor, *, lr: torch.Tensor | None = None,
                   back_projection: int = 0, teacher: nn.Module | None = None,
                   distil_weight: float = 1.0, loss: str = "l1",
                   precision: str = "fp32", refine_t: int = -1,
                   first_x_t: str = "noise", target: str = "hr",
                   jpeg: torch.Tensor | None = None,
                   guide_image: torch.Tensor | None = None,
                   correction_weight: float = 0.0) -> torch.Tensor:
    """L1 between the true and predicted eps (or x0, for ``prediction == "sample"``) at one
    timestep ``t`` for the whole batch (``loss="l2"``: the mean squared error instead, the
    quantity PSNR scores).

    ``back_projection`` > 0 (x0 models only): the predicted image is back-projected onto ``lr``
    that many rounds, as the runtime does after sampling, and the loss is taken on the image
    (times the residual scale, so its size matches the x0 loss): the network is then trained
    only on the error back-projection leaves (``models.projection``). ``target="projected"``
    compares it with the HR image back-projected the same way instead: back-projection is
    affine, so the loss becomes the distance of A·(prediction − HR) alone, where the default
    also carries the part of the error no prediction can change (what the LR's own
    degradation, e.g. JPEG, leaves after projection), which under L1 sets the sign of the
    gradient wherever it is the larger.

    ``target="split"`` takes the HR for the samples ``jpeg`` marks and the projected HR for the
    rest. Why: back-projection is not an orthogonal projection, so the projected loss can be
    lowered by errors that correlate with what the LR's JPEG error leaves; on unseen JPEG'd
    photos it kept falling while their PSNR fell too (docs/EXPERIMENTS.md), where for clean
    downscalers the projected target is the better one.

    ``teacher`` (same formulation; e.g. the full-precision twin): output distillation. The
    teacher sees the same x_t, and ``distil_weight`` times the same distance between the
    student's and the teacher's output (after the same back-projection) is added.

    ``guide_image`` (an image teacher's output for the same LR, ``models.teachers``): image
    distillation. ``distil_weight`` times the same distance between the student's image (after
    the back-projection) and it is added; under L2 that trains on the weighted mean of the two
    targets, a target the LR determines (the HR's detail beyond it is noise to the gradient).

    ``correction_weight`` (models with an LR correction): that many times the distance between
    the LR back-projection aims at and the LR the target image implies is added: the HR's own
    bicubic downscale (the LR back-projection assumes) where the target is the HR, the LR as
    given where it is the projected HR (``split``: the former for JPEG'd patches only). The
    image loss reaches the correction only through back-projection, a weak signal for a part
    that starts at zero; this one tells it directly what to undo (JPEG blocking), and to leave
    alone the LRs whose downscaler it cannot tell apart from bicubic (a correction learnt on
    those would be their mixture's mean, wrong for each).

    ``precision="bf16"``: the network calls (student and teacher) run under bf16 autocast; their
    outputs come back as float32 for everything after them.

    ``refine_t`` >= 0 (x0 models): a second call, as a two-step DDIM sampler makes it: the first
    call's x0 (clipped to [-1, 1] like the scheduler's) and the ε it implies give x_t at
    ``refine_t`` (0: the ``linspace`` spacing's last step, x_t = the estimate within 0.001), the
    network predicts x0 again there, and the loss is the mean of both calls' losses, gradients
    flowing through the first call into the second.

    ``first_x_t="zeros"``: the first call sees x_t = 0, as a sampler started from x_T = 0 gives
    it. Why: at the top timesteps x_t is almost pure noise, so the network learns to ignore its
    x_t inputs; a refining call needs those same inputs to carry the estimate, and zeros in the
    first call leave them free for it (noise there pulls the shared weights the other way).
    """
    form = model_config.formulation
    if target not in LOSS_TARGETS:
        raise ValueError(f"unknown loss target {target!r}; valid: {', '.join(LOSS_TARGETS)}")
    if target != "hr" and not back_projection:
        raise ValueError(f"loss target {target!r} needs back_projection > 0")
    if target == "split" and jpeg is None:
        raise ValueError("loss target 'split' needs the batch's jpeg flags")
    if guide_image is not None and (not back_projection or teacher is not None or refine_t >= 0):
        raise ValueError("a guide image needs back_projection > 0, no teacher and no refining call")
    if first_x_t == "zeros" and form.prediction != "sample":
        raise ValueError("x_t = 0 in the first call needs an x0-predicting model")
    if form.lr_correction and (not back_projection or refine_t >= 0):
        raise ValueError("an LR-correcting model is trained through back-projection, in one call")
    x0 = form.target(hr, cond)
    a = abar[t]
    x_t = torch.zeros_like(x0) if first_x_t == "zeros" else a.sqrt() * x0 + (1 - a).sqrt() * noise
    t_batch = torch.full((hr.shape[0], 1), t, dtype=torch.int64, device=hr.device)

    def call(x: torch.Tensor, t_now: torch.Tensor) -> torch.Tensor:
        with precision_context(hr.device, precision):
            return model(x, cond, t_now).float()

    outs = [call(x_t, t_batch)]
    aux = None
    if refine_t >= 0:
        if form.prediction != "sample" or teacher is not None:
            raise ValueError("a refining second call needs an x0-predicting model and no teacher")
        first = outs[0].clamp(-1.0, 1.0)
        eps = (x_t - a.sqrt() * first) / (1 - a).sqrt()
        a2 = abar[refine_t]
        outs.append(call(a2.sqrt() * first + (1 - a2).sqrt() * eps, torch.full_like(t_batch, refine_t)))
    guide = None
    if teacher is not None:
        with torch.no_grad(), precision_context(hr.device, precision):
            guide = teacher(x_t, cond, t_batch).float()
    if back_projection:
        if form.prediction != "sample" or lr is None:
            raise ValueError("a back-projected loss needs an x0-predicting model and the LR batch")

        c, scale = hr.shape[1], model_config.scale

        def aim_of(pred: torch.Tensor) -> torch.Tensor:
            return form.lr_target(lr, downscale(pred[:, c:], scale)) if form.lr_correction else lr

        def to_image(pred: torch.Tensor) -> torch.Tensor:
            return back_project(form.to_image(pred[:, :c], cond), aim_of(pred), scale, back_projection)

        weight = form.residual_scale if form.type == "residual" else 1.0
        want = hr if target == "hr" else back_project(hr, lr, scale, back_projection)
        if target == "split":
            want = torch.where(jpeg.view(-1, 1, 1, 1).to(hr.device), hr, want)
        if form.lr_correction and correction_weight:
            want_lr = lr if target == "projected" else downscale(hr, scale)
            if target == "split":
                want_lr = torch.where(jpeg.view(-1, 1, 1, 1).to(hr.device), want_lr, lr)
            aux = correction_weight * LOSSES[loss](aim_of(outs[0]) - want_lr)
        outs, guide = [to_image(o) for o in outs], None if guide is None else to_image(guide)
    else:
        weight = 1.0
        want = x0 if form.prediction == "sample" else noise
    distance = LOSSES[loss]
    total = sum(distance(o - want) for o in outs) / len(outs)
    if guide is None:
        guide = guide_image
    if guide is not None:
        total = total + distil_weight * distance(outs[0] - guide)
    if aux is not None:
        total = total + aux
    return total * weight


def hardware_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {cpu}, {torch.get_num_threads()} thread(s)"


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _export(path: Path, model: nn.Module, model_config: ModelConfig, meta: dict[str, str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_checkpoint(tmp, model, model_config, extra_metadata=meta)
    os.replace(tmp, path)


@dataclass
class _Run:
    """Everything a checkpoint holds (returned by ``train`` for inspection and tests)."""
    config: TrainConfig
    model_config: ModelConfig
    model: nn.Module
    ema: nn.Module
    optimizer: torch.optim.Optimizer
    step: int
    train_seconds: float
    noise_gen: torch.Generator
    sampler: dict[str, str] = field(default_factory=dict)   # carried from --init into every export


def _new_run(cfg: TrainConfig, model_config: ModelConfig, device: torch.device) -> _Run:
    torch.manual_seed(cfg.seed)
    model = create_model(model_config).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    if cfg.train_params == "full-precision":
        for m in model.modules():
            if isinstance(m, HardBinaryConv):
                m.weight.requires_grad_(False)
    params = [(n, q) for n, q in model.named_parameters() if q.requires_grad]
    own = ("head.", "final_conv.correction.")
    groups: list[dict[str, Any]] = [{"params": [q for n, q in params if not n.startswith(own)]}]
    head = [q for n, q in params if n.startswith(own)]
    if head:   # head blocks and an LR correction start at zero: their own step (head_lr_scale)
        groups.append({"params": head, "lr_scale": cfg.head_lr_scale})
    opt = torch.optim.Adam(groups, lr=cfg.lr, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(cfg.seed)
    return _Run(cfg, model_config, model, ema, opt, 0, 0.0, gen)


def _state(run: _Run) -> dict[str, Any]:
    return {"config": asdict(run.config), "model_config": run.model_config.to_json(),
            "model": run.model.state_dict(), "ema": run.ema.state_dict(),
            "optimizer": run.optimizer.state_dict(), "step": run.step,
            "train_seconds": run.train_seconds, "sampler": run.sampler,
            "rng": {"noise": run.noise_gen.get_state(), "torch": torch.get_rng_state()}}


def _restore(path: Path, overrides: dict[str, Any], device: torch.device) -> _Run:
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved = TrainConfig(**state["config"])
    if overrides.get("model", saved.model) != saved.model:
        raise SystemExit(f"{path} trains {saved.model!r}, not {overrides['model']!r}; "
                         "drop --config or choose another --name")
    cfg = replace(saved, **overrides)
    if cfg.train_params != saved.train_params:
        raise SystemExit(f"{path} trains {saved.train_params!r} parameters; its optimizer state cannot "
                         f"move {cfg.train_params!r}: continue from its weights with --init instead")
    run = _new_run(cfg, ModelConfig.from_dict(json.loads(state["model_config"])), device)
    run.model.load_state_dict(state["model"])
    run.ema.load_state_dict(state["ema"])
    try:
        run.optimizer.load_state_dict(state["optimizer"])
    except ValueError as e:
        raise SystemExit(f"{path}: its optimizer state does not fit this network's parameter groups ({e}); "
                         "continue from its weights with --init instead") from None
    for group in run.optimizer.param_groups[1:]:
        group["lr_scale"] = cfg.head_lr_scale
    run.step, run.train_seconds = state["step"], state["train_seconds"]
    run.sampler = state.get("sampler", {})
    run.noise_gen.set_state(state["rng"]["noise"])
    torch.set_rng_state(state["rng"]["torch"])
    return run



_GROWN = {"cond_embed": False, "head_blocks": 0}
"""Network settings whose added parts start as no-ops (with their defaults: absent)."""


def _grows(old: ModelConfig, new: ModelConfig) -> bool:
    """``new`` is ``old`` plus parts that start as no-ops (a condition summary, more head
    blocks, an LR correction) and nothing else, so ``old``'s weights start it as the same
    function."""
    def rest(net: dict) -> dict:
        return {k: v for k, v in net.items() if k not in _GROWN}
    return (rest(old.network) == rest(new.network)
            and all(old.network.get(k, d) <= new.network.get(k, d) for k, d in _GROWN.items())
            and new.scale == old.scale
            and replace(new.formulation, lr_correction=False) == replace(old.formulation, lr_correction=False)
            and old.formulation.lr_correction <= new.formulation.lr_correction)


def _init_from(run: _Run, path: Path) -> None:
    """Continue from a weights-only checkpoint (e.g. the shipped model): its weights seed both
    the model and the EMA, its ``steps`` / ``train_seconds`` metadata and its sampler settings
    carry on (so every snapshot samples as the model it continues); the optimizer
    moments start afresh and the noise stream is reseeded with the step (the data stream is
    per step anyway), so a run that lost its ``state.pt`` is not thrown back to a random init.
    The weights of a network without the condition summary, head blocks or LR correction start
    one with them (``_grows``)."""
    model, cfg = load_checkpoint(path)
    if cfg.name != run.model_config.name and not _grows(cfg, run.model_config):
        raise SystemExit(f"{path} holds {cfg.name!r}, not {run.model_config.name!r}; pass --config {cfg.name}")
    for net in (run.model, run.ema):
        net.load_state_dict(model.state_dict(), strict=cfg.name == run.model_config.name)
    meta = read_metadata(path)
    run.step = int(meta.get("steps", 0))
    run.train_seconds = float(meta.get("train_seconds", 0.0))
    run.sampler = {k: meta[k] for k in (*SAMPLER_METADATA, "default_steps") if k in meta}
    run.noise_gen.manual_seed(run.config.seed * 1_000_003 + run.step)


def _load_teacher(path: str, student: ModelConfig, device: torch.device) -> nn.Module:
    """The frozen distillation teacher; it must predict what the student predicts."""
    try:
        teacher, cfg = load_checkpoint(path)
    except ValueError as e:
        raise SystemExit(f"teacher: {e}") from None
    if (cfg.formulation, cfg.scale) != (student.formulation, student.scale):
        raise SystemExit(f"teacher {path} ({cfg.name}) predicts another target than {student.name}: "
                         "choose a teacher with the same formulation and scale")
    return teacher.to(device).requires_grad_(False)


def _load_image_teacher(folder: str, student: ModelConfig, back_projection: int,
                        device: torch.device) -> nn.Module:
    """The frozen image teacher of ``folder`` (``models.teachers``); its networks are x2."""
    if student.scale != 2:
        raise SystemExit(f"image teacher: its networks upscale x2, {student.name} x{student.scale}")
    try:
        return load_image_teacher(folder, back_projection).to(device)
    except ValueError as e:
        raise SystemExit(f"image teacher: {e}") from None


def _checkpoint(run: _Run, run_dir: Path, hardware: str, snapshot: bool) -> None:
    _atomic_save(_state(run), run_dir / STATE_FILE)
    meta = {**run.sampler, "steps": str(run.step), "train_seconds": f"{run.train_seconds:.0f}",
            "tile": str(run.config.patch),
            "hardware": hardware, "train_config": json.dumps(asdict(run.config))}
    _export(run_dir / "latest_ema.safetensors", run.ema, run.model_config, {**meta, "weights": "ema"})
    _export(run_dir / "latest_raw.safetensors", run.model, run.model_config, {**meta, "weights": "raw"})
    if snapshot:
        _export(run_dir / f"ema-{run.step:07d}.safetensors", run.ema, run.model_config,
                {**meta, "weights": "ema"})


def train(cfg: TrainConfig, run_dir: str | Path, *, resume: bool = False,
          overrides: dict[str, Any] | None = None, device: str = "cpu",
          images: Sequence[np.ndarray] | None = None, model_config: ModelConfig | None = None,
          until: int | None = None, progress: bool = True,
          init: str | Path | None = None, workers: int = 0) -> _Run:
    """Train (or continue) a run in ``run_dir`` up to ``cfg.steps`` (or ``until``, if sooner).

    With ``resume`` the saved TrainConfig is used, updated by ``overrides`` (the flags a user
    gave explicitly). ``images`` (HWC uint8) replaces ``cfg.data`` and ``model_config``
    replaces the registry config ``cfg.model`` (both for tests). ``init`` starts a new run
    from a weights-only checkpoint (see ``_init_from``). ``workers`` processes make batches
    ahead (the batches do not depend on it).
    """
    from tqdm import tqdm

    run_dir = Path(run_dir)
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    state_path = run_dir / STATE_FILE
    if resume:
        if not state_path.exists():
            raise SystemExit(f"nothing to resume: {state_path} does not exist")
        run = _restore(state_path, overrides or {}, dev)
    else:
        if state_path.exists():
            raise SystemExit(f"{state_path} exists; pass --resume to continue it or choose another --name")
        run = _new_run(cfg, model_config or get_config(cfg.model), dev)
        if init is not None:
            _init_from(run, Path(init))
    cfg = run.config
    teacher = _load_teacher(cfg.teacher, run.model_config, dev) if cfg.teacher else None
    image_teacher = (_load_image_teacher(cfg.image_teacher, run.model_config, cfg.loss_back_projection, dev)
                     if cfg.image_teacher else None)
    run_dir.mkdir(parents=True, exist_ok=True)
    if images is None:
        images = load_images(cfg.data)
    abar = torch.from_numpy(alphas_cumprod().copy()).to(dev)
    hardware = hardware_description(dev)
    last = min(cfg.steps, until if until is not None else cfg.steps)
    scale = run.model_config.scale
    log = (run_dir / LOG_FILE).open("a")
    log.write(json.dumps({"event": "start", "step": run.step, "config": asdict(cfg),
                          "model_config": run.model_config.to_dict(), "hardware": hardware,
                          "time": time.time()}) + "\n")
    bar = tqdm(total=last, initial=run.step, disable=not progress, dynamic_ncols=True,
               mininterval=1 if sys.stderr.isatty() else 30)
    losses: list[float] = []
    t_ckpt = t_log = time.monotonic()
    run.model.train()
    batches = BatchStream(images, cfg.batch, patch=cfg.patch, scale=scale, seed=cfg.seed,
                          start=run.step, workers=workers, degradation=cfg.degradation,
                          zoom=cfg.zoom)
    stop: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, _frame: stop.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while run.step < last and not stop:
            t0 = time.monotonic()
            batch = next(batches)
            t = int(torch.randint(cfg.t_min, len(abar), (1,), generator=run.noise_gen))
            noise = torch.randn(batch.hr.shape, generator=run.noise_gen).to(dev)
            for group in run.optimizer.param_groups:
                group["lr"] = learning_rate(run.step, cfg) * group.get("lr_scale", 1.0)
            lr_batch = torch.from_numpy(batch.lr).to(dev)
            jpeg = None if batch.jpeg is None else torch.from_numpy(batch.jpeg)
            loss = diffusion_loss(run.model, torch.from_numpy(batch.hr).to(dev),
                                  torch.from_numpy(batch.cond).to(dev), t, noise,
                                  run.model_config, abar, lr=lr_batch,
                                  back_projection=cfg.loss_back_projection, teacher=teacher,
                                  distil_weight=cfg.distil_weight, loss=cfg.loss,
                                  precision=cfg.precision, refine_t=cfg.refine_t,
                                  first_x_t=cfg.first_x_t, target=cfg.loss_target,
                                  jpeg=jpeg, guide_image=None if image_teacher is None
                                  else image_teacher(lr_batch, jpeg),
                                  correction_weight=cfg.correction_weight)
            run.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            run.optimizer.step()
            ema_update(run.ema, run.model, ema_decay(run.step, cfg.ema_decay))
            run.step += 1
            run.train_seconds += time.monotonic() - t0
            losses.append(loss.item())
            bar.update(1)
            now = time.monotonic()
            if run.step % cfg.log_every == 0 or run.step == last:
                rate = len(losses) * cfg.batch / max(now - t_log, 1e-9)
                bar.set_postfix(loss=f"{np.mean(losses):.4f}", samples_s=f"{rate:.1f}")
                log.write(json.dumps({"step": run.step, "loss": float(np.mean(losses)),
                                      "lr": learning_rate(run.step - 1, cfg),
                                      "samples_per_s": rate, "train_seconds": run.train_seconds,
                                      "time": time.time()}) + "\n")
                log.flush()
                losses, t_log = [], now
            if now - t_ckpt >= cfg.checkpoint_minutes * 60 or run.step == last:
                _checkpoint(run, run_dir, hardware, snapshot=True)
                log.write(json.dumps({"event": "checkpoint", "step": run.step, "time": time.time()}) + "\n")
                log.flush()
                t_ckpt = now
        if stop:
            _checkpoint(run, run_dir, hardware, snapshot=False)
            log.write(json.dumps({"event": "stopped", "signal": stop[0], "step": run.step,
                                  "time": time.time()}) + "\n")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        batches.close()
        bar.close()
        log.close()
    return run


