"""Building a bench bundle: the compiled kernels / libraries, ONNX graphs and inputs of one part
for one export target, written to a folder with ``bench.json`` (needs the TVM compiler and onnx;
the measuring machine needs neither, ``bench_measure``)."""
from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path

from .bench import BUNDLE_FILE, BUNDLE_VERSION, BenchOptions


def _save_onnx(nodes, inputs: dict, inits: dict, out_shape, path: Path, opset: int) -> None:
    from onnx import TensorProto, helper, numpy_helper, save

    from bidiff.exporter.onnx_binary_op import make_model
    graph = helper.make_graph(
        nodes, "op", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s)
                      for n, s in inputs.items()],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        [numpy_helper.from_array(a, n) for n, a in inits.items()])
    save(make_model(graph, custom_op=False, opset=opset), str(path))


def _build_a(opts: BenchOptions, target, root: Path) -> dict:
    import numpy as np
    import tvm
    from onnx import helper

    from bidiff.exporter.tvm.binary_conv import BinaryConvShape, binary_conv_primfunc
    from bidiff.runtime.binary_op import pack_weights

    c, s, k = opts.channels, opts.size, opts.kernel
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, c, s, s)).astype(np.float32)
    w = rng.standard_normal((c, c, k, k)).astype(np.float32)
    np.savez(root / "a_inputs.npz", x=x, w=w, wp=pack_weights(w),
             scale=np.abs(w).reshape(c, -1).mean(1).astype(np.float32),
             thr=np.zeros(c, np.float32))
    kernels = {}
    for variant, tgt in _variants(target):
        shape = BinaryConvShape(c, c, s, s, kernel=k)
        lib = f"a_{variant.value}.so"
        tvm.compile(tvm.IRModule({"k": binary_conv_primfunc(shape, variant, name="k")}),
                    target=tgt).export_library(str(root / lib), **_cc(opts))
        kernels[variant.value] = lib
    _save_onnx([helper.make_node("Conv", ["x", "w"], ["y"], pads=[k // 2] * 4)],
               {"x": (1, c, s, s)}, {"w": w}, (1, c, s, s), root / "a_conv.onnx", 17)
    return {"channels": c, "size": s, "kernel": k, "inputs": "a_inputs.npz",
            "kernels": kernels, "onnx": "a_conv.onnx"}


def _float_cases():
    """(name, nodes, inputs {name: shape}, initializers {name: array}, output shape)."""
    import numpy as np
    from onnx import helper
    rng = np.random.default_rng(0)
    f32 = np.float32
    return [
        ("conv 3x3 1x64x64x64", [helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1] * 4)],
         {"x": (1, 64, 64, 64)}, {"w": (0.05 * rng.standard_normal((64, 64, 3, 3))).astype(f32),
                                  "b": rng.standard_normal(64).astype(f32)}, (1, 64, 64, 64)),
        ("conv 1x1 1x128x64x64", [helper.make_node("Conv", ["x", "w"], ["y"])],
         {"x": (1, 128, 64, 64)}, {"w": (0.05 * rng.standard_normal((128, 128, 1, 1))).astype(f32)},
         (1, 128, 64, 64)),
        ("GroupNorm(8) + Swish 1x64x128x128",
         [helper.make_node("GroupNormalization", ["x", "g", "b"], ["n"], num_groups=8,
                           epsilon=1e-5),
          helper.make_node("Sigmoid", ["n"], ["s"]), helper.make_node("Mul", ["n", "s"], ["y"])],
         {"x": (1, 64, 128, 128)}, {"g": (rng.random(64) + 0.5).astype(f32),
                                    "b": rng.standard_normal(64).astype(f32)}, (1, 64, 128, 128)),
        ("add 1x64x128x128", [helper.make_node("Add", ["x", "z"], ["y"])],
         {"x": (1, 64, 128, 128), "z": (1, 64, 128, 128)}, {}, (1, 64, 128, 128)),
        ("attention core 256x64 (QK^T, softmax, V)",
         [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
          helper.make_node("MatMul", ["q", "kt"], ["a"]),
          helper.make_node("Softmax", ["a"], ["p"], axis=-1),
          helper.make_node("MatMul", ["p", "v"], ["y"])],
         {"q": (1, 256, 64), "k": (1, 256, 64), "v": (1, 256, 64)}, {}, (1, 256, 64)),
        ("pixel shuffle 1x256x32x32 -> 1x64x64x64",
         [helper.make_node("DepthToSpace", ["x"], ["y"], blocksize=2, mode="CRD")],
         {"x": (1, 256, 32, 32)}, {}, (1, 64, 64, 64)),
    ]


def _build_b(opts: BenchOptions, target, root: Path) -> dict:
    import onnx
    import tvm
    from tvm.relax.frontend import onnx as relax_onnx

    from bidiff.exporter.tvm.float_schedules import relax_pipeline
    cases = []
    for i, (name, nodes, inputs, inits, out_shape) in enumerate(_float_cases()):
        path = root / f"b{i}.onnx"
        _save_onnx(nodes, inputs, inits, out_shape, path, 21)
        ex = tvm.compile(relax_onnx.from_onnx(onnx.load(str(path))), target,
                         relax_pipeline=relax_pipeline(target))
        ex.export_library(str(root / f"b{i}.so"), **_cc(opts))
        cases.append({"op": name, "onnx": path.name, "lib": f"b{i}.so", "seed": 1,
                      "inputs": {n: list(shape) for n, shape in inputs.items()}})
    return {"cases": cases}


def _step_library(opts: BenchOptions, root: Path, tmp: Path) -> tuple[dict, Path, object]:
    """Group 0 of the model at one tile, compiled into ``root`` with its inputs; returns the
    part's spec, the binary ONNX graph (written in ``tmp``) and the model."""
    import numpy as np

    from bidiff.exporter.onnx_export import write_onnx_graphs
    from bidiff.exporter.targets import get_target
    from bidiff.exporter.tvm.build import build_library
    from bidiff.models import load_or_random

    model = load_or_random(opts.checkpoint, opts.config)
    s = opts.tile
    t0 = time.perf_counter()
    binary = write_onnx_graphs(model, tmp, tile=s, groups=[0])
    build_library(binary, get_target(opts.target), root / "c_model.so")
    rng = np.random.default_rng(0)
    x, cond = (rng.standard_normal((1, 3, s, s)).astype(np.float32) for _ in range(2))
    np.savez(root / "c_inputs.npz", x_t=x, cond=cond, t=np.array([[100]], np.int64))
    return ({"config": opts.config, "checkpoint": opts.checkpoint, "tile": s,
             "build_s": time.perf_counter() - t0, "lib": "c_model.so", "inputs": "c_inputs.npz"},
            binary[0], model)


def _build_c(opts: BenchOptions, target, root: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:      # the runner rebuilds the ONNX graphs
        return _step_library(opts, root, Path(tmp))[0]


def _build_r(opts: BenchOptions, target, root: Path) -> dict:
    """Part c's library, the float ONNX of the same step (onnxruntime's contender), the work of
    every node counted from the binary graph (``bench_roofline``) and the peak kernels."""
    import onnx
    import tvm

    from bidiff.exporter.bench_peaks import peak_primfunc, peaks_for
    from bidiff.exporter.bench_roofline import count_work, work_to_json
    from bidiff.exporter.onnx_export import write_onnx_graphs
    from bidiff.exporter.tvm.binary_conv import (BinaryConvShape, select_variant,
                                                 vector_lanes32, word_bits)
    from bidiff.exporter.tvm.frontend import fuse_binary_epilogues

    variant = select_variant(target)
    with tempfile.TemporaryDirectory() as tmp:
        spec, graph, model = _step_library(opts, root, Path(tmp))
        fused, _ = fuse_binary_epilogues(onnx.load(str(graph)))
        work = count_work(fused, lambda c, k: word_bits(BinaryConvShape(c, c, 1, 1, kernel=k),
                                                        variant))
    plain = write_onnx_graphs(model, root / "r_float", tile=opts.tile, groups=[0],
                              binary=False, check=False)[0]
    lanes = vector_lanes32(variant)
    peaks = peaks_for(lanes, {w.word_bits for w in work if w.words})
    tvm.compile(tvm.IRModule({p.name: peak_primfunc(p, lanes) for p in peaks}),
                target=target).export_library(str(root / "r_peaks.so"), **_cc(opts))
    return {**spec, "float_onnx": plain.relative_to(root).as_posix(), "work": work_to_json(work),
            "peaks_lib": "r_peaks.so", "peaks": [dataclasses.asdict(p) for p in peaks]}


def kernel_cases() -> list[tuple]:
    """(channels, filters, height, width, kernel, epilogue, residual, source, addend) of part k.

    ``source`` > 0: the kernel reads its channels from a ``source``-channel input through a
    folded channel map (:func:`_channel_map`); ``addend``: an [N, F, H, W] input is added last.
    The fused cases have the models' own shapes, so the row write-back of wide layers is run."""
    sizes = ((7, 9), (16, 16), (17, 31))
    cases = set()
    for i, c in enumerate((3, 16, 32, 33, 48, 64, 96)):
        for k in (1, 3):
            h, w = sizes[(i + k) % len(sizes)]
            cases.add((c, max(16, c), h, w, k, "none", False))
    cases |= {(33, 32, h, w, 3, "none", False) for h, w in sizes}
    cases |= {(33, 24, 17, 31, 3, "none", False), (64, 64, 7, 9, 3, "rprelu", True),
              (96, 48, 16, 16, 1, "rprelu", False), (32, 32, 9, 7, 3, "rprelu", True),
              (128, 128, 9, 7, 3, "rprelu", True), (256, 64, 5, 5, 1, "none", False),
              (32, 32, 1, 1, 3, "none", False), (16, 16, 2, 3, 3, "rprelu", True),
              (48, 24, 5, 1, 3, "none", False)}     # every tap row / column outside
    plain = {case + (0, False) for case in cases}
    fused = {(32, 32, 128, 128, 1, "rprelu", True, 64, True),     # CS-Fusion 1x1 + skip add
             (32, 32, 128, 128, 3, "rprelu", True, 0, True),      # ResBlock conv + skip add
             (64, 64, 64, 64, 1, "rprelu", True, 128, False),
             (64, 64, 33, 35, 3, "rprelu", True, 128, True),      # CP-Down half, odd size
             (48, 24, 17, 31, 3, "rprelu", False, 96, True),
             (256, 256, 32, 32, 1, "rprelu", True, 512, True),
             (512, 512, 16, 16, 3, "rprelu", True, 0, True)}
    return sorted(plain | fused)


def _channel_map(channels: int, source: int) -> list[int]:
    """The folded channel map of a part-k case: CS-Fusion's two stride-2 runs when ``source``
    is twice ``channels``, else CP-Down's split (the last ``channels`` of ``source``)."""
    if source == 2 * channels and channels % 2 == 0:
        half = channels // 2
        return [2 * i for i in range(half)] + [channels + 1 + 2 * i for i in range(half)]
    return list(range(source - channels, source))


def _build_k(opts: BenchOptions, target, root: Path) -> dict:
    import numpy as np
    import tvm

    from bidiff.exporter.tvm.binary_conv import BinaryConvShape, binary_conv_primfunc
    from bidiff.runtime.binary_op import pack_weights
    cases = []
    for i, (c, f, h, w, k, epi, res, source, addend) in enumerate(kernel_cases()):
        rng = np.random.default_rng(i)
        index = _channel_map(c, source) if source else list(range(c))
        x = rng.standard_normal((1, source or c, h, w)).astype(np.float32)
        thr = (0.2 * rng.standard_normal(c)).astype(np.float32)
        x[0, index, 0, 0] = thr                # exact ties must give bit 1
        wt = rng.standard_normal((f, c, k, k)).astype(np.float32)
        wt[0, 0] = 0.0                         # packs as +1
        arrays = {"x": x, "thr": thr, "wp": pack_weights(wt),
                  "scale": (rng.random(f) + 0.5).astype(np.float32)}
        if epi == "rprelu":
            arrays.update((n, rng.standard_normal(f).astype(np.float32))
                          for n in ("b0", "slope", "b1"))
        if addend:
            arrays["addend"] = rng.standard_normal((1, f, h, w)).astype(np.float32)
        np.savez(root / f"k{i}.npz", **arrays)
        shape = BinaryConvShape(c, f, h, w, kernel=k, epilogue=epi, residual=res,
                                channel_map=tuple(index) if source else (),
                                source_channels=source, addend=addend)
        for variant, tgt in _variants(target):
            lib = f"k{i}_{variant.value}.so"
            tvm.compile(tvm.IRModule({"k": binary_conv_primfunc(shape, variant, name="k")}),
                        target=tgt).export_library(str(root / lib), **_cc(opts))
            cases.append({"variant": variant.value, "channels": c, "filters": f, "height": h,
                          "width": w, "kernel": k, "epilogue": epi, "residual": res,
                          "channel_index": index if source else None, "addend": addend,
                          "inputs": f"k{i}.npz", "lib": lib})
    return {"cases": cases}


def _variants(target):
    """The target's binary-conv schedule, plus the AVX2 one on an AVX-512 target."""
    import tvm

    from bidiff.exporter.tvm.binary_conv import KernelVariant, select_variant
    variants = [(select_variant(target), target)]
    if variants[0][0] is KernelVariant.X86_AVX512:
        variants.append((KernelVariant.X86_AVX2, tvm.target.Target(
            {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v3"})))
    return variants


def _cc(opts: BenchOptions) -> dict:
    from bidiff.exporter.targets import get_target
    from bidiff.exporter.tvm.build import check_cross_compiler
    cc = check_cross_compiler(get_target(opts.target))
    return {"cc": cc} if cc else {}


def build_bundle(opts: BenchOptions, root: Path) -> Path:
    """Compile part ``opts.part`` for ``opts.target`` into ``root`` (see the module docstring)."""
    from bidiff.exporter.targets import get_target
    from bidiff.exporter.tvm.target import tvm_target
    spec = get_target(opts.target)
    target = tvm_target(spec)
    root.mkdir(parents=True, exist_ok=True)
    part = {"a": _build_a, "b": _build_b, "c": _build_c, "k": _build_k,
            "r": _build_r}[opts.part](opts, target, root)
    meta = {"version": BUNDLE_VERSION, "part": opts.part, "target": spec.name,
            "target_str": str(target), "spec": part}
    (root / BUNDLE_FILE).write_text(json.dumps(meta, indent=2))
    return root

