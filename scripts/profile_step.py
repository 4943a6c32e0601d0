#!/usr/bin/env python
"""Where one denoising step's time goes in the TVM library, kernel by kernel.

    python scripts/profile_step.py --checkpoint models/weights/bidiff-s-x2.safetensors --threads 1

Builds group 0 of the model at one tile (like ``bench.py --part c``) and times every call the
Relax VM makes in one step through ``VirtualMachine.set_instrument``: a markdown table of the
kernels sorted by total time, with their call counts and share of the step.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None, help="model config (default: the checkpoint's)")
    p.add_argument("--checkpoint", default=None, help="weights (default: random, needs --config)")
    p.add_argument("--tile", type=int, default=128, help="HR tile (default 128)")
    p.add_argument("--threads", type=int, default=1, help="TVM threads (default 1)")
    p.add_argument("--top", type=int, default=25, help="rows to print (default 25)")
    args = p.parse_args(argv)
    if not (args.config or args.checkpoint):
        p.error("give --checkpoint or --config")
    from bidiff.runtime.backends.tvm import SPIN_COUNT
    os.environ.update(TVM_NUM_THREADS=str(args.threads), TVM_BIND_THREADS="0",
                      TVM_THREAD_POOL_SPIN_COUNT=str(SPIN_COUNT))     # as the runtime runs it
    import numpy as np
    import tvm
    import tvm_ffi
    from tvm import relax

    from bidiff.exporter.onnx_export import write_onnx_graphs
    from bidiff.exporter.targets import get_target
    from bidiff.exporter.tvm.build import build_library
    from bidiff.models import load_or_random

    model = load_or_random(args.checkpoint, args.config)
    s = args.tile
    with tempfile.TemporaryDirectory() as tmp:
        graphs = write_onnx_graphs(model, Path(tmp) / "bin", tile=s, groups=[0])
        info = build_library(graphs, get_target("x86_64"), Path(tmp) / "model.so")
        vm = relax.VirtualMachine(tvm.runtime.load_module(str(info.path)), tvm.cpu())
    rng = np.random.default_rng(0)
    feeds = [rng.standard_normal((1, 3, s, s)).astype(np.float32) for _ in range(2)]
    targs = [tvm.runtime.tensor(a) for a in (*feeds, np.array([[100]], np.int64))]
    vm["group_0"](*targs)                                   # warm-up

    total: dict[str, float] = collections.defaultdict(float)
    calls: collections.Counter[str] = collections.Counter()
    started: dict[str, float] = {}

    def instrument(func, name, before, ret, *call_args):
        if before:
            started[name] = time.perf_counter()
        else:
            total[name] += time.perf_counter() - started[name]
            calls[name] += 1
        return 0

    vm.set_instrument(tvm_ffi.convert(instrument))
    t0 = time.perf_counter()
    vm["group_0"](*targs)
    step = time.perf_counter() - t0
    print(f"### One step of group 0, tile {s}, {args.threads} thread(s): {step * 1e3:.1f} ms "
          f"(instrumented)\n")
    print("| kernel | calls | ms | share |")
    print("|---|---|---|---|")
    for name, sec in sorted(total.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"| {name} | {calls[name]} | {sec * 1e3:.2f} | {sec / step:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
