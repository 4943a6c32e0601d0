#!/usr/bin/env python
"""Where one denoising step's time goes in the TVM library, kernel by kernel.

    python scripts/profile_step.py --checkpoint models/weights/bidiff-m2-x2.safetensors --threads 1
    python scripts/profile_step.py --library ART/model.so --tile 128 --threads 2   # no compiler

Builds group 0 of the model at one tile for this CPU (like ``bench.py --part c``), or takes an
already compiled library (an artifact's, or a bench bundle's ``c_model.so`` compiled for another
CPU), loads it through the device runtime (apache-tvm-ffi + libtvm_runtime, no ``import tvm``)
and times every call the Relax VM makes in one step through the VM's ``set_instrument``: a
markdown table of the kernels sorted by total time, with their call counts and share of the step.
Several steps are profiled and each kernel's median total is reported (``--steps``).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path


def _build(args, out: Path) -> Path:
    from bidiff.exporter.onnx_export import write_onnx_graphs
    from bidiff.exporter.targets import get_target
    from bidiff.exporter.tvm.build import build_library
    from bidiff.models import load_or_random

    model = load_or_random(args.checkpoint, args.config)
    graphs = write_onnx_graphs(model, out / "bin", tile=args.tile, groups=[0])
    return build_library(graphs, get_target("x86_64"), out / "model.so").path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None, help="model config (default: the checkpoint's)")
    p.add_argument("--checkpoint", default=None, help="weights (default: random, needs --config)")
    p.add_argument("--library", type=Path, default=None,
                   help="profile this compiled library instead of building one")
    p.add_argument("--tile", type=int, default=128, help="HR tile (default 128; must match "
                                                         "--library's)")
    p.add_argument("--threads", type=int, default=1, help="TVM threads (default 1)")
    p.add_argument("--steps", type=int, default=5, help="profiled steps (default 5)")
    p.add_argument("--top", type=int, default=25, help="rows to print (default 25)")
    args = p.parse_args(argv)
    if not (args.config or args.checkpoint or args.library):
        p.error("give --checkpoint, --config or --library")
    import numpy as np

    from bidiff.exporter.bench_measure import profile_vm
    from bidiff.runtime.backends.tvm import aligned_copy, load_tvm_runtime, load_vm
    ffi = load_tvm_runtime(args.threads)          # the pool settings the runtime runs with
    with tempfile.TemporaryDirectory() as tmp:
        vm = load_vm(ffi, args.library or _build(args, Path(tmp)))
    s = args.tile
    rng = np.random.default_rng(0)
    bufs = [aligned_copy(a) for a in (
        *(rng.standard_normal((1, 3, s, s)).astype(np.float32) for _ in range(2)),
        np.array([[100]], np.int64))]
    targs = [ffi.from_dlpack(b) for b in bufs]
    prof = profile_vm(ffi, vm, "group_0", targs, args.steps)
    step = statistics.median(prof.step_ms) / 1e3
    med = {name: ms / 1e3 for name, ms in prof.kernel_ms.items()}
    print(f"### One step of group 0, tile {s}, {args.threads} thread(s): {step * 1e3:.1f} ms "
          f"(instrumented, median of {args.steps})\n")
    print("| kernel | calls | ms | share |")
    print("|---|---|---|---|")
    for name, sec in sorted(med.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"| {name} | {prof.calls[name]} | {sec * 1e3:.2f} | {sec / step:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
