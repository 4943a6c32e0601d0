"""Benchmarks of the TVM-compiled kernels against onnxruntime (and PyTorch) fp32, in one
process at the same thread count, reported as ratios (``scripts/bench.py`` is the command).

Parts (issue 5):

- a: one binary conv layer (default 64 -> 64, 3x3, 64x64 input): the bit-serial TVM kernel vs
  onnxruntime's fp32 Conv of the same shape (and torch.conv2d);
- b: each float op class (conv 3x3, conv 1x1, GroupNorm + Swish, add, attention core, pixel
  shuffle) compiled by TVM with bidiff's schedules vs onnxruntime on the same one-op ONNX;
- c: one denoising step (group 0) of a model config at one tile: the compiled library vs
  onnxruntime on the binary ONNX, onnxruntime on the plain float ONNX of the same network, and
  PyTorch fp32 (random weights unless a checkpoint is given);
- r: the roofline of part c's step (``bench_roofline``): per kernel class, the ideal time of its
  counted work at this CPU's peak popcount, FMA and stream rates (``bench_peaks``, measured in
  the same run) next to its measured time (the VM's per-call profile), and the step's thread
  scaling against onnxruntime on the float ONNX at each of ``thread_counts``;
- k: no timing: every binary-conv shape class (channel counts around word boundaries and several
  64-bit words, odd sizes, 1x1 and 3x3, RPReLU + residual epilogues, folded channel maps and
  addends) compiled for the target and checked against the numpy reference op, for CPUs the
  test suite cannot run on.

Building (``bench_build``, TVM compiler) and measuring (``bench_measure``, device runtime only)
are two stages joined by a bundle folder (``BUNDLE_FILE`` and the part's files), so a CPU without
the TVM compiler (a Raspberry Pi, an AVX-512 server the build machine is not) is measured with
what it runs in production. ``bench_report`` renders a result as markdown and ``bench_cli`` is
the command. Importing these modules imports neither TVM nor onnx nor torch.
"""
from __future__ import annotations

from dataclasses import dataclass

BUNDLE_FILE = "bench.json"     # the bundle's index: part, target, and the part's spec
BUNDLE_VERSION = 1


@dataclass
class BenchOptions:
    """One benchmark run (``scripts/bench.py``'s options; the defaults are its defaults)."""
    part: str = "a"                    # a | b | c | k | r (the module docstring)
    target: str = "x86_64"             # export target the TVM code is compiled for
    config: str = "official-x2"        # part c: model config
    checkpoint: str | None = None      # part c: weights (None: random, seeded)
    tile: int = 128                    # part c: HR tile
    channels: int = 64                 # part a: binary conv channels
    size: int = 64                     # part a: input height = width
    kernel: int = 3                    # part a: 1 or 3
    threads: int = 2                   # measuring: threads of every runtime
    rounds: int = 15                   # measuring: interleaved rounds
    repeat: int = 10                   # measuring: least calls per contender per round
    min_block_ms: float = 100.0        # measuring: least time per block of calls (0: repeat calls)
    thread_counts: tuple[int, ...] = (1, 2, 4)   # part r: the step's thread scaling
