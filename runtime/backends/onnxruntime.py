"""The onnxruntime backend: one InferenceSession per timestep-group graph of the artifact.

The graphs use the custom-domain op ``bidiff::BinaryConv2d``; each model carries a model-local
ONNX function for it whose body uses standard ops only, so stock onnxruntime runs them.
Sessions are created on first use of their group (a short run may touch only a few groups).
"""
from __future__ import annotations

import threading

import numpy as np

from ..artifact import Artifact
from . import resolve_threads


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, artifact: Artifact, *, threads: int | None = None) -> None:
        import onnxruntime as ort       # the backend's own dependency, loaded only when chosen
        self._ort = ort
        self.artifact = artifact
        self.tile = int(artifact.manifest.tile)
        self.input_multiple = int(artifact.manifest.input_multiple)
        self.threads = resolve_threads(threads)     # explicit: the same default as TVM
        self._sessions: dict[int, object] = {}
        self._lock = threading.Lock()

    def _options(self):
        so = self._ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = self._ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        return so

    def session(self, group: int):
        with self._lock:
            s = self._sessions.get(group)
            if s is None:
                path = self.artifact.onnx_path(group)
                s = self._ort.InferenceSession(str(path), sess_options=self._options(),
                                               providers=["CPUExecutionProvider"])
                self._sessions[group] = s
            return s

    def run(self, group: int, x_t: np.ndarray, cond: np.ndarray, t: np.ndarray) -> np.ndarray:
        (eps,) = self.session(group).run(["eps"], {"x_t": x_t, "cond": cond, "t": t})
        return eps

    def close(self) -> None:
        with self._lock:
            self._sessions.clear()
