"""Winograd F(4,3) for the float 3x3 convs: the transform matrices, which convs take it, and the
compiled kernel (fused with its bias / residual epilogue) against onnxruntime."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import tvm
from onnx import helper, numpy_helper
from tvm import relax

from bidiff.exporter.tvm import winograd
from bidiff.exporter.tvm.float_schedules import SCHEDULE_ATTR, relax_pipeline
from bidiff.exporter.tvm.frontend import from_onnx
from bidiff.exporter.tvm.target import host_target
from conftest import float_onnx


def _correlate(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Plain 'same' 3x3 cross-correlation (what ONNX Conv computes), float64."""
    c, h, wd = x.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1)))
    out = np.zeros((w.shape[0], h, wd))
    for a in range(3):
        for b in range(3):
            out += np.einsum("kc,chw->khw", w[:, :, a, b], xp[:, a:a + h, b:b + wd])
    return out


def test_transform_matrices_compute_the_correlation():
    """Y = A^T [U * (B^T d B)] A on every 6x6 tile equals the direct correlation (a wrong sign
    or coefficient in any matrix is off by O(1))."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 8, 12))
    w = rng.standard_normal((3, 5, 3, 3)).astype(np.float32)
    u = winograd.transform_weights(w).astype(np.float64)
    assert u.shape == (6, 6, 3, 5)
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1)))
    y = np.zeros((3, 8, 12))
    for ty in range(2):
        for tx in range(3):
            d = xp[:, 4 * ty:4 * ty + 6, 4 * tx:4 * tx + 6]
            v = np.einsum("xa,cab,yb->xyc", winograd.B_T, d, winograd.B_T)
            m = np.einsum("xykc,xyc->xyk", u, v)
            y[:, 4 * ty:4 * ty + 4, 4 * tx:4 * tx + 4] = np.einsum(
                "ix,xyk,jy->kij", winograd.A_T, m, winograd.A_T)
    np.testing.assert_allclose(y, _correlate(x, w), rtol=1e-5, atol=1e-5)   # U is float32


def test_transform_weights_rejects_other_kernels():
    with pytest.raises(ValueError, match=r"3x3 weights \[K, C, 3, 3\]"):
        winograd.transform_weights(np.zeros((4, 4, 1, 1), np.float32))


@pytest.mark.parametrize("shape,expected", [
    ((32, 32, 32, 32), True),
    ((16, 64, 64, 128), True),
    ((3, 64, 64, 64), False),      # the first conv: too few input channels for a GEMM
    ((64, 3, 64, 64), False),      # the last conv
    ((64, 64, 16, 16), False),     # narrower than 8 tiles
    ((64, 64, 32, 30), False),     # not whole 4x4 tiles
])
def test_applicable(shape, expected):
    assert winograd.applicable(*shape) is expected


def _conv_model(c: int, k: int, h: int, w: int, *, stride: int = 1, seed: int = 1):
    """Conv(3x3, bias) + a residual Add: the epilogue that must fuse into the kernel."""
    rng = np.random.default_rng(seed)
    ho, wo = h // stride, w // stride
    inits = [numpy_helper.from_array(a, n) for n, a in [
        ("w", (rng.standard_normal((k, c, 3, 3)) / np.sqrt(9 * c)).astype(np.float32)),
        ("b", rng.standard_normal(k).astype(np.float32)),
        ("r", rng.standard_normal((1, k, ho, wo)).astype(np.float32))]]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["h"], pads=[1, 1, 1, 1],
                              strides=[stride, stride]),
             helper.make_node("Add", ["h", "r"], ["y"])]
    return float_onnx(nodes, {"x": (1, c, h, w)}, {"y": (1, k, ho, wo)}, inits)


def _rules(mod, target) -> dict[str, str]:
    lowered = relax_pipeline(target)(mod)
    return {gv.name_hint: str(f.attrs[SCHEDULE_ATTR]) for gv, f in lowered.functions_items()
            if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None
            and SCHEDULE_ATTR in f.attrs}


@pytest.mark.parametrize("c,k,h,w", [(32, 16, 32, 32), (24, 40, 8, 36)])
def test_compiled_winograd_matches_onnxruntime(c, k, h, w):
    target = host_target()
    model = _conv_model(c, k, h, w)
    mod, _ = from_onnx(model, target=target)
    rules = _rules(mod, target)
    fused = [n for n, r in rules.items() if r == "winograd"]
    assert len(fused) == 1 and "add" in fused[0], rules       # bias + residual in its epilogue
    ex = tvm.compile(mod, target, relax_pipeline=relax_pipeline(target))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for seed in range(2):
        x = np.random.default_rng(seed).standard_normal((1, c, h, w)).astype(np.float32)
        got = vm["main"](tvm.runtime.tensor(x)).numpy()
        ref = sess.run(None, {"x": x})[0]
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_strided_conv_keeps_the_direct_schedule():
    target = host_target()
    rules = _rules(from_onnx(_conv_model(32, 32, 64, 64, stride=2), target=target)[0], target)
    assert "winograd" not in rules.values() and "conv2d_nchw" in rules.values()


def test_shared_weights_are_transformed_once():
    """Two convs with the same weight constant (as the five groups of a library have after
    import) get one transformed constant, so the library stores U once, and one kernel."""
    bb = relax.BlockBuilder()
    wc = relax.const(np.random.default_rng(0).standard_normal((16, 16, 3, 3)).astype(np.float32))
    x = relax.Var("x", relax.TensorType((1, 16, 32, 32), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            a = bb.emit(relax.op.nn.conv2d(x, wc, padding=1))
            b = bb.emit(relax.op.nn.conv2d(a, wc, padding=1))
            out = bb.emit_output(b)
        bb.emit_func_output(out)
    legalized = relax.transform.LegalizeOps({"relax.nn.conv2d": winograd.LegalizeWinograd()})(
        bb.get())
    calls = [b.value for b in legalized["main"].body.blocks[0].bindings
             if isinstance(b.value, relax.Call)]
    u_args = [c.args[1].fields[1] for c in calls]          # call_tir(func, (x, U))
    assert all(isinstance(u, tvm.ir.expr.Constant) for u in u_args)
    assert u_args[0].same_as(u_args[1])
    assert calls[0].args[0].same_as(calls[1].args[0])     # and one kernel for the one shape
    assert tuple(u_args[0].value.shape) == (6, 6, 16, 16)


@pytest.mark.parametrize("target_name", ["x86_64-avx512", "x86_64-avx2", "arm64", "rpi5"])
def test_every_target_gets_the_winograd_schedule(target_name):
    """A schedule that a target's vector width breaks would fall back to the generic reduction
    rule silently (and run many times slower): check the rule for each target's lanes / tiles,
    at the 32-pixel width where 16-lane vectors no longer fit twice."""
    from bidiff.exporter.targets import get_target
    from bidiff.exporter.tvm.target import tvm_target
    target = tvm_target(get_target(target_name))
    for c, k, h, w in [(32, 16, 32, 32), (64, 128, 16, 64)]:
        rules = _rules(from_onnx(_conv_model(c, k, h, w), target=target)[0], target)
        assert sorted(rules.values()).count("winograd") == 1, (target_name, rules)
