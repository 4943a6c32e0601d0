"""UNet blocks of BI-DiffSR (binary and full-precision twins), official module names."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .graph import GraphBuilder
from .layers import BIConv


class Swish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)

    def emit_onnx(self, g: GraphBuilder, x: str, path: str) -> str:
        return g.op("Mul", [x, g.op("Sigmoid", [x], path + ".sigmoid")], path)


class PositionalEncoding(nn.Module):
    """WaveGrad encoding of the raw integer timestep: [sin(t*f_j), cos(t*f_j)], f_j = 1e4^(-j/n).

    ``step`` is a non-persistent buffer so that ``.double()`` moves the whole computation to
    float64 while float32 keeps the official rounding (t * f in float32).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.register_buffer("step", torch.arange(dim // 2) / (dim // 2), persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        enc = t.reshape(-1, 1).to(self.step.dtype) * torch.exp(-math.log(1e4) * self.step.unsqueeze(0))
        return torch.cat([torch.sin(enc), torch.cos(enc)], dim=-1)

    def emit_onnx(self, g: GraphBuilder, t: str, path: str) -> str:
        """The frequency table is a float32 constant computed as torch computes it."""
        freq = torch.exp(-math.log(1e4) * self.step.float().unsqueeze(0)).numpy()
        arg = g.op("Mul", [g.cast(t, np.float32, path + ".t_float"),
                           g.const("posenc_freq", freq.reshape(1, self.dim // 2))], path + ".arg")
        return g.op("Concat", [g.op("Sin", [arg], path + ".sin"), g.op("Cos", [arg], path + ".cos")],
                    path, axis=1)


def _dropout(p: float) -> nn.Module:
    return nn.Dropout(p) if p != 0 else nn.Identity()


class _NormActConv(nn.Module):
    """What BI_Block and Block share: ``conv(block(x))``."""

    block: nn.Sequential
    conv: nn.Module

    def emit_onnx(self, g: GraphBuilder, x: str, path: str) -> str:
        return g.module(self.conv, g.module(self.block, x, path + ".block"), path + ".conv")


class BI_Block(_NormActConv):
    """GroupNorm -> Swish -> [Dropout] -> BIConv 3x3."""

    def __init__(self, dim: int, groups: int, dropout: float = 0.0, dynamic_group: int = 5) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.GroupNorm(groups, dim), Swish(), _dropout(dropout))
        self.conv = BIConv(dim, 3, dynamic_group)

    def forward(self, x: torch.Tensor, group: int) -> torch.Tensor:
        return self.conv(self.block(x), group)


class Block(_NormActConv):
    """Full-precision twin of BI_Block: GroupNorm -> Swish -> [Dropout] -> Conv 3x3 (bias)."""

    def __init__(self, dim: int, groups: int, dropout: float = 0.0, dynamic_group: int = 5) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.GroupNorm(groups, dim), Swish(), _dropout(dropout))
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: torch.Tensor, group: int) -> torch.Tensor:
        return self.conv(self.block(x))


class Block_F(nn.Module):
    """The final conv: GroupNorm -> Swish -> (identity) -> Conv 3x3 C -> out (``block.3``).

    ``extra`` > 0: a second conv (``correction``) on the same activations adds that many output
    channels (the LR correction, ``Formulation.lr_correction``). It is a module of its own, not
    more rows of ``block.3``, so training can give it its own step size; it starts at zero.
    """

    def __init__(self, dim: int, dim_out: int, groups: int, extra: int = 0) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.GroupNorm(groups, dim), Swish(), nn.Identity(),
                                   nn.Conv2d(dim, dim_out, 3, padding=1))
        self.correction = nn.Conv2d(dim, extra, 3, padding=1) if extra else None
        if self.correction is not None:
            with torch.no_grad():
                self.correction.weight.zero_()
                self.correction.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.correction is None:
            return self.block(x)
        h = self.block[:3](x)
        return torch.cat([self.block[3](h), self.correction(h)], 1)

    def emit_onnx(self, g: GraphBuilder, x: str, path: str) -> str:
        if self.correction is None:
            return g.module(self.block, x, path + ".block")
        h = g.module(self.block[:3], x, path + ".block")
        out = [g.module(self.block[3], h, path + ".block.3"), g.module(self.correction, h, path + ".correction")]
        return g.op("Concat", out, path + ".cat", axis=1)


class CondEmbed(nn.Module):
    """A per-tile summary of the condition, added to the timestep embedding: every block's
    per-channel bias (``_ResnetBlock.timestep_func``) can then depend on what kind of input the
    tile is (clean, JPEG-blocky, soft), which one fixed timestep of a 1-step sampler cannot
    tell it. Three strided full-precision convs, a global mean, a linear layer initialised to
    zero (so a network that gains it computes what it computed before)."""

    def __init__(self, in_channel: int, dim: int, width: int = 32) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(in_channel, width, 3, stride=2, padding=1), Swish(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), Swish(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), Swish())
        self.proj = nn.Linear(2 * width, dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        return self.proj(self.convs(cond).mean(dim=(2, 3)))

    def emit_onnx(self, g: GraphBuilder, cond: str, path: str) -> str:
        pooled = g.op("GlobalAveragePool", [g.module(self.convs, cond, path + ".convs")], path + ".pool")
        return g.module(self.proj, g.op("Flatten", [pooled], path + ".flat", axis=1), path + ".proj")

class _ResnetBlock(nn.Module):
    """h = block1(x) + Linear(Swish(time_emb)); y = block2(h) + x (block2 carries the dropout)."""

    block_cls: type[nn.Module]

    def __init__(self, dim: int, time_dim: int, dropout: float, norm_groups: int,
                 dynamic_group: int) -> None:
        super().__init__()
        self.timestep_func = nn.Sequential(Swish(), nn.Linear(time_dim, dim))
        self.block1 = self.block_cls(dim, norm_groups, 0.0, dynamic_group)
        self.block2 = self.block_cls(dim, norm_groups, dropout, dynamic_group)

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor, group: int) -> torch.Tensor:
        h = self.block1(x, group)
        h = h + self.timestep_func(time_emb).view(x.shape[0], -1, 1, 1)
        return self.block2(h, group) + x

    def emit_onnx(self, g: GraphBuilder, x: str, path: str, temb: str) -> str:
        h = g.module(self.block1, x, path + ".block1")
        e = g.module(self.timestep_func, temb, path + ".timestep_func")
        e = g.op("Unsqueeze", [e, g.const("axes_23", np.array([2, 3], np.int64))], path + ".temb")
        h = g.op("Add", [h, e], path + ".add_temb")
        return g.op("Add", [g.module(self.block2, h, path + ".block2"), x], path)


class BI_ResnetBlock(_ResnetBlock):
    block_cls = BI_Block


class ResnetBlock(_ResnetBlock):
    block_cls = Block


class SelfAttention(nn.Module):
    """One-head attention over all positions (SR3), residual."""

    def __init__(self, channels: int, norm_groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(norm_groups, channels)
        self.qkv = nn.Conv2d(channels, channels * 3, 1, bias=False)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3 * c, h * w).chunk(3, dim=1)
        attn = torch.softmax(torch.einsum("bcq,bck->bqk", q, k) / math.sqrt(c), dim=-1)
        out = torch.einsum("bqk,bck->bcq", attn, v).reshape(b, c, h, w)
        return self.out(out) + x

    def emit_onnx(self, g: GraphBuilder, x: str, path: str, hw: tuple[int, int]) -> str:
        """``hw``: the static spatial size. Computes attn @ v^T, then transposes back to
        [C, HW]: two transposes of C x HW instead of one of the HW x HW attention matrix (4 MB
        at the shipped model's bottleneck)."""
        c, n = self.qkv.in_channels, hw[0] * hw[1]
        qkv = g.module(self.qkv, g.module(self.norm, x, path + ".norm"), path + ".qkv")
        qkv = g.op("Reshape", [qkv, g.const("shape_attn", np.array([1, 3 * c, n], np.int64))], path + ".qkv_flat")
        q, k, v = g.op("Split", [qkv, g.const("split3", np.array([c, c, c], np.int64))], path + ".split", n_out=3, axis=1)
        qt = g.op("Transpose", [q], path + ".qT", perm=[0, 2, 1])                      # [1, HW, C]
        s = g.op("MatMul", [qt, k], path + ".scores")                                  # [1, HWq, HWk]
        s = g.op("Div", [s, g.const("sqrt_c", np.array(math.sqrt(c), np.float32))], path + ".scaled")
        a = g.op("Softmax", [s], path + ".softmax", axis=-1)
        vt = g.op("Transpose", [v], path + ".vT", perm=[0, 2, 1])                      # [1, HWk, C]
        o = g.op("MatMul", [a, vt], path + ".weightedT")                              # [1, HWq, C]
        o = g.op("Transpose", [o], path + ".weighted", perm=[0, 2, 1])                 # [1, C, HWq]
        o = g.op("Reshape", [o, g.const("shape_chw", np.array([1, c, *hw], np.int64))], path + ".unflat")
        return g.op("Add", [g.module(self.out, o, path + ".out"), x], path)


class _ResnetBlocWithAttn(nn.Module):
    res_cls: type[_ResnetBlock]

    def __init__(self, dim: int, time_dim: int, norm_groups: int, dropout: float,
                 with_attn: bool, dynamic_group: int) -> None:
        super().__init__()
        self.res_block = self.res_cls(dim, time_dim, dropout, norm_groups, dynamic_group)
        self.attn = SelfAttention(dim, norm_groups) if with_attn else None

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor, group: int) -> torch.Tensor:
        x = self.res_block(x, time_emb, group)
        return self.attn(x) if self.attn is not None else x

    def emit_onnx(self, g: GraphBuilder, x: str, path: str, temb: str, hw: tuple[int, int]) -> str:
        x = g.module(self.res_block, x, path + ".res_block", temb)
        return g.module(self.attn, x, path + ".attn", hw) if self.attn is not None else x


class BI_ResnetBlocWithAttn(_ResnetBlocWithAttn):
    res_cls = BI_ResnetBlock


class ResnetBlocWithAttn(_ResnetBlocWithAttn):
    res_cls = ResnetBlock


class CP_Down(nn.Module):
    """C -> 2C, H -> H/2: BIConv on each channel half, sum, PixelUnshuffle(2)."""

    def __init__(self, dim: int, dynamic_group: int = 5) -> None:
        super().__init__()
        self.biconv1 = BIConv(dim // 2, 3, dynamic_group)
        self.biconv2 = BIConv(dim // 2, 3, dynamic_group)
        self.unshuffle = nn.PixelUnshuffle(2)

    def forward(self, x: torch.Tensor, group: int) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return self.unshuffle(self.biconv1(a, group) + self.biconv2(b, group))

    def emit_onnx(self, g: GraphBuilder, x: str, path: str,
                  hw: tuple[int, int]) -> tuple[str, tuple[int, int]]:
        """Returns the output and its spatial size. PixelUnshuffle is Reshape / Transpose /
        Reshape (ONNX SpaceToDepth orders the channels differently from torch)."""
        c, (h, w) = self.biconv1.channels, hw
        a, b = g.op("Split", [x, g.const("split2", np.array([c, c], np.int64))], path + ".chunk", n_out=2, axis=1)
        y = g.op("Add", [g.module(self.biconv1, a, path + ".biconv1"),
                         g.module(self.biconv2, b, path + ".biconv2")], path + ".sum")
        y = g.op("Reshape", [y, g.const("shape_unshuf6", np.array([1, c, h // 2, 2, w // 2, 2], np.int64))], path + ".unshuffle6")
        y = g.op("Transpose", [y], path + ".unshuffleT", perm=[0, 1, 3, 5, 2, 4])   # out c*4 + i*2 + j
        y = g.op("Reshape", [y, g.const("shape_unshuf4", np.array([1, c * 4, h // 2, w // 2], np.int64))], path)
        return y, (h // 2, w // 2)


class CP_Up(nn.Module):
    """C -> C/2, H -> 2H: two BIConv on the input, concatenated, PixelShuffle(2)."""

    def __init__(self, dim: int, dynamic_group: int = 5) -> None:
        super().__init__()
        self.biconv1 = BIConv(dim, 3, dynamic_group)
        self.biconv2 = BIConv(dim, 3, dynamic_group)
        self.shuffle = nn.PixelShuffle(2)

    def forward(self, x: torch.Tensor, group: int) -> torch.Tensor:
        return self.shuffle(torch.cat([self.biconv1(x, group), self.biconv2(x, group)], dim=1))

    def emit_onnx(self, g: GraphBuilder, x: str, path: str,
                  hw: tuple[int, int]) -> tuple[str, tuple[int, int]]:
        """Returns the output and its spatial size; DepthToSpace mode CRD is torch's PixelShuffle."""
        y = g.op("Concat", [g.module(self.biconv1, x, path + ".biconv1"),
                            g.module(self.biconv2, x, path + ".biconv2")], path + ".cat", axis=1)
        return g.op("DepthToSpace", [y], path, blocksize=2, mode="CRD"), (2 * hw[0], 2 * hw[1])


def channel_shuffle_halves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CS-Fusion's mix of (decoder, skip): ([x odd, skip even], [x even, skip odd])."""
    a, b = x.chunk(2, dim=1)
    return (torch.cat([a[:, 1::2], b[:, 0::2]], dim=1),
            torch.cat([a[:, 0::2], b[:, 1::2]], dim=1))


def channel_shuffle_indices(channels: int) -> tuple[np.ndarray, np.ndarray]:
    """The channels ``channel_shuffle_halves`` picks from a ``channels``-wide input (int64)."""
    half = channels // 2
    return (np.concatenate([np.arange(1, half, 2), half + np.arange(0, half, 2)]).astype(np.int64),
            np.concatenate([np.arange(0, half, 2), half + np.arange(1, half, 2)]).astype(np.int64))


class CS_Fusion(nn.Module):
    """2C -> C: channel-shuffled halves through two binary 1x1 convs, summed."""

    def __init__(self, dim_in: int, dim_out: int, dynamic_group: int = 5) -> None:
        super().__init__()
        if dim_in != 2 * dim_out:
            raise ValueError(f"CS_Fusion needs dim_in = 2*dim_out, got {dim_in} -> {dim_out}")
        self.biconv_1 = BIConv(dim_out, 1, dynamic_group)
        self.biconv_2 = BIConv(dim_out, 1, dynamic_group)

    def forward(self, x: torch.Tensor, group: int) -> torch.Tensor:
        f1, f2 = channel_shuffle_halves(x)
        return self.biconv_1(f1, group) + self.biconv_2(f2, group)

    def emit_onnx(self, g: GraphBuilder, x: str, path: str) -> str:
        """The mix as one Gather on the channel axis per half."""
        idx1, idx2 = channel_shuffle_indices(2 * self.biconv_1.channels)
        f1 = g.op("Gather", [x, g.const("cs_idx_odd_even", idx1)], path + ".fu1", axis=1)
        f2 = g.op("Gather", [x, g.const("cs_idx_even_odd", idx2)], path + ".fu2", axis=1)
        return g.op("Add", [g.module(self.biconv_1, f1, path + ".biconv_1"),
                            g.module(self.biconv_2, f2, path + ".biconv_2")], path)


class CS_Fusion_FP(nn.Module):
    """Full-precision CS-Fusion: the same shuffle, plain 1x1 convs with bias."""

    def __init__(self, dim_in: int, dim_out: int, dynamic_group: int = 5) -> None:
        super().__init__()
        if dim_in != 2 * dim_out:
            raise ValueError(f"CS_Fusion_FP needs dim_in = 2*dim_out, got {dim_in} -> {dim_out}")
        self.biconv_1 = nn.Conv2d(dim_out, dim_out, 1)
        self.biconv_2 = nn.Conv2d(dim_out, dim_out, 1)

    def forward(self, x: torch.Tensor, group: int) -> torch.Tensor:
        f1, f2 = channel_shuffle_halves(x)
        return self.biconv_1(f1) + self.biconv_2(f2)

    def emit_onnx(self, g: GraphBuilder, x: str, path: str) -> str:
        """conv_1(x[idx1]) + conv_2(x[idx2]) as one 1x1 Conv on ``x``: idx1 and idx2 partition
        its channels, so each column of the merged weight is one column of conv_1 or conv_2
        (copied, not summed). Saves the two channel Gathers, a second pass over the output and
        the Add; only the order of the fp32 sum changes."""
        idx1, idx2 = channel_shuffle_indices(2 * self.biconv_1.in_channels)
        w1, w2 = (c.weight.detach().float().numpy() for c in (self.biconv_1, self.biconv_2))
        w = np.zeros((w1.shape[0], len(idx1) + len(idx2), 1, 1), np.float32)
        w[:, idx1], w[:, idx2] = w1, w2
        b = (self.biconv_1.bias.detach().float() + self.biconv_2.bias.detach().float()).numpy()
        return g.op("Conv", [x, g.param(f"{path}.merged.weight", w),
                             g.param(f"{path}.merged.bias", b)], path, kernel_shape=[1, 1])
