"""bidiff.exporter: unroll per timestep group, ONNX with ``bidiff::BinaryConv2d``, artifacts.

``export_artifact`` is the entry point (``bidiff-export`` is its CLI); importing this package
does not import torch or onnx (they load when an export runs).
"""
from .export import ExportError, ExportResult, export_artifact

__all__ = ["ExportError", "ExportResult", "export_artifact"]
