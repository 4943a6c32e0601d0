"""Benchmarks of the TVM-compiled kernels against onnxruntime (and PyTorch) fp32, as ratios.

The command line of ``bidiff.exporter.bench`` (its docstring: the parts and the bundles), run
as ``scripts/bench.py``. Markdown on stdout, JSON with --json; exit code 1 when part k finds a
kernel that disagrees with the reference.

Examples:
  python scripts/bench.py --part a --threads 2 --json bench_a.json        # build + measure here
  python scripts/bench.py --part a --target x86_64-avx512 --bundle B      # build only, for a CPU
  python scripts/bench.py --run B --threads 2 --json bench_a.json         # measure B there
  python scripts/bench.py --part k --target x86_64-avx512 --bundle K      # kernels to check
  python scripts/bench.py --part r --checkpoint CKPT --rounds 5 --repeat 2 # roofline, scaling
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

from .bench import BenchOptions
from .bench_build import build_bundle
from .bench_measure import measure_bundle
from .bench_report import report


def _counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(v) for v in text.split(","))
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected thread counts like 1,2,4, got {text!r}")
    return counts


def _parse(argv):
    p = argparse.ArgumentParser(prog="scripts/bench.py", description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=["a", "b", "c", "k", "r"], default="a",
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
    p.add_argument("--thread-counts", type=_counts, default=(1, 2, 4),
                   help="part r: thread counts of the step's scaling table (default 1,2,4)")
    p.add_argument("--json", dest="json_path", help="also write the results as JSON here")
    p.add_argument("--target", default="x86_64",
                   help="export target the TVM code is compiled for (default: this CPU)")
    p.add_argument("--bundle", type=Path,
                   help="build only: write the compiled bundle here (measure it with --run)")
    p.add_argument("--run", dest="run_bundle", type=Path,
                   help="measure a bundle written by --bundle (needs no TVM compiler)")
    return p.parse_args(argv)



def main(argv: list[str] | None = None) -> int:
    """Build and/or measure one part; returns the exit code (1: part k found a mismatch)."""
    args = _parse(argv)
    opts = BenchOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BenchOptions)})
    # the TVM thread pool reads its settings once, when libtvm_runtime loads; the runtime's
    # (bidiff.runtime.backends.tvm): by default a TVM worker busy-waits ~240 ms after every
    # call, so the next contender ran against a spinning core (onnxruntime's conv measured
    # 8 ms instead of 2.5 ms: the ratios flattered TVM)
    from bidiff.runtime.backends.tvm import SPIN_COUNT
    os.environ["TVM_NUM_THREADS"] = str(opts.threads)
    os.environ["TVM_BIND_THREADS"] = "0"
    os.environ["TVM_THREAD_POOL_SPIN_COUNT"] = str(SPIN_COUNT)
    if "tvm" in sys.modules:
        print("warning: tvm already imported; TVM_NUM_THREADS may not apply", file=sys.stderr)
    if args.bundle:
        build_bundle(opts, args.bundle)
        print(f"wrote {args.bundle}: measure it with  python scripts/bench.py --run {args.bundle}")
        return 0
    if args.run_bundle:
        result = measure_bundle(args.run_bundle, opts)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            result = measure_bundle(build_bundle(opts, Path(tmp)), opts)
    print(report(result))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(result, f, indent=2)
    return 1 if any(not r.get("ok", True) for r in result["rows"]) else 0


if __name__ == "__main__":      # pragma: no cover
    sys.exit(main())
