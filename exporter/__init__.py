"""bidiff.exporter: unroll per timestep group, ONNX with ``bidiff::BinaryConv2d``, artifacts.

``export_artifact`` is the entry point (``bidiff-export`` is its CLI); importing this package
does not import torch or onnx (they load when an export runs).
"""
from .export import (ExportError, ExportResult, default_artifact_key, default_checkpoint_sha256,
                     export_artifact)

__all__ = ["ExportError", "ExportResult", "default_artifact_key", "default_checkpoint_sha256",
           "export_artifact"]
