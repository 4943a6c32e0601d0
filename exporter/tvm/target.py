"""TargetSpec (``bidiff.exporter.targets``) -> ``tvm.target.Target``, in one place."""
from __future__ import annotations

import tvm
from tvm.target import Target

from bidiff.exporter.targets import TargetSpec


def tvm_target(spec: TargetSpec) -> Target:
    """The LLVM target of a native ``spec``; ``mcpu=None`` means this machine's CPU."""
    if not spec.native:
        raise ValueError(f"target {spec.name!r} is portable ONNX only; it has no TVM target")
    cfg = {"kind": "llvm", "mtriple": spec.triple,
           "mcpu": spec.mcpu or tvm.target.codegen.llvm_get_system_cpu()}
    if spec.mattr:
        cfg["mattr"] = list(spec.mattr)
    return Target(cfg)


def host_target() -> Target:
    """This machine's CPU (x86_64 only; the triple is set explicitly, see docs/tvm-notes.md)."""
    return Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu",
                   "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
