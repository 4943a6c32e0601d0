"""Command-line flags for ``TrainConfig``: one definition for every training script.

Why: scripts/train.py and scripts/train_timed.py (the lent-GPU entry point) must take the same
recipe; when the timed script kept its own short list, each new lever (teachers, loss targets,
bf16) reached the CPU runs only, and a GPU call could not run the recipe being shipped.
"""
from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Any

from bidiff.models.train import TrainConfig

HELP = {  # TrainConfig field -> help
    "data": "folder of HR training images",
    "steps": "total optimizer steps (the cosine schedule ends here)",
    "batch": "patches per step",
    "patch": "HR patch size in pixels (multiple of scale x the model's input multiple)",
    "lr": "peak Adam learning rate",
    "lr_schedule": "constant | cosine (after the warm-up)",
    "warmup_steps": "linear LR warm-up steps",
    "decay_start": "step where the cosine decay starts (>= warm-up)",
    "min_lr": "final LR of the cosine",
    "degradation": "LR degradation: bicubic | mixed | mixed-jpeg | jpeg-only | no-jpeg (downscalers + JPEG; models.data.MIXES)",
    "loss_back_projection": "x0 models: back-project the prediction this many rounds before the loss",
    "t_min": "draw timesteps from t_min..1999 only (a 1-step x0 sampler sees t = 1999)",
    "ema_decay": "maximum EMA decay (warmed up as (1+n)/(10+n))",
    "seed": "seed of init, data and noise",
    "log_every": "steps per log line",
    "checkpoint_minutes": "minutes between checkpoints and EMA snapshots",
    "teacher": "distil from this checkpoint's outputs (e.g. a bidiff-s2-x2-fp run), as well as the HR",
    "distil_weight": "weight of the distance to the teacher's output (with --teacher or --image-teacher)",
    "image_teacher": "distil from the x2 networks of this folder (data/teachers, made by "
                     "prepare_data.py --teachers; models.teachers) as well as the HR",
    "loss": "per-pixel distance: l1 (official) | l2 (the mean squared error PSNR scores) | l1-luma | "
            "l2-luma (the same in YCbCr, each chroma channel weighted 1/4)",
    "refine_t": "x0 models: also train a second call at this timestep on the first call's estimate "
                "(0: the 2-step linspace sampler's), the loss the mean of both; -1: off",
    "first_x_t": "x0 models: the first call's x_t, noise (the forward process) | zeros (a sampler "
                 "started from x_T = 0; frees the x_t inputs for a --refine-t call)",
    "loss_target": "with --loss-back-projection: compare with the HR image (hr) | the HR image "
                   "back-projected onto the same LR (projected: leaves out the error no prediction "
                   "can change, e.g. the LR's JPEG error) | split (hr for JPEG'd patches, projected "
                   "for the rest)",
    "train_params": "parameters the optimizer moves: all | full-precision (all but the 1-bit convs' "
                    "latent weights, whose signs then stay those of --init)",
    "zoom": "smallest scale a training photo is shown at: each HR patch is cut at a random scale "
            "in [zoom, 1] (antialiased bicubic; models.data.random_patch); 1: native pixels only",
    "precision": "network arithmetic in training: fp32 | bf16 (autocast; 1.8x faster on AMX CPUs)",
    "head_lr_scale": "learning-rate multiplier for the head blocks and the LR correction (they start at zero)",
    "correction_weight": "models with an LR correction: weight of the distance between the LR it aims "
                         "at and the LR the image target implies (the HR's bicubic downscale where "
                         "the target is the HR, with split the JPEG'd patches; else the given LR)",
}


def add_config_flags(parser: argparse.ArgumentParser, *, leave_out: tuple[str, ...] = ()) -> None:
    """``--config`` and one ``--flag`` per ``TrainConfig`` field in ``HELP`` (but ``leave_out``:
    fields the script sets itself). Every flag defaults to None, so ``given_config`` can tell
    what was passed from what was not (a resumed run keeps its saved values)."""
    defaults = TrainConfig()
    parser.add_argument("--config", dest="model", default=None,
                        help=f"model config name (default: {defaults.model})")
    for f in fields(TrainConfig):
        if f.name in HELP and f.name not in leave_out:
            parser.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(defaults, f.name)),
                                default=None, help=f"{HELP[f.name]} (default: {getattr(defaults, f.name)})")


def given_config(args: argparse.Namespace) -> dict[str, Any]:
    """The ``TrainConfig`` fields passed on the command line, by name."""
    return {f.name: getattr(args, f.name) for f in fields(TrainConfig)
            if getattr(args, f.name, None) is not None}
