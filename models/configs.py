"""Named model configs (timm-style registry). A config is the architecture plus what the
artifact and the sampler must know: upscaling factor and training formulation."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

from bidiff.runtime.formulation import Formulation

_REGISTRY: dict[str, Callable[[], "ModelConfig"]] = {}


@dataclass(frozen=True)
class ModelConfig:
    name: str
    network: dict[str, Any]
    scale: int = 2
    formulation: Formulation = field(default_factory=Formulation)
    description: str = ""

    @property
    def input_multiple(self) -> int:
        return 2 ** (len(self.network["channel_mults"]) - 1)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["formulation"] = self.formulation.to_dict()
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        d["formulation"] = Formulation.from_dict(d.get("formulation"))
        d["network"] = {k: list(v) if isinstance(v, tuple) else v for k, v in d["network"].items()}
        return cls(**d)


def register_config(fn: Callable[[], ModelConfig]) -> Callable[[], ModelConfig]:
    """Register a zero-argument function returning a config; the config's name is the key."""
    cfg = fn()
    if cfg.name in _REGISTRY:
        raise ValueError(f"config {cfg.name!r} is registered twice")
    _REGISTRY[cfg.name] = fn
    return fn


def list_configs() -> list[str]:
    return sorted(_REGISTRY)


def get_config(name: str) -> ModelConfig:
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise ValueError(f"unknown config {name!r}; valid configs: {', '.join(list_configs())}") from None


def _net(**kw: Any) -> dict[str, Any]:
    base = dict(in_channel=6, out_channel=3, inner_channel=64, norm_groups=16,
                channel_mults=[1, 2, 4, 8], attn_res=[], res_blocks=2, dropout=0.2,
                image_size=256, fp_res=[256, 128], total_step=2000, dynamic_group=5)
    base.update(kw)
    return base


@register_config
def official_x2() -> ModelConfig:
    return ModelConfig("official-x2", _net(), 2, Formulation("official"),
                       "BI-DiffSR x2 as in the paper (load the official .pth with this name)")


@register_config
def official_x4() -> ModelConfig:
    return ModelConfig("official-x4", _net(), 4, Formulation("official"),
                       "BI-DiffSR x4 as in the paper (same network as x2)")


@register_config
def golden_small() -> ModelConfig:
    return ModelConfig("golden-small", _net(inner_channel=16, norm_groups=8, image_size=64,
                                            fp_res=[64, 32]),
                       2, Formulation("official"),
                       "the official structure at width 16 (tests/golden/small)")


@register_config
def bidiff_s_x2() -> ModelConfig:
    return ModelConfig("bidiff-s-x2", _net(inner_channel=32, norm_groups=8, channel_mults=[1, 2, 4],
                                           dropout=0.0, image_size=64, fp_res=[]),
                       2, Formulation("residual", 4.0),
                       "an earlier x2 model: all-binary, 3 levels, residual target")


@register_config
def bidiff_s2_x2() -> ModelConfig:
    return ModelConfig("bidiff-s2-x2", _net(inner_channel=32, norm_groups=8, channel_mults=[1, 2, 4],
                                            dropout=0.0, image_size=64, fp_res=[64]),
                       2, Formulation("residual", 4.0, "sample"),
                       "x2: binary UNet with a full-precision top decoder level, predicts the "
                       "residual x0 (a few DDIM steps)")


@register_config
def bidiff_m2_x2() -> ModelConfig:
    return ModelConfig("bidiff-m2-x2", {**bidiff_s2_x2().network, "inner_channel": 64, "norm_groups": 16},
                       2, bidiff_s2_x2().formulation,
                       "the shipped x2 model: bidiff-s2-x2 at width 64 (4x the parameters, 2.6x "
                       "the time per tile)")



@register_config
def bidiff_m2c_x2() -> ModelConfig:
    return ModelConfig("bidiff-m2c-x2", {**bidiff_m2_x2().network, "cond_embed": True}, 2,
                       bidiff_m2_x2().formulation,
                       "bidiff-m2-x2 with a per-tile summary of the condition added to the timestep "
                       "embedding (an experiment; starts from bidiff-m2-x2's weights)")

@register_config
def bidiff_m2h_x2() -> ModelConfig:
    return ModelConfig("bidiff-m2h-x2", {**bidiff_m2_x2().network, "head_blocks": 1}, 2,
                       bidiff_m2_x2().formulation,
                       "bidiff-m2-x2 with one more full-precision residual block at the top (an "
                       "experiment; starts from bidiff-m2-x2's weights)")


@register_config
def bidiff_m2l_x2() -> ModelConfig:
    return ModelConfig("bidiff-m2l-x2", bidiff_m2_x2().network, 2,
                       replace(bidiff_m2_x2().formulation, lr_correction=True),
                       "bidiff-m2-x2 that also predicts a correction of its LR input for "
                       "back-projection (an experiment; starts from bidiff-m2-x2's weights)")


@register_config
def bidiff_s2_x2_fp() -> ModelConfig:
    return ModelConfig("bidiff-s2-x2-fp", {**bidiff_s2_x2().network, "binary": False}, 2,
                       bidiff_s2_x2().formulation,
                       "full-precision twin of bidiff-s2-x2: a distillation teacher for training, "
                       "not exportable")


@register_config
def tiny_binary() -> ModelConfig:
    return ModelConfig("tiny-binary", _net(inner_channel=16, norm_groups=4, channel_mults=[1, 2],
                                           res_blocks=1, dropout=0.0, image_size=32, fp_res=[]),
                       2, Formulation("residual", 4.0),
                       "a tiny all-binary network for tests")


@register_config
def tiny_binary_cond() -> ModelConfig:
    return ModelConfig("tiny-binary-cond", {**tiny_binary().network, "cond_embed": True}, 2,
                       tiny_binary().formulation, "tiny-binary with the condition summary (tests)")


@register_config
def tiny_head() -> ModelConfig:
    return ModelConfig("tiny-head", {**tiny_binary().network, "fp_res": [32], "head_blocks": 1}, 2,
                       tiny_binary().formulation,
                       "tiny-binary with a full-precision top level and a head block (tests)")


@register_config
def tiny_lrc() -> ModelConfig:
    return ModelConfig("tiny-lrc", tiny_binary().network, 2,
                       Formulation("residual", 4.0, "sample", lr_correction=True),
                       "tiny-binary predicting x0 and an LR correction (tests)")
