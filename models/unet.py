"""BIDiffSRUNet: the BI-DiffSR denoiser, structure and state_dict names as released."""
from __future__ import annotations

import torch
from torch import nn

from bidiff.runtime.schedule import timestep_group

from .blocks import (CP_Down, CP_Up, CS_Fusion, CS_Fusion_FP, Block_F, BI_ResnetBlocWithAttn, CondEmbed,
                     PositionalEncoding, ResnetBlocWithAttn, Swish)
from .graph import GraphBuilder
from .layers import make_full_precision


class BIDiffSRUNet(nn.Module):
    """eps = net(x_t, cond, t); the expert group is chosen by t[0] for the whole batch.

    Levels i = 0..L-1 have width inner_channel * channel_mults[i] (each mult twice the last:
    CP-Down doubles channels). A decoder level whose nominal resolution (image_size halved per
    level; a config property, not the input size) is in ``fp_res`` is full precision.
    ``binary=False`` builds the full-precision twin (``layers.make_full_precision``).
    ``cond_embed``: a per-tile summary of the condition is added to the timestep embedding
    (``blocks.CondEmbed``; not in the paper).
    ``head_blocks``: that many more full-precision residual blocks after the (full-precision)
    top decoder level, before the final conv: depth where full precision learns fastest. Each
    starts as the identity (its last conv is zero), so a network that gains them computes what
    it computed before and can continue from its weights.
    ``lr_correction``: the final block outputs ``out_channel`` more channels, the correction of
    the LR that back-projection aims at (``Formulation.lr_correction``), starting at zero.
    """

    def __init__(self, in_channel: int = 6, out_channel: int = 3, inner_channel: int = 64,
                 norm_groups: int = 16, channel_mults: tuple[int, ...] = (1, 2, 4, 8),
                 attn_res: tuple[int, ...] = (), res_blocks: int = 2, dropout: float = 0.2,
                 image_size: int = 256, fp_res: tuple[int, ...] = (256, 128),
                 total_step: int = 2000, dynamic_group: int = 5, binary: bool = True,
                 cond_embed: bool = False, head_blocks: int = 0, lr_correction: bool = False) -> None:
        super().__init__()
        mults = list(channel_mults)
        for a, b in zip(mults, mults[1:]):
            if b != 2 * a:
                raise ValueError(f"channel_mults must double per level (CP-Down is C -> 2C), got {mults}")
        self.in_channel, self.out_channel = in_channel, out_channel
        self.total_step, self.dynamic_group = total_step, dynamic_group
        self.input_multiple = 2 ** (len(mults) - 1)
        k = dynamic_group
        self.timestep_level_mlp = nn.Sequential(
            PositionalEncoding(inner_channel), nn.Linear(inner_channel, inner_channel * 4),
            Swish(), nn.Linear(inner_channel * 4, inner_channel))
        self.cond_embed = CondEmbed(in_channel - out_channel, inner_channel) if cond_embed else None

        pre = inner_channel
        feats = [pre]
        res = image_size
        downs: list[nn.Module] = [nn.Conv2d(in_channel, inner_channel, 3, padding=1)]
        for i, m in enumerate(mults):
            width = inner_channel * m
            for _ in range(res_blocks):
                downs.append(BI_ResnetBlocWithAttn(pre, inner_channel, norm_groups, dropout,
                                                   res in attn_res, k))
                feats.append(width)
                pre = width
            if i != len(mults) - 1:
                downs.append(CP_Down(pre, k))
                pre *= 2
                feats.append(pre)
                res //= 2
        self.downs = nn.ModuleList(downs)
        self.mid = nn.ModuleList([
            BI_ResnetBlocWithAttn(pre, inner_channel, norm_groups, dropout, True, k),
            BI_ResnetBlocWithAttn(pre, inner_channel, norm_groups, dropout, False, k)])
        ups: list[nn.Module] = []
        for i in reversed(range(len(mults))):
            width = inner_channel * mults[i]
            fp = res in fp_res
            fusion, block = (CS_Fusion_FP, ResnetBlocWithAttn) if fp else (CS_Fusion, BI_ResnetBlocWithAttn)
            for _ in range(res_blocks + 1):
                ups.append(fusion(pre + feats.pop(), width, k))
                ups.append(block(width, inner_channel, norm_groups, dropout, res in attn_res, k))
                pre = width
            if i != 0:
                ups.append(CP_Up(pre, k))
                pre //= 2
                res *= 2
        self.ups = nn.ModuleList(ups)
        if head_blocks and res not in fp_res:
            raise ValueError(f"head_blocks needs a full-precision top level ({res} in fp_res), got fp_res {list(fp_res)}")
        self.head = nn.ModuleList([ResnetBlocWithAttn(pre, inner_channel, norm_groups, 0.0, False, k)
                                   for _ in range(head_blocks)])
        with torch.no_grad():
            for blk in self.head:
                blk.res_block.block2.conv.weight.zero_()
                blk.res_block.block2.conv.bias.zero_()
        self.final_conv = Block_F(pre, out_channel, norm_groups, out_channel if lr_correction else 0)
        self.binary = binary
        if not binary:
            make_full_precision(self)

    def check_inputs(self, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> int:
        """Validate shapes and timesteps; returns the expert group of t[0]."""
        c_in = self.in_channel - self.out_channel
        if x_t.ndim != 4 or x_t.shape[1] != self.out_channel:
            raise ValueError(f"x_t must be [B, {self.out_channel}, H, W], got {tuple(x_t.shape)}")
        if cond.ndim != 4 or cond.shape[1] != c_in:
            raise ValueError(f"cond must be [B, {c_in}, H, W], got {tuple(cond.shape)}")
        if cond.shape[0] != x_t.shape[0] or cond.shape[2:] != x_t.shape[2:]:
            raise ValueError(f"cond {tuple(cond.shape)} and x_t {tuple(x_t.shape)} differ in batch or size")
        h, w = x_t.shape[2:]
        if h % self.input_multiple or w % self.input_multiple:
            raise ValueError(f"H and W must be multiples of {self.input_multiple}, got {h}x{w}")
        if t.numel() != x_t.shape[0]:
            raise ValueError(f"t must hold one timestep per batch element ([B, 1]), got shape {tuple(t.shape)}")
        if t.is_floating_point() or not bool(((t >= 0) & (t < self.total_step)).all()):
            raise ValueError(f"t must be integer timesteps in 0..{self.total_step - 1}, got {t.flatten().tolist()[:4]}")
        return int(timestep_group(int(t.flatten()[0]), num_groups=self.dynamic_group,
                                  total_steps=self.total_step))

    def forward(self, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor,
                group: int | None = None) -> torch.Tensor:
        """``group`` forces an expert (used to check unrolled graphs); default: from t[0]."""
        g = self.check_inputs(x_t, cond, t)
        g = g if group is None else int(group)
        time_emb = self.timestep_level_mlp(t)
        if self.cond_embed is not None:
            time_emb = time_emb + self.cond_embed(cond)
        x = torch.cat([cond, x_t], dim=1)
        skips = []
        for layer in self.downs:
            if isinstance(layer, BI_ResnetBlocWithAttn):
                x = layer(x, time_emb, g)
            elif isinstance(layer, CP_Down):
                x = layer(x, g)
            else:
                x = layer(x)
            skips.append(x)
        for layer in self.mid:
            x = layer(x, time_emb, g)
        for layer in self.ups:
            if isinstance(layer, (CS_Fusion, CS_Fusion_FP)):
                x = layer(torch.cat([x, skips.pop()], dim=1), g)
            elif isinstance(layer, CP_Up):
                x = layer(x, g)
            else:
                x = layer(x, time_emb, g)
        for layer in self.head:
            x = layer(x, time_emb, g)
        return self.final_conv(x)

    def emit_onnx(self, g: GraphBuilder, x_t: str, cond: str, t: str, tile: int) -> str:
        """``forward`` for one tile size as ONNX nodes (the expert group is the builder's);
        the same steps as forward, plus the static spatial size that attention and CP-Down
        need. Returns the output's tensor name."""
        time_emb = g.module(self.timestep_level_mlp, t, "timestep_level_mlp")
        if self.cond_embed is not None:
            time_emb = g.op("Add", [time_emb, g.module(self.cond_embed, cond, "cond_embed")], "temb_cond")
        x = g.op("Concat", [cond, x_t], "input_cat", axis=1)
        hw = (tile, tile)
        skips = []
        for i, layer in enumerate(self.downs):
            path = f"downs.{i}"
            if isinstance(layer, BI_ResnetBlocWithAttn):
                x = g.module(layer, x, path, time_emb, hw)
            elif isinstance(layer, CP_Down):
                x, hw = g.module(layer, x, path, hw)
            else:
                x = g.module(layer, x, path)
            skips.append(x)
        for i, layer in enumerate(self.mid):
            x = g.module(layer, x, f"mid.{i}", time_emb, hw)
        for i, layer in enumerate(self.ups):
            path = f"ups.{i}"
            if isinstance(layer, (CS_Fusion, CS_Fusion_FP)):
                x = g.module(layer, g.op("Concat", [x, skips.pop()], path + ".cat", axis=1), path)
            elif isinstance(layer, CP_Up):
                x, hw = g.module(layer, x, path, hw)
            else:
                x = g.module(layer, x, path, time_emb, hw)
        for i, layer in enumerate(self.head):
            x = g.module(layer, x, f"head.{i}", time_emb, hw)
        return g.module(self.final_conv, x, "final_conv")
