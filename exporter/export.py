"""``export_artifact``: checkpoint -> per-group ONNX graphs (+ native library) -> artifact.

The artifact format is ``bidiff.runtime.artifact``'s (read its docstring); this module only
fills it:

    manifest.json
    onnx/group_<k>.onnx        one graph per timestep group (custom op + model-local function)
    onnx/weights.safetensors   the weights all five graphs share (ONNX external data)
    model.so                   native targets only: ``bidiff.exporter.tvm.build.build_library``

The weights file sits next to the graphs because ONNX external data must live inside the
model's directory (onnx and onnxruntime refuse ``..`` paths).

``export_artifact`` runs four stages, each returning what the next needs: ``unroll_stage``
(checkpoint -> ``Unrolled``: the network in deploy mode and its checkpoint's facts),
``graphs_stage`` (-> the group graphs and the portable manifest), ``compile_stage`` (native
targets: -> the manifest naming the library) and ``write_stage`` (-> the published artifact);
``float_stage`` measures the plain float ONNX for the summary.

Everything is built in a staging directory next to ``out`` and published atomically: on any
error nothing is left at ``out`` (an existing artifact is only replaced with ``force=True``, and
only once the new one is complete). All user errors are ``ValueError`` subclasses with one-line
messages (``ExportError``, ``ArtifactError``, and ``load_checkpoint``'s ValueError naming the
keys that do not fit), which the CLI prints with exit code 2.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from bidiff.runtime.artifact import (ArtifactWriter, GroupInfo, Manifest, ModelInfo, SHIPPED_MODEL,
                                     required_format_version,
                                     TargetInfo, host_info, sha256_file)
from bidiff.runtime.binary_op import OP_VERSION
from bidiff.runtime.bounds import STEPS

from .targets import TargetSpec, get_target, required_features
from .unroll import group_table, is_biconv

__all__ = ["ExportError", "ExportResult", "export_artifact", "export_float_onnx", "check_tile",
           "default_artifact_key", "default_checkpoint_sha256",
           "DEFAULT_TILE", "ONNX_DIR"]

DEFAULT_TILE = 128
DEFAULT_STEPS = 50       # the official sampler's; a checkpoint may recommend another
ONNX_DIR = "onnx"
LIBRARY_FILE = "model.so"
_MIN_TILE_MULTIPLE = 8


class ExportError(ValueError):
    """Bad input to the exporter; the message is one line and says what to do."""


@dataclass
class ExportResult:
    """What ``export_artifact`` wrote, with the sizes the CLI summary prints."""
    path: Path
    manifest: Manifest
    file_sizes: dict[str, int]            # artifact-relative path -> bytes (manifest included)
    packed_binary_bytes: int              # bit-packed binary weights in the artifact
    binary_float32_bytes: int             # the same weights as float32
    float_onnx_bytes: int | None = None   # plain float ONNX export of the same network (all groups)
    float_onnx_path: Path | None = None   # where it was kept (None: measured, then deleted)

    @property
    def artifact_bytes(self) -> int:
        return sum(self.file_sizes.values())

    @property
    def binary_ratio(self) -> float:
        return self.binary_float32_bytes / max(1, self.packed_binary_bytes)

    @property
    def float_ratio(self) -> float | None:
        return None if self.float_onnx_bytes is None else self.float_onnx_bytes / max(1, self.artifact_bytes)


def check_tile(tile: object, *, multiple: int = _MIN_TILE_MULTIPLE) -> int:
    if isinstance(tile, bool) or not isinstance(tile, int) or tile <= 0 or tile % multiple:
        raise ExportError(f"tile {tile!r} must be a positive multiple of {multiple} (e.g. 64, 128, 256)")
    return tile


def default_checkpoint_sha256() -> str | None:
    """sha256 of the shipped checkpoint (what ``export_artifact(None)`` exports), None when it is
    not installed. Found without importing torch: the runtime asks this to tell whether its
    cached default artifact still holds the shipped model."""
    spec = importlib.util.find_spec("bidiff.models")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "weights" / f"{SHIPPED_MODEL}.safetensors"
        if path.is_file():
            return sha256_file(path)
    return None


_KEY_PACKAGES = ("bidiff.models", "bidiff.exporter")   # the code an export runs
_KEY_DISTRIBUTIONS = ("bidiff", "torch", "onnx", "apache-tvm", "apache-tvm-ffi")


def default_artifact_key() -> str | None:
    """sha256 of everything the default artifact is a function of: the shipped checkpoint, the
    sources of ``bidiff.models`` and ``bidiff.exporter`` and the versions of bidiff, torch, onnx
    and TVM. The runtime names its cached default artifact by it, so a new shipped model *or*
    an upgraded exporter (faster kernels, a fixed graph) builds a fresh one instead of serving
    the stale cache. None when the shipped checkpoint is not installed. No torch import."""
    import hashlib
    import importlib.metadata as md
    ckpt = default_checkpoint_sha256()
    if ckpt is None:
        return None
    h = hashlib.sha256(f"checkpoint {ckpt}\n".encode())
    for pkg in _KEY_PACKAGES:
        spec = importlib.util.find_spec(pkg)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            for src in sorted(Path(folder).rglob("*.py")):
                h.update(f"{pkg} {src.relative_to(folder).as_posix()} {sha256_file(src)}\n".encode())
    for dist in _KEY_DISTRIBUTIONS:
        try:
            version = md.version(dist)
        except md.PackageNotFoundError:
            version = None
        h.update(f"{dist} {version}\n".encode())
    return h.hexdigest()


def _load(checkpoint, config):
    from bidiff.models import SHIPPED_CHECKPOINT, get_config, load_checkpoint
    if config is not None and isinstance(config, str):
        get_config(config)                      # unknown name -> ValueError listing valid ones
    if checkpoint is None:
        if not Path(SHIPPED_CHECKPOINT).is_file():
            raise ExportError(f"the shipped model ({Path(SHIPPED_CHECKPOINT).name}) is not installed: "
                              "pass a checkpoint path")
        checkpoint = SHIPPED_CHECKPOINT
    path = Path(checkpoint)
    if not path.is_file():
        raise ExportError(f"checkpoint {path} does not exist")
    try:
        model, cfg = load_checkpoint(path, config)
    except ValueError:
        raise
    except Exception as e:  # a damaged file: torch/safetensors raise assorted types
        msg = " ".join(str(e).split())[:200]
        raise ExportError(f"cannot read checkpoint {path} ({type(e).__name__}: {msg})") from None
    if not cfg.network.get("binary", True):
        raise ExportError(f"{path} holds {cfg.name!r}, a full-precision training twin (a distillation "
                          "teacher): export a binary model, e.g. one trained with --teacher from it")
    return model, cfg, path


def _check_steps(steps: object, what: str) -> int:
    try:
        return STEPS.check(steps, what)
    except ValueError as e:
        raise ExportError(str(e)) from None


def _metadata_int(ckpt_path: Path, key: str, default: int, check: Callable[[object], int]) -> int:
    """An integer setting from a bidiff checkpoint's metadata, checked, else ``default``; a bad
    value is an ExportError naming the file and the key."""
    if ckpt_path.suffix != ".safetensors":
        return default
    from bidiff.models.checkpoint import read_metadata
    value = read_metadata(ckpt_path).get(key)
    if value is None:
        return default
    try:
        return check(int(value) if value.isdigit() else value)
    except ExportError as e:
        raise ExportError(f"{ckpt_path.name}: metadata {e}") from None


def _recommended_steps(ckpt_path: Path) -> int:
    """The checkpoint's ``default_steps`` metadata, else 50."""
    return _metadata_int(ckpt_path, "default_steps", DEFAULT_STEPS,
                         lambda v: _check_steps(v, "default_steps"))


def _recommended_tile(ckpt_path: Path) -> int:
    """The checkpoint's ``tile`` metadata (the HR patch it was trained at: its GroupNorms saw
    statistics of that size, and tiles of it score best, docs/EXPERIMENTS.md), else DEFAULT_TILE."""
    return _metadata_int(ckpt_path, "tile", DEFAULT_TILE, check_tile)


def _tuned_sampler(ckpt_path: Path) -> dict:
    """The checkpoint's sampler settings (``models.checkpoint.SAMPLER_METADATA`` of bidiff
    safetensors; the paper's sampler otherwise), which the manifest carries to the device."""
    from bidiff.models.checkpoint import checkpoint_sampler, read_metadata
    meta = read_metadata(ckpt_path) if ckpt_path.suffix == ".safetensors" else {}
    try:
        return checkpoint_sampler(meta, ckpt_path.name)
    except ValueError as e:
        raise ExportError(str(e)) from None


def _graph_metadata(cfg, ckpt_sha: str, sampler: dict) -> dict[str, str]:
    from bidiff.runtime.artifact import _bidiff_version
    version = required_format_version(cfg.formulation.to_dict(), sampler["timestep_spacing"])
    return {"config": cfg.to_json(), "config_name": cfg.name, "scale": str(cfg.scale),
            "formulation": json.dumps(cfg.formulation.to_dict(), sort_keys=True),
            "bidiff_version": _bidiff_version(), "format_version": str(version),
            "checkpoint_sha256": ckpt_sha}


def _versions() -> dict[str, str | None]:
    import onnx
    import torch
    try:
        import onnxruntime
        ort_v = onnxruntime.__version__
    except ImportError:      # pragma: no cover - onnxruntime is in the [export] extra
        ort_v = None
    from .onnx_binary_op import ONNX_OPSET
    return {"torch": torch.__version__.split("+")[0], "onnx": onnx.__version__,
            "onnxruntime": ort_v, "onnx_opset": str(ONNX_OPSET), "bidiff_op": str(OP_VERSION)}


def _tvm_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for dist, key in (("apache-tvm", "tvm"), ("apache-tvm-ffi", "tvm_ffi")):
        try:
            from importlib.metadata import version
            out[key] = version(dist)
        except Exception:
            out[key] = None
    return out


def _tvm_backend(spec: TargetSpec):
    """``bidiff.exporter.tvm.build``, or a one-line ExportError when TVM is not installed."""
    try:
        return importlib.import_module("bidiff.exporter.tvm.build")
    except ImportError:
        raise ExportError(f"target {spec.name} needs the TVM compiler, which is not installed: "
                          "pip install 'bidiff[export]' (apache-tvm 0.27.0.post1), or use --target onnx"
                          ) from None


def _target_info(spec: TargetSpec, lib) -> TargetInfo:
    return TargetInfo(name=spec.name, arch=spec.arch, triple=lib.triple, cpu=lib.mcpu,
                      features=required_features(spec, host_info().features))


def export_float_onnx(model, out_dir: str | os.PathLike, *, tile: int, metadata: dict[str, str] | None = None,
                      progress: Callable[[str], None] | None = None) -> dict[int, Path]:
    """The plain float ONNX of ``model`` (standard Conv with alpha*sign(W), no custom op)."""
    from .onnx_export import write_onnx_graphs
    return write_onnx_graphs(model, out_dir, tile=tile, binary=False, metadata=metadata, progress=progress)


# --------------------------------------------------------------------------- stages
# export_artifact runs them in order: unroll -> graphs -> compile -> write. Each returns what
# the next needs, so each can be read (and tested) on its own.

@dataclass
class Unrolled:
    """The network in deploy mode, ready to be unrolled per group (each graph folds one group's
    experts, ``unroll.fold_biconv``), with what the manifest says about its checkpoint."""
    model: Any
    config: Any                       # bidiff.models.ModelConfig
    checkpoint_sha256: str
    default_steps: int
    tile: int                         # the HR tile the graphs are fixed to
    sampler: dict[str, Any]           # the checkpoint's tuned sampler (manifest fields)
    metadata: dict[str, str]          # every graph's metadata_props


def unroll_stage(checkpoint: str | os.PathLike | None, config: str | None, *, tile: int | None,
                 steps: int | None) -> Unrolled:
    """Load the checkpoint, switch it to deploy mode and check that the tile (None: the
    checkpoint's) fits it."""
    model, cfg, ckpt_path = _load(checkpoint, config)
    tile = _recommended_tile(ckpt_path) if tile is None else tile
    from bidiff.models import set_deploy
    set_deploy(model, True)
    check_tile(tile, multiple=max(_MIN_TILE_MULTIPLE, model.input_multiple))
    if tile % cfg.scale:
        raise ExportError(f"tile {tile} is not a multiple of the model's scale {cfg.scale}")
    ckpt_sha = sha256_file(ckpt_path)
    sampler = _tuned_sampler(ckpt_path)
    return Unrolled(model=model, config=cfg, checkpoint_sha256=ckpt_sha,
                    default_steps=steps if steps is not None else _recommended_steps(ckpt_path),
                    tile=tile, sampler=sampler, metadata=_graph_metadata(cfg, ckpt_sha, sampler))


def graphs_stage(u: Unrolled, staging: Path, *,
                 progress: Callable[[str], None]) -> tuple[dict[int, Path], Manifest]:
    """One binary ONNX graph per group under ``staging/onnx`` and the portable manifest."""
    from .onnx_export import write_onnx_graphs
    paths = write_onnx_graphs(u.model, staging / ONNX_DIR, tile=u.tile, binary=True,
                              metadata=u.metadata, progress=progress)
    cfg = u.config
    manifest = Manifest(
        model=ModelInfo(name=cfg.name, network=dict(cfg.network), scale=int(cfg.scale),
                        formulation=cfg.formulation.to_dict(), checkpoint_sha256=u.checkpoint_sha256),
        groups=[GroupInfo(index=k, t_min=lo, t_max=hi, onnx=f"{ONNX_DIR}/{paths[k].name}")
                for k, lo, hi in group_table(u.model)],
        tile=int(u.tile), input_multiple=int(u.model.input_multiple), default_steps=u.default_steps,
        **u.sampler, versions=_versions())
    return paths, manifest


def compile_stage(tvm_build, spec: TargetSpec, paths: dict[int, Path], staging: Path,
                  manifest: Manifest) -> Manifest:
    """The native library of ``spec`` (``tvm.build.build_library``) in ``staging``; returns the
    manifest that names it, its functions and the CPU features it needs."""
    try:
        lib = tvm_build.build_library(paths, spec, staging / LIBRARY_FILE)
    except tvm_build.BuildError as e:
        raise ExportError(f"cannot build target {spec.name}: {' '.join(str(e).split())}") from None
    return dataclasses.replace(
        manifest, library=LIBRARY_FILE, target=_target_info(spec, lib),
        groups=[dataclasses.replace(g, function=lib.functions[g.index]) for g in manifest.groups],
        backends=["tvm", "onnxruntime"], versions={**manifest.versions, **_tvm_versions()})


def float_stage(u: Unrolled, scratch: Path, *,
                keep: str | os.PathLike | None) -> tuple[int, Path | None]:
    """Bytes of the plain float ONNX of the same network (built in a temp dir under ``scratch``)
    and where it was kept (``keep``; None: deleted)."""
    tmp = Path(tempfile.mkdtemp(prefix=".float-onnx-", dir=scratch))
    try:
        export_float_onnx(u.model, tmp, tile=u.tile, metadata=u.metadata)
        size = sum(p.stat().st_size for p in tmp.iterdir())
        if keep is None:
            return size, None
        kept = Path(keep)
        if kept.exists():
            shutil.rmtree(kept) if kept.is_dir() else kept.unlink()
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(tmp), str(kept))
        return size, kept
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_stage(writer: ArtifactWriter, manifest: Manifest) -> tuple[Path, dict[str, int]]:
    """Checksum, write the manifest and publish; returns the artifact and its file sizes."""
    # mkdtemp makes the staging dir 0700; the published artifact is meant to be shared
    umask = os.umask(0)
    os.umask(umask)
    writer.staging.chmod(0o777 & ~umask)
    published = writer.finish(manifest)
    sizes = ({p.relative_to(published).as_posix(): p.stat().st_size
              for p in sorted(published.rglob("*")) if p.is_file()}
             if published.is_dir() else {published.name: published.stat().st_size})
    return published, sizes


def export_artifact(checkpoint: str | os.PathLike | None = None, *, config: str | None = None,
                    target: str = "onnx", out: str | os.PathLike, tile: int | None = None,
                    force: bool = False, progress: bool = True,
                    float_onnx: str | os.PathLike | None = None,
                    measure_float: bool = True, steps: int | None = None) -> ExportResult:
    """Export a checkpoint to an artifact at ``out`` (a directory, or a ``.bidiff`` zip).

    - ``checkpoint``: a bidiff safetensors checkpoint (carries its config) or an official
      ``.pth`` (then ``config`` names it); default None = the shipped model.
    - ``config``: a registered config name (``bidiff.models.list_configs()``); default: the
      checkpoint's own.
    - ``target``: ``onnx`` (portable graphs only, the default) or a native target name from
      ``bidiff.exporter.targets`` (needs ``bidiff.exporter.tvm.build``).
    - ``tile``: the HR tile S the graphs are fixed to (a multiple of 8; the runtime tiles larger
      images with overlap); default None = the checkpoint's ``tile`` metadata (the patch it was
      trained at), else 128.
    - ``force``: replace an existing ``out`` (atomically, once the new artifact is complete).
    - ``progress``: show a tqdm bar on stderr.
    - ``float_onnx``: also keep the plain float ONNX export (same graphs, standard Conv with
      alpha*sign(W)) in this directory; default None: it is built in a temp dir only to measure
      its size for the summary (``measure_float=False`` skips even that).
    - ``steps``: the DDIM steps the runtime uses when a caller gives none; default None = the
      checkpoint's ``default_steps`` metadata (a trainer's measured recommendation), else 50.
    """
    spec = get_target(target) if isinstance(target, str) else None
    if spec is None:
        raise ExportError(f"target must be a name, got {target!r}")
    if tile is not None:
        check_tile(tile)
    if steps is not None:
        _check_steps(steps, "steps")
    if isinstance(config, str):
        from bidiff.models import get_config
        get_config(config)                      # unknown name -> ValueError listing valid ones
    if float_onnx is not None and Path(float_onnx).exists() and not force:
        raise ExportError(f"{float_onnx} already exists: pass --force to replace it")
    tvm_build = _tvm_backend(spec) if spec.native else None
    with_float = measure_float or float_onnx is not None

    from tqdm import tqdm
    bar = None        # created once the input is validated, so an error stays a single line
    try:
        writer = ArtifactWriter(out, force=force)            # refuses an existing out early
        try:
            writer.__enter__()                                # the staging dir next to out
        except OSError as e:
            raise ExportError(f"cannot write the artifact to {out}: {e.strerror or e}") from None
        with writer:
            u = unroll_stage(checkpoint, config, tile=tile, steps=steps)
            bar = tqdm(total=1 + u.model.dynamic_group + with_float + (tvm_build is not None),
                       desc="bidiff-export", unit="step", disable=not progress, leave=False)

            def step(msg: str) -> None:
                bar.set_postfix_str(msg)
                bar.update(1)

            paths, manifest = graphs_stage(u, writer.staging, progress=step)
            if tvm_build is not None:
                bar.set_postfix_str(f"compiling for {spec.name}")
                manifest = compile_stage(tvm_build, spec, paths, writer.staging, manifest)
                bar.update(1)
            float_bytes, float_path = None, None
            if with_float:
                bar.set_postfix_str("float ONNX for comparison")
                float_bytes, float_path = float_stage(u, writer.staging.parent, keep=float_onnx)
                bar.update(1)
            bar.set_postfix_str("writing artifact")
            packed = _packed_weight_bytes(writer.staging / ONNX_DIR)
            as_float = 4 * sum(m.binary_conv.weight.numel() for m in u.model.modules() if is_biconv(m))
            published, sizes = write_stage(writer, manifest)
            bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return ExportResult(path=published, manifest=manifest, file_sizes=sizes,
                        packed_binary_bytes=packed, binary_float32_bytes=as_float,
                        float_onnx_bytes=float_bytes, float_onnx_path=float_path)


def _packed_weight_bytes(onnx_dir: Path) -> int:
    """Bytes of the bit-packed binary weights in the shared weights file (read off its header)."""
    from .onnx_export import WEIGHTS_FILE, read_safetensors_index
    header, _ = read_safetensors_index(onnx_dir / WEIGHTS_FILE)
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()
               if k.endswith(".binary_conv.packed"))
