"""bidiff.models: BI-DiffSR in PyTorch (exact official network), configs, checkpoints, sampler."""
from .checkpoint import (SHIPPED_CHECKPOINT, create_model, load_checkpoint, load_or_random,
                         save_checkpoint)
from .configs import ModelConfig, get_config, list_configs, register_config
from .layers import set_deploy
from .unet import BIDiffSRUNet

__all__ = ["BIDiffSRUNet", "ModelConfig", "SHIPPED_CHECKPOINT", "create_model", "get_config",
           "list_configs", "load_checkpoint", "load_or_random", "register_config", "save_checkpoint", "set_deploy"]
