"""Train a BI-DiffSR model: `python scripts/train.py --config bidiff-s2-x2 [--resume]`.

Thin CLI over ``bidiff.models.train``; every flag left out keeps the default (new run) or the
saved value (``--resume``), so ``--resume --threads 2`` continues the same run on more cores.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bidiff.models.train import TrainConfig, train
from bidiff.models.train_flags import add_config_flags, given_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_flags(parser)
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

    given = given_config(args)
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
