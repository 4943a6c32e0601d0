"""Shared fixtures. The golden reference vectors are part of the suite: tests/golden (its README
says what each file is and how it was made)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden"

# The test networks are tiny: with 2 intra-op threads, OpenMP's hand-offs cost more than the
# work, and on a busy machine a 32x32 forward went from 75 ms (1 thread) to 2.8 s (2 threads).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return GOLDEN


@pytest.fixture(scope="session")
def cross_toolchain() -> None:
    """The aarch64 cross compiler and objdump are required (scripts/test.sh installs them):
    without them the arm64 checks fail instead of vanishing from the run."""
    missing = [t for t in ("aarch64-linux-gnu-gcc", "aarch64-linux-gnu-objdump") if shutil.which(t) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found: run scripts/install_cross.sh", pytrace=False)


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
    from bidiff.exporter.onnx_binary_op import make_model
    graph = helper.make_graph(
        nodes, "test", [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s)) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s)) for n, s in outputs.items()],
        list(inits))
    return make_model(graph, custom_op=False)
