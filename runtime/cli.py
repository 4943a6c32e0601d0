"""The ``bidiff`` command: ``bidiff upscale``, ``bidiff info``, ``bidiff bench`` and ``bidiff device-server``.

    bidiff upscale photo.png -o out/                  # out/photo_x2.png
    bidiff upscale photos/ -o out/ --steps 20         # every image of the folder, sorted
    bidiff upscale photo.png -o big.png --artifact model.bidiff --backend onnxruntime
    bidiff info model.bidiff                          # manifest summary and checksum status
    bidiff bench model.bidiff --size 640x480          # step time per backend, upscale estimate
    bidiff upscale photos/ -o out/ --artifact rpi4-art --tracker 10.0.0.2:9190 --key rpi4
    bidiff device-server --tracker 10.0.0.2:9190 --key rpi4   # on each device

User errors (bad input, bad artifact, bad options) print one line on stderr and exit with
status 2; no output file is created and no existing one is touched. Outputs are written to a
temp file in the output folder and renamed into place.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import click

from . import images
from .artifact import Artifact, ArtifactError, file_status, read_artifact, target_mismatch
from .backends import BACKENDS, BackendError
from .bounds import STEPS, THREADS
from .consistency import BACK_PROJECTION
from .ensemble import ENSEMBLES
from .schedule import TIME_SHIFT

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
USER_ERRORS = (ArtifactError, images.ImageError, BackendError)
EXIT_USAGE = 2


class CliError(click.ClickException):
    exit_code = EXIT_USAGE


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bidiff", prog_name="bidiff")
def cli() -> None:
    """bidiff: binarized diffusion super-resolution on the device."""


def _collect_inputs(inputs: tuple[Path, ...]) -> tuple[list[Path], bool]:
    """Files to process (folders expanded, sorted) and whether any input was a folder."""
    files: list[Path] = []
    any_dir = False
    for p in inputs:
        if p.is_dir():
            any_dir = True
            found = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in IMAGE_EXTS)
            if not found:
                raise CliError(f"folder {p} has no images ({', '.join(IMAGE_EXTS)})")
            files += found
        elif not p.exists():
            raise CliError(f"{p} does not exist")
        else:
            files.append(p)
    return files, any_dir


def _check_writable_dir(d: Path) -> None:
    """Fail early if ``d`` cannot be written (or created); creates nothing."""
    try:
        if d.exists():
            if not d.is_dir():
                raise NotADirectoryError(20, "not a directory")
            fd, probe = tempfile.mkstemp(prefix=".bidiff-probe-", dir=d)
            os.close(fd)
            os.unlink(probe)
            return
        parent = d.parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise NotADirectoryError(20, f"{parent} is not a directory")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise PermissionError(13, "permission denied")
    except OSError as e:
        raise CliError(f"output folder {d} is not writable ({e.strerror or e}): choose another -o") from None


def _out_ext(src: Path, ext: str, has_alpha: bool) -> str:
    if has_alpha:
        return ".png"
    if ext != "auto":
        return "." + ext
    s = src.suffix.lower()
    return s if s in IMAGE_EXTS else ".png"


@cli.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="INPUT...")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Output folder (created if needed), or a file name for a single input.")
@click.option("--artifact", type=click.Path(path_type=Path), default=None,
              help="Artifact folder or .bidiff file. Default: the one for this host in "
                   "$BIDIFF_CACHE or ~/.cache/bidiff.")
@click.option("--steps", type=STEPS.click_type(), default=None,
              help=f"DDIM steps, {STEPS.span}. Default: the artifact's.")
@click.option("--time-shift", type=TIME_SHIFT.click_type(), default=None,
              help="Ask the network for eps this many timesteps earlier (see docs/TRAINING.md). "
                   "Default: the artifact's for the step count (measured; 0 for official models).")
@click.option("--back-projection", type=BACK_PROJECTION.click_type(), default=None,
              help="Rounds of correction that make the result downscale back to the input "
                   "(0 = off). Default: the artifact's (measured with the model).")
@click.option("--ensemble", type=click.Choice([str(n) for n in ENSEMBLES]), default="1",
              show_default=True,
              help="Average the results for this many flips / rotations of the input (that many "
                   "times the network calls; see docs/EXPERIMENTS.md for what it gains).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the initial noise.")
@click.option("--threads", type=THREADS.click_type(), default=None,
              help="Backend threads. Default: $BIDIFF_THREADS, else the usable cores (CPU affinity).")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
              help="auto: TVM when the artifact has a library for this host, else onnxruntime.")
@click.option("--overlap", type=click.IntRange(min=0), default=None,
              help="HR pixels shared by neighbouring tiles, at least. Default: an eighth of the artifact's tile.")
@click.option("--suffix", default=None, help="Output name suffix. Default: x{scale}, as in photo_x2.png.")
@click.option("--ext", type=click.Choice(["auto", "png", "jpg", "webp"]), default="auto", show_default=True,
              help="Output format; auto keeps the input's. Images with alpha are always PNG.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@click.option("--tracker", default=None, metavar="HOST:PORT",
              help="Run on the RPC servers of this TVM tracker (python -m tvm.exec.rpc_tracker), "
                   "one image per server at a time; servers left over share an image's tiles. "
                   "Needs --key.")
@click.option("--key", default=None, help="With --tracker: the device key the servers registered.")
@click.option("--devices", type=click.IntRange(min=1), default=None,
              help="With --tracker: servers to use at once. Default: all registered under --key, "
                   "at most as many as the images have tiles per step.")
def upscale(inputs: tuple[Path, ...], output: Path, artifact: Path | None, steps: int | None,
            time_shift: int | None, back_projection: int | None, ensemble: str, seed: int,
            threads: int | None, backend: str, overlap: int | None, suffix: str | None, ext: str, quiet: bool,
            tracker: str | None, key: str | None, devices: int | None) -> None:
    """Upscale images (files or folders of images) into OUTPUT."""
    from .api import load            # keeps `bidiff info` / `--help` from loading the sampler

    _check_remote_options(tracker, key, devices, threads=threads, backend=backend)
    files, any_dir = _collect_inputs(inputs)
    single_file = len(files) == 1 and not any_dir and output.suffix.lower() in IMAGE_EXTS \
        and not output.is_dir()
    out_dir = output.parent if single_file else output

    # 1. Everything that can be wrong is checked before any work: inputs decode, the output
    #    folder is writable, the artifact verifies and fits a backend.
    has_alpha, sizes = {}, {}
    for f in files:
        inp = images.load_input(f)
        has_alpha[f], sizes[f] = inp.alpha is not None, inp.size     # (H, W) as the sampler sees it
        del inp
    _check_writable_dir(out_dir)
    if tracker:
        from .api import default_artifact
        art = read_artifact(default_artifact() if artifact is None else artifact)
        manifest = art.manifest
        if not manifest.library:
            raise CliError(f"artifact {art.source} has no native library (exported for target onnx): "
                           "--tracker needs one exported for the servers' target")
    else:
        up = load(artifact, backend=backend, threads=threads)
        manifest = up.manifest
    sfx = suffix if suffix is not None else f"x{manifest.model.scale}"
    if overlap is not None and overlap >= manifest.tile:
        raise CliError(f"--overlap {overlap} must be smaller than the artifact's tile ({manifest.tile})")

    targets: dict[Path, Path] = {}
    for f in files:
        dst = output if single_file else out_dir / f"{f.stem}_{sfx}{_out_ext(f, ext, has_alpha[f])}"
        if single_file and has_alpha[f] and dst.suffix.lower() in (".jpg", ".jpeg"):
            raise CliError(f"{f} has an alpha channel; JPEG cannot hold it: write a .png")
        if dst in targets.values():
            raise CliError(f"two inputs would both be written to {dst}: use separate output folders")
        if dst.resolve() == f.resolve():
            raise CliError(f"output {dst} would overwrite its input: choose another -o or --suffix")
        targets[f] = dst

    # 2. Upscale, one image at a time, each written atomically.
    sampler = {"time_shift": time_shift, "back_projection": back_projection, "ensemble": int(ensemble)}
    if tracker:        # the folder is made with the first result: a failed run leaves nothing
        _upscale_remote(art, files, targets, sizes, out_dir, tracker, key, devices, quiet=quiet,
                        steps=steps, seed=seed, overlap=overlap, **sampler)
        return
    _make_dir(out_dir)
    for n, f in enumerate(files, 1):
        label = f"[{n}/{len(files)}] {f.name}"
        if quiet:
            result = up.upscale(f, steps=steps, seed=seed, overlap=overlap, **sampler)
        else:
            with click.progressbar(length=1, label=label, file=sys.stderr, show_eta=True) as bar:
                def progress(done: int, total: int, bar=bar) -> None:
                    bar.length = total
                    bar.update(done - bar.pos)
                result = up.upscale(f, steps=steps, seed=seed, overlap=overlap, progress=progress,
                                    **sampler)
        images.save_image(result, targets[f])
        if not quiet:
            click.echo(f"{targets[f]}", err=False)


def _check_remote_options(tracker: str | None, key: str | None, devices: int | None, *,
                          threads: int | None, backend: str) -> None:
    """--tracker needs --key; --key/--devices need --tracker; the servers run TVM libraries
    with threads of their own."""
    if tracker is None:
        if key is not None or devices is not None:
            raise CliError(f"{'--key' if key is not None else '--devices'} needs --tracker HOST:PORT")
        return
    from .rpc import parse_address
    parse_address(tracker)
    if not key:
        raise CliError("--tracker needs --key KEY, the device key the RPC servers registered")
    if threads is not None:
        raise CliError("--threads does not apply with --tracker: each server runs its own thread "
                       "count (bidiff device-server --threads N)")
    if backend == "onnxruntime":
        raise CliError("--tracker runs the artifact's TVM library on the servers: use --backend tvm")


def _make_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CliError(f"output folder {out_dir} is not writable ({e.strerror or e}): choose another -o") from None


def _upscale_remote(art: Artifact, files: list[Path], targets: dict[Path, Path],
                    sizes: dict[Path, tuple[int, int]], out_dir: Path, tracker: str, key: str,
                    devices: int | None, *, quiet: bool, **upscale_kw) -> None:
    """The files over the RPC servers of ``key`` (``pool.Pool``), each written when it is done.
    sizes: each file's (height, width), read in the checks; the pool opens no more sessions
    than the files' tiles per step add up to."""
    from .benchmark import network_calls
    from .pool import Pool
    from .rpc import parse_address, rpc_timeout

    m = art.manifest

    def width(f: Path) -> int | None:
        """Tiles per DDIM step of ``f`` (every ensemble pass has as many: turns swap the sides)."""
        if f not in sizes:
            return None
        h, w = sizes[f]
        return network_calls(w, h, scale=m.model.scale, tile=m.tile, steps=1,
                             overlap=upscale_kw.get("overlap"), align=m.input_multiple)[0]

    def log(msg: str) -> None:
        if not quiet:
            click.echo(f"bidiff: {msg}", err=True)

    done_n = 0
    started = time.monotonic()

    def done(f: Path, result, calls: dict[str, int]) -> None:
        nonlocal done_n
        _make_dir(out_dir)
        images.save_image(result, targets[f])
        done_n += 1
        if not quiet:
            shared = f"{' + '.join(map(str, calls.values()))} network calls, " if len(calls) > 1 else ""
            click.echo(f"[{done_n}/{len(files)}] {f.name} on {' + '.join(calls)} "
                       f"({shared}{time.monotonic() - started:.1f} s)", err=True)
            click.echo(f"{targets[f]}")

    pool = Pool(art, parse_address(tracker), key, devices=devices, timeout=rpc_timeout(), log=log)
    pool.run(files, lambda up, f: up.upscale(f, **upscale_kw), done,
             lambda f, where: log(f"{f.name} starts on {where}"), width=width)


@cli.command()
@click.argument("artifact", type=click.Path(path_type=Path))
def info(artifact: Path) -> None:
    """Show an artifact's manifest and whether its files are intact."""
    art = read_artifact(artifact, verify=False)
    m = art.manifest
    click.echo(f"artifact    {art.source}")
    click.echo(m.summary())
    status = file_status(art.root, m)
    width = max((len(p) for p, _ in status), default=0)
    click.echo("files")
    for rel, st in status:
        size = (art.root / rel).stat().st_size if st != "missing" else 0
        click.echo(f"  {rel:<{width}}  {size:>12,d} B  {st}")
    why = target_mismatch(m)
    click.echo("host        " + ("portable graphs only" if m.target is None or not m.library
                                 else "target fits this machine" if why is None else f"MISMATCH: {why}"))
    bad = [(p, s) for p, s in status if s != "ok"]
    if bad:
        raise CliError(f"{len(bad)} artifact file(s) missing or modified (first: {bad[0][0]}, "
                       f"{bad[0][1]}): re-export the artifact")


def _parse_size(text: str) -> tuple[int, int]:
    w, sep, h = text.lower().partition("x")
    if sep and w.isdigit() and h.isdigit() and int(w) >= images.MIN_SIDE and int(h) >= images.MIN_SIDE:
        return int(w), int(h)
    raise CliError(f"--size {text!r} is not WIDTHxHEIGHT in pixels, each >= {images.MIN_SIDE} "
                   "(e.g. 640x480)")


@cli.command()
@click.argument("artifact", required=False, type=click.Path(path_type=Path))
@click.option("--backend", type=click.Choice(("all",) + BACKENDS), default="all", show_default=True,
              help="all: every backend that can run the artifact here, timed side by side.")
@click.option("--threads", type=THREADS.click_type(), default=None,
              help="Backend threads. Default: $BIDIFF_THREADS, else the usable cores (CPU affinity).")
@click.option("--rounds", type=click.IntRange(1, 1000), default=7, show_default=True,
              help="Interleaved rounds; each times 3 network calls per backend.")
@click.option("--size", default=None,
              help="Input WIDTHxHEIGHT: estimate a whole upscale of it and run one, file to file, "
                   "at --steps (the sample photo resized). Default: estimate 512x512 only.")
@click.option("--steps", type=STEPS.click_type(), default=None,
              help="DDIM steps for the estimate and the upscale. Default: the artifact's.")
@click.option("--tracker", default=None, metavar="HOST:PORT",
              help="Measure on an RPC server of this TVM tracker instead of here. Needs --key.")
@click.option("--key", default=None, help="With --tracker: the device key the servers registered.")
def bench(artifact: Path | None, backend: str, threads: int | None, rounds: int, size: str | None,
          steps: int | None, tracker: str | None, key: str | None) -> None:
    """Time one denoising step per backend here, estimate a whole upscale, and run one (--size)."""
    from .api import default_artifact
    from .backends import THREADS_ENV, create_backend, resolve_backend, resolve_threads
    from .benchmark import format_duration, network_calls, time_steps, time_upscale

    _check_remote_options(tracker, key, None, threads=threads, backend=backend)
    width, height = _parse_size(size or "512x512")
    art = read_artifact(default_artifact() if artifact is None else artifact)
    m = art.manifest
    steps = m.default_steps if steps is None else steps
    if tracker:
        from .benchmark import time_remote_steps
        from .rpc import ServerLost, Tracker, open_remote, parse_address, rpc_timeout
        timeout = rpc_timeout()
        trk = Tracker(parse_address(tracker), timeout)
        try:
            remote = open_remote(art, trk, key, timeout=timeout)
        finally:
            trk.close()
        try:
            timings = time_remote_steps(remote, rounds=rounds)
            real = time_upscale(art, remote, width, height, steps=steps) if size else None
        except ServerLost as e:     # a benchmark is of one server: no retry elsewhere
            raise BackendError(f"{e}: the benchmark lost its server; run it again") from None
        finally:
            remote.close()
        server_line = f"server      {remote.where}  (key {key}; {remote.host.describe()})"
    elif backend == "all":
        names = []
        for name in ("tvm", "onnxruntime"):
            try:
                names.append(resolve_backend(art, name))
            except (BackendError, ArtifactError):
                continue
        if not names:
            names = [resolve_backend(art, "auto")]     # raises with the reason
    else:
        names = [resolve_backend(art, backend)]
    if not tracker:
        n_threads = resolve_threads(threads)
        opened = {}
        try:
            for name in names:
                opened[name] = create_backend(art, name, threads=n_threads)
            timings = time_steps(opened, tile=m.tile, rounds=rounds)
            # the backend `bidiff upscale` would pick: TVM where it runs
            real = time_upscale(art, opened[names[0]], width, height, steps=steps) if size else None
        finally:
            for b in opened.values():
                b.close()
    tiles, calls = network_calls(width, height, scale=m.model.scale, tile=m.tile, steps=steps,
                                 align=m.input_multiple)
    target = m.target.name if m.target else "onnx"
    click.echo(f"artifact    {art.source}  ({m.model.name} x{m.model.scale}, tile {m.tile}, "
               f"target {target})")
    if tracker:
        click.echo(server_line)
    else:
        origin = "" if threads is not None else \
            f" (${THREADS_ENV})" if os.environ.get(THREADS_ENV, "").strip() else " (the usable cores)"
        click.echo(f"threads     {n_threads}{origin}")
    click.echo(f"one step on one {m.tile}x{m.tile} tile, median of {rounds} round(s) of 3 calls:")
    width_name = max(len(t.backend) for t in timings)
    for t in timings:
        click.echo(f"  {t.backend:<{width_name}}  {t.median_ms:9.2f} ms  (best {t.min_ms:.2f})")
    click.echo(f"upscaling a {width}x{height} input to {width * m.model.scale}x"
               f"{height * m.model.scale} at {steps} steps: {tiles} tile(s) x {steps} = {calls} "
               f"network calls")
    for t in timings:
        click.echo(f"  {t.backend:<{width_name}}  about {format_duration(calls * t.median_ms / 1e3)}")
    if real is not None:
        click.echo(f"one real upscale, PNG to PNG ({real.backend}, {real.steps} steps, "
                   f"{real.calls} network calls): {real.wall_s:.2f} s wall")
        rows = [("network", real.network_s), ("outside the network", real.outside_s)]
        rows += [(f"  {label}", sec) for label, sec in real.parts()]
        w = max(len(label) for label, _ in rows)
        for label, sec in rows:
            click.echo(f"  {label:<{w}}  {sec:9.3f} s  {100 * sec / real.wall_s:5.1f}%")


@cli.command("device-server")
@click.option("--tracker", required=True, metavar="HOST:PORT", help="The RPC tracker to register with.")
@click.option("--key", required=True, help="The device key clients ask for (e.g. rpi4).")
@click.option("--host", default="0.0.0.0", show_default=True,
              help="Address to listen on: a trusted network only (clients run native code here).")
@click.option("--port", type=click.IntRange(1, 65535), default=9090, show_default=True,
              help="First port to try.")
@click.option("--port-end", type=click.IntRange(2, 65536), default=9199, show_default=True,
              help="Ports up to (not including) this one are tried.")
@click.option("--custom-addr", default=None, help="The address to report to the tracker, if not the "
                                                  "one the tracker sees.")
@click.option("--threads", type=THREADS.click_type(), default=None,
              help="TVM threads per session. Default: $BIDIFF_THREADS, else the usable cores.")
def device_server(tracker: str, key: str, host: str, port: int, port_end: int,
                  custom_addr: str | None, threads: int | None) -> None:
    """Serve this device to the RPC tracker: TVM's rpc_server, plus what bidiff asks of it."""
    from .rpc import parse_address, serve
    if port_end <= port:
        raise CliError(f"--port-end {port_end} must be larger than --port {port}")
    serve(parse_address(tracker), key, host=host, port=port, port_end=port_end,
          custom_addr=custom_addr, threads=threads)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors become one line on stderr and exit status 2."""
    try:
        rv = cli.main(args=argv, prog_name="bidiff", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("bidiff: aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        click.echo(f"bidiff: error: {' '.join(e.format_message().split())}", err=True)
        sys.exit(EXIT_USAGE)
    except USER_ERRORS as e:
        click.echo(f"bidiff: error: {' '.join(str(e).split())}", err=True)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        click.echo("bidiff: interrupted", err=True)
        sys.exit(130)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
