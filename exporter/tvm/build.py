"""Compile the per-group ONNX graphs into one native library (one Relax VM function per group).

:func:`build_library` imports each ``group_<k>.onnx`` with the Relax ONNX frontend (binary convs
lowered to our bit-serial kernels, :mod:`.frontend`), puts every group's graph into one module as
``group_<k>`` (binary-conv kernels, which depend only on the layer shape, are shared; weight
constants with identical bytes are shared too, so the five groups do not store the shared
weights five times), compiles it with :func:`.float_schedules.relax_pipeline` and exports a
shared library (cross-linked with the TargetSpec's ``cc`` for arm64).

Calling convention of the library (what ``bidiff.runtime.backends.tvm`` relies on)::

    vm = tvm_ffi.load_module(path)["vm_load_executable"]()
    vm["vm_initialization"](1, 0, 2)             # kDLCPU, device 0, pooled allocator
    eps = vm["group_<k>"](x_t, cond, t)          # ONNX input order; x_t/cond f32 [1,3,S,S],
                                                 # t int64 [1,1] -> eps f32 [1,3,S,S]
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import tvm
import tvm_ffi
from tvm import relax

from bidiff.exporter.targets import KERNEL_FEATURES, TargetSpec
from bidiff.runtime.binary_op import OP_DOMAIN, OP_VERSION
from bidiff.exporter.tvm.float_schedules import relax_pipeline
from bidiff.exporter.tvm.frontend import from_onnx
from bidiff.exporter.tvm.target import tvm_target


class BuildError(RuntimeError):
    """A build that cannot proceed (message is one line, meant for the CLI)."""


def group_function(k: int) -> str:
    """Name of group ``k``'s function in the library."""
    return f"group_{int(k)}"


@dataclass(frozen=True)
class LibraryInfo:
    path: Path
    functions: dict[int, str]                       # group -> function name
    inputs: tuple[str, ...]                         # argument order of every group function
    outputs: tuple[str, ...]
    triple: str
    mcpu: str
    mattr: tuple[str, ...]
    kernels: dict[str, str] = field(default_factory=dict)   # binary kernel -> variant
    features: tuple[str, ...] = ()                  # CPU features the code relies on
    versions: dict[str, str] = field(default_factory=dict)   # apache-tvm, apache-tvm-ffi


def target_features(target: tvm.target.Target) -> tuple[str, ...]:
    """Those of ``targets.KERNEL_FEATURES`` that ``target`` has (sorted, LLVM spelling)."""
    return tuple(sorted(f for f in KERNEL_FEATURES
                        if tvm.target.codegen.target_has_features(f, target)))


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for dist in ("apache-tvm", "apache-tvm-ffi"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "unknown"
    return out


def check_cross_compiler(spec: TargetSpec) -> str | None:
    """The compiler to link with (None: the host default); raises if a cross ``cc`` is missing."""
    if spec.cc is None:
        return None
    if shutil.which(spec.cc) is None:
        raise BuildError(f"cross compiler {spec.cc!r} for target {spec.name!r} not found; "
                         f"install it with scripts/install_cross.sh")
    return spec.cc


@relax.expr_functor.mutator
class _ShareGlobals(relax.PyExprMutator):
    """Point call_tir GlobalVars at the module's canonical ones (by name) and replace constants
    by one canonical Constant per distinct content (so the VM's constant pool stores it once)."""

    def __init__(self, gvars: dict[str, tvm.ir.GlobalVar], consts: dict, mod=None):
        super().__init__(mod)
        self.gvars = gvars
        self.consts = consts

    def visit_global_var_(self, op):
        return self.gvars.get(op.name_hint, op)

    def visit_generic_const_(self, op):
        arr = op.value.numpy()
        key = (str(arr.dtype), arr.shape, hashlib.sha256(np.ascontiguousarray(arr).tobytes())
               .hexdigest())
        if key not in self.consts:
            self.consts[key] = op
        return self.consts[key]


def _check_op_version(model, path) -> None:
    """Refuse graphs written for another version of the bidiff custom op."""
    for o in model.opset_import:
        if o.domain == OP_DOMAIN and int(o.version) != OP_VERSION:
            raise BuildError(f"{path} uses {OP_DOMAIN} op version {o.version}; this bidiff "
                             f"compiles version {OP_VERSION}: re-export the graphs")
    meta = {p.key: p.value for p in model.metadata_props}
    if "op_version" in meta and meta["op_version"] != str(OP_VERSION):
        raise BuildError(f"{path} was exported for {OP_DOMAIN} op version {meta['op_version']}; "
                         f"this bidiff compiles version {OP_VERSION}: re-export the graphs")


def import_groups(onnx_model_paths: dict[int, str | os.PathLike], target: tvm.target.Target
                  ) -> tuple[tvm.IRModule, dict[str, str], tuple[str, ...], tuple[str, ...]]:
    """One IRModule with ``group_<k>`` per graph; returns (module, kernels, inputs, outputs)."""
    funcs: dict[str, tvm.ir.BaseFunc] = {}
    gvars: dict[str, tvm.ir.GlobalVar] = {}
    consts: dict = {}
    kernels: dict[str, str] = {}
    io = None
    for k in sorted(onnx_model_paths):
        path = Path(onnx_model_paths[k])
        if not path.is_file():
            raise BuildError(f"ONNX graph for group {k} not found: {path}")
        model = onnx.load(str(path))            # external weights resolve relative to path
        _check_op_version(model, path)
        ins = tuple(i.name for i in model.graph.input)
        outs = tuple(o.name for o in model.graph.output)
        if io is None:
            io = (ins, outs)
        elif io != (ins, outs):
            raise BuildError(f"group {k} has inputs {ins} / outputs {outs}, group "
                             f"{min(onnx_model_paths)} has {io[0]} / {io[1]}")
        mod, selected = from_onnx(model, target=target)
        kernels.update({name: variant.value for name, variant in selected})
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                continue
            name = gv.name_hint
            if name in funcs:
                if not tvm_ffi.structural_equal(funcs[name], func):
                    raise BuildError(f"kernel {name} differs between groups")
                continue
            funcs[name] = func
            gvars[name] = gv                    # the first group's GlobalVar (it carries ty)
        main = mod["main"]
        body = _ShareGlobals(gvars, consts).visit_expr(main)
        fname = group_function(k)
        funcs[fname] = body.with_attr("global_symbol", fname)
    out = tvm.IRModule({gvars.get(n, n): f for n, f in funcs.items()})
    return out, kernels, io[0], io[1]


# TVM's C++ log lines that are known noise for our graphs: the Relax ONNX frontend imports the
# channel Gathers as take(mode="fast") with in-range constant-derived indices.
_KNOWN_NATIVE_WARNINGS = ("Fast mode segfaults when there are out-of-bounds indices",)


@contextlib.contextmanager
def _filtered_native_stderr():
    """Hold back TVM's native (fd 2) log lines during a build, then re-emit all but the known
    noise, so an export prints its progress, not ~90 identical warnings."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as buf:
        os.dup2(buf.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            buf.seek(0)
            kept = [ln for ln in buf.read().decode(errors="replace").splitlines(keepends=True)
                    if not any(w in ln for w in _KNOWN_NATIVE_WARNINGS)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def build_library(onnx_model_paths: dict[int, str | os.PathLike], target: TargetSpec,
                  out_path: str | os.PathLike) -> LibraryInfo:
    """Compile the groups' graphs for ``target`` into the shared library ``out_path``.

    The library is written to a temporary file next to ``out_path`` and renamed at the end, so a
    failed build leaves nothing behind. Raises :class:`BuildError` (one line) for a missing
    cross compiler, a missing graph or groups that disagree.
    """
    if not target.native:
        raise BuildError(f"target {target.name!r} has no native library (portable ONNX only)")
    if not onnx_model_paths:
        raise BuildError("no ONNX graphs to compile")
    cc = check_cross_compiler(target)
    tgt = tvm_target(target)
    with _filtered_native_stderr():
        mod, kernels, inputs, outputs = import_groups(onnx_model_paths, tgt)
        ex = tvm.compile(mod, tgt, relax_pipeline=relax_pipeline(tgt))
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", prefix=".build-", dir=out.parent)
    os.close(fd)
    try:
        if cc is None:
            ex.export_library(tmp)
        else:
            ex.export_library(tmp, cc=cc)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return LibraryInfo(path=out, functions={k: group_function(k) for k in sorted(onnx_model_paths)},
                       inputs=inputs, outputs=outputs, triple=str(tgt.attrs["mtriple"]),
                       mcpu=str(tgt.attrs["mcpu"]), mattr=tuple(target.mattr), kernels=kernels,
                       features=target_features(tgt), versions=_versions())
