#!/usr/bin/env python
"""Benchmarks of the TVM-compiled kernels against onnxruntime (and PyTorch) fp32, one process,
same thread count, reported as ratios (markdown table on stdout, JSON with --json).

Parts (issue 5):
  a  one binary conv layer (default 64 -> 64, 3x3, 64x64 input): the bit-serial TVM kernel vs
     onnxruntime's fp32 Conv of the same shape (and torch.conv2d);
  b, c  (not yet here) float op classes; one denoising step.

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
    p.add_argument("--part", choices=["a"], default="a", help="which benchmark (default a)")
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


def part_a(args):
    import numpy as np
    import onnx
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
    samples = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, fn in contenders.items():
            time.sleep(0.05)     # let the previous contender's spinning pool threads go idle
            fn()
            samples[name].append(_timer(fn, args.repeat))
    med = {name: float(np.median(v)) for name, v in samples.items()}
    base = med["onnxruntime fp32 Conv"]
    rows = [{"kernel": name, "median_ms": med[name], "speedup_vs_onnxruntime": base / med[name]}
            for name in contenders]
    return {"part": "a", "layer": f"binary conv {c}->{c}, {k}x{k}, 1x{c}x{s}x{s}",
            "threads": args.threads, "rows": rows}


def main(argv=None) -> int:
    args = _parse(argv)
    # the TVM thread pool reads TVM_NUM_THREADS once, when libtvm_runtime loads
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    if "tvm" in sys.modules:
        print("warning: tvm already imported; TVM_NUM_THREADS may not apply", file=sys.stderr)
    import tvm

    result = part_a(args)
    result["machine"] = {"cpu": tvm.target.codegen.llvm_get_system_cpu(),
                         "platform": platform.platform(), "python": platform.python_version(),
                         "tvm": tvm.__version__}
    print(f"### Part {result['part']}: {result['layer']}, {result['threads']} threads "
          f"({result['machine']['cpu']})\n")
    print("| kernel | median ms | speed-up vs onnxruntime |")
    print("|---|---|---|")
    for r in result["rows"]:
        print(f"| {r['kernel']} | {r['median_ms']:.3f} | {r['speedup_vs_onnxruntime']:.2f}x |")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
