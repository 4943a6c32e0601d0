#!/usr/bin/env python
"""Benchmarks of the TVM-compiled kernels against onnxruntime (and PyTorch) fp32, as ratios:
``bidiff.exporter.bench_cli`` (``--help``; the parts and the bundles: ``bidiff.exporter.bench``)."""
import sys

from bidiff.exporter.bench_cli import main

if __name__ == "__main__":
    sys.exit(main())
