"""``bidiff-export``: checkpoint -> artifact (portable ONNX graphs, later a native library).

    bidiff-export [CHECKPOINT] --out PATH [--target onnx] [--config NAME] [--tile N] [--force]

CHECKPOINT defaults to the shipped model. Bad input (unknown config or target, a checkpoint
that does not fit its config, an existing output without --force, an unwritable output, a tile
that is not a multiple of 8) prints one line on stderr and exits with code 2; nothing is left
at the output path.
"""
from __future__ import annotations

import sys

import click

from bidiff.runtime.bounds import STEPS

from .export import DEFAULT_TILE, ExportResult, export_artifact
from .targets import TARGETS

EXIT_BAD_INPUT = 2


def _size(n: int) -> str:
    for unit, div in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def summary(r: ExportResult) -> str:
    m = r.manifest
    lines = [f"wrote {r.path}  (config {m.model.name}, x{m.model.scale}, tile {m.tile}, "
             f"{len(m.groups)} groups, target {m.target.name if m.target else 'onnx'})"]
    width = max(len(k) for k in r.file_sizes)
    for k, v in r.file_sizes.items():
        lines.append(f"  {k:<{width}}  {_size(v):>10}")
    lines.append(f"  {'total':<{width}}  {_size(r.artifact_bytes):>10}")
    lines.append(f"binary weights: {_size(r.packed_binary_bytes)} bit-packed vs "
                 f"{_size(r.binary_float32_bytes)} as float32 ({r.binary_ratio:.1f}x smaller)")
    if r.float_onnx_bytes is not None:
        where = f" kept in {r.float_onnx_path}" if r.float_onnx_path else ""
        lines.append(f"plain float ONNX of the same network ({len(m.groups)} graphs, shared weights"
                     f"{where}): {_size(r.float_onnx_bytes)}; the artifact is {r.float_ratio:.1f}x smaller")
    return "\n".join(lines)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("checkpoint", required=False, type=click.Path(dir_okay=False))
@click.option("--out", "-o", required=True, type=click.Path(),
              help="Artifact to write: a directory, or a single file ending in .bidiff.")
@click.option("--target", "-t", default="onnx", show_default=True,
              help=f"Export target: {', '.join(TARGETS)}.")
@click.option("--config", "-c", default=None,
              help="Model config name (needed for official .pth checkpoints; default: the checkpoint's own).")
@click.option("--tile", default=None, type=int,
              help="HR tile size the graphs are fixed to (a multiple of 8). Default: the patch the "
                   f"checkpoint was trained at (64 for the shipped model), else {DEFAULT_TILE}.")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@click.option("--float-onnx", type=click.Path(), default=None,
              help="Also keep the plain float ONNX export (for benchmarks) in this directory.")
@click.option("--steps", default=None, type=int,
              help=f"DDIM steps the artifact runs when the caller gives none, {STEPS.span}. Default: "
                   "the checkpoint's recommendation (1 for the shipped model), else 50.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
def cli(checkpoint, out, target, config, tile, force, float_onnx, steps, progress) -> None:
    """Export a BI-DiffSR checkpoint (default: the shipped model) to a bidiff artifact."""
    result = export_artifact(checkpoint, config=config, target=target, out=out, tile=tile,
                             force=force, progress=progress, float_onnx=float_onnx, steps=steps)
    click.echo(summary(result))


def _fail(msg: str) -> int:
    print(f"bidiff-export: error: {' '.join(str(msg).split())}", file=sys.stderr)
    return EXIT_BAD_INPUT


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit code (0 ok, 2 bad input)."""
    try:
        rv = cli.main(args=argv, prog_name="bidiff-export", standalone_mode=False)
        return int(rv or 0)
    except click.exceptions.Exit as e:           # --help
        return e.exit_code
    except click.ClickException as e:            # usage errors: one line, exit 2
        return _fail(e.format_message())
    except click.exceptions.Abort:
        return _fail("aborted")
    except ValueError as e:                      # ExportError, ArtifactError, load_checkpoint
        return _fail(e)
    except OSError as e:
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        return _fail(f"{e.strerror or e}{where}")


if __name__ == "__main__":      # pragma: no cover
    sys.exit(main())
