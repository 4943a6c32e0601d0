"""Float-op schedules (``ScheduleFloatOps``): every PrimFunc of a small float graph gets a rule,
and the compiled graph equals onnxruntime on the same ONNX."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import tvm
from onnx import helper, numpy_helper
from tvm import relax
from tvm.relax.backend.cpu_generic import pipeline as cpu_pipeline
from tvm.relax.frontend import onnx as relax_onnx

from bidiff.exporter.tvm.float_schedules import (LEGALIZE, SCHEDULE_ATTR, ScheduleFloatOps,
                                                 legalize_fast_sigmoid, relax_pipeline)
from bidiff.exporter.tvm.target import host_target
from conftest import float_onnx

C, H, W = 32, 16, 24


def _model():
    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array(a, n) for n, a in [
        ("w3", (0.1 * rng.standard_normal((C, 3, 3, 3))).astype(np.float32)),
        ("b3", rng.standard_normal(C).astype(np.float32)),
        ("wc", (0.1 * rng.standard_normal((C, C, 3, 3))).astype(np.float32)),
        ("gs", (rng.random(C) + 0.5).astype(np.float32)),
        ("gb", rng.standard_normal(C).astype(np.float32)),
        ("w1", (0.1 * rng.standard_normal((2 * C, C, 1, 1))).astype(np.float32)),
        ("wl", (0.1 * rng.standard_normal((3, 2 * C, 3, 3))).astype(np.float32)),
    ]]
    nodes = [
        helper.make_node("Conv", ["x", "w3", "b3"], ["h0"], pads=[1, 1, 1, 1]),   # first conv
        helper.make_node("Conv", ["h0", "wc"], ["h1"], pads=[1, 1, 1, 1]),
        helper.make_node("GroupNormalization", ["h1", "gs", "gb"], ["g"], num_groups=8,
                         epsilon=1e-5),
        helper.make_node("Sigmoid", ["g"], ["sg"]),
        helper.make_node("Mul", ["g", "sg"], ["sw"]),                              # Swish
        helper.make_node("Add", ["sw", "h0"], ["r"]),                              # residual
        helper.make_node("Conv", ["r", "w1"], ["h2"]),                             # 1x1
        helper.make_node("Conv", ["h2", "wl"], ["y"], pads=[1, 1, 1, 1]),          # last conv
    ]
    return float_onnx(nodes, {"x": (1, 3, H, W)}, {"y": (1, 3, H, W)}, inits)


@pytest.fixture(scope="module")
def model():
    return _model()


def test_every_primfunc_gets_a_rule(model):
    target = host_target()
    mod = relax_onnx.from_onnx(model)
    with target:
        mod = tvm.transform.Sequential(
            cpu_pipeline.library_dispatch_passes(target)
            + [relax.transform.LegalizeOps({"relax.sigmoid": legalize_fast_sigmoid}),
               relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(),
               relax.transform.FuseOps(), relax.transform.FuseTIR(),
               ScheduleFloatOps(target)])(mod)
    rules = {gv.name_hint: f.attrs[SCHEDULE_ATTR] for gv, f in mod.functions.items()
             if isinstance(f, tvm.tirx.PrimFunc)}
    assert "unscheduled" not in rules.values(), rules
    conv_rules = [r for n, r in rules.items() if "conv2d" in n]
    assert conv_rules and set(conv_rules) == {"conv2d_nchw"}, rules
    assert any("group_norm" in n and r == "reduction" for n, r in rules.items()), rules
    gn = [f.script() for gv, f in mod.functions.items() if "group_norm" in gv.name_hint]
    assert gn and all("_rf_local" in s and "T.vectorized" in s for s in gn)   # vector sums
    assert all(f.attrs["tirx.is_scheduled"] for f in mod.functions.values()
               if isinstance(f, tvm.tirx.PrimFunc))


def test_scheduled_graph_matches_onnxruntime(model):
    target = host_target()
    ex = tvm.compile(relax_onnx.from_onnx(model), target, relax_pipeline=relax_pipeline(target))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    x = np.random.default_rng(0).standard_normal((1, 3, H, W)).astype(np.float32)
    got = vm["main"](tvm.runtime.tensor(x, tvm.cpu())).numpy()
    ref = ort.InferenceSession(model.SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    # float32 with different summation orders and the fast exp in Swish (max rel err ~4e-6,
    # docs/tvm-notes.md); outputs are O(1)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def _attention_model(tokens: int = 64, c: int = 32):
    """The bottleneck attention core as the exporter writes it: (q^T k) / sqrt(c), softmax over
    keys, the probabilities transposed, v @ p^T."""
    nodes = [
        helper.make_node("MatMul", ["qt", "k"], ["s"]),
        helper.make_node("Div", ["s", "scale"], ["s2"]),
        helper.make_node("Softmax", ["s2"], ["p"], axis=-1),
        helper.make_node("Transpose", ["p"], ["pt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["v", "pt"], ["y"]),
    ]
    return float_onnx(nodes, {"qt": (1, tokens, c), "k": (1, c, tokens), "v": (1, c, tokens)},
                      {"y": (1, c, tokens)},
                      [numpy_helper.from_array(np.array(np.sqrt(c), np.float32), "scale")])


def test_attention_core_is_scheduled_and_matches_onnxruntime():
    """Panel-packed matmuls, the tiled transpose and the vector softmax reductions (each a
    schedule of its own) against onnxruntime, at a size where every one of them applies."""
    target = host_target()
    model = _attention_model()
    mod = relax_onnx.from_onnx(model)
    with target:
        scheduled = tvm.transform.Sequential(
            cpu_pipeline.library_dispatch_passes(target)
            + [relax.transform.LegalizeOps(LEGALIZE), relax.transform.AnnotateTIROpPattern(),
               relax.transform.FuseOps(), relax.transform.FuseTIR(), ScheduleFloatOps(target)])(mod)
    funcs = {gv.name_hint: f for gv, f in scheduled.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
    rules = {n: f.attrs[SCHEDULE_ATTR] for n, f in funcs.items()}
    assert sorted(r for n, r in rules.items() if "matmul" in n) == ["matmul", "matmul"], rules
    scripts = {n: f.script() for n, f in funcs.items()}
    assert sum("_global" in s for n, s in scripts.items() if "matmul" in n) == 2   # packed panels
    softmax = next(n for n in scripts if "softmax" in n)
    assert rules[softmax] == "softmax" and scripts[softmax].count("T.parallel") == 1
    assert "T_fast_exp_local" in scripts[softmax] and "T.vectorized" in scripts[softmax]
    transpose = next(s for n, s in scripts.items() if n.startswith("transpose"))
    assert "T.int64(16)" in transpose

    ex = tvm.compile(mod, target, relax_pipeline=relax_pipeline(target))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    rng = np.random.default_rng(3)
    feeds = {i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]
                                         ).astype(np.float32) for i in model.graph.input}
    got = vm["main"](*(tvm.runtime.tensor(feeds[i.name], tvm.cpu()) for i in model.graph.input)).numpy()
    ref = ort.InferenceSession(model.SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def _pointwise_model():
    """The same 1x1 conv twice: plain (packed input panels apply) and padded (they do not)."""
    rng = np.random.default_rng(7)
    c, k, h, w = 48, 32, 6, 64
    inits = [numpy_helper.from_array((0.1 * rng.standard_normal((k, c, 1, 1))).astype(np.float32),
                                     "w"),
             numpy_helper.from_array(rng.standard_normal(k).astype(np.float32), "b")]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"]),
             helper.make_node("Conv", ["x", "w", "b"], ["z"], pads=[1, 1, 1, 1])]
    return float_onnx(nodes, {"x": (1, c, h, w)}, {"y": (1, k, h, w), "z": (1, k, h + 2, w + 2)},
                      inits)


@pytest.mark.parametrize("target_name", ["host", "x86_64-avx512", "x86_64-avx2", "arm64"])
def test_pointwise_conv_packs_its_input_rows(target_name):
    """A 1x1 conv whose width is whole column tiles reads its input from per-row panels
    [W / tile, C, tile] (the plain NCHW read strides a whole plane per channel); a padded 1x1
    keeps the plain read. Checked for each target's tile width (a failing schedule would fall
    back to the generic rule silently)."""
    from bidiff.exporter.targets import get_target
    from bidiff.exporter.tvm.target import tvm_target
    target = host_target() if target_name == "host" else tvm_target(get_target(target_name))
    lowered = relax_pipeline(target)(relax_onnx.from_onnx(_pointwise_model()))
    convs = {gv.name_hint: f for gv, f in lowered.functions_items()
             if isinstance(f, tvm.tirx.PrimFunc) and "conv2d" in gv.name_hint}
    assert {str(f.attrs[SCHEDULE_ATTR]) for f in convs.values()} == {"conv2d_nchw"}
    packed = [n for n, f in convs.items() if 'sblock("x_global")' in f.script()]
    assert len(convs) == 2 and len(packed) == 1, list(convs)


def test_pointwise_convs_match_onnxruntime():
    model = _pointwise_model()
    target = host_target()
    ex = tvm.compile(relax_onnx.from_onnx(model), target, relax_pipeline=relax_pipeline(target))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    x = np.random.default_rng(8).standard_normal((1, 48, 6, 64)).astype(np.float32)
    got = [t.numpy() for t in vm["main"](tvm.runtime.tensor(x, tvm.cpu()))]
    ref = ort.InferenceSession(model.SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, {"x": x})
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_register_tile_trades_columns_for_rows():
    """A row narrower than the tile's vectors gets more rows instead, so the tile keeps its
    count of accumulators; extents that the preferred sizes do not divide fall back."""
    from bidiff.exporter.tvm.schedule_helpers import register_tile
    assert register_tile(1536, 1, 4, 4) == (16, 1)     # AVX-512 1x1 conv at a 16-wide row
    assert register_tile(1536, 8, 4, 4) == (4, 4)      # wide rows: as configured
    assert register_tile(64, 2, 4, 4) == (8, 2)
    assert register_tile(24, 1, 4, 2) == (8, 1)
    assert register_tile(12, 1, 4, 4) == (12, 1)       # fewer rows than wanted: all of them
    assert register_tile(3, 4, 4, 2) == (3, 2)         # the last conv's 3 filters
    assert register_tile(10, 1, 4, 2) == (2, 1)        # 10 > 8 wanted, 8 and 4 do not divide


def _bottleneck_pointwise_model():
    """1x1 convs with more weights than input (the bottleneck attention's qkv and output
    projections, scaled down), with bias and a residual add."""
    rng = np.random.default_rng(9)
    c, h, w = 64, 8, 8
    inits = [numpy_helper.from_array((0.1 * rng.standard_normal((3 * c, c, 1, 1))).astype(np.float32), "wq"),
             numpy_helper.from_array((0.1 * rng.standard_normal((c, 3 * c, 1, 1))).astype(np.float32), "wo"),
             numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "bo")]
    nodes = [helper.make_node("Conv", ["x", "wq"], ["qkv"]),
             helper.make_node("Conv", ["qkv", "wo", "bo"], ["o"]),
             helper.make_node("Add", ["o", "x"], ["y"])]
    return float_onnx(nodes, {"x": (1, c, h, w)}, {"y": (1, c, h, w)}, inits)


@pytest.mark.parametrize("target_name", ["x86_64-avx512", "x86_64-avx2", "arm64"])
def test_bottleneck_pointwise_convs_get_the_conv_rule(target_name):
    """Filter-parallel (weights-stationary) 1x1 convs and narrow-row tiles schedule for every
    target's lanes (a failing schedule would fall back to the generic rule silently)."""
    from bidiff.exporter.targets import get_target
    from bidiff.exporter.tvm.target import tvm_target
    target = tvm_target(get_target(target_name))
    lowered = relax_pipeline(target)(relax_onnx.from_onnx(_bottleneck_pointwise_model()))
    rules = {gv.name_hint: str(f.attrs[SCHEDULE_ATTR]) for gv, f in lowered.functions_items()
             if isinstance(f, tvm.tirx.PrimFunc) and "conv2d" in gv.name_hint}
    assert len(rules) == 2 and set(rules.values()) == {"conv2d_nchw"}, rules


def test_bottleneck_pointwise_convs_match_onnxruntime():
    model = _bottleneck_pointwise_model()
    target = host_target()
    ex = tvm.compile(relax_onnx.from_onnx(model), target, relax_pipeline=relax_pipeline(target))
    x = np.random.default_rng(10).standard_normal((1, 64, 8, 8)).astype(np.float32)
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x, tvm.cpu())).numpy()
    ref = ort.InferenceSession(model.SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("target_name", ["host", "x86_64-avx512", "x86_64-avx2", "arm64"])
@pytest.mark.parametrize("shape", [(1, 5, 36), (2, 3, 7), (1, 4, 256)])
def test_row_softmax(target_name, shape):
    """Softmax over the last axis: one parallel pass per row for every target's lanes (rows of
    any length: partials of 16, 4 or 1 lanes), equal to numpy's softmax on the host."""
    from bidiff.exporter.targets import get_target
    from bidiff.exporter.tvm.target import tvm_target
    target = host_target() if target_name == "host" else tvm_target(get_target(target_name))
    model = float_onnx([helper.make_node("Softmax", ["x"], ["y"], axis=-1)], {"x": shape},
                       {"y": shape})
    mod = relax_onnx.from_onnx(model)
    lowered = relax_pipeline(target)(mod)
    rules = [str(f.attrs[SCHEDULE_ATTR]) for _, f in lowered.functions_items()
             if isinstance(f, tvm.tirx.PrimFunc)]
    assert rules == ["softmax"]
    if target_name != "host":
        return
    x = (4 * np.random.default_rng(14).standard_normal(shape)).astype(np.float32)
    ex = tvm.compile(mod, target, relax_pipeline=relax_pipeline(target))
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x, tvm.cpu())).numpy()
    e = np.exp(x.astype(np.float64) - x.max(axis=-1, keepdims=True))
    np.testing.assert_allclose(got, e / e.sum(axis=-1, keepdims=True), rtol=2e-6, atol=1e-7)
