"""Folding one TaR/TaA expert: the numpy reference equals PyTorch's deploy mode, per layer.

For every shape class of BI-DiffSR's binary convs (1x1 and 3x3; 16, 32, 33, 48, 96 channels)
a BIConv in deploy mode, expert g, must equal ``binary_conv2d_reference`` on the folded
tensors, followed by RPReLU and the residual in numpy (float64). Tolerance: PyTorch convolves
with alpha*sign(W) in float32 (sums of C*k*k terms, |acc| <= C*k*k*alpha), the reference sums
exact +-1 integers and scales once, so they differ by float32 rounding of that sum: ~1e-6
relative to the largest |acc| (1e-5 absolute covers it at these sizes with margin).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bidiff.exporter.unroll import fold_biconv, group_table, unroll
from bidiff.models import create_model, list_configs
from bidiff.models.layers import BIConv, set_deploy
from bidiff.runtime.binary_op import binary_conv2d_reference, unpack_weights


def _perturbed(module: torch.nn.Module, seed: int, scale: float = 0.1) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return module.eval()


def _numpy_biconv(f, x: np.ndarray) -> np.ndarray:
    h = binary_conv2d_reference(x, f.packed, f.scale, channels=f.channels, kernel=f.kernel,
                                threshold=f.threshold, pad=f.pad, stride=f.stride).astype(np.float64)
    h = h + f.bias0[None, :, None, None]
    h = np.where(h >= 0, h, h * f.slope[None, :, None, None])
    return h + f.bias1[None, :, None, None] + x


@pytest.mark.parametrize("channels", [16, 32, 33, 48, 96])
@pytest.mark.parametrize("kernel", [1, 3])
def test_reference_equals_pytorch_deploy(channels: int, kernel: int) -> None:
    conv = _perturbed(BIConv(channels, kernel, 5), seed=channels + kernel)
    conv.binary_conv.weight.data.view(-1)[:3] = 0.0          # exact zeros: +1 in both paths
    set_deploy(conv, True)
    x = torch.randn(1, channels, 9, 13, generator=torch.Generator().manual_seed(3))
    for g in (0, 2, 4):
        x[0, :, 0, 0] = -conv.TaR[g].bias.detach().view(-1)   # x + b == 0 exactly -> +1
        f = fold_biconv(conv, g, "conv")
        with torch.no_grad():
            want = conv(x, g).numpy()
        got = _numpy_biconv(f, x.numpy())
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_fold_values_and_shared_parts() -> None:
    conv = _perturbed(BIConv(40, 3, 5), seed=1)
    w = conv.binary_conv.weight.detach().numpy()
    f0, f3 = fold_biconv(conv, 0), fold_biconv(conv, 3)
    np.testing.assert_array_equal(unpack_weights(f0.packed, 40), np.where(w >= 0, 1.0, -1.0))
    np.testing.assert_allclose(f0.scale, np.abs(w).mean(axis=(1, 2, 3)), rtol=1e-6)
    np.testing.assert_array_equal(f0.packed, f3.packed)                       # group independent
    np.testing.assert_array_equal(f3.threshold, -conv.TaR[3].bias.detach().numpy().reshape(-1))
    np.testing.assert_array_equal(f3.slope, conv.TaA[3].pr_prelu.weight.detach().numpy())
    assert not np.array_equal(f0.threshold, f3.threshold)
    with pytest.raises(ValueError, match="outside 0..4"):
        fold_biconv(conv, 5)


@pytest.mark.parametrize("name", list_configs())
def test_unroll_covers_every_biconv_and_groups(name: str) -> None:
    """Every registered config unrolls: one folded BIConv per module for a group, and the group
    table partitions the timesteps into the model's expert groups."""
    model = create_model(name)
    k = model.dynamic_group - 1
    folded = unroll(model, k)
    n = sum(type(m).__name__ == "BIConv" for m in model.modules())
    assert n > 0 and len(folded) == n and all(f.group == k for f in folded.values())
    table = group_table(model)
    assert [g for g, _, _ in table] == list(range(model.dynamic_group))
    assert table[0][1] == 0 and table[-1][2] == model.total_step - 1
    assert all(hi + 1 == lo for (_, _, hi), (_, lo, _) in zip(table, table[1:]))
    if (model.dynamic_group, model.total_step) == (5, 2000):
        assert table == [(0, 0, 399), (1, 400, 799), (2, 800, 1199), (3, 1200, 1599), (4, 1600, 1999)]
