#!/usr/bin/env python
"""Benchmarks of the TVM-compiled kernels against onnxruntime (and PyTorch) fp32, one process,
same thread count, reported as ratios (markdown table on stdout, JSON with --json).

Parts (issue 5):
  a  one binary conv layer (default 64 -> 64, 3x3, 64x64 input): the bit-serial TVM kernel vs
     onnxruntime's fp32 Conv of the same shape (and torch.conv2d);
  b  each float op class (conv 3x3, conv 1x1, GroupNorm + Swish, add, attention core, pixel
     shuffle) compiled by TVM with bidiff's schedules vs onnxruntime on the same one-op ONNX;
  c  one denoising step (group 0) of a model config at one tile: the compiled library vs
     onnxruntime on the binary ONNX, onnxruntime on the plain float ONNX of the same network,
     and PyTorch fp32 (``--config``, ``--tile``; random weights unless ``--checkpoint``).

Example:  python scripts/bench.py --part a --threads 2 --json bench_a.json

Timings are medians over interleaved rounds (each round times ``--repeat`` calls of every
contender in turn, after a short pause and one untimed call), so load from other jobs on a shared
machine hits all contenders alike; on a busy machine absolute times mean little, ratios more.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=["a", "b", "c"], default="a",
                   help="which benchmark (default a)")
    p.add_argument("--config", default="official-x2", help="part c: model config name")
    p.add_argument("--checkpoint", help="part c: checkpoint to load (default: random weights)")
    p.add_argument("--tile", type=int, default=128, help="part c: HR tile (default 128)")
    p.add_argument("--threads", type=int, default=2, help="threads for every runtime (default 2)")
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--size", type=int, default=64, help="input height = width (default 64)")
    p.add_argument("--kernel", type=int, default=3, choices=[1, 3])
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds (default 15)")
    p.add_argument("--repeat", type=int, default=10, help="calls per contender per round")
    p.add_argument("--json", dest="json_path", help="also write the results as JSON here")
    return p.parse_args(argv)


def _timer(fn, repeat):
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat * 1e3


def _interleaved(contenders: dict, rounds: int, repeat: int) -> dict[str, list[float]]:
    """Time every contender once per round, in turn, so machine load hits them all alike."""
    samples: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(rounds):
        for k, fn in contenders.items():
            time.sleep(0.05)     # let the previous contender's spinning pool threads go idle
            fn()
            samples[k].append(_timer(fn, repeat))
    return samples


def part_a(args):
    import numpy as np
    import onnxruntime as ort
    import torch
    import tvm
    from onnx import TensorProto, helper, numpy_helper

    from bidiff.exporter.tvm.binary_conv import (BinaryConvShape, KernelVariant,
                                                 binary_conv_primfunc, select_variant)
    from bidiff.exporter.tvm.target import host_target
    from bidiff.runtime.binary_op import binary_conv2d_reference, pack_weights

    c, s, k = args.channels, args.size, args.kernel
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, c, s, s)).astype(np.float32)
    w = rng.standard_normal((c, c, k, k)).astype(np.float32)
    wp = pack_weights(w)
    scale = np.abs(w).reshape(c, -1).mean(1).astype(np.float32)
    thr = np.zeros(c, np.float32)
    ref = binary_conv2d_reference(x, wp, scale, channels=c, kernel=k)

    contenders = {}
    host = host_target()
    variants = [(select_variant(host), host)]
    if variants[0][0] is KernelVariant.X86_AVX512:     # also the AVX2 schedule on this CPU
        variants.append((KernelVariant.X86_AVX2, tvm.target.Target(
            {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v3"})))
    dev = tvm.cpu()
    for variant, target in variants:
        shape = BinaryConvShape(c, c, s, s, kernel=k)
        fn = tvm.compile(tvm.IRModule({"k": binary_conv_primfunc(shape, variant, name="k")}),
                         target=target).jit()["k"]
        targs = [tvm.runtime.tensor(a, dev) for a in (x, wp, scale, thr)]
        out = tvm.runtime.empty((1, c, s, s), "float32", dev)
        fn(*targs, out)
        err = float(np.abs(out.numpy() - ref).max())
        if err > 1e-3:
            raise SystemExit(f"TVM {variant.value} kernel disagrees with the reference: {err}")
        contenders[f"TVM binary ({variant.value})"] = (lambda fn=fn, a=targs, o=out: fn(*a, o))

    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[k // 2] * 4)], "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, s, s])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, s, s])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    contenders["onnxruntime fp32 Conv"] = lambda: sess.run(None, {"x": x})

    torch.set_num_threads(args.threads)
    tx, tw = torch.from_numpy(x), torch.from_numpy(w)

    def torch_conv():
        with torch.no_grad():
            torch.nn.functional.conv2d(tx, tw, padding=k // 2)
    contenders["torch fp32 conv2d"] = torch_conv

    for fn in contenders.values():          # warm-up
        for _ in range(3):
            fn()
    samples = _interleaved(contenders, args.rounds, args.repeat)
    med = {name: float(np.median(v)) for name, v in samples.items()}
    base = med["onnxruntime fp32 Conv"]
    rows = [{"kernel": name, "median_ms": med[name], "speedup_vs_onnxruntime": base / med[name]}
            for name in contenders]
    return {"part": "a", "layer": f"binary conv {c}->{c}, {k}x{k}, 1x{c}x{s}x{s}",
            "threads": args.threads, "rows": rows}


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


def part_b(args):
    import numpy as np
    import onnxruntime as ort
    import tvm
    from onnx import TensorProto, helper, numpy_helper
    from tvm import relax
    from tvm.relax.frontend import onnx as relax_onnx

    from bidiff.exporter.tvm.float_schedules import relax_pipeline
    from bidiff.exporter.tvm.target import host_target

    target = host_target()
    rows = []
    for name, nodes, inputs, inits, out_shape in _float_cases():
        graph = helper.make_graph(
            nodes, "op", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s)
                          for n, s in inputs.items()],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
            [numpy_helper.from_array(a, n) for n, a in inits.items()])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
        model.ir_version = 10
        rng = np.random.default_rng(1)
        feeds = {n: rng.standard_normal(s).astype(np.float32) for n, s in inputs.items()}
        ex = tvm.compile(relax_onnx.from_onnx(model), target,
                         relax_pipeline=relax_pipeline(target))
        vm = relax.VirtualMachine(ex, tvm.cpu())
        targs = [tvm.runtime.tensor(feeds[n]) for n in inputs]
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        so.inter_op_num_threads = 1
        sess = ort.InferenceSession(model.SerializeToString(), so,
                                    providers=["CPUExecutionProvider"])
        got = vm["main"](*targs).numpy()
        ref = sess.run(None, feeds)[0]
        err = float(np.abs(got - ref).max() / max(1.0, float(np.abs(ref).max())))
        contenders = {"tvm": lambda: vm["main"](*targs), "ort": lambda: sess.run(None, feeds)}
        samples = _interleaved(contenders, args.rounds, args.repeat)
        tvm_ms, ort_ms = (float(np.median(samples[k])) for k in ("tvm", "ort"))
        rows.append({"op": name, "tvm_ms": tvm_ms, "onnxruntime_ms": ort_ms,
                     "tvm_over_onnxruntime": tvm_ms / ort_ms, "max_rel_err": err})
    return {"part": "b", "threads": args.threads, "rows": rows}


def part_c(args):
    import tempfile
    from pathlib import Path

    import numpy as np
    import onnxruntime as ort
    import torch
    import tvm
    from tvm import relax

    from bidiff.exporter.onnx_export import write_onnx_graphs
    from bidiff.exporter.targets import get_target
    from bidiff.exporter.tvm.build import build_library
    from bidiff.models import load_or_random

    model = load_or_random(args.checkpoint, args.config)
    s = args.tile
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        binary = write_onnx_graphs(model, tmp / "bin", tile=s, groups=[0])
        plain = write_onnx_graphs(model, tmp / "float", tile=s, groups=[0], binary=False)
        info = build_library(binary, get_target("x86_64"), tmp / "model.so")
        build_s = time.perf_counter() - t0
        vm = relax.VirtualMachine(tvm.runtime.load_module(str(info.path)), tvm.cpu())
        rng = np.random.default_rng(0)
        x, cond = (rng.standard_normal((1, 3, s, s)).astype(np.float32) for _ in range(2))
        t = np.array([[100]], np.int64)
        targs = [tvm.runtime.tensor(a) for a in (x, cond, t)]
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        so.inter_op_num_threads = 1
        feeds = {"x_t": x, "cond": cond, "t": t}
        s_bin = ort.InferenceSession(str(binary[0]), so, providers=["CPUExecutionProvider"])
        s_flt = ort.InferenceSession(str(plain[0]), so, providers=["CPUExecutionProvider"])
        torch.set_num_threads(args.threads)
        tx, tc, tt = torch.from_numpy(x), torch.from_numpy(cond), torch.from_numpy(t)

        def torch_step():
            with torch.no_grad():
                model(tx, tc, tt)
        contenders = {"TVM (bidiff library)": lambda: vm["group_0"](*targs),
                      "onnxruntime, binary ONNX": lambda: s_bin.run(None, feeds),
                      "onnxruntime, float ONNX": lambda: s_flt.run(None, feeds),
                      "PyTorch fp32": torch_step}
        samples = _interleaved(contenders, args.rounds, args.repeat)
    med = {k: float(np.median(v)) for k, v in samples.items()}
    base = med["onnxruntime, float ONNX"]
    rows = [{"runtime": k, "median_ms": v, "speedup_vs_onnxruntime_float": base / v}
            for k, v in med.items()]
    return {"part": "c", "config": args.config, "tile": s, "threads": args.threads,
            "build_s": build_s, "rows": rows}


def main(argv=None) -> int:
    args = _parse(argv)
    # the TVM thread pool reads its settings once, when libtvm_runtime loads; the runtime's
    # (bidiff.runtime.backends.tvm): by default a TVM worker busy-waits ~240 ms after every
    # call, so the next contender ran against a spinning core (onnxruntime's conv measured
    # 8 ms instead of 2.5 ms: the ratios flattered TVM)
    from bidiff.runtime.backends.tvm import SPIN_COUNT
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    os.environ["TVM_BIND_THREADS"] = "0"
    os.environ["TVM_THREAD_POOL_SPIN_COUNT"] = str(SPIN_COUNT)
    if "tvm" in sys.modules:
        print("warning: tvm already imported; TVM_NUM_THREADS may not apply", file=sys.stderr)
    import tvm

    result = {"a": part_a, "b": part_b, "c": part_c}[args.part](args)
    result["machine"] = {"cpu": tvm.target.codegen.llvm_get_system_cpu(),
                         "platform": platform.platform(), "python": platform.python_version(),
                         "tvm": tvm.__version__}
    cpu = result["machine"]["cpu"]
    if args.part == "a":
        print(f"### Part a: {result['layer']}, {result['threads']} threads ({cpu})\n")
        print("| kernel | median ms | speed-up vs onnxruntime |")
        print("|---|---|---|")
        for r in result["rows"]:
            print(f"| {r['kernel']} | {r['median_ms']:.3f} | {r['speedup_vs_onnxruntime']:.2f}x |")
    elif args.part == "c":
        print(f"### Part c: one denoising step, {result['config']} at {result['tile']}x"
              f"{result['tile']}, {result['threads']} threads ({cpu})\n")
        print("| runtime | median ms | speed-up vs onnxruntime float |")
        print("|---|---|---|")
        for r in result["rows"]:
            print(f"| {r['runtime']} | {r['median_ms']:.2f} | "
                  f"{r['speedup_vs_onnxruntime_float']:.2f}x |")
    else:
        print(f"### Part b: float op classes, {result['threads']} threads ({cpu})\n")
        print("| op | TVM ms | onnxruntime ms | TVM / onnxruntime | max rel err |")
        print("|---|---|---|---|---|")
        for r in result["rows"]:
            print(f"| {r['op']} | {r['tvm_ms']:.3f} | {r['onnxruntime_ms']:.3f} | "
                  f"{r['tvm_over_onnxruntime']:.2f} | {r['max_rel_err']:.1e} |")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
