"""The PyTorch reference sampler: the official BI-DiffSR inference, end to end.

The schedule and the DDIM update come from ``bidiff.runtime.schedule`` (numpy), so this
reference and the device runtime share one definition of the arithmetic.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from bidiff.runtime.consistency import back_project, downscale
from bidiff.runtime.formulation import Formulation
from bidiff.runtime.schedule import DDIMScheduler


@dataclass
class SampleResult:
    image: torch.Tensor                        # [B, 3, H, W] clamped to [0, 1]
    raw: torch.Tensor                          # final x0 before formulation/clamp, cropped
    x_t: list[torch.Tensor] = field(default_factory=list)   # per step, padded (if recorded)
    eps: list[torch.Tensor] = field(default_factory=list)


@torch.no_grad()
def sample(model: torch.nn.Module, cond: torch.Tensor, *, steps: int = 50,
           noise: torch.Tensor | None = None, seed: int = 0,
           formulation: Formulation | None = None, dtype: torch.dtype = torch.float32,
           time_shift: int = 0, lr: np.ndarray | None = None, back_projection: int = 0,
           timestep_spacing: str = "leading", record: bool = False) -> SampleResult:
    """DDIM (eta = 0) from x_T to x0 for a condition [B, 3, H, W] (any H, W).

    The condition is reflect-padded (bottom/right) to the model's input multiple, x_T is
    ``noise`` (padded size) or N(0, 1) from ``torch.Generator().manual_seed(seed)``; the result
    is cropped back and clamped to [0, 1]. ``time_shift``, ``timestep_spacing``: see
    ``DDIMScheduler`` (0 and "leading" = official); the network's output is ε or x0 as
    ``formulation.prediction`` says (``eps`` records it either way).
    ``back_projection``: rounds of ``consistency.back_project`` onto ``lr`` [B, 3, h, w] (the
    LR image the condition was upscaled from) before clamping, as the device sampler does; for
    a model with an LR correction, onto ``lr`` corrected by its last call.
    """
    form = formulation or Formulation()
    if back_projection and lr is None:
        raise ValueError("back_projection needs the LR image (lr=)")
    model = model.to(dtype)
    mult = getattr(model, "input_multiple", 8)
    b, _, h, w = cond.shape
    ph, pw = (-h) % mult, (-w) % mult
    cond_p = F.pad(cond.to(dtype), (0, pw, 0, ph), mode="reflect") if (ph or pw) else cond.to(dtype)
    if noise is None:
        noise = torch.randn(cond_p.shape, generator=torch.Generator().manual_seed(seed))
    if tuple(noise.shape) != tuple(cond_p.shape):
        raise ValueError(f"noise must have the padded shape {tuple(cond_p.shape)}, got {tuple(noise.shape)}")
    sched = DDIMScheduler(time_shift=time_shift, timestep_spacing=timestep_spacing,
                          prediction_type=form.prediction)
    timesteps = sched.set_timesteps(steps)
    x = noise.to(dtype)
    result = SampleResult(image=x, raw=x)
    for i in range(len(timesteps)):
        tt = torch.full((b, 1), int(sched.model_timesteps[i]), dtype=torch.int64)
        eps = model(x, cond_p, tt)
        if record:
            result.x_t.append(x.clone())
            result.eps.append(eps.clone())
        out = sched.step(eps[:, :3].numpy(), i, x.numpy())
        x = torch.from_numpy(np.ascontiguousarray(out.prev_sample))
    raw = x[:, :, :h, :w]
    result.raw = raw
    image = form.to_image(raw, cond.to(dtype))
    if back_projection:
        lr = np.asarray(lr, np.float32)
        scale = w // lr.shape[-1]
        if form.lr_correction:
            corr = eps[:, 3:, :h, :w].float().numpy()
            lr = np.stack([form.lr_target(low, downscale(c, low.shape[1:])) for low, c in zip(lr, corr)])
        image = torch.from_numpy(np.stack([back_project(im, low, scale, back_projection)
                                           for im, low in zip(image.float().numpy(), lr)])).to(dtype)
    result.image = image.clamp(0, 1)
    return result
