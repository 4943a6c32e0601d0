"""bidiff.runtime: what runs on the device. numpy + pillow + a backend; never torch or onnx.

Public API (loaded lazily, so ``import bidiff.runtime`` stays light)::

    runtime.load(artifact=None, *, backend="auto", threads=None) -> Upscaler
    Upscaler.upscale(image, *, steps=None, seed=0, progress=None) -> same kind as image
    runtime.upscale(image, artifact=None, **kw)       # loads (once) and upscales
    runtime.read_artifact(path) -> Artifact           # verify an artifact
"""
from __future__ import annotations

from typing import Any

_LAZY = {
    "load": "api", "upscale": "api", "Upscaler": "api", "default_artifact": "api",
    "read_artifact": "artifact", "Artifact": "artifact", "ArtifactError": "artifact",
    "Manifest": "artifact", "ImageError": "images", "BackendError": "backends",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'bidiff.runtime' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
