"""Shared fixtures. The golden vectors are read from ../shared/golden (never copied here)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

try:
    import torch
except ImportError:          # the device-side subset of the suite runs without torch
    torch = None
if torch is not None:
    # The test networks are tiny: with 2 intra-op threads, OpenMP's hand-offs cost more than the
    # work, and on a busy machine a 32x32 forward went from 75 ms (1 thread) to 2.8 s (2 threads).
    torch.set_num_threads(1)
GOLDEN = Path(os.environ.get("BIDIFF_GOLDEN", REPO.parent / "shared" / "golden"))


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not (GOLDEN / "units.npz").is_file():
        pytest.fail(f"golden reference data not found at {GOLDEN} (set BIDIFF_GOLDEN)")
    return GOLDEN


@pytest.fixture(scope="session")
def golden_npz(golden_dir):
    cache: dict[str, dict] = {}

    def load(name: str) -> dict:
        if name not in cache:
            with np.load(golden_dir / name) as f:
                cache[name] = {k: f[k] for k in f.files}
        return cache[name]
    return load


@pytest.fixture(scope="session")
def golden_small_model(golden_dir):
    from bidiff.models import load_checkpoint
    model, cfg = load_checkpoint(golden_dir / "small" / "net_g.pth", "golden-small")
    return model, cfg


def float_onnx(nodes, inputs: dict, outputs: dict, inits=()):
    """A standard-op ONNX model (opset 21, IR 10) from nodes, {name: shape} of the float32
    inputs and outputs, and initializers: the small graphs the float-schedule tests compile."""
    from onnx import TensorProto, helper
    graph = helper.make_graph(
        nodes, "test", [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s)) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s)) for n, s in outputs.items()],
        list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model
