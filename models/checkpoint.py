"""Checkpoint I/O: our safetensors files carry their config; official .pth files need a name."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from bidiff.runtime.artifact import SHIPPED_MODEL
from bidiff.runtime.consistency import check_back_projection
from bidiff.runtime.schedule import check_time_shift, check_time_shifts, check_timestep_spacing

from .configs import ModelConfig, get_config
from .layers import HardBinaryConv
from .unet import BIDiffSRUNet

CHECKPOINT_FORMAT = "bidiff-checkpoint-1"
SHIPPED_CHECKPOINT = Path(__file__).resolve().parent / "weights" / f"{SHIPPED_MODEL}.safetensors"


def create_model(config: str | ModelConfig) -> BIDiffSRUNet:
    """A freshly initialised network. An x0-predicting model (``prediction == "sample"``) gets:

    - a zero last conv, so before any training its output is x0 = 0: the condition itself for
      the ``residual`` formulation, never worse than bicubic;
    - zero first-conv weights on the x_t channels. At the timesteps a few-step sampler visits
      x_t is almost pure noise (std 1 against a residual of a few hundredths), so with random
      weights every feature is mostly noise and the 1-bit activations (signs) carry next to
      nothing of the image; Adam did not shrink those weights in 500 steps (docs/EXPERIMENTS.md).
      Starting at zero, the network sees the condition cleanly and can still learn to use x_t.
    """
    cfg = get_config(config) if isinstance(config, str) else config
    model = BIDiffSRUNet(**cfg.network, lr_correction=cfg.formulation.lr_correction)
    if cfg.formulation.prediction == "sample":
        with torch.no_grad():
            last = model.final_conv.block[-1]
            last.weight.zero_()
            last.bias.zero_()
            model.downs[0].weight[:, model.in_channel - model.out_channel:].zero_()
    return model


LATENT_FORMS = ("float32", "int8", "signs")
"""How ``save_checkpoint`` stores the 1-bit convs' latent weights: as trained; int8
(``pack_latents``: training continues from 7-bit magnitudes); or only what the forward uses
(``pack_signs``: one bit a weight and alpha per output channel)."""


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, config: ModelConfig,
                    extra_metadata: Mapping[str, str] | None = None, *,
                    latents: str = "float32") -> None:
    """Write weights + config to a safetensors file, atomically.

    ``latents`` (``LATENT_FORMS``): ``int8`` is about a third of the bytes for a wide model, so a
    work-in-progress checkpoint stays under the repository's file-size limit; ``signs`` about a
    third of that again, for the shipped model, which every install carries (a Raspberry Pi
    included) and which is exported, not trained. Both keep every sign and every per-channel
    alpha the forward uses (to float rounding). ``load_checkpoint`` reads every form.
    """
    if latents not in LATENT_FORMS:
        raise ValueError(f"unknown latent form {latents!r}; valid: {', '.join(LATENT_FORMS)}")
    meta = {"format": CHECKPOINT_FORMAT, "config": config.to_json()}
    meta.update({k: str(v) for k, v in (extra_metadata or {}).items()})
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    if latents == "int8":
        tensors = pack_latents(tensors, binary_weight_keys(model))
    elif latents == "signs":
        tensors = pack_signs(tensors, binary_weight_keys(model))
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


LATENT_SCALE = ".int8_scale"
"""Suffix of the per-output-channel float32 step stored next to an int8 latent weight."""


def binary_weight_keys(model: torch.nn.Module) -> list[str]:
    """State-dict keys of the latent weights of the model's 1-bit convs."""
    return [f"{name}.weight" for name, m in model.named_modules() if isinstance(m, HardBinaryConv)]


def pack_latents(state: Mapping[str, torch.Tensor], keys: list[str]) -> dict[str, torch.Tensor]:
    """int8 latents with a per-output-channel step chosen so the forward's inputs are kept.

    A 1-bit conv uses only sign(W) and alpha = mean|W| per output channel. q = round(W / step0)
    with step0 = max|W| / 127, except that a nonzero weight never rounds to 0 (it keeps its
    sign as +-1); the stored step is then alpha / mean|q|, so q * step has the same alpha. The
    latent magnitudes (what training resumes from) keep 7 bits.
    """
    packed = dict(state)
    for key in keys:
        w = state[key].to(torch.float64)
        flat = w.flatten(1)
        step0 = flat.abs().amax(dim=1).clamp(min=1e-30) / 127.0
        q = torch.round(flat / step0[:, None])
        q = torch.where((q == 0) & (flat != 0), torch.sign(flat), q)
        alpha = flat.abs().mean(dim=1)
        step = alpha / q.abs().mean(dim=1).clamp(min=1.0)
        packed[key] = q.to(torch.int8).reshape(w.shape).contiguous()
        packed[key + LATENT_SCALE] = step.to(torch.float32).reshape(-1, 1, 1, 1).contiguous()
    return packed


SIGN_ALPHA, SIGN_SHAPE = ".sign_alpha", ".sign_shape"
"""Suffixes of the per-output-channel alpha and the weight's shape stored next to the packed
sign bits of ``pack_signs``."""


def pack_signs(state: Mapping[str, torch.Tensor], keys: list[str]) -> dict[str, torch.Tensor]:
    """Sign bits (numpy ``packbits`` order, a row per output channel) and alpha = mean|W|.

    Unpacked, the latent weight is +-alpha: the same signs and (to float rounding) the same
    alpha, so the same forward; training may start from it (``--init``) but not from the
    magnitudes it was trained with. A latent of exactly 0 (sign 0) has no bit, so it is refused.
    """
    packed = dict(state)
    for key in keys:
        w = state[key]
        flat = w.flatten(1)
        if not flat.all():
            raise ValueError(f"{key} has latent weights of exactly 0, whose sign 0 one bit cannot "
                             "store: keep this checkpoint with int8 latents")
        bits = np.packbits((flat > 0).numpy(), axis=1)
        packed[key] = torch.from_numpy(bits)
        packed[key + SIGN_ALPHA] = flat.abs().to(torch.float64).mean(dim=1).to(torch.float32).reshape(-1, 1, 1, 1)
        packed[key + SIGN_SHAPE] = torch.tensor(w.shape, dtype=torch.int64)
    return packed


def unpack_latents(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Undo ``pack_latents`` and ``pack_signs``: float32 weights under the original keys."""
    out = {k: v for k, v in state.items() if not k.endswith((LATENT_SCALE, SIGN_ALPHA, SIGN_SHAPE))}
    for key, q in out.items():
        if q.dtype == torch.int8:
            if key + LATENT_SCALE not in state:
                raise ValueError(f"int8 tensor {key} has no {key + LATENT_SCALE}")
            out[key] = q.to(torch.float32) * state[key + LATENT_SCALE]
        elif q.dtype == torch.uint8:
            if key + SIGN_ALPHA not in state or key + SIGN_SHAPE not in state:
                raise ValueError(f"sign bits {key} have no {key + SIGN_ALPHA} and {key + SIGN_SHAPE}")
            shape = tuple(int(d) for d in state[key + SIGN_SHAPE])
            n = int(np.prod(shape[1:]))
            bits = np.unpackbits(q.numpy(), axis=1, count=n).astype(np.float32) * 2 - 1
            out[key] = (torch.from_numpy(bits) * state[key + SIGN_ALPHA].reshape(-1, 1)).reshape(shape)
    return out


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


SAMPLER_METADATA: dict[str, tuple[Callable[[object], Any], str]] = {
    "time_shift": (check_time_shift, "0"),             # schedule.DDIMScheduler, at the default steps
    "time_shifts": (check_time_shifts, "{}"),          # {steps: shift} (schedule.time_shift_for)
    "back_projection": (check_back_projection, "0"),   # consistency.back_project
    "timestep_spacing": (check_timestep_spacing, "leading"),   # schedule.DDIMScheduler
}
"""Sampler settings measured for a checkpoint (scripts/tune_sampler.py, scripts/eval.py) and
stored in its metadata, with the value where absent (the official sampler); exports copy them
into the manifest."""


def checkpoint_sampler(meta: Mapping[str, str], source: str) -> dict[str, Any]:
    """The checkpoint's tuned sampler settings, one value per ``SAMPLER_METADATA`` key (ints;
    the ``time_shifts`` table as {str(steps): shift}, as the manifest stores it)."""
    settings: dict[str, Any] = {}
    for key, (check, default) in SAMPLER_METADATA.items():
        value = meta.get(key, default)
        try:
            settings[key] = check(int(value) if value.isdigit() else value)
        except ValueError as e:
            raise ValueError(f"{source}: metadata {e}") from None
    settings["time_shifts"] = {str(k): v for k, v in settings["time_shifts"].items()}
    return settings


def _read_state_dict(path: Path, config: ModelConfig | None) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    if path.suffix == ".safetensors":
        meta = read_metadata(path)
        if meta.get("format") != CHECKPOINT_FORMAT or "config" not in meta:
            if config is None:
                raise ValueError(f"{path} carries no bidiff config: pass a config name")
        else:
            stored = ModelConfig.from_dict(json.loads(meta["config"]))
            config = stored if config is None else config
        with safe_open(str(path), framework="pt") as f:
            return unpack_latents({k: f.get_tensor(k) for k in f.keys()}), config
    if config is None:
        raise ValueError(f"{path} is an official checkpoint: pass its config name (e.g. official-x2)")
    ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(ckpt, dict) and ("params_ema" in ckpt or "params" in ckpt):
        ckpt = ckpt["params_ema"] if "params_ema" in ckpt else ckpt["params"]
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} holds no state_dict (expected {{'params': ...}})")
    return {k.removeprefix("module."): v for k, v in ckpt.items()}, config


def check_state_dict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], config_name: str) -> None:
    """Raise a ValueError naming the first keys that do not fit the model."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
             for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (first: {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (first: {', '.join(unexpected[:3])})")
    if shape:
        problems.append(f"{len(shape)} with other shapes (first: {'; '.join(shape[:2])})")
    if problems:
        raise ValueError(f"checkpoint does not fit config {config_name!r}: " + "; ".join(problems))


def load_checkpoint(path: str | os.PathLike | None = None,
                    config: str | ModelConfig | None = None) -> tuple[BIDiffSRUNet, ModelConfig]:
    """Load ours (config from metadata) or an official .pth (``config`` required); eval mode.

    ``path=None`` loads the shipped default model.
    """
    path = Path(SHIPPED_CHECKPOINT if path is None else path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist")
    cfg = get_config(config) if isinstance(config, str) else config
    state, cfg = _read_state_dict(path, cfg)
    model = create_model(cfg)
    check_state_dict(model, state, cfg.name)
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
    return model.eval(), cfg


def load_or_random(checkpoint: str | os.PathLike | None, config: str | None = None, *,
                   seed: int = 0) -> BIDiffSRUNet:
    """A checkpoint's model, or (no checkpoint) ``config`` with a seeded random init; eval mode.
    For benchmarks and profiles, where speed does not depend on the weights."""
    if checkpoint:
        model, _ = load_checkpoint(checkpoint, config)
    else:
        torch.manual_seed(seed)
        model = create_model(config)
    return model.eval()
