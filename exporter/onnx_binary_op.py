"""The ONNX form of bidiff's binary convolution: custom op ``bidiff::BinaryConv2d`` (version 1).

This module is the contract between the ONNX writer (``exporter.onnx_export``), onnxruntime
(through the model-local function below) and the TVM Relax frontend converter (``exporter/tvm``),
which registers a converter for the same op name and attributes. Keep it stable; a change of
meaning needs a new ``OP_VERSION`` in ``bidiff.runtime.binary_op``.

Semantics: exactly ``bidiff.runtime.binary_op.binary_conv2d_reference`` (read its docstring for
the bit conventions: uint32 words, channel c in word c // 32 at bit c % 32, bit 1 = +1, packed
weights [F, kh, kw, ceil(C / 32)], padding bits 0).

Node ``BinaryConv2d`` in domain ``bidiff`` (opset import ``bidiff`` version 1):

=========  =========================  ==================================================
input      type / shape               meaning
=========  =========================  ==================================================
X          float32 [N, C, H, W]       activations (C = ``channels``)
W_packed   uint32 [F, k, k, ceil(C/32)] bit-packed signs of the weights (bit 1 = +1)
scale      float32 [F]                per-output-channel scale (alpha_f = mean|W_f|)
threshold  float32 [C]                sign threshold: s(x) = +1 if x >= threshold[c] else -1
                                      (TaR's learnable bias b folds in as threshold = -b:
                                      ``x + b >= 0`` and ``x >= -b`` agree exactly in IEEE
                                      float with gradual underflow)
=========  =========================  ==================================================

``threshold`` is optional in the op contract (absent = all zeros) and the TVM converter must
accept both forms; the ONNX function body below needs it, so the bidiff exporter always emits
all four inputs.

Attributes (all ints, all always written by the exporter):
``kernel`` (k, square kernel), ``channels`` (C, the unpadded input channel count), ``pad`` (zero
padding on each spatial side, applied *after* binarisation so padded taps contribute 0; k // 2
for BI-DiffSR), ``stride`` (1 for BI-DiffSR).

Output ``Y`` float32 [N, F, (H + 2p - k) // s + 1, (W + 2p - k) // s + 1]:
``Y[n, f] = scale[f] * sum_{c, taps} s(X)[n, c, tap] * sign(W)[f, c, tap]``.

Function body (standard ONNX ops only, so stock onnxruntime runs the model with no plugin):
unpack bits (Unsqueeze, BitShift RIGHT by 0..31, BitwiseAnd 1, Reshape, Slice to ``channels``,
Transpose to [F, C, k, k], Cast bool, Where -> +-1 float); binarise X (GreaterOrEqual threshold,
Where -> +-1); Pad with 0 by ``pad``; Conv with the +-1 weights (stride 1); Slice with steps
``stride``; Mul by ``scale``. Sums of +-1 are exact integers in float32 (|sum| <= C*k*k < 2**24)
and the final Mul is one rounding, so the body equals the numpy reference bit for bit
(tests/test_export_binary_op.py checks that, with onnxruntime's default optimisations on and
off). The Mul is written as ``Mul(scale, acc)`` on purpose: onnxruntime's Conv+Mul fusion only
matches ``Mul(conv_out, constant)``, and fusing would fold alpha into the weights (sums of
alpha*sign(W) round, breaking exactness against the reference and the TVM popcount kernels).
onnxruntime constant-folds the weight unpacking of
an initializer at session start, so a run costs one float Conv. Attribute values reach the body
through ``onnx.helper.make_attribute_ref`` (``Constant(value_int=@attr)``), since Conv's
``pads``/``strides`` are int lists and cannot reference the scalar attributes directly.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bidiff.runtime.binary_op import OP_DOMAIN, OP_NAME, OP_VERSION, WORD_BITS

#: Standard-domain opset the function body and the bidiff graphs use (GroupNormalization-21).
ONNX_OPSET = 21
#: The ONNX IR version of every model bidiff writes (opset 21 needs IR >= 10; onnxruntime 1.32
#: reads it).
IR_VERSION = 10
#: Inputs / outputs / attributes of the op, in order (the contract above).
OP_INPUTS = ("X", "W_packed", "scale", "threshold")
OP_OUTPUTS = ("Y",)
OP_ATTRIBUTES = ("kernel", "channels", "pad", "stride")

__all__ = ["OP_DOMAIN", "OP_NAME", "OP_VERSION", "ONNX_OPSET", "OP_INPUTS", "OP_OUTPUTS",
           "OP_ATTRIBUTES", "opset_imports", "binary_conv_function", "make_binary_conv_node",
           "make_single_op_model"]


def opset_imports() -> list[onnx.OperatorSetIdProto]:
    """The opset imports of a model that uses the op: standard ONNX_OPSET + bidiff v1."""
    return [helper.make_opsetid("", ONNX_OPSET), helper.make_opsetid(OP_DOMAIN, OP_VERSION)]


def make_model(graph: onnx.GraphProto, *, custom_op: bool = True, opset: int = ONNX_OPSET,
               producer_name: str = "bidiff") -> onnx.ModelProto:
    """A model of ``graph`` at :data:`IR_VERSION`: with the op's function and opset imports
    (``custom_op``), or the standard ``opset`` only."""
    if custom_op:
        m = helper.make_model(graph, opset_imports=opset_imports(), functions=[binary_conv_function()],
                              producer_name=producer_name)
    else:
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name=producer_name)
    m.ir_version = IR_VERSION
    return m


def _const(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value), name))


def _attr_scalar(name: str, attr: str) -> list[onnx.NodeProto]:
    """int attribute ``attr`` -> 1-D int64 tensor ``name`` of length 1."""
    ref = helper.make_attribute_ref("value_int", onnx.AttributeProto.INT, ref_attr_name=attr)
    scalar = helper.make_node("Constant", [], [name + "_scalar"])
    scalar.attribute.append(ref)
    return [scalar, helper.make_node("Reshape", [name + "_scalar", "one_dim"], [name])]


def binary_conv_function() -> onnx.FunctionProto:
    """The model-local FunctionProto defining ``bidiff::BinaryConv2d`` with standard ops."""
    X, Wp, scale, thr = OP_INPUTS
    nodes: list[onnx.NodeProto] = [
        _const("one_dim", np.array([1], np.int64)),
        _const("shape_nchw_c", np.array([1, -1, 1, 1], np.int64)),
        # -- weights: [F, k, k, NW] uint32 -> [F, C, k, k] float +-1
        _const("shifts", np.arange(WORD_BITS, dtype=np.uint32)),
        _const("one_u32", np.array(1, np.uint32)),
        _const("axis_last", np.array([-1], np.int64)),
        _const("flat_shape", np.array([0, 0, 0, -1], np.int64)),
        _const("zero_1", np.array([0], np.int64)),
        _const("axis_3", np.array([3], np.int64)),
        _const("plus_one", np.array(1.0, np.float32)),
        _const("minus_one", np.array(-1.0, np.float32)),
        helper.make_node("Unsqueeze", [Wp, "axis_last"], ["w_words"]),
        helper.make_node("BitShift", ["w_words", "shifts"], ["w_shifted"], direction="RIGHT"),
        helper.make_node("BitwiseAnd", ["w_shifted", "one_u32"], ["w_bits"]),
        helper.make_node("Reshape", ["w_bits", "flat_shape"], ["w_bits_flat"]),
        *_attr_scalar("channels_1", "channels"),
        helper.make_node("Slice", ["w_bits_flat", "zero_1", "channels_1", "axis_3"], ["w_bits_c"]),
        helper.make_node("Transpose", ["w_bits_c"], ["w_bits_fckk"], perm=[0, 3, 1, 2]),
        helper.make_node("Cast", ["w_bits_fckk"], ["w_pos"], to=TensorProto.BOOL),
        helper.make_node("Where", ["w_pos", "plus_one", "minus_one"], ["w_pm1"]),
        # -- activations: s(x) = +1 if x >= threshold else -1, then zero padding
        helper.make_node("Reshape", [thr, "shape_nchw_c"], ["thr_nchw"]),
        helper.make_node("GreaterOrEqual", [X, "thr_nchw"], ["x_pos"]),
        helper.make_node("Where", ["x_pos", "plus_one", "minus_one"], ["x_pm1"]),
        *_attr_scalar("pad_1", "pad"),
        _const("zero_2", np.array([0, 0], np.int64)),
        helper.make_node("Concat", ["zero_2", "pad_1", "pad_1", "zero_2", "pad_1", "pad_1"],
                         ["pads"], axis=0),
        helper.make_node("Pad", ["x_pm1", "pads"], ["x_padded"], mode="constant"),
        # -- +-1 convolution (exact integer sums), stride by slicing, then the scale
        helper.make_node("Conv", ["x_padded", "w_pm1"], ["acc_full"]),
        *_attr_scalar("stride_1", "stride"),
        helper.make_node("Concat", ["stride_1", "stride_1"], ["steps"], axis=0),
        _const("big_2", np.array([np.iinfo(np.int64).max] * 2, np.int64)),
        _const("axes_hw", np.array([2, 3], np.int64)),
        helper.make_node("Slice", ["acc_full", "zero_2", "big_2", "axes_hw", "steps"], ["acc"]),
        helper.make_node("Reshape", [scale, "shape_nchw_c"], ["scale_nchw"]),
        helper.make_node("Mul", ["scale_nchw", "acc"], list(OP_OUTPUTS)),
    ]
    return helper.make_function(
        OP_DOMAIN, OP_NAME, list(OP_INPUTS), list(OP_OUTPUTS), nodes,
        [helper.make_opsetid("", ONNX_OPSET)], attributes=list(OP_ATTRIBUTES),
        doc_string="bidiff BinaryConv2d v1: see bidiff.exporter.onnx_binary_op")


def make_binary_conv_node(x: str, w_packed: str, scale: str, threshold: str, y: str, *,
                          kernel: int, channels: int, pad: int, stride: int = 1,
                          name: str | None = None) -> onnx.NodeProto:
    """One ``bidiff::BinaryConv2d`` node with all four attributes written explicitly."""
    return helper.make_node(OP_NAME, [x, w_packed, scale, threshold], [y], name=name,
                            domain=OP_DOMAIN, kernel=int(kernel), channels=int(channels),
                            pad=int(pad), stride=int(stride))


def make_single_op_model(w_packed: np.ndarray, scale: np.ndarray, threshold: np.ndarray, *,
                         channels: int, kernel: int, pad: int | None = None,
                         stride: int = 1) -> onnx.ModelProto:
    """A model holding one BinaryConv2d (input ``X`` [N, C, H, W] dynamic), for tests/benchmarks."""
    p = kernel // 2 if pad is None else int(pad)
    f = int(w_packed.shape[0])
    graph = helper.make_graph(
        [make_binary_conv_node("X", "W_packed", "scale", "threshold", "Y", kernel=kernel,
                               channels=channels, pad=p, stride=stride, name="binary_conv")],
        "bidiff_binary_conv2d",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", channels, "H", "W"])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", f, "HO", "WO"])],
        initializer=[numpy_helper.from_array(np.ascontiguousarray(w_packed, np.uint32), "W_packed"),
                     numpy_helper.from_array(np.asarray(scale, np.float32).reshape(f), "scale"),
                     numpy_helper.from_array(np.asarray(threshold, np.float32).reshape(channels),
                                             "threshold")])
    return make_model(graph)
