"""Backends: what runs one timestep group's network on one tile.

Every backend has the same small interface (``Backend``): ``run(group, x_t, cond, t) -> eps``
with x_t, cond float32 [1, 3, S, S], t int64 [1, 1] and eps float32 [1, 3, S, S], S = ``tile``;
``input_multiple`` is the manifest's (the sampler aligns tiles to it, ``tiling``).

- ``onnxruntime``: the artifact's portable ONNX graphs (``backends/onnxruntime.py``).
- ``tvm``: the artifact's TVM-compiled library through apache-tvm-ffi + libtvm_runtime, without
  ``import tvm`` (``backends/tvm.py``).
- ``auto``: ``tvm`` when the artifact has a native library whose target fits this host and the
  TVM runtime is installed, else ``onnxruntime``. An artifact built for another architecture or
  for CPU features this host lacks is refused (its native library is what it is for); choose
  ``onnxruntime`` explicitly to run its portable graphs anyway.

Backends are imported lazily: importing this package loads neither onnxruntime nor tvm_ffi.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Literal, Protocol

import numpy as np

from ..artifact import Artifact, ArtifactError, check_target

BACKENDS: tuple[str, ...] = ("auto", "tvm", "onnxruntime")
THREADS_ENV = "BIDIFF_THREADS"


class BackendError(ValueError):
    """A backend that cannot be used here; the message is one line and says what to do."""


class Backend(Protocol):
    name: str
    tile: int
    input_multiple: int     # the network's downsampling factor: tiles start on its grid

    def run(self, group: int, x_t: np.ndarray, cond: np.ndarray, t: np.ndarray) -> np.ndarray:
        """x_t, cond float32 [1, 3, S, S], t int64 [1, 1] -> eps float32 [1, 3, S, S]."""

    def close(self) -> None:
        """Release sessions / modules."""


def usable_cores() -> int:
    """CPUs this process may run on: its affinity mask (taskset, cgroup cpusets), else all."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):          # no sched_getaffinity (macOS, Windows)
        return max(1, os.cpu_count() or 1)


def resolve_threads(threads: int | None) -> int:
    """``threads``, else ``$BIDIFF_THREADS``, else :func:`usable_cores`.

    Always an explicit count: the backends' own defaults differ (TVM takes half the hardware
    threads on x86, assuming SMT, so a 2-core VM without it ran on one core)."""
    if threads is None:
        env = os.environ.get(THREADS_ENV, "").strip()
        if not env:
            return usable_cores()
        try:
            threads = int(env)
        except ValueError:
            raise BackendError(f"{THREADS_ENV}={env!r} is not an integer") from None
    if int(threads) < 1:
        raise BackendError(f"threads must be >= 1, got {threads}")
    return int(threads)


def onnxruntime_available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def tvm_runtime_available() -> bool:
    """apache-tvm-ffi is installed and a libtvm_runtime can be found (nothing is loaded)."""
    from .tvm import find_libtvm_runtime
    return importlib.util.find_spec("tvm_ffi") is not None and find_libtvm_runtime() is not None


def resolve_backend(artifact: Artifact, name: str = "auto") -> str:
    """The concrete backend for ``name`` (raises BackendError / ArtifactError with the reason)."""
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; valid: {', '.join(BACKENDS)}")
    m = artifact.manifest
    if name == "auto":
        if m.library:
            check_target(m)        # a native artifact for another host is a mistake: say so
            if tvm_runtime_available():
                return "tvm"
        if any(g.onnx for g in m.groups) and onnxruntime_available():
            return "onnxruntime"
        if m.library:
            raise BackendError("neither the TVM runtime nor onnxruntime is installed: "
                               "pip install 'bidiff[tvm]' (or 'bidiff[onnxruntime]')")
        raise BackendError("this artifact has only ONNX graphs and onnxruntime is not installed: "
                           "pip install 'bidiff[onnxruntime]'")
    if name == "tvm":
        if not m.library:
            raise BackendError(f"artifact {artifact.source} has no native library (exported for "
                               "target onnx): use --backend onnxruntime or export for this host")
        check_target(m)
        if not tvm_runtime_available():
            raise BackendError("the TVM runtime is not installed: pip install 'bidiff[tvm]' "
                               "(or set BIDIFF_TVM_RUNTIME to libtvm_runtime.so)")
        return "tvm"
    if not any(g.onnx for g in m.groups):
        raise BackendError(f"artifact {artifact.source} has no ONNX graphs: use --backend tvm")
    if not onnxruntime_available():
        raise BackendError("onnxruntime is not installed: pip install 'bidiff[onnxruntime]'")
    return "onnxruntime"


def create_backend(artifact: Artifact, name: str = "auto", *, threads: int | None = None) -> Backend:
    """Open ``artifact`` with the backend ``name`` ("auto", "tvm" or "onnxruntime")."""
    concrete = resolve_backend(artifact, name)
    threads = resolve_threads(threads)
    if concrete == "tvm":
        from .tvm import TVMBackend
        return TVMBackend(artifact, threads=threads)
    from .onnxruntime import OnnxRuntimeBackend
    return OnnxRuntimeBackend(artifact, threads=threads)


__all__ = ["Backend", "BackendError", "BACKENDS", "THREADS_ENV", "create_backend",
           "resolve_backend", "resolve_threads", "usable_cores", "tvm_runtime_available",
           "onnxruntime_available", "ArtifactError"]
