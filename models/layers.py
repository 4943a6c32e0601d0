"""BI-DiffSR's binary building blocks, named exactly as the official state_dict.

Two arithmetics live side by side:
- the official one (default): torch.sign with sign(0) = 0 for activations and weights, and the
  straight-through expressions of the released code (their forward values are what the golden
  vectors hold);
- ``deploy`` mode: the arithmetic of ``bidiff.runtime.binary_op`` that every exported kernel
  implements (v >= 0 -> +1 for activations and weights, alpha = mean|W|). It exists so the
  difference between the official network and the exported one is measured, not guessed.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LearnableBias(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias.expand_as(x)


class RPReLU(nn.Module):
    """y = PReLU(x + b0) + b1 with per-channel slopes."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.pr_bias0 = LearnableBias(channels)
        self.pr_prelu = nn.PReLU(channels)
        self.pr_bias1 = LearnableBias(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pr_bias1(self.pr_prelu(self.pr_bias0(x)))


class _SignBiReal(torch.autograd.Function):
    """sign(x) forward, Bi-Real's piecewise-polynomial derivative max(0, 2 - 2|x|) backward.

    The same forward value and gradient as the official straight-through expression, at about
    half the training cost (docs/TRAINING.md).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return torch.sign(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad * (2.0 - 2.0 * x.abs()).clamp_(min=0.0)


def deploy_sign(x: torch.Tensor) -> torch.Tensor:
    """The exported sign: +1 for v >= 0, -1 otherwise (bit-packing has no 0)."""
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


class BinaryActivation(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.deploy = False
        self.real = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.real:
            return x
        if self.deploy:
            return deploy_sign(x)
        return _SignBiReal.apply(x)


class HardBinaryConv(nn.Module):
    """alpha * sign(W) convolution; alpha = mean|W| per output channel (detached).

    The official forward value is ``a*sign(W) - clamp(W) + clamp(W)`` (straight through the
    clamp), which differs from a*sign(W) by 1 ulp for a few weights; we keep that expression so
    the golden vectors are reproduced to the last digit the official code allows.
    """

    def __init__(self, in_chn: int, out_chn: int, kernel_size: int = 3, stride: int = 1,
                 padding: int | None = None) -> None:
        super().__init__()
        self.stride = stride
        self.padding = kernel_size // 2 if padding is None else padding
        self.weight = nn.Parameter(torch.rand(out_chn, in_chn, kernel_size, kernel_size) * 0.001)
        self.deploy = False
        self.real = False

    def scaling_factor(self) -> torch.Tensor:
        w = self.weight.abs()
        return w.mean(dim=3, keepdim=True).mean(dim=2, keepdim=True).mean(dim=1, keepdim=True).detach()

    def effective_weight(self) -> torch.Tensor:
        if self.real:
            return self.weight
        alpha = self.scaling_factor()
        if self.deploy:
            return alpha * deploy_sign(self.weight.detach())
        hard = alpha * torch.sign(self.weight)
        clipped = torch.clamp(self.weight, -1.0, 1.0)
        return hard.detach() - clipped.detach() + clipped

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.effective_weight(), stride=self.stride, padding=self.padding)


class _Experts(nn.Module):
    """K timestep experts stored as ``<prefix>_<i>`` children (the official naming)."""

    def __init__(self, prefix: str, make, num: int) -> None:
        super().__init__()
        self.prefix = prefix
        self.num = num
        for i in range(num):
            self.add_module(f"{prefix}_{i}", make())

    def __getitem__(self, group: int) -> nn.Module:
        return getattr(self, f"{self.prefix}_{group}")


class BIConv(nn.Module):
    """y = TaA_g(conv(sign(TaR_g(x)))) + x, with g the timestep group (C -> C)."""

    def __init__(self, channels: int, kernel_size: int, dynamic_group: int = 5) -> None:
        super().__init__()
        self.channels = channels
        self.kernel_size = kernel_size
        self.TaR = _Experts("dynamic_move", lambda: LearnableBias(channels), dynamic_group)
        self.binary_act = BinaryActivation()
        self.binary_conv = HardBinaryConv(channels, channels, kernel_size)
        self.TaA = _Experts("dynamic_relu", lambda: RPReLU(channels), dynamic_group)

    def forward(self, x: torch.Tensor, group: int) -> torch.Tensor:
        h = self.binary_conv(self.binary_act(self.TaR[group](x)))
        return self.TaA[group](h) + x


def make_full_precision(model: nn.Module) -> nn.Module:
    """Turn every binary module into its full-precision twin: identity instead of sign, the
    latent weight used as it is (re-initialised as ``nn.Conv2d`` would, since the binary init of
    a few thousandths only sets signs). Same parameters and names, so the twin trains with the
    same code and its weights map one to one onto the binary network's; it is a distillation
    teacher (docs/TRAINING.md), never exported."""
    for m in model.modules():
        if isinstance(m, BinaryActivation):
            m.real = True
        elif isinstance(m, HardBinaryConv):
            m.real = True
            nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5))
    return model


def set_deploy(model: nn.Module, deploy: bool = True) -> nn.Module:
    """Switch every binary module to the exported arithmetic (or back to the official one)."""
    for m in model.modules():
        if isinstance(m, (BinaryActivation, HardBinaryConv)):
            m.deploy = bool(deploy)
    return model
