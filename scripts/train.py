"""Train a BI-DiffSR model: `python scripts/train.py --config bidiff-s2-x2 [--resume]`.

Thin CLI over ``bidiff.models.train``; every flag left out keeps the default (new run) or the
saved value (``--resume``), so ``--resume --threads 2`` continues the same run on more cores.
"""
from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

import torch

from bidiff.models.train import TrainConfig, train

_FLAGS = {  # TrainConfig field -> help
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


def main() -> None:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", dest="model", default=None,
                        help=f"model config name (default: {defaults.model})")
    for f in fields(TrainConfig):
        if f.name in _FLAGS:
            parser.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(defaults, f.name)),
                                default=None,
                                help=f"{_FLAGS[f.name]} (default: {getattr(defaults, f.name)})")
    parser.add_argument("--name", default=None, help="run name (default: the config name)")
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="runs folder (default: runs)")
    parser.add_argument("--resume", action="store_true", help="continue runs/<name>/state.pt")
    parser.add_argument("--init", type=Path, default=None,
                        help="start a new run from these weights (e.g. checkpoints/bidiff-m2-x2.safetensors)")
    parser.add_argument("--until", type=int, default=None, help="stop at this step (default: --steps)")
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1 (default: cpu)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--workers", type=int, default=0,
                        help="processes making batches ahead, for GPUs (default: 0, inline)")
    args = parser.parse_args()

    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig)
             if getattr(args, f.name, None) is not None}
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available in this torch build")
    # A resumed run's flags override its saved config and are checked against it by train():
    # on their own they may not be a valid config (--loss-target projected without the
    # --loss-back-projection the run was saved with).
    if args.resume:
        cfg = TrainConfig(**{k: v for k, v in given.items() if k == "model"})
    else:
        cfg = TrainConfig(**given)
    run_dir = args.runs / (args.name or cfg.model)
    if args.init and args.resume:
        raise SystemExit("--init starts a new run; --resume continues one: pass only one of them")
    train(cfg, run_dir, resume=args.resume, overrides=given, device=args.device, until=args.until,
          init=args.init, workers=args.workers)


if __name__ == "__main__":
    main()
