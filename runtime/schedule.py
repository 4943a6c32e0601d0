"""The diffusion arithmetic shared bit for bit by training, export and the device.

Everything here is numpy only: the device imports it, and `bidiff.models` imports it too, so
the noise schedule, the DDIM update and the timestep -> expert-group map have exactly one
definition.

Symbols (as in the DDIM paper): beta_t = ``betas[t]``, abar_t = ``alphas_cumprod[t]``,
eps = the network's noise estimate, x0 = the predicted clean sample.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, Mapping

import numpy as np

from .bounds import IntBound

NUM_TRAIN_TIMESTEPS = 2000
BETA_START = 1e-6
BETA_END = 1e-2
NUM_GROUPS = 5
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "sample")
TIME_SHIFT = IntBound("time_shift", 0, NUM_TRAIN_TIMESTEPS - 1)   # DDIMScheduler(time_shift=...)


@lru_cache(maxsize=None)
def _tables(n: int, start: float, end: float) -> tuple[np.ndarray, np.ndarray]:
    # torch.linspace(float32) evaluates start + step*i (first half) and end - step*(n-1-i)
    # (second half) with a fused multiply-add; float64 arithmetic rounded once to float32
    # reproduces that exactly (step*i is exact in float64). np.linspace differs by 1 ulp in
    # most entries, and one ulp here flips signs a few steps later (docs/MODEL.md).
    s, e = np.float32(start), np.float32(end)
    step = np.float64((e - s) / np.float32(n - 1))
    i = np.arange(n, dtype=np.float64)
    lo = (np.float64(s) + step * i).astype(np.float32)
    hi = (np.float64(e) - step * (n - 1 - i)).astype(np.float32)
    betas = np.where(i < n // 2, lo, hi).astype(np.float32)
    # torch's float32 cumprod of (1 - beta) (computed in float32) equals a float64 cumprod
    # rounded once; a float32 numpy cumprod does not.
    alphas_cumprod = np.cumprod((np.float32(1) - betas).astype(np.float64)).astype(np.float32)
    betas.setflags(write=False)
    alphas_cumprod.setflags(write=False)
    return betas, alphas_cumprod


def linear_betas(n: int = NUM_TRAIN_TIMESTEPS, start: float = BETA_START,
                 end: float = BETA_END) -> np.ndarray:
    """float32 linear betas, bit-identical to ``torch.linspace(start, end, n)`` (read-only)."""
    return _tables(n, start, end)[0]


def alphas_cumprod(n: int = NUM_TRAIN_TIMESTEPS, start: float = BETA_START,
                   end: float = BETA_END) -> np.ndarray:
    """float32 abar_t = prod(1 - beta), bit-identical to torch's float32 cumprod (read-only)."""
    return _tables(n, start, end)[1]


def timestep_group(t: int | np.ndarray, *, num_groups: int = NUM_GROUPS,
                   total_steps: int = NUM_TRAIN_TIMESTEPS) -> int | np.ndarray:
    """TaR/TaA expert index for timestep t: clamp(int(t*K/T), 0, K-1)."""
    g = np.clip(np.asarray(t, dtype=np.int64) * num_groups // total_steps, 0, num_groups - 1)
    return int(g) if g.ndim == 0 else g


def group_ranges(*, num_groups: int = NUM_GROUPS,
                 total_steps: int = NUM_TRAIN_TIMESTEPS) -> list[tuple[int, int]]:
    """Inclusive (t_min, t_max) of every group, e.g. [(0, 399), (400, 799), ...]."""
    g = timestep_group(np.arange(total_steps), num_groups=num_groups, total_steps=total_steps)
    return [(int(np.argmax(g == k)), int(total_steps - 1 - np.argmax(g[::-1] == k)))
            for k in range(num_groups)]


def check_time_shift(value: object, total_steps: int = NUM_TRAIN_TIMESTEPS) -> int:
    """A sampler time shift: an integer in 0..total_steps-1 (raises ValueError otherwise)."""
    return TIME_SHIFT.with_hi(total_steps - 1).check(value)


def check_time_shifts(value: object, total_steps: int = NUM_TRAIN_TIMESTEPS) -> dict[int, int]:
    """A per-step-count shift table ({steps: shift}; JSON text or a mapping with int or digit
    keys) -> {int: int} sorted by steps (raises ValueError naming the bad entry)."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError:
            raise ValueError(f"time_shifts must be a JSON object of steps -> shift, got {value!r}") from None
    if not isinstance(value, Mapping):
        raise ValueError(f"time_shifts must be a mapping of steps -> shift, got {value!r}")
    table = {}
    for k, v in value.items():
        steps = int(k) if isinstance(k, str) and k.isdigit() else k
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= total_steps:
            raise ValueError(f"time_shifts has a step count {k!r} outside 1..{total_steps}")
        table[int(steps)] = check_time_shift(v, total_steps)
    return dict(sorted(table.items()))


def check_timestep_spacing(value: object) -> str:
    """A DDIM timestep spacing name (raises ValueError otherwise)."""
    if value not in TIMESTEP_SPACINGS:
        raise ValueError(f"timestep_spacing must be one of {', '.join(TIMESTEP_SPACINGS)}, got {value!r}")
    return str(value)


def time_shift_for(steps: int, table: Mapping[int, int], default: int) -> int:
    """The measured shift for ``steps``: the table's entry for the nearest measured step count
    (on a log scale, ties to the fewer steps), or ``default`` when the table is empty.

    The best shift depends on the step count (at 50 steps the small model wants several
    strides of shift, at 10-20 steps next to none: docs/TRAINING.md), so a model carries one
    per measured step count.
    """
    if not table:
        return int(default)
    near = min(table, key=lambda n: (abs(np.log(n / steps)), n))
    return int(table[near])


@dataclass(frozen=True)
class DDIMStepOutput:
    prev_sample: np.ndarray
    pred_original_sample: np.ndarray


class DDIMScheduler:
    """Deterministic DDIM (eta = 0), as diffusers' ``DDIMScheduler``.

    Two phases, as in diffusers: ``set_timesteps(n)`` fills ``timesteps``; ``step`` then
    consumes them in order. ``timestep_spacing``:

    - ``leading`` (the official sampler): t = (n-1)·T/n, ..., T/n, 0; with 50 steps
      1960, 1920, ..., 40, 0. Its first step is not at the last timestep, which does not matter
      for 50 steps but does for a few (one step would be t = 0 on pure noise);
    - ``trailing``: t = T-1, T-1-T/n, ..., T/n-1 (diffusers' "trailing"); with 5 steps
      1999, 1599, 1199, 799, 399: the first step sees pure noise, as in training, and each of
      the five expert groups is visited once;
    - ``linspace``: t = round(linspace(T-1, 0, n)) (diffusers' "linspace"); with 2 steps
      1999, 0: the second call sees the first one's x0 almost noise-free (sqrt(1 - abar_0) =
      0.001), so a model trained for it refines its own estimate. One step is t = T-1, where
      diffusers has 0, so that ``steps=1`` on such a model is its first call alone, not a call
      at t = 0 on pure noise.

    ``prediction_type`` says what ``model_output`` is: ``epsilon`` (the noise, the paper's) or
    ``sample`` (x0 itself; ε is then derived from x_t and x0 for the update).

    ``time_shift`` (default 0, the official sampler): the network is asked for eps at
    ``model_timesteps = max(0, t - time_shift)`` while the update uses t. Along a sampling
    chain x_t is less noisy than the training marginal at t when the network over-estimates the
    noise (exposure bias); evaluating it at an earlier timestep compensates, as the Time-Shift
    sampler (Li et al., ICLR 2024) does per step. A model's value is measured on a validation
    split and travels in its checkpoint and artifact (docs/TRAINING.md).
    """

    def __init__(self, *, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
                 beta_start: float = BETA_START, beta_end: float = BETA_END,
                 timestep_spacing: Literal["leading", "trailing", "linspace"] = "leading",
                 prediction_type: Literal["epsilon", "sample"] = "epsilon", clip_sample: bool = True,
                 clip_range: float = 1.0, time_shift: int = 0) -> None:
        self.timestep_spacing = check_timestep_spacing(timestep_spacing)
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")
        self.prediction_type = prediction_type
        self.num_train_timesteps = num_train_timesteps
        self.time_shift = check_time_shift(time_shift, num_train_timesteps)
        self.alphas_cumprod = alphas_cumprod(num_train_timesteps, beta_start, beta_end)
        self.clip_sample = clip_sample
        self.clip_range = clip_range
        self.timesteps: np.ndarray | None = None
        self.model_timesteps: np.ndarray | None = None

    def set_timesteps(self, num_inference_steps: int) -> np.ndarray:
        n = int(num_inference_steps)
        if not 1 <= n <= self.num_train_timesteps:
            raise ValueError(f"steps must be between 1 and {self.num_train_timesteps}, got {num_inference_steps}")
        if self.timestep_spacing == "leading":
            ratio = self.num_train_timesteps // n
            self.timesteps = (np.arange(n, dtype=np.int64) * ratio)[::-1].copy()
        elif self.timestep_spacing == "linspace":
            self.timesteps = np.linspace(self.num_train_timesteps - 1, 0, n).round().astype(np.int64)
        else:
            ratio = self.num_train_timesteps / n
            self.timesteps = (np.round(np.arange(self.num_train_timesteps, 0, -ratio)).astype(np.int64) - 1)
        self.model_timesteps = np.maximum(self.timesteps - self.time_shift, 0)
        return self.timesteps

    def prev_timestep(self, index: int) -> int:
        """The timestep after ``timesteps[index]`` (read from the table; -1 after the last)."""
        ts = self._require_timesteps()
        return int(ts[index + 1]) if index + 1 < len(ts) else -1

    def _require_timesteps(self) -> np.ndarray:
        if self.timesteps is None:
            raise RuntimeError("call set_timesteps(n) before step()")
        return self.timesteps

    def step(self, model_output: np.ndarray, index: int, sample: np.ndarray) -> DDIMStepOutput:
        """One DDIM update from ``timesteps[index]`` to the next one, in the sample's dtype."""
        ts = self._require_timesteps()
        t, t_prev = int(ts[index]), self.prev_timestep(index)
        dtype = sample.dtype
        f32 = np.float32
        # 1. abar_t and abar_prev (abar_prev = 1 after the last step, so the result is x0).
        #    Coefficients are float32 whatever the sample dtype, as diffusers computes them.
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[t_prev] if t_prev >= 0 else f32(1.0)
        sqrt_a_t, sqrt_1m_a_t = (dtype.type(np.sqrt(a_t)), dtype.type(np.sqrt(f32(1) - a_t)))
        sqrt_a_prev, sqrt_1m_a_prev = (dtype.type(np.sqrt(a_prev)), dtype.type(np.sqrt(f32(1) - a_prev)))
        if self.prediction_type == "epsilon":
            # 2. x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), clipped
            eps = model_output
            x0 = (sample - sqrt_1m_a_t * eps) / sqrt_a_t
            if self.clip_sample:
                x0 = np.clip(x0, -self.clip_range, self.clip_range).astype(dtype, copy=False)
        else:
            # 2'. x0 predicted, clipped; eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)
            x0 = model_output.astype(dtype, copy=False)
            if self.clip_sample:
                x0 = np.clip(x0, -self.clip_range, self.clip_range).astype(dtype, copy=False)
            eps = (sample - sqrt_a_t * x0) / sqrt_1m_a_t
        # 3. x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps   (eta = 0: no fresh noise)
        prev = sqrt_a_prev * x0 + sqrt_1m_a_prev * eps
        return DDIMStepOutput(prev_sample=prev.astype(dtype, copy=False), pred_original_sample=x0)
