"""The graph-builder interface a module's ``emit_onnx`` writes against.

Each block defines its exported structure (which child runs on which tensor, skips, concat /
split / pixel shuffle, attention wiring) in ``emit_onnx`` next to its ``forward``, so adding a
block type is a change in one place. The builder itself (``bidiff.exporter.onnx_export``) is
passed in and owns the primitive leaves (Conv2d, GroupNorm, Linear, BIConv's binary or float
lowering, Sequential, Identity/Dropout), naming, constants and initializers; this package
never imports onnx or the exporter. Tensors are graph tensor names (str).
"""
from __future__ import annotations

from typing import Any, Protocol

import numpy as np
from torch import nn


class GraphBuilder(Protocol):
    def op(self, op_type: str, inputs: list[str], base: str, n_out: int = 1,
           **attrs: Any) -> Any:
        """Append one ONNX node named after ``base``; its output name (a list if n_out > 1)."""

    def const(self, base: str, value: np.ndarray) -> str:
        """An inline constant (shapes, indices, tables); its tensor name."""

    def param(self, name: str, value: np.ndarray) -> str:
        """A weight, stored in the shared weights file under ``name``; its tensor name."""

    def cast(self, x: str, dtype: type, base: str) -> str:
        """``x`` cast to a numpy dtype."""

    def module(self, m: nn.Module, x: str, path: str, *args: Any) -> Any:
        """Emit child ``m`` (state_dict path ``path``) on ``x``: a primitive leaf, or
        ``m.emit_onnx(builder, x, path, *args)``; NotImplementedError for anything else."""
