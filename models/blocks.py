"""UNet blocks of BI-DiffSR (binary and full-precision twins), official module names."""
from __future__ import annotations

import math

import torch
from torch import nn

from .layers import BIConv


class Swish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


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


def _dropout(p: float) -> nn.Module:
    return nn.Dropout(p) if p != 0 else nn.Identity()


class BI_Block(nn.Module):
    """GroupNorm -> Swish -> [Dropout] -> BIConv 3x3."""

    def __init__(self, dim: int, groups: int, dropout: float = 0.0, dynamic_group: int = 5) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.GroupNorm(groups, dim), Swish(), _dropout(dropout))
        self.conv = BIConv(dim, 3, dynamic_group)

    def forward(self, x: torch.Tensor, group: int) -> torch.Tensor:
        return self.conv(self.block(x), group)


class Block(nn.Module):
    """Full-precision twin of BI_Block: GroupNorm -> Swish -> [Dropout] -> Conv 3x3 (bias)."""

    def __init__(self, dim: int, groups: int, dropout: float = 0.0, dynamic_group: int = 5) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.GroupNorm(groups, dim), Swish(), _dropout(dropout))
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: torch.Tensor, group: int) -> torch.Tensor:
        return self.conv(self.block(x))


class Block_F(nn.Module):
    """The final conv: GroupNorm -> Swish -> (identity) -> Conv 3x3 C -> out (``block.3``)."""

    def __init__(self, dim: int, dim_out: int, groups: int) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.GroupNorm(groups, dim), Swish(), nn.Identity(),
                                   nn.Conv2d(dim, dim_out, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


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


class CP_Up(nn.Module):
    """C -> C/2, H -> 2H: two BIConv on the input, concatenated, PixelShuffle(2)."""

    def __init__(self, dim: int, dynamic_group: int = 5) -> None:
        super().__init__()
        self.biconv1 = BIConv(dim, 3, dynamic_group)
        self.biconv2 = BIConv(dim, 3, dynamic_group)
        self.shuffle = nn.PixelShuffle(2)

    def forward(self, x: torch.Tensor, group: int) -> torch.Tensor:
        return self.shuffle(torch.cat([self.biconv1(x, group), self.biconv2(x, group)], dim=1))


def channel_shuffle_halves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CS-Fusion's mix of (decoder, skip): ([x odd, skip even], [x even, skip odd])."""
    a, b = x.chunk(2, dim=1)
    return (torch.cat([a[:, 1::2], b[:, 0::2]], dim=1),
            torch.cat([a[:, 0::2], b[:, 1::2]], dim=1))


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
