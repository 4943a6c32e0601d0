"""Relax ONNX frontend with ``bidiff::BinaryConv2d`` lowered to our bit-serial kernels.

TVM's ONNX frontend has no hook for custom ops and ignores ``model.functions``; it looks every
node up by op_type in the module-level ``_get_convert_map()`` of
``tvm.relax.frontend.onnx.onnx_frontend`` (see TVM_NOTES). :func:`install` wraps that function
once so that the map also holds :class:`BinaryConv2d`, whose converter adds the scheduled
PrimFunc for the layer's static shape (``bb.add_func``) and returns ``relax.call_tir``.

The kernel variant depends on the compile target, which the frontend knows nothing about, so
:func:`from_onnx` takes the target and passes it to the converter through a context variable
that is set only for the duration of the import.

Node contract (planned by the ONNX exporter; bit conventions from ``bidiff.runtime.binary_op``):
domain ``bidiff``, op_type ``BinaryConv2d``; attributes ``kernel``, ``channels``, ``pad``,
``stride`` (ints); inputs ``X`` f32 [1, C, H, W], ``W_packed`` u32 [F, k, k, ceil(C/32)],
``scale`` f32 [F], optional ``threshold`` f32 [C] (bit = X >= threshold; default 0).
"""
from __future__ import annotations

import contextlib
import contextvars

import numpy as np
import tvm
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend

from bidiff.exporter.tvm.binary_conv import BinaryConvShape, KernelVariant, binary_conv_primfunc, \
    select_variant
from bidiff.runtime.binary_op import OP_NAME, num_words

_TARGET: contextvars.ContextVar[tvm.target.Target | None] = contextvars.ContextVar(
    "bidiff_tvm_target", default=None)
# (kernel name, variant) of every BinaryConv2d converted in the current import, in graph order
_SELECTED: contextvars.ContextVar[list | None] = contextvars.ContextVar(
    "bidiff_tvm_selected", default=None)


def _static_shape(expr: relax.Expr, what: str) -> tuple[int, ...]:
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        raise ValueError(f"BinaryConv2d: {what} needs a static tensor shape, got {ty}")
    try:
        return tuple(int(d) for d in ty.shape.values)
    except TypeError:
        raise ValueError(f"BinaryConv2d: {what} has a symbolic shape {ty.shape}; export with "
                         "static shapes") from None


def kernel_name(shape: BinaryConvShape, variant: KernelVariant) -> str:
    """Global symbol of the kernel for ``shape``: one PrimFunc per distinct layer shape."""
    return (f"bidiff_bconv_{variant.value}_c{shape.channels}_f{shape.filters}"
            f"_h{shape.height}_w{shape.width}_k{shape.kernel}")


class BinaryConv2d(onnx_frontend.OnnxOpConverter):
    """``bidiff::BinaryConv2d`` -> ``call_tir`` of the scheduled bit-serial kernel."""

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        target = _TARGET.get()
        if target is None:
            raise RuntimeError("BinaryConv2d needs a compile target: import the model with "
                               "bidiff.exporter.tvm.frontend.from_onnx(model, target=...)")
        if len(inputs) < 3:
            raise ValueError(f"BinaryConv2d takes X, W_packed, scale[, threshold]; got "
                             f"{len(inputs)} inputs")
        x, w, scale = inputs[0], inputs[1], inputs[2]
        thr = inputs[3] if len(inputs) > 3 else None
        kernel = int(attr.get("kernel", 3))
        channels = int(attr["channels"]) if "channels" in attr else None
        pad = int(attr.get("pad", kernel // 2))
        stride = int(attr.get("stride", 1))
        n, c, h, wd = _static_shape(x, "X")
        f, kh, kw, nw = _static_shape(w, "W_packed")
        if channels is not None and channels != c:
            raise ValueError(f"BinaryConv2d: attribute channels={channels} but X has {c}")
        if stride != 1 or pad != kernel // 2:
            raise NotImplementedError(f"BinaryConv2d: only stride 1 with 'same' padding is "
                                      f"compiled (got stride={stride}, pad={pad}, kernel={kernel})")
        if (kh, kw) != (kernel, kernel) or nw != num_words(c) or n != 1:
            raise ValueError(f"BinaryConv2d: W_packed {(f, kh, kw, nw)} does not fit kernel "
                             f"{kernel} and {c} channels (batch {n})")
        if w.ty.dtype != "uint32":
            raise ValueError(f"BinaryConv2d: W_packed must be uint32, got {w.ty.dtype}")
        if thr is None:
            thr = relax.const(np.zeros((c,), np.float32))
        shape = BinaryConvShape(channels=c, filters=f, height=h, width=wd, kernel=kernel)
        variant = select_variant(target)
        name = kernel_name(shape, variant)
        gvar = _lookup_or_add(bb, name, lambda: binary_conv_primfunc(shape, variant, name=name))
        selected = _SELECTED.get()
        if selected is not None:
            selected.append((name, variant))
        return relax.call_tir(gvar, [x, w, scale, thr],
                              out_ty=relax.TensorType((n, f, h, wd), "float32"))


def _lookup_or_add(bb: relax.BlockBuilder, name: str, make) -> tvm.ir.GlobalVar:
    mod = bb.get()
    for gv in mod.get_global_vars():
        if gv.name_hint == name:
            return gv
    return bb.add_func(make(), name)


_ORIGINAL_MAP = None


def install() -> None:
    """Add ``BinaryConv2d`` to the Relax ONNX frontend's converter map (idempotent)."""
    global _ORIGINAL_MAP
    if _ORIGINAL_MAP is not None:
        return
    _ORIGINAL_MAP = onnx_frontend._get_convert_map

    def _get_convert_map():
        table = _ORIGINAL_MAP()
        table[OP_NAME] = BinaryConv2d
        return table

    onnx_frontend._get_convert_map = _get_convert_map


@contextlib.contextmanager
def _import_context(target: tvm.target.Target, selected: list):
    t1, t2 = _TARGET.set(target), _SELECTED.set(selected)
    try:
        yield
    finally:
        _TARGET.reset(t1)
        _SELECTED.reset(t2)


def from_onnx(model, *, target: tvm.target.Target, **kwargs) -> tuple[tvm.IRModule, list]:
    """Import ``model`` (``onnx.ModelProto``) into Relax with BinaryConv2d kernels for ``target``.

    Returns ``(module, selected)`` where ``selected`` lists ``(kernel name, KernelVariant)`` for
    each BinaryConv2d node, so callers and tests can see which schedule was used.
    ``kwargs`` go to ``tvm.relax.frontend.onnx.from_onnx`` (e.g. ``shape_dict``).
    """
    install()
    selected: list = []
    with _import_context(target, selected):
        mod = onnx_frontend.from_onnx(model, **kwargs)
    return mod, selected
