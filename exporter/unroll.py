"""Unrolling per timestep group: fold one TaR/TaA expert of every BIConv into fixed tensors.

A ``BIConv`` computes ``y = TaA_g(conv(sign(TaR_g(x)))) + x`` where g is the timestep group.
For a fixed g everything but the input is constant, and it folds into what the
``bidiff::BinaryConv2d`` op and three elementwise ops need:

- ``sign(x + b) `` with the TaR bias b  ->  ``x >= threshold`` with ``threshold = -b``. In IEEE
  float (gradual underflow), ``x + b >= 0`` and ``x >= -b`` agree for every x, so the fold is
  exact, not approximately equal.
- ``alpha * sign(W)`` -> packed sign bits (``binary_op.pack_weights``: w >= 0 -> bit 1, so an
  exact 0.0 weight is +1, as in PyTorch's deploy mode) and ``scale = alpha = mean|W|`` per output
  channel (``binary_op.weight_scale``, a float64 flat mean rounded once; PyTorch's nested float32
  mean may differ by 1 ulp, which moves outputs by < 1e-6).
- ``TaA_g`` = RPReLU: ``PReLU(h + b0) + b1`` -> ``bias0``, ``slope``, ``bias1`` (kept as
  Add / PRelu / Add; folding b1 into the residual Add would change nothing but the rounding).

Packed bits and scale do not depend on g: the exporter stores them once for all groups; only the
threshold and the three RPReLU vectors differ per group.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from bidiff.runtime.binary_op import pack_weights, unpack_weights, weight_scale
from bidiff.runtime.schedule import group_ranges

if TYPE_CHECKING:      # torch is imported by the caller; this module itself needs numpy only
    from torch import nn

__all__ = ["FoldedBIConv", "fold_biconv", "unroll", "is_biconv", "group_table"]


def _np(t) -> np.ndarray:
    return t.detach().to("cpu").float().numpy().copy()


@dataclass(frozen=True)
class FoldedBIConv:
    """One BIConv with the expert of ``group`` folded in (all arrays float32 except ``packed``)."""
    path: str                 # module path in the model, e.g. "downs.1.res_block.block1.conv"
    group: int
    channels: int
    kernel: int
    pad: int
    stride: int
    packed: np.ndarray        # uint32 [F, k, k, ceil(C/32)]  (group independent)
    scale: np.ndarray         # float32 [F]                   (group independent)
    threshold: np.ndarray     # float32 [C] = -TaR_g.bias
    bias0: np.ndarray         # float32 [C]   TaA_g.pr_bias0
    slope: np.ndarray         # float32 [C]   TaA_g.pr_prelu.weight
    bias1: np.ndarray         # float32 [C]   TaA_g.pr_bias1

    @property
    def out_channels(self) -> int:
        return int(self.packed.shape[0])

    def float_weight(self) -> np.ndarray:
        """alpha * sign(W) as float32 [F, C, k, k]: the weights of the plain float export."""
        return (unpack_weights(self.packed, self.channels) * self.scale[:, None, None, None]).astype(np.float32)


def is_biconv(module: "nn.Module") -> bool:
    return type(module).__name__ == "BIConv"


def fold_biconv(conv: "nn.Module", group: int, path: str = "") -> FoldedBIConv:
    """Fold expert ``group`` of a ``BIConv`` (see the module docstring)."""
    if not is_biconv(conv):
        raise TypeError(f"{path or 'module'} is a {type(conv).__name__}, not a BIConv")
    k_groups = conv.TaR.num
    if not 0 <= group < k_groups:
        raise ValueError(f"group {group} is outside 0..{k_groups - 1}")
    hbc = conv.binary_conv
    w = _np(hbc.weight)
    f, c, kh, kw = w.shape
    if kh != kw:
        raise ValueError(f"{path}: only square kernels are supported, got {kh}x{kw}")
    tar, taa = conv.TaR[group], conv.TaA[group]
    return FoldedBIConv(
        path=path, group=int(group), channels=int(c), kernel=int(kh), pad=int(hbc.padding),
        stride=int(hbc.stride), packed=pack_weights(w), scale=weight_scale(w),
        threshold=(-_np(tar.bias)).reshape(c),
        bias0=_np(taa.pr_bias0.bias).reshape(f), slope=_np(taa.pr_prelu.weight).reshape(f),
        bias1=_np(taa.pr_bias1.bias).reshape(f))


def unroll(model: "nn.Module", group: int) -> dict[str, FoldedBIConv]:
    """Every BIConv of ``model`` folded for ``group``, keyed by module path (model order)."""
    return {name: fold_biconv(m, group, name) for name, m in model.named_modules() if is_biconv(m)}


def group_table(model: "nn.Module") -> list[tuple[int, int, int]]:
    """(k, t_min, t_max) for every timestep group of ``model`` (inclusive t ranges)."""
    ranges = group_ranges(num_groups=model.dynamic_group, total_steps=model.total_step)
    return [(k, lo, hi) for k, (lo, hi) in enumerate(ranges)]
