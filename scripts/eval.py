"""Score a checkpoint against bicubic: `python scripts/eval.py -i data/heldout -o runs/eval`.

Rows: bicubic, bicubic + the model's back-projection (no network), the model at its default
steps and at twice that (or ``--steps``), and with ``--paper`` the paper's 50-step sampler;
columns: each LR degradation (``--degradations``, default all three of
``models.data.EVAL_DEGRADATIONS``; ``STRESS_DEGRADATIONS`` probe robustness). Writes results.md (mean and per-image Y PSNR/SSIM),
results.json and comparison.png (bicubic | SR | HR crops) into the output folder. By default images are sampled whole with the
PyTorch sampler; ``--runtime onnx|x86_64`` exports the checkpoint to a temporary artifact and
samples through the device runtime instead, tile by tile, exactly as ``bidiff upscale`` does
(the network's GroupNorm statistics depend on the tile, so large images can differ).
"""
from __future__ import annotations

import argparse
import tempfile
from functools import partial
from pathlib import Path

import torch

from bidiff import runtime
from bidiff.exporter import export_artifact
from bidiff.models import SHIPPED_CHECKPOINT
from bidiff.models.data import EVAL_DEGRADATIONS, STRESS_DEGRADATIONS
from bidiff.models.evaluate import EvalResult, markdown_table, run_eval
from bidiff.runtime.artifact import sha256_file
from bidiff.runtime.ensemble import ENSEMBLES, sample_ensemble
from bidiff.runtime.schedule import TIMESTEP_SPACINGS


def _eval_artifact(args: argparse.Namespace, artifact: Path, kw: dict) -> EvalResult:
    """Score ``args.checkpoint`` sampled through the device runtime on ``artifact``."""
    with runtime.load(artifact, threads=args.threads) as up:
        checkpoint = args.checkpoint or SHIPPED_CHECKPOINT      # its metadata picks the sampler
        sha = up.manifest.model.checkpoint_sha256
        if sha and sha != sha256_file(checkpoint):
            raise SystemExit(f"{artifact} was not exported from {checkpoint}: pass its checkpoint with -c")
        runner = partial(sample_ensemble, up.backend, scale=up.scale, formulation=up.formulation,
                         overlap=args.overlap, ensemble=args.ensemble)
        return run_eval(args.checkpoint, args.input, args.output, runner=runner,
                        runner_name=f"bidiff runtime, {up.backend_name}, tiles of "
                                    f"{up.manifest.tile}, overlap {args.overlap or 'default'}, "
                                    f"ensemble of {args.ensemble}", **kw)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--checkpoint", type=Path, default=None,
                        help="bidiff .safetensors checkpoint (default: the shipped model)")
    parser.add_argument("-i", "--input", type=Path, default=Path("data/heldout"),
                        help="folder of HR images (default: data/heldout)")
    parser.add_argument("-o", "--output", type=Path, default=Path("runs/eval"),
                        help="output folder (default: runs/eval)")
    parser.add_argument("-s", "--steps", type=int, nargs="+", default=None,
                        help="sampler step counts (default: the checkpoint's default_steps and twice that)")
    parser.add_argument("--degradations", nargs="+", default=list(EVAL_DEGRADATIONS),
                        choices=EVAL_DEGRADATIONS + STRESS_DEGRADATIONS,
                        help="how LR images are made (default: the three of the issue-17 table; "
                             "the others probe robustness, see models.data.STRESS_DEGRADATIONS)")
    parser.add_argument("--paper", action="store_true",
                        help="also score the paper's sampler (50 leading DDIM steps, no time shift)")
    parser.add_argument("--max-side", type=int, default=None,
                        help="centre-crop every HR image to at most this many pixels per side "
                             "(default: whole images; 128-256 keeps a CPU run to minutes)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images (sorted)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
    parser.add_argument("--picture-crop", type=int, default=128,
                        help="crop size of each tile in comparison.png (default: 128)")
    parser.add_argument("--time-shift", type=int, default=None,
                        help="sampler time shift (default: the checkpoint's metadata, else 0)")
    parser.add_argument("--back-projection", type=int, default=None,
                        help="LR-consistency rounds (default: the checkpoint's metadata, else 0)")
    parser.add_argument("--timestep-spacing", choices=TIMESTEP_SPACINGS, default=None,
                        help="DDIM step spacing (default: the checkpoint's metadata, else leading; "
                             "a run trained from scratch carries none)")
    parser.add_argument("--runtime", metavar="TARGET", default=None,
                        help="sample through the device runtime on an artifact exported for "
                             "TARGET (onnx, x86_64, ...) instead of the PyTorch sampler")
    parser.add_argument("--artifact", type=Path, default=None,
                        help="sample through this artifact (exported from --checkpoint) instead "
                             "of exporting one for --runtime")
    parser.add_argument("--overlap", type=int, default=None,
                        help="with --runtime/--artifact: HR pixels shared by neighbouring tiles, at "
                             "least (default: the runtime's tile plan)")
    parser.add_argument("--ensemble", type=int, choices=ENSEMBLES, default=1,
                        help="with --runtime/--artifact: average over this many flips / rotations "
                             "of each input (default: 1)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.steps is not None and any(n < 1 for n in args.steps):
        raise SystemExit(f"--steps must be positive, got {args.steps}")
    kw = dict(steps=args.steps, seed=args.seed, max_side=args.max_side, limit=args.limit,
              picture_crop=args.picture_crop, time_shift=args.time_shift,
              back_projection=args.back_projection, timestep_spacing=args.timestep_spacing,
              degradations=args.degradations, paper=args.paper)
    if args.artifact is not None:
        result = _eval_artifact(args, args.artifact, kw)
    elif args.runtime is not None:
        with tempfile.TemporaryDirectory() as tmp:
            export_artifact(args.checkpoint, target=args.runtime, out=Path(tmp) / "a",
                            progress=False, measure_float=False)
            result = _eval_artifact(args, Path(tmp) / "a", kw)
    elif args.overlap is not None or args.ensemble != 1:
        raise SystemExit("--overlap and --ensemble need --runtime or --artifact (the PyTorch sampler "
                         "takes whole images, once)")
    else:
        result = run_eval(args.checkpoint, args.input, args.output, **kw)
    print(markdown_table(result), end="")
    print(f"written to {args.output}/")


if __name__ == "__main__":
    main()
