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
     and PyTorch fp32 (``--config``, ``--tile``; random weights unless ``--checkpoint``);
  k  no timing: every binary-conv shape class (channel counts around word boundaries and
     several 64-bit words, odd sizes, 1x1 and 3x3, RPReLU + residual epilogues) compiled for
     the target and checked against the numpy reference op, for CPUs the test suite cannot run
     on (exit code 1 on a mismatch).

Examples:
  python scripts/bench.py --part a --threads 2 --json bench_a.json        # build + measure here
  python scripts/bench.py --part a --target x86_64-avx512 --bundle B      # build only, for a CPU
  python scripts/bench.py --run B --threads 2 --json bench_a.json         # measure B there
  python scripts/bench.py --part k --target x86_64-avx512 --bundle K      # kernels to check

Building and measuring are two stages joined by a bundle folder (``bench.json``, the compiled
libraries, the ONNX graphs, the inputs), so a CPU that has no TVM compiler (a Raspberry Pi, a
server with AVX-512 that the build machine lacks) is measured with what it runs in production:
the libraries are loaded with apache-tvm-ffi + libtvm_runtime (``bidiff.runtime.backends.tvm``),
never ``import tvm``. Part c rebuilds its ONNX graphs and the PyTorch model from the config
and checkpoint (or seed) on the measuring machine (the official config's float ONNX weighs
200 MB), so it needs torch there; the TVM output is checked against onnxruntime's on the
binary ONNX, which also shows that both machines built the same weights.

Timings are medians over interleaved rounds (each round times a block of at least ``--repeat``
calls and ``--min-block-ms`` of every contender in turn, in an order that rotates per round,
after a short pause and one untimed call), so load from other jobs on a shared machine hits all
contenders alike; on a busy machine
absolute times mean little, ratios more.
Every TVM contender is checked against a reference before it is timed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

BUNDLE_FILE = "bench.json"
BUNDLE_VERSION = 1


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=["a", "b", "c", "k"], default="a",
                   help="which benchmark (default a)")
    p.add_argument("--config", default="official-x2", help="part c: model config name")
    p.add_argument("--checkpoint", help="part c: checkpoint to load (default: random weights)")
    p.add_argument("--tile", type=int, default=128, help="part c: HR tile (default 128)")
    p.add_argument("--threads", type=int, default=2, help="threads for every runtime (default 2)")
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--size", type=int, default=64, help="input height = width (default 64)")
    p.add_argument("--kernel", type=int, default=3, choices=[1, 3])
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds (default 15)")
    p.add_argument("--repeat", type=int, default=10, help="least calls per contender per round")
    p.add_argument("--min-block-ms", type=float, default=100.0,
                   help="time each contender's block of calls for at least this long (default "
                        "100; 0: exactly --repeat calls)")
    p.add_argument("--json", dest="json_path", help="also write the results as JSON here")
    p.add_argument("--target", default="x86_64",
                   help="export target the TVM code is compiled for (default: this CPU)")
    p.add_argument("--bundle", type=Path,
                   help="build only: write the compiled bundle here (measure it with --run)")
    p.add_argument("--run", dest="run_bundle", type=Path,
                   help="measure a bundle written by --bundle (needs no TVM compiler)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------- measuring

def _timer(fn, repeat):
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat * 1e3


def _interleaved(contenders: dict, rounds: int, repeat: int,
                 min_block_ms: float = 0.0) -> dict[str, list[float]]:
    """``bidiff.runtime.benchmark.interleaved`` (rotating order, pause, one untimed call per
    block) with blocks of ``repeat`` calls, or as many as fill ``min_block_ms`` (calibrated once
    per contender): sub-millisecond ops timed 10 calls at a time measured mostly the wake-up of
    idle pool threads and the previous contender's still-spinning ones (a TVM add of 4 MB: 0.78
    ms per call in blocks of 10, 0.14 ms back to back; onnxruntime 0.43 vs 0.18-0.24 ms)."""
    from bidiff.runtime.benchmark import interleaved
    calls = {}
    for k, fn in contenders.items():
        fn()
        t = _timer(fn, repeat)
        calls[k] = max(repeat, int(min_block_ms / max(t, 1e-6)) + 1 if min_block_ms else 0)
    return interleaved(contenders, rounds, calls)


def _medians(samples: dict[str, list[float]]) -> dict[str, float]:
    import numpy as np
    return {k: float(np.median(v)) for k, v in samples.items()}


def _ort_session(path: Path, threads: int):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class _Loader:
    """Loads bundle libraries through the device runtime's TVM loader (no ``import tvm``)."""

    def __init__(self, threads: int):
        from bidiff.runtime.backends import tvm as backend
        self.ffi = backend.load_tvm_runtime(threads)
        self._backend = backend

    def tensor(self, a):
        buf = self._backend.aligned_copy(a)
        return buf, self.ffi.from_dlpack(buf)     # keep buf alive with the tensor

    def function(self, lib: Path, name: str):
        return self.ffi.load_module(str(lib))[name]

    def vm(self, lib: Path):
        return self._backend.load_vm(self.ffi, lib)


def run_a(spec: dict, root: Path, args) -> dict:
    import numpy as np

    from bidiff.runtime.binary_op import binary_conv2d_reference
    c, s, k = spec["channels"], spec["size"], spec["kernel"]
    data = np.load(root / spec["inputs"])
    x, w, wp, scale, thr = (data[n] for n in ("x", "w", "wp", "scale", "thr"))
    ref = binary_conv2d_reference(x, wp, scale, channels=c, kernel=k)
    load = _Loader(args.threads)
    keep, contenders = [], {}
    for variant, lib in spec["kernels"].items():
        fn = load.function(root / lib, "k")
        pairs = [load.tensor(a) for a in (x, wp, scale, thr)]
        out_np, out = load.tensor(np.zeros((1, c, s, s), np.float32))
        keep += pairs
        targs = [t for _, t in pairs]
        fn(*targs, out)
        err = float(np.abs(out_np - ref).max())
        if err > 1e-3:
            raise SystemExit(f"TVM {variant} kernel disagrees with the reference: {err}")
        contenders[f"TVM binary ({variant})"] = (lambda fn=fn, a=targs, o=out: fn(*a, o))
    sess = _ort_session(root / spec["onnx"], args.threads)
    contenders["onnxruntime fp32 Conv"] = lambda: sess.run(None, {"x": x})
    torch = _optional_torch(args.threads)
    if torch is not None:
        tx, tw = torch.from_numpy(x), torch.from_numpy(w)

        def torch_conv():
            with torch.no_grad():
                torch.nn.functional.conv2d(tx, tw, padding=k // 2)
        contenders["torch fp32 conv2d"] = torch_conv
    for fn in contenders.values():          # warm-up
        for _ in range(3):
            fn()
    med = _medians(_interleaved(contenders, args.rounds, args.repeat, args.min_block_ms))
    base = med["onnxruntime fp32 Conv"]
    rows = [{"kernel": name, "median_ms": med[name], "speedup_vs_onnxruntime": base / med[name]}
            for name in contenders]
    return {"part": "a", "layer": f"binary conv {c}->{c}, {k}x{k}, 1x{c}x{s}x{s}", "rows": rows}


def run_b(spec: dict, root: Path, args) -> dict:
    import numpy as np
    load = _Loader(args.threads)
    rows = []
    for case in spec["cases"]:
        rng = np.random.default_rng(case["seed"])
        feeds = {n: rng.standard_normal(shape).astype(np.float32)
                 for n, shape in case["inputs"].items()}
        names = list(feeds)
        f = load.vm(root / case["lib"])["main"]
        pairs = [load.tensor(feeds[n]) for n in names]
        targs = [t for _, t in pairs]
        sess = _ort_session(root / case["onnx"], args.threads)
        got = np.from_dlpack(f(*targs)).copy()
        ref = sess.run(None, feeds)[0]
        err = float(np.abs(got - ref).max() / max(1.0, float(np.abs(ref).max())))
        contenders = {"tvm": lambda f=f, a=targs: f(*a), "ort": lambda: sess.run(None, feeds)}
        med = _medians(_interleaved(contenders, args.rounds, args.repeat, args.min_block_ms))
        rows.append({"op": case["op"], "tvm_ms": med["tvm"], "onnxruntime_ms": med["ort"],
                     "tvm_over_onnxruntime": med["tvm"] / med["ort"], "max_rel_err": err})
        del pairs
    return {"part": "b", "rows": rows}


def run_c(spec: dict, root: Path, args) -> dict:
    import numpy as np
    load = _Loader(args.threads)       # before torch: tvm_ffi's optional torch hooks stay off
    torch = _optional_torch(args.threads)
    if torch is None:
        raise SystemExit("part c needs torch on the measuring machine (the float ONNX baseline "
                         "and the PyTorch contender are rebuilt there): pip install torch")
    from bidiff.exporter.onnx_export import write_onnx_graphs
    from bidiff.models import load_or_random

    s = spec["tile"]
    ckpt = spec["checkpoint"]
    model = load_or_random(ckpt, spec["config"])
    data = np.load(root / spec["inputs"])
    x, cond, t = data["x_t"], data["cond"], data["t"]
    feeds = {"x_t": x, "cond": cond, "t": t}
    f = load.vm(root / spec["lib"])["group_0"]
    pairs = [load.tensor(a) for a in (x, cond, t)]
    targs = [p for _, p in pairs]
    with tempfile.TemporaryDirectory() as tmp:
        binary = write_onnx_graphs(model, Path(tmp) / "bin", tile=s, groups=[0], check=False)
        plain = write_onnx_graphs(model, Path(tmp) / "float", tile=s, groups=[0], binary=False,
                                  check=False)
        s_bin = _ort_session(binary[0], args.threads)
        s_flt = _ort_session(plain[0], args.threads)
    # the library was compiled from the same seeded/loaded weights: equal within fp32 noise.
    # Except where a sign() flips: an activation within rounding of its threshold takes the
    # other sign under another summation order, and the network carries that on (the shipped
    # model on AVX-512: one flipped input bit of one 3x3 conv, 288 outputs of it). onnxruntime
    # against itself with x_t perturbed by 1e-6 (relative, random) shows how far apart two
    # correct runs can land.
    y_bin = s_bin.run(None, feeds)[0]
    diff = np.abs(np.from_dlpack(f(*targs)) - y_bin)
    err = float(diff.max())
    noise = np.random.default_rng(0).standard_normal(x.shape).astype(np.float32)
    nudged = dict(feeds, x_t=x + np.float32(1e-6) * np.abs(x) * noise)
    floor = float(np.abs(s_bin.run(None, nudged)[0] - y_bin).max())
    tx, tc, tt = torch.from_numpy(x), torch.from_numpy(cond), torch.from_numpy(t)

    def torch_step():
        with torch.no_grad():
            model(tx, tc, tt)
    contenders = {"TVM (bidiff library)": lambda: f(*targs),
                  "onnxruntime, binary ONNX": lambda: s_bin.run(None, feeds),
                  "onnxruntime, float ONNX": lambda: s_flt.run(None, feeds),
                  "PyTorch fp32": torch_step}
    med = _medians(_interleaved(contenders, args.rounds, args.repeat, args.min_block_ms))
    base = med["onnxruntime, float ONNX"]
    rows = [{"runtime": k, "median_ms": v, "speedup_vs_onnxruntime_float": base / v}
            for k, v in med.items()]
    return {"part": "c", "config": spec["config"], "tile": s, "build_s": spec["build_s"],
            "tvm_vs_onnxruntime_binary_max_abs_err": err,
            "tvm_vs_onnxruntime_binary_share_over_1e-3": float((diff > 1e-3).mean()),
            "onnxruntime_binary_perturbed_max_abs_diff": floor, "rows": rows}


def run_k(spec: dict, root: Path, args) -> dict:
    import numpy as np

    from bidiff.runtime.binary_op import binary_conv2d_reference
    load = _Loader(args.threads)
    rows = []
    for case in spec["cases"]:
        c, f, h, w, k = (case[n] for n in ("channels", "filters", "height", "width", "kernel"))
        data = np.load(root / case["inputs"])
        index = case.get("channel_index")
        x = data["x"] if index is None else data["x"][:, index]
        ref = binary_conv2d_reference(x, data["wp"], data["scale"], channels=c,
                                      kernel=k, threshold=data["thr"])
        names = ["x", "wp", "scale", "thr"]
        if case["epilogue"] == "rprelu":
            names += ["b0", "slope", "b1"]
            z = ref + data["b0"][None, :, None, None]
            ref = np.where(z >= 0, z, data["slope"][None, :, None, None] * z) + \
                data["b1"][None, :, None, None]
        if case["residual"]:
            ref = ref + x
        if case.get("addend"):
            names.append("addend")
            ref = ref + data["addend"]
        pairs = [load.tensor(data[n]) for n in names]
        out_np, out = load.tensor(np.zeros((1, f, h, w), np.float32))
        load.function(root / case["lib"], "k")(*[t for _, t in pairs], out)
        err = float(np.abs(out_np - ref).max())
        rows.append({**{n: case[n] for n in ("variant", "channels", "filters", "height", "width",
                                              "kernel", "epilogue", "residual")},
                     "source": data["x"].shape[1] if index is not None else 0,
                     "addend": bool(case.get("addend")),
                     "max_abs_err": err,
                     "ok": bool(np.allclose(out_np, ref, rtol=1e-5, atol=1e-4))})
    return {"part": "k", "rows": rows}


def _optional_torch(threads: int):
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    return torch


# ---------------------------------------------------------------------------------- building

def _save_onnx(nodes, inputs: dict, inits: dict, out_shape, path: Path, opset: int) -> None:
    from onnx import TensorProto, helper, numpy_helper, save

    from bidiff.exporter.onnx_binary_op import make_model
    graph = helper.make_graph(
        nodes, "op", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s)
                      for n, s in inputs.items()],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        [numpy_helper.from_array(a, n) for n, a in inits.items()])
    save(make_model(graph, custom_op=False, opset=opset), str(path))


def build_a(args, target, root: Path) -> dict:
    import numpy as np
    import tvm
    from onnx import helper

    from bidiff.exporter.tvm.binary_conv import BinaryConvShape, binary_conv_primfunc
    from bidiff.runtime.binary_op import pack_weights

    c, s, k = args.channels, args.size, args.kernel
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
                    target=tgt).export_library(str(root / lib), **_cc(args))
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


def build_b(args, target, root: Path) -> dict:
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
        ex.export_library(str(root / f"b{i}.so"), **_cc(args))
        cases.append({"op": name, "onnx": path.name, "lib": f"b{i}.so", "seed": 1,
                      "inputs": {n: list(shape) for n, shape in inputs.items()}})
    return {"cases": cases}


def build_c(args, target, root: Path) -> dict:
    import numpy as np

    from bidiff.exporter.onnx_export import write_onnx_graphs
    from bidiff.exporter.targets import get_target
    from bidiff.exporter.tvm.build import build_library
    from bidiff.models import load_or_random

    model = load_or_random(args.checkpoint, args.config)
    s = args.tile
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:      # the runner rebuilds the ONNX graphs
        binary = write_onnx_graphs(model, Path(tmp), tile=s, groups=[0])
        build_library(binary, get_target(args.target), root / "c_model.so")
    rng = np.random.default_rng(0)
    x, cond = (rng.standard_normal((1, 3, s, s)).astype(np.float32) for _ in range(2))
    np.savez(root / "c_inputs.npz", x_t=x, cond=cond, t=np.array([[100]], np.int64))
    return {"config": args.config, "checkpoint": args.checkpoint, "tile": s,
            "build_s": time.perf_counter() - t0, "lib": "c_model.so", "inputs": "c_inputs.npz"}


def _kernel_cases():
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


def build_k(args, target, root: Path) -> dict:
    import numpy as np
    import tvm

    from bidiff.exporter.tvm.binary_conv import BinaryConvShape, binary_conv_primfunc
    from bidiff.runtime.binary_op import pack_weights
    cases = []
    for i, (c, f, h, w, k, epi, res, source, addend) in enumerate(_kernel_cases()):
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
                        target=tgt).export_library(str(root / lib), **_cc(args))
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


def _cc(args) -> dict:
    from bidiff.exporter.targets import get_target
    from bidiff.exporter.tvm.build import check_cross_compiler
    cc = check_cross_compiler(get_target(args.target))
    return {"cc": cc} if cc else {}


def build_bundle(args, root: Path) -> Path:
    """Compile part ``args.part`` for ``args.target`` into ``root`` (see the module docstring)."""
    from bidiff.exporter.targets import get_target
    from bidiff.exporter.tvm.target import tvm_target
    spec = get_target(args.target)
    target = tvm_target(spec)
    root.mkdir(parents=True, exist_ok=True)
    part = {"a": build_a, "b": build_b, "c": build_c, "k": build_k}[args.part](args, target, root)
    meta = {"version": BUNDLE_VERSION, "part": args.part, "target": spec.name,
            "target_str": str(target), "spec": part}
    (root / BUNDLE_FILE).write_text(json.dumps(meta, indent=2))
    return root


def measure_bundle(root: Path, args) -> dict:
    meta = json.loads((root / BUNDLE_FILE).read_text())
    if meta.get("version") != BUNDLE_VERSION:
        raise SystemExit(f"{root}: bench bundle version {meta.get('version')}, this script "
                         f"reads {BUNDLE_VERSION}: rebuild it with --bundle")
    run = {"a": run_a, "b": run_b, "c": run_c, "k": run_k}[meta["part"]]
    result = run(meta["spec"], root, args)
    result.update(threads=args.threads, target=meta["target"], machine=_machine())
    return result


def _machine() -> dict:
    from bidiff.runtime.artifact import host_info
    host = host_info()
    return {"cpu": _cpu_name(), "arch": host.arch,
            "features": sorted(f for f in (host.features or ()) if f.startswith(("avx", "asimd"))),
            "platform": platform.platform(), "python": platform.python_version()}


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith(("model name", "Model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# --------------------------------------------------------------------------------- reporting

def _report(result: dict) -> None:
    head = f"{result['threads']} threads, target {result['target']} ({result['machine']['cpu']})"
    if result["part"] == "a":
        print(f"### Part a: {result['layer']}, {head}\n")
        print("| kernel | median ms | speed-up vs onnxruntime |")
        print("|---|---|---|")
        for r in result["rows"]:
            print(f"| {r['kernel']} | {r['median_ms']:.3f} | {r['speedup_vs_onnxruntime']:.2f}x |")
    elif result["part"] == "c":
        print(f"### Part c: one denoising step, {result['config']} at {result['tile']}x"
              f"{result['tile']}, {head}\n")
        print("| runtime | median ms | speed-up vs onnxruntime float |")
        print("|---|---|---|")
        for r in result["rows"]:
            print(f"| {r['runtime']} | {r['median_ms']:.2f} | "
                  f"{r['speedup_vs_onnxruntime_float']:.2f}x |")
        print(f"\nTVM vs onnxruntime (binary ONNX) max abs difference: "
              f"{result['tvm_vs_onnxruntime_binary_max_abs_err']:.1e}")
        if "onnxruntime_binary_perturbed_max_abs_diff" in result:
            print(f"({100 * result['tvm_vs_onnxruntime_binary_share_over_1e-3']:.3f}% of outputs "
                  f"differ by more than 1e-3; onnxruntime against itself with x_t perturbed by "
                  f"1e-6: {result['onnxruntime_binary_perturbed_max_abs_diff']:.1e})")
    elif result["part"] == "k":
        bad = [r for r in result["rows"] if not r["ok"]]
        print(f"### Part k: {len(result['rows'])} binary-conv kernels vs the numpy reference, "
              f"{head}: {len(bad)} mismatches\n")
        print("| variant | [source:] C -> F | H x W | kernel | epilogue | max abs err | ok |")
        print("|---|---|---|---|---|---|---|")
        for r in result["rows"]:
            epi = r["epilogue"] + (" + residual" if r["residual"] else "") + \
                (" + addend" if r.get("addend") else "")
            src = f"{r['source']}: " if r.get("source") else ""
            print(f"| {r['variant']} | {src}{r['channels']} -> {r['filters']} | {r['height']}x"
                  f"{r['width']} | {r['kernel']}x{r['kernel']} | {epi} | {r['max_abs_err']:.1e} | "
                  f"{'yes' if r['ok'] else 'NO'} |")
    else:
        print(f"### Part b: float op classes, {head}\n")
        print("| op | TVM ms | onnxruntime ms | TVM / onnxruntime | max rel err |")
        print("|---|---|---|---|---|")
        for r in result["rows"]:
            print(f"| {r['op']} | {r['tvm_ms']:.3f} | {r['onnxruntime_ms']:.3f} | "
                  f"{r['tvm_over_onnxruntime']:.2f} | {r['max_rel_err']:.1e} |")


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
    if args.bundle:
        build_bundle(args, args.bundle)
        print(f"wrote {args.bundle}: measure it with  python scripts/bench.py --run {args.bundle}")
        return 0
    if args.run_bundle:
        result = measure_bundle(args.run_bundle, args)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            result = measure_bundle(build_bundle(args, Path(tmp)), args)
    _report(result)
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(result, f, indent=2)
    return 1 if any(not r.get("ok", True) for r in result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
