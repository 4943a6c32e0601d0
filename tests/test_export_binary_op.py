"""bidiff::BinaryConv2d's ONNX function body (run by stock onnxruntime) vs the numpy reference.

Shapes sweep the uint32 word boundary (3, 16, 32, 33, 48, 64, 96 channels), 1x1 and 3x3
kernels, odd spatial sizes, stride 2, thresholds hit exactly (x == threshold must give +1) and
exact-zero weights (pack as +1).
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from bidiff.exporter.onnx_binary_op import (OP_ATTRIBUTES, OP_DOMAIN, OP_NAME,
                                            binary_conv_function, make_single_op_model)
from bidiff.runtime.binary_op import binary_conv2d_reference, pack_weights, weight_scale


def _session(model: onnx.ModelProto, optimize: bool) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _case(channels: int, kernel: int, seed: int):
    rng = np.random.default_rng(seed)
    f = channels + 3
    w = rng.standard_normal((f, channels, kernel, kernel)).astype(np.float32)
    w.flat[rng.integers(0, w.size, 5)] = 0.0                       # exact zeros pack as +1
    thr = (0.2 * rng.standard_normal(channels)).astype(np.float32)
    x = rng.standard_normal((1, channels, 7, 11)).astype(np.float32)
    x[0, :, 0, 0] = thr                                            # x == threshold -> +1
    x[0, :, 1, 1] = 0.0
    return x, w, thr


@pytest.mark.parametrize("channels", [3, 16, 32, 33, 48, 64, 96])
@pytest.mark.parametrize("kernel", [1, 3])
def test_function_body_equals_reference(channels: int, kernel: int) -> None:
    x, w, thr = _case(channels, kernel, seed=channels * 10 + kernel)
    packed, scale = pack_weights(w), weight_scale(w)
    model = make_single_op_model(packed, scale, thr, channels=channels, kernel=kernel)
    ref = binary_conv2d_reference(x, packed, scale, channels=channels, kernel=kernel, threshold=thr)
    # The body is exact: +-1 sums are integers in float32 and the scale is one rounding, as in
    # the float64 reference -> bit-identical, also with onnxruntime's graph optimisations on
    # (they must not fold the scale into the weights: see the module docstring).
    for optimize in (False, True):
        got = _session(model, optimize=optimize).run(None, {"X": x})[0]
        np.testing.assert_array_equal(got, ref, err_msg=f"optimize={optimize}")


def test_stride_and_batch() -> None:
    x, w, thr = _case(40, 3, seed=7)
    x = np.concatenate([x, -x], axis=0)
    packed, scale = pack_weights(w), weight_scale(w)
    model = make_single_op_model(packed, scale, thr, channels=40, kernel=3, stride=2)
    ref = binary_conv2d_reference(x, packed, scale, channels=40, kernel=3, threshold=thr, stride=2)
    got = _session(model, optimize=False).run(None, {"X": x})[0]
    assert got.shape == (2, 43, 4, 6)
    np.testing.assert_array_equal(got, ref)


def test_contract_and_checker() -> None:
    fn = binary_conv_function()
    assert (fn.domain, fn.name) == (OP_DOMAIN, OP_NAME) == ("bidiff", "BinaryConv2d")
    assert list(fn.attribute) == list(OP_ATTRIBUTES) == ["kernel", "channels", "pad", "stride"]
    assert all(n.domain in ("", "ai.onnx") for n in fn.node)       # standard ops only
    x, w, thr = _case(16, 3, seed=1)
    model = make_single_op_model(pack_weights(w), weight_scale(w), thr, channels=16, kernel=3)
    onnx.checker.check_model(model, full_check=True)
