"""The public runtime API: ``load(...) -> Upscaler``, ``Upscaler.upscale(...)``, ``upscale(...)``.

    from bidiff import runtime
    up = runtime.load("model.bidiff")                 # verify, pick a backend, open it
    out = up.upscale(Image.open("photo.png"), steps=50, seed=0)
    out = runtime.upscale("photo.png")                # default artifact, loaded once and cached

An artifact's native library is native code that runs in this process: load only artifacts
you trust. Checksums catch corruption and edits after export, not a malicious exporter.
"""
from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np

from . import images
from .artifact import Artifact, ArtifactError, default_cache_dir, host_info, read_artifact
from .backends import BACKENDS, Backend, BackendError, create_backend
from .bounds import STEPS
from .formulation import Formulation
from .ensemble import check_ensemble, sample_ensemble
from .sampler import Progress

MAX_STEPS = STEPS.hi
check_steps = STEPS.check


class Upscaler:
    """A loaded artifact with an open backend. Thread-safe: concurrent ``upscale`` calls on one
    Upscaler run one after another (a lock), since a backend's sessions/VM are shared state;
    use one Upscaler per thread to run in parallel."""

    def __init__(self, artifact: Artifact, backend: Backend) -> None:
        self.artifact = artifact
        self.manifest = artifact.manifest
        self.backend = backend
        self.scale = int(self.manifest.model.scale)
        self.formulation = Formulation.from_dict(self.manifest.model.formulation)
        self._lock = threading.Lock()

    @property
    def backend_name(self) -> str:
        return self.backend.name

    def __repr__(self) -> str:
        return (f"Upscaler({self.manifest.model.name} x{self.scale}, backend={self.backend_name}, "
                f"artifact={str(self.artifact.source)!r})")

    def upscale(self, image: Any, *, steps: int | None = None, seed: int = 0,
                progress: Progress | None = None, overlap: int | None = None,
                time_shift: int | None = None, back_projection: int | None = None,
                ensemble: int = 1) -> Any:
        """Super-resolve ``image`` by the artifact's scale.

        image: a PIL image, a path, or an H x W (x 3 | x 4) uint8 / uint16 / float numpy array.
        The result has the same kind (PIL in -> PIL out, path in -> PIL out, uint8 in -> uint8
        out); alpha is upscaled with plain bicubic and reattached (``images`` module docstring).
        steps: DDIM steps, 1..1000; None = the artifact's ``default_steps`` (50 for the shipped
        model). seed: seeds x_T; the same seed, image and backend give identical bytes.
        progress: ``progress(done, total)`` after every network evaluation (tiles x steps).
        overlap: HR pixels shared by neighbouring tiles, at least (default: an eighth of the tile).
        time_shift: the network is asked for eps at max(0, t - time_shift) (``DDIMScheduler``);
        None = the artifact's for this step count (``Manifest.time_shift_for``).
        back_projection: rounds of LR-consistency correction of the result
        (``consistency.back_project``); None = the artifact's, 0 = none.
        ensemble: average over 1, 2, 4 or 8 flips / rotations of the input (``ensemble``), at
        that many times the network calls.
        """
        steps = check_steps(self.manifest.default_steps if steps is None else steps)
        ensemble = check_ensemble(ensemble)
        inp = images.load_input(image)
        with self._lock:
            rgb = sample_ensemble(self.backend, inp.rgb, scale=self.scale, ensemble=ensemble,
                         formulation=self.formulation, steps=steps, seed=int(seed), overlap=overlap,
                         time_shift=(self.manifest.time_shift_for(steps) if time_shift is None
                                     else time_shift),
                         back_projection=(self.manifest.back_projection if back_projection is None
                                          else back_projection),
                         timestep_spacing=self.manifest.timestep_spacing,
                         group_of=lambda t: self.manifest.group_for(t).index, progress=progress)
        alpha = images.upscale_alpha(inp.alpha, self.scale) if inp.alpha is not None else None
        return images.to_output(rgb, alpha, inp)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> "Upscaler":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load(artifact: str | os.PathLike | Artifact | None = None, *, backend: str = "auto",
         threads: int | None = None) -> Upscaler:
    """Open an artifact (a folder or ``.bidiff`` file; None = the default one for this host).

    Verifies the format version and every checksum, and the target against this host before
    any native code is loaded. backend: "auto" (TVM when the artifact has a library for this
    host and the TVM runtime is installed, else onnxruntime), "tvm" or "onnxruntime".
    threads: backend thread count (default ``$BIDIFF_THREADS``, else the usable cores: the
    CPUs this process's affinity allows); for TVM it is fixed when the runtime library first
    loads in the process.
    """
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if isinstance(artifact, Artifact):
        art = artifact
    else:
        art = read_artifact(default_artifact() if artifact is None else artifact)
    return Upscaler(art, create_backend(art, backend, threads=threads))


_cache: dict[tuple, Upscaler] = {}
_cache_lock = threading.Lock()


def upscale(image: Any, artifact: str | os.PathLike | None = None, *, backend: str = "auto",
            threads: int | None = None, **kw: Any) -> Any:
    """``load(artifact, backend=..., threads=...).upscale(image, **kw)``, loading once per process."""
    key = (str(Path(artifact).expanduser().resolve()) if artifact is not None else None, backend, threads)
    with _cache_lock:
        up = _cache.get(key)
        if up is None:
            up = _cache[key] = load(artifact, backend=backend, threads=threads)
    return up.upscale(image, **kw)


# --------------------------------------------------------------------------- default artifact

def _default_target() -> str:
    """The export target the default artifact is built for on this host."""
    import importlib.util
    if importlib.util.find_spec("tvm") is None:
        return "onnx"
    return {"x86_64": "x86_64", "aarch64": "arm64"}.get(host_info().arch, "onnx")


def default_artifact_candidates(cache: Path | None = None, *, key: str | None = None) -> list[Path]:
    """Where the default artifact may already be, best first.

    With ``key`` (``exporter.default_artifact_key()``, known when the exporter is installed)
    the names carry its first 12 hex digits, so an artifact cached from an older shipped model
    (other weights or sampler settings) or built by an older exporter is never picked up again;
    without it (a device with the runtime only) the plain names, where a user copies an
    artifact.
    """
    cache = cache or default_cache_dir()
    arch = host_info().arch
    names = [f"default-{arch}", f"default-{'arm64' if arch == 'aarch64' else arch}", "default-onnx"]
    if key:
        names = [f"{n}-{key[:12]}" for n in names]
    out = []
    for n in dict.fromkeys(names):
        out += [cache / n, cache / f"{n}.bidiff"]
    return out


def default_artifact(*, build: bool = True) -> Path:
    """The default artifact for this host from the cache (``$BIDIFF_CACHE`` or ~/.cache/bidiff),
    built with the exporter on first use when ``bidiff[export]`` is installed."""
    cache = default_cache_dir()
    key = _default_artifact_key()
    for p in default_artifact_candidates(cache, key=key):
        if (p / "manifest.json").is_file() or p.is_file():
            return p
    if build:
        built = _build_default_artifact(cache, key)
        if built is not None:
            return built
    raise ArtifactError(f"no bidiff artifact in {cache} for this machine: pass one (--artifact PATH), "
                        f"copy one to {cache}/default-onnx, or pip install 'bidiff[export]' and run "
                        f"bidiff-export --target onnx -o {cache}/default-onnx")


def _default_artifact_key() -> str | None:
    """The exporter's ``default_artifact_key()``; None where it is not installed (the same
    guarded, lazy import as ``_build_default_artifact``)."""
    try:
        from bidiff.exporter import default_artifact_key   # noqa: PLC0415 (optional)
    except ImportError:
        return None
    return default_artifact_key()


def _build_default_artifact(cache: Path, key: str | None) -> Path | None:
    """Export the shipped model for this host into the cache; None if the exporter is absent.

    The ONLY place the runtime touches ``bidiff.exporter``: a guarded, lazy import, because on a
    device the exporter (and torch) is normally not installed, and must never be required.
    """
    try:
        from bidiff.exporter import export_artifact          # noqa: PLC0415 (optional, see above)
    except ImportError:
        return None
    target = _default_target()
    print(f"bidiff: first use: exporting the default model for this machine into {cache} "
          f"(target {target}); this takes a while, once", file=sys.stderr, flush=True)
    for tgt in dict.fromkeys([target, "onnx"]):       # native first; portable if compiling fails
        name = f"default-{'onnx' if tgt == 'onnx' else host_info().arch}"
        out = cache / (f"{name}-{key[:12]}" if key else name)
        try:
            export_artifact(None, target=tgt, out=out, force=False)
            return out
        except ValueError as e:                     # the exporter's one-line user errors
            raise ArtifactError(f"cannot build the default artifact ({' '.join(str(e).split())}): "
                                f"pass --artifact PATH or copy an artifact to {cache}/default-onnx") from None
        except RuntimeError as e:                   # a failed native build: the ONNX graphs still work
            if tgt == "onnx":
                raise
            print(f"bidiff: native build failed ({' '.join(str(e).split())[:200]}); "
                  "exporting the portable ONNX graphs instead", file=sys.stderr, flush=True)
    return None


__all__ = ["load", "upscale", "Upscaler", "default_artifact", "check_steps", "MAX_STEPS"]
