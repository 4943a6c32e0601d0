"""Train within a wall-clock budget, ending on a full cosine anneal: `python scripts/train_timed.py
--minutes 8 --device cuda --workers 12 ...` (how the shipped model was trained on a lent GPU).

Why: a lent accelerator comes for minutes, and the cosine schedule needs its end step up front.
Phase 1 trains at the constant peak LR (after the warm-up) for ``--probe-steps`` and measures
the step rate; phase 2 resumes the same run with a cosine decay from there to the step the
remaining budget reaches (``--no-anneal``: at the peak LR to that step, for a line that a
lower rate made worse, docs/EXPERIMENTS.md). Everything else is ``bidiff.models.train`` (same
run directory, checkpoint format and log; the same recipe flags, ``models.train_flags``), so
the run can still be resumed or annealed further by scripts/train.py.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bidiff.models.checkpoint import read_metadata
from bidiff.models.train import TrainConfig, train
from bidiff.models.train_flags import add_config_flags, given_config

_RESTART_SECONDS = 20.0  # phase 2 loads the state and spawns its workers again


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_flags(parser, leave_out=("steps", "lr_schedule", "decay_start"))
    parser.add_argument("--minutes", type=float, required=True, help="wall-clock budget of both phases")
    parser.add_argument("--probe-steps", type=int, default=600,
                        help="constant-LR steps (warm-up included) that measure the rate")
    parser.add_argument("--anneal", action=argparse.BooleanOptionalAction, default=True,
                        help="phase 2 decays the LR on a cosine to --min-lr (default); --no-anneal "
                             "keeps the peak LR to the end (the EMA then does the averaging)")
    parser.add_argument("--name", default=None, help="run name (default: the config name)")
    parser.add_argument("--runs", type=Path, default=Path("runs"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=0, help="processes making batches ahead")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--init", type=Path, default=None,
                        help="start from these weights (e.g. the shipped model); the step count "
                             "continues from its metadata and --probe-steps count from there")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available in this torch build")

    deadline = time.monotonic() + args.minutes * 60
    cfg = TrainConfig(**{**given_config(args), "steps": 10**9, "lr_schedule": "constant"})
    run_dir = args.runs / (args.name or cfg.model)
    common = dict(device=args.device, workers=args.workers)
    start, seconds0 = 0, 0.0
    if args.init is not None:
        meta = read_metadata(args.init)
        start, seconds0 = int(meta.get("steps", 0)), float(meta.get("train_seconds", 0.0))
    run = train(cfg, run_dir, until=start + args.probe_steps, init=args.init, **common)
    # loop time of this run only: start-up costs are not per step
    rate = (run.step - start) / max(run.train_seconds - seconds0, 1e-9)
    extra = int(0.95 * rate * max(0.0, deadline - time.monotonic() - _RESTART_SECONDS))
    schedule = "cosine" if args.anneal else "constant"
    print(f"phase 1: {run.step} steps at {rate:.2f} steps/s; {schedule} over {extra} more steps", flush=True)
    if extra == 0:
        return      # the budget went on phase 1: a resume by scripts/train.py can take the run on
    end = {"steps": run.step + extra}
    if args.anneal:
        end |= {"lr_schedule": "cosine", "decay_start": run.step}
    train(cfg, run_dir, resume=True, overrides=end, **common)


if __name__ == "__main__":
    main()
