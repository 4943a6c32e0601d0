"""Relax ONNX frontend + bidiff::BinaryConv2d converter, compiled for the host, vs onnxruntime.

onnxruntime runs the same model through the model-local function of
``bidiff.exporter.onnx_binary_op`` (standard ops), so the two sides share only the ONNX file.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper

from bidiff.exporter.onnx_binary_op import make_binary_conv_node, make_model
from bidiff.exporter.tvm.binary_conv import KernelVariant, select_variant
from bidiff.exporter.tvm.frontend import from_onnx
from bidiff.exporter.tvm.target import host_target
from bidiff.runtime.binary_op import binary_conv2d_reference, pack_weights

C, H, W = 32, 12, 20


def _model(with_threshold: bool = True, with_temb: bool = False):
    rng = np.random.default_rng(3)
    inits, nodes = [], []

    def init(name, arr):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    # float conv 3 -> C, then two binary convs (3x3 C -> C, 1x1 C -> 48) around standard ops
    init("w0", (0.3 * rng.standard_normal((C, 3, 3, 3))).astype(np.float32))
    nodes.append(helper.make_node("Conv", ["x", "w0"], ["h0"], pads=[1, 1, 1, 1]))
    w1 = rng.standard_normal((C, C, 3, 3)).astype(np.float32)
    init("w1p", pack_weights(w1))
    init("s1", (rng.random(C) + 0.5).astype(np.float32))
    init("t1", (0.1 * rng.standard_normal(C)).astype(np.float32))
    nodes.append(make_binary_conv_node("h0", "w1p", "s1", "t1", "h1", kernel=3, channels=C,
                                       pad=1, name="bconv3"))
    init("b", rng.standard_normal((1, C, 1, 1)).astype(np.float32))
    init("slope", np.full((C, 1, 1), 0.25, np.float32))
    nodes.append(helper.make_node("Add", ["h1", "b"], ["h2"]))
    nodes.append(helper.make_node("PRelu", ["h2", "slope"], ["h3"]))
    init("b1", rng.standard_normal((1, C, 1, 1)).astype(np.float32))
    nodes.append(helper.make_node("Add", ["b1", "h3"], ["h3b"]))         # operands swapped
    nodes.append(helper.make_node("Add", ["h3b", "h0"], ["h4"]))         # identity shortcut
    if with_temb:                            # a ResBlock's timestep embedding, per channel
        init("axes23", np.array([2, 3], np.int64))
        nodes.append(helper.make_node("Unsqueeze", ["temb", "axes23"], ["e"]))
        nodes.append(helper.make_node("Add", ["h4", "e"], ["h5"]))
    w2 = rng.standard_normal((48, C, 1, 1)).astype(np.float32)
    init("w2p", pack_weights(w2))
    init("s2", (rng.random(48) + 0.5).astype(np.float32))
    if with_threshold:
        init("t2", np.zeros(C, np.float32))
        inputs2 = ["h4", "w2p", "s2", "t2"]
    else:
        inputs2 = ["h4", "w2p", "s2"]
    node = make_binary_conv_node("h4", "w2p", "s2", "t2", "y", kernel=1, channels=C, pad=0,
                                 name="bconv1")
    del node.input[:]
    node.input.extend(inputs2)
    if with_temb:
        node.input[0] = "h5"
    nodes.append(node)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, H, W])]
    if with_temb:
        inputs.append(helper.make_tensor_value_info("temb", TensorProto.FLOAT, [1, C]))
    graph = helper.make_graph(nodes, "g", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                             [1, 48, H, W])], inits)
    model = make_model(graph)
    return model


def _numpy_forward(model, x):
    p = {i.name: numpy_helper.to_array(i).copy() for i in model.graph.initializer}
    import torch  # float conv only, as an independent reference of the standard Conv
    h0 = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(p["w0"]),
                                    padding=1).numpy()
    h1 = binary_conv2d_reference(h0, p["w1p"], p["s1"], channels=C, kernel=3, threshold=p["t1"])
    h2 = h1 + p["b"]
    h3 = np.where(h2 >= 0, h2, p["slope"][None] * h2)
    h4 = h3 + p["b1"] + h0
    return binary_conv2d_reference(h4, p["w2p"], p["s2"], channels=C, kernel=1)


def _compile(model, **kw):
    target = host_target()
    mod, selected = from_onnx(model, target=target, **kw)
    ex = tvm.compile(mod, target=target)
    return tvm.relax.VirtualMachine(ex, tvm.cpu()), selected


@pytest.fixture(scope="module")
def compiled():
    model = _model()
    vm, selected = _compile(model)
    return model, vm, selected


def test_converter_selects_host_variant(compiled):
    _, _, selected = compiled
    variant = select_variant(host_target())
    assert variant in (KernelVariant.X86_AVX512, KernelVariant.X86_AVX2)
    assert [v for _, v in selected] == [variant, variant]
    # TaA (Add, PRelu, Add) and the shortcut Add run in the kernel's epilogue
    assert selected[0][0].endswith("_c32_f32_h12_w20_k3_rprelu_res")
    assert selected[1][0].endswith("_c32_f48_h12_w20_k1")


def test_compiled_graph_matches_onnxruntime_and_reference(compiled):
    model, vm, _ = compiled
    x = np.random.default_rng(0).standard_normal((1, 3, H, W)).astype(np.float32)
    got = vm["main"](tvm.runtime.tensor(x, tvm.cpu())).numpy()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ref_ort = ort.InferenceSession(model.SerializeToString(), so,
                                   providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    ref_np = _numpy_forward(model, x)
    # The binary convs are exact integer sums times one scale on both sides; the float conv and
    # the shortcut add differ in summation order (~1e-6 relative). A float difference that flips
    # a sign bit would show up as a jump of 2*scale, far above this tolerance.
    np.testing.assert_allclose(got, ref_ort, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got, ref_np, rtol=1e-4, atol=1e-4)


def test_unfused_epilogue_gives_the_same_result(compiled):
    model, vm, _ = compiled
    vm2, selected = _compile(model, fuse_epilogues=False)
    assert selected[0][0].endswith("_k3")
    x = np.random.default_rng(1).standard_normal((1, 3, H, W)).astype(np.float32)
    a = vm["main"](tvm.runtime.tensor(x, tvm.cpu())).numpy()
    b = vm2["main"](tvm.runtime.tensor(x, tvm.cpu())).numpy()
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_threshold_input_is_optional():
    model = _model(with_threshold=False)
    target = host_target()
    mod, selected = from_onnx(model, target=target)
    assert len(selected) == 2
    assert any(gv.name_hint == selected[1][0] for gv in mod.get_global_vars())


def test_converter_needs_target():
    from bidiff.exporter.tvm import frontend
    frontend.install()
    with pytest.raises(Exception, match="needs a compile target"):
        tvm.relax.frontend.onnx.from_onnx(_model())


def test_epilogue_fusion_only_for_private_chains():
    from bidiff.exporter.tvm.frontend import FUSED_OP, fuse_binary_epilogues
    model = _model()
    fused, n = fuse_binary_epilogues(model)
    assert n == 1                                   # bconv3's chain; bconv1 has no TaA after it
    ops = [nd.op_type for nd in fused.graph.node]
    assert ops.count(FUSED_OP) == 1 and "PRelu" not in ops
    node = next(nd for nd in fused.graph.node if nd.op_type == FUSED_OP)
    assert node.output[0] == "h4" and list(node.input[4:]) == ["b", "slope", "b1"]
    assert {a.name: a.i for a in node.attribute}["residual"] == 1
    assert [nd.op_type for nd in model.graph.node].count("PRelu") == 1   # input untouched
    # an intermediate result read elsewhere (here: a second graph output) blocks the fusion
    model.graph.output.append(helper.make_tensor_value_info("h2", TensorProto.FLOAT,
                                                            [1, C, H, W]))
    assert fuse_binary_epilogues(model)[1] == 0


def test_timestep_embedding_folds_into_the_epilogue():
    """Add(e) of a per-channel [1, C, 1, 1] vector after the chain becomes b1 + e."""
    from bidiff.exporter.tvm.frontend import FUSED_OP, fuse_binary_epilogues
    model = _model(with_temb=True)
    fused, n = fuse_binary_epilogues(model)
    assert n == 1
    node = next(nd for nd in fused.graph.node if nd.op_type == FUSED_OP)
    assert node.output[0] == "h5" and node.input[6] == "bconv3.b1"
    assert not any(nd.op_type == "Add" and "e" in nd.input for nd in fused.graph.node)
    order = [o for nd in fused.graph.node for o in nd.output]
    assert order.index("e") < order.index("h5")            # still topologically sorted
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1, 3, H, W)).astype(np.float32)
    temb = (3 * rng.standard_normal((1, C))).astype(np.float32)
    feeds = [tvm.runtime.tensor(a, tvm.cpu()) for a in (x, temb)]
    got = _compile(model)[0]["main"](*feeds).numpy()
    unfused = _compile(model, fuse_epilogues=False)[0]["main"](*feeds).numpy()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ref = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]
                               ).run(None, {"x": x, "temb": temb})[0]
    np.testing.assert_allclose(got, unfused, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def _assert_equals_onnxruntime(model, vm, feeds: dict) -> None:
    """Every output of the compiled graph equals onnxruntime's (unoptimised) within 1e-4."""
    got = vm["main"](*(tvm.runtime.tensor(feeds[i.name], tvm.cpu()) for i in model.graph.input))
    got = [t.numpy() for t in got] if len(model.graph.output) > 1 else [got.numpy()]
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ref = ort.InferenceSession(model.SerializeToString(), so,
                               providers=["CPUExecutionProvider"]).run(None, feeds)
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


def _cs_fusion_model(extra_reader: bool = False, pick: str = "Gather"):
    """A binary CS-Fusion as the exporter writes it: Concat(x, skip), two channel Gathers
    (odd/even mix), each through BinaryConv2d 1x1 + TaA + its shortcut, summed. With
    ``pick="Split"`` the halves are CP-Down's instead (Split into [0, c) and [c, 2c))."""
    rng = np.random.default_rng(11)
    c, h, w = 32, 6, 16
    inits, nodes = [], [helper.make_node("Concat", ["x", "skip"], ["cat"], axis=1)]

    def init(name, arr):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name
    idx = {1: np.r_[np.arange(1, c, 2), c + np.arange(0, c, 2)],
           2: np.r_[np.arange(0, c, 2), c + np.arange(1, c, 2)]}
    if pick == "Split":
        init("halves", np.array([c, c], np.int64))
        nodes.append(helper.make_node("Split", ["cat", "halves"], ["f1", "f2"], axis=1))
    for k in (1, 2):
        if pick == "Gather":
            init(f"idx{k}", idx[k].astype(np.int64))
            nodes.append(helper.make_node("Gather", ["cat", f"idx{k}"], [f"f{k}"], axis=1))
        init(f"w{k}", pack_weights(rng.standard_normal((c, c, 1, 1)).astype(np.float32)))
        init(f"s{k}", (rng.random(c) + 0.5).astype(np.float32))
        init(f"t{k}", (0.1 * rng.standard_normal(c)).astype(np.float32))
        nodes.append(make_binary_conv_node(f"f{k}", f"w{k}", f"s{k}", f"t{k}", f"h{k}", kernel=1,
                                           channels=c, pad=0, name=f"bconv{k}"))
        init(f"b0_{k}", rng.standard_normal((1, c, 1, 1)).astype(np.float32))
        init(f"sl{k}", np.full((c, 1, 1), 0.25, np.float32))
        init(f"b1_{k}", rng.standard_normal((1, c, 1, 1)).astype(np.float32))
        nodes += [helper.make_node("Add", [f"h{k}", f"b0_{k}"], [f"a{k}"]),
                  helper.make_node("PRelu", [f"a{k}", f"sl{k}"], [f"p{k}"]),
                  helper.make_node("Add", [f"p{k}", f"b1_{k}"], [f"q{k}"]),
                  helper.make_node("Add", [f"q{k}", f"f{k}"], [f"y{k}"])]
    nodes.append(helper.make_node("Add", ["y1", "y2"], ["y"]))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, h, w])]
    if extra_reader:                        # f2 read elsewhere too: its Gather must stay
        nodes.append(helper.make_node("Relu", ["f2"], ["r"]))
        outputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, c, h, w]))
    graph = helper.make_graph(nodes, "cs_fusion", [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, c, h, w]) for n in ("x", "skip")],
        outputs, inits)
    model = make_model(graph)
    return model


@pytest.mark.parametrize("extra_reader", [False, True])
def test_cp_down_split_folds_into_the_kernels(extra_reader):
    """Both halves of a Split read only by their conv chains: the Split goes and each kernel
    reads its channel range of the whole input; with one half read elsewhere the Split stays
    (the other half still folds). Both equal onnxruntime."""
    from bidiff.exporter.tvm.frontend import FUSED_OP, fuse_binary_epilogues
    model = _cs_fusion_model(extra_reader, pick="Split")
    fused, n = fuse_binary_epilogues(model)
    assert n == 2
    assert [nd.op_type for nd in fused.graph.node].count("Split") == int(extra_reader)
    index = {nd.name: list(next((a.ints for a in nd.attribute if a.name == "channel_index"), []))
             for nd in fused.graph.node if nd.op_type == FUSED_OP}
    assert index == {"bconv1.fused": list(range(32)),
                     "bconv2.fused": [] if extra_reader else list(range(32, 64))}
    vm, _ = _compile(model)
    rng = np.random.default_rng(15)
    feeds = {n: rng.standard_normal((1, 32, 6, 16)).astype(np.float32) for n in ("x", "skip")}
    _assert_equals_onnxruntime(model, vm, feeds)


@pytest.mark.parametrize("extra_reader", [False, True])
def test_cs_fusion_gathers_fold_into_the_kernels(extra_reader):
    """Each Gather read only by its conv chain becomes the kernel's channel_index (no take
    kernel left); one read elsewhere stays a Gather. Both equal onnxruntime."""
    from bidiff.exporter.tvm.frontend import FUSED_OP, fuse_binary_epilogues
    model = _cs_fusion_model(extra_reader)
    fused, n = fuse_binary_epilogues(model)
    assert n == 2
    nodes = {nd.name: nd for nd in fused.graph.node if nd.op_type == FUSED_OP}
    folded = {name: "channel_index" in {a.name for a in nd.attribute} for name, nd in nodes.items()}
    assert folded == {"bconv1.fused": True, "bconv2.fused": not extra_reader}
    assert [nd.op_type for nd in fused.graph.node].count("Gather") == int(extra_reader)
    index = next(a.ints for a in nodes["bconv1.fused"].attribute if a.name == "channel_index")
    assert list(index) == list(range(1, 32, 2)) + list(range(32, 64, 2))
    assert nodes["bconv1.fused"].input[0] == "cat"
    vm, selected = _compile(model)
    names = [name for name, _ in selected]
    assert sum("_from64_" in nm for nm in names) == 2 - extra_reader, names
    assert sum("_res_add" in nm for nm in names) == 1, names     # the halves' sum: in one
    rng = np.random.default_rng(12)
    feeds = {n: rng.standard_normal((1, 32, 6, 16)).astype(np.float32) for n in ("x", "skip")}
    _assert_equals_onnxruntime(model, vm, feeds)


@pytest.mark.parametrize("skip_shape", [(1, C, H, W), (1, 1, H, W)])
def test_skip_add_fuses_into_the_kernel(skip_shape):
    """An Add of another full tensor after the chain (a ResBlock's skip) runs in the kernel's
    epilogue; a broadcasting one stays an Add after it. Both equal onnxruntime."""
    from bidiff.exporter.tvm.frontend import FUSED_OP, fuse_binary_epilogues
    model = _model()
    g = model.graph
    g.input.append(helper.make_tensor_value_info("skip", TensorProto.FLOAT, list(skip_shape)))
    for node in g.node:                         # h4 (the chain's end) + skip -> h4s -> bconv1
        if node.name == "bconv1":
            node.input[0] = "h4s"
    g.node.insert(len(g.node) - 1, helper.make_node("Add", ["skip", "h4"], ["h4s"]))
    fused, n = fuse_binary_epilogues(model)
    node = next(nd for nd in fused.graph.node if nd.op_type == FUSED_OP)
    assert n == 1 and node.output[0] == "h4s" and node.input[7] == "skip"
    vm, selected = _compile(model)
    assert selected[0][0].endswith("_res_add") == (skip_shape == (1, C, H, W)), selected
    rng = np.random.default_rng(13)
    feeds = {"x": rng.standard_normal((1, 3, H, W)).astype(np.float32),
             "skip": rng.standard_normal(skip_shape).astype(np.float32)}
    _assert_equals_onnxruntime(model, vm, feeds)
