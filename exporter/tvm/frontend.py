"""Relax ONNX frontend with ``bidiff::BinaryConv2d`` lowered to our bit-serial kernels.

TVM's ONNX frontend has no hook for custom ops and ignores ``model.functions``; it looks every
node up by op_type in the module-level ``_get_convert_map()`` of
``tvm.relax.frontend.onnx.onnx_frontend`` (see docs/tvm-notes.md). :func:`install` wraps that function
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
import hashlib

import numpy as np
import tvm
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend

from bidiff.exporter.tvm.binary_conv import (MAX_MAP_PIECES, BinaryConvShape, KernelVariant,
                                             affine_pieces, binary_conv_primfunc, select_variant)
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
    epi = {"none": "", "rprelu": "_rprelu"}[shape.epilogue] + ("_res" if shape.residual else "") \
        + ("_add" if shape.addend else "")
    if shape.channel_map:
        digest = hashlib.sha256(np.asarray(shape.channel_map, np.int64).tobytes()).hexdigest()
        epi += f"_from{shape.source_channels}_{digest[:8]}"
    return (f"bidiff_bconv_{variant.value}_c{shape.channels}_f{shape.filters}"
            f"_h{shape.height}_w{shape.width}_k{shape.kernel}{epi}")


def _flat_param(expr: relax.Expr, f: int, what: str) -> relax.Expr:
    """A per-output-channel parameter ([1,F,1,1], [F,1,1], [F] or one value) as an f32 [F]."""
    if isinstance(expr, tvm.ir.expr.Constant):
        arr = np.asarray(expr.value.numpy(), np.float32).reshape(-1)
        if arr.size == 1:
            arr = np.repeat(arr, f)
        if arr.size != f:
            raise ValueError(f"BinaryConv2d epilogue: {what} has {arr.size} values, expected {f}")
        return relax.const(np.ascontiguousarray(arr))
    size = int(np.prod(_static_shape(expr, what)))
    if size != f:
        raise ValueError(f"BinaryConv2d epilogue: {what} has {size} values, expected {f}")
    return relax.op.reshape(expr, (f,))


def _convert(bb, inputs, attr, *, epilogue: str, residual: bool):
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
    channel_map = tuple(int(i) for i in attr.get("channel_index", ()))
    source_channels = c if channel_map else 0
    if channel_map:                          # a folded Gather / Split (fuse_binary_epilogues)
        c = len(channel_map)
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
    args = [x, w, scale, thr]
    if epilogue == "rprelu":
        args += [_flat_param(e, f, nm) for e, nm in zip(inputs[4:7], ("bias0", "slope", "bias1"))]
    addend = inputs[7] if epilogue == "rprelu" and len(inputs) > 7 else None
    if addend is not None and _static_shape(addend, "addend") == (n, f, h, wd):
        args.append(addend)
    shape = BinaryConvShape(channels=c, filters=f, height=h, width=wd, kernel=kernel,
                            epilogue=epilogue, residual=residual, channel_map=channel_map,
                            source_channels=source_channels,
                            addend=addend is not None and len(args) == 8)
    variant = select_variant(target)
    name = kernel_name(shape, variant)
    gvar = _lookup_or_add(bb, name, lambda: binary_conv_primfunc(shape, variant, name=name))
    selected = _SELECTED.get()
    if selected is not None:
        selected.append((name, variant))
    y = relax.call_tir(gvar, args, out_ty=relax.TensorType((n, f, h, wd), "float32"))
    if addend is not None and not shape.addend:       # a broadcasting Add: not in the kernel
        y = bb.emit(y)
        return relax.op.add(y, addend)
    return y


class BinaryConv2d(onnx_frontend.OnnxOpConverter):
    """``bidiff::BinaryConv2d`` -> ``call_tir`` of the scheduled bit-serial kernel."""

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        return _convert(bb, inputs, attr, epilogue="none", residual=False)


class BinaryConv2dRPReLU(onnx_frontend.OnnxOpConverter):
    """Internal ``BinaryConv2d`` + TaA RPReLU (+ identity shortcut), written only by
    :func:`fuse_binary_epilogues` for the import; never part of an exported graph."""

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        return _convert(bb, inputs, attr, epilogue="rprelu",
                        residual=bool(int(attr.get("residual", 0))))


FUSED_OP = "BinaryConv2dRPReLU"
FUSED_DOMAIN = "bidiff.tvm"


def fuse_binary_epilogues(model):
    """Rewrite ``BinaryConv2d -> Add(b0) -> PRelu(slope) -> Add(b1) [-> Add(X)] [-> Add(e)]
    [-> Add(z)]`` chains (TaA after a binary conv, then the BIConv shortcut, then a ResBlock's
    timestep embedding, then a ResBlock's skip or CS-Fusion's other half) into one internal
    node, so the kernel applies them in its epilogue. b0 / slope / b1 must be initializers;
    ``e`` is a per-channel vector (``Unsqueeze(axes=[2, 3])`` of a [1, C] result, the exporter's
    timestep embedding) folded into b1 by a small Add of [C] vectors before the kernel; ``z``
    is any other tensor, an 8th input (the converter keeps a broadcasting one as an Add after
    the kernel). Intermediate results must have no other consumer. The fused node
    takes the place of the chain's last node, so every input it reads is computed by then.
    A channel ``Gather`` (constant, piecewise-affine indices: CS-Fusion's odd/even mix) or a
    ``Split`` part (CP-Down's halves) whose result only this chain reads folds in too: the node
    reads the whole input, with the channels as attribute ``channel_index``, and the kernel
    picks them while packing (the Gather / Split wrote a copy of its input per conv).
    Returns (new model, number of chains fused); ``model`` is not modified.
    """
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    inits = {i.name for i in g.initializer}
    outputs = {o.name for o in g.output}
    consumers: dict[str, list] = {}
    for node in g.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)

    def only_consumer(name):
        cs = consumers.get(name, [])
        return cs[0] if len(cs) == 1 and name not in outputs else None

    def other(node, name):
        a, b = node.input
        return b if a == name else a if b == name else None

    producers = {o: node for node in g.node for o in node.output}
    init_values = {i.name: i for i in g.initializer}

    def channel_vector(name) -> bool:      # Unsqueeze(axes=[2, 3]) of a rank-2 [1, C] result
        node = producers.get(name)
        if node is None or node.op_type != "Unsqueeze" or len(node.input) != 2:
            return False
        axes = init_values.get(node.input[1])
        return axes is not None and onnx.numpy_helper.to_array(axes).tolist() == [2, 3]

    def channel_selection(name, readers):
        """(source tensor, channel index, producing node) when ``name`` is channels of another
        tensor picked by a Gather (constant, piecewise-affine indices) or one output of a
        Split (constant sizes) on axis 1, and only ``readers`` read it; else None."""
        node = producers.get(name)
        if node is None or node.op_type not in ("Gather", "Split") or name in outputs or \
                {id(c) for c in consumers.get(name, [])} != readers or \
                next((a.i for a in node.attribute if a.name == "axis"), 0) != 1 or \
                len(node.input) < 2 or node.input[1] not in init_values:
            return None
        values = onnx.numpy_helper.to_array(init_values[node.input[1]]).astype(np.int64)
        if values.ndim != 1:
            return None
        if node.op_type == "Split":
            k = list(node.output).index(name)
            start = int(values[:k].sum())
            index = list(range(start, start + int(values[k])))
        else:
            index = values.tolist()
        if not index or min(index) < 0 or \
                len(affine_pieces(tuple(index))) > MAX_MAP_PIECES:
            return None
        return node.input[0], index, node

    flat_shape = None

    remove, replace = set(), {}
    folded: dict[int, set[str]] = {}        # channel-picking node -> its outputs folded so far
    for node in g.node:
        if node.op_type != OP_NAME or len(node.input) != 4:
            continue
        x = node.input[0]
        add0 = only_consumer(node.output[0])
        if add0 is None or add0.op_type != "Add" or other(add0, node.output[0]) not in inits:
            continue
        prelu = only_consumer(add0.output[0])
        if prelu is None or prelu.op_type != "PRelu" or prelu.input[0] != add0.output[0] \
                or prelu.input[1] not in inits:
            continue
        add1 = only_consumer(prelu.output[0])
        if add1 is None or add1.op_type != "Add" or other(add1, prelu.output[0]) not in inits:
            continue
        chain, last, residual = [add0, prelu, add1], add1, 0
        b1 = other(add1, prelu.output[0])
        add2 = only_consumer(add1.output[0])
        if add2 is not None and add2.op_type == "Add" and other(add2, add1.output[0]) == x:
            chain.append(add2)
            last, residual = add2, 1
        before = []
        add3 = only_consumer(last.output[0])
        if add3 is not None and add3.op_type == "Add" and \
                channel_vector(other(add3, last.output[0])):
            if flat_shape is None:
                flat_shape = _unique_name(g, "bidiff_tvm_flat")
                g.initializer.append(onnx.numpy_helper.from_array(
                    np.array([-1], np.int64), flat_shape))
            e, stem = other(add3, last.output[0]), (node.name or node.output[0]) + ".b1"
            before = [onnx.helper.make_node("Reshape", [b1, flat_shape], [stem + "_flat"]),
                      onnx.helper.make_node("Reshape", [e, flat_shape], [stem + "_e"]),
                      onnx.helper.make_node("Add", [stem + "_flat", stem + "_e"], [stem])]
            b1 = stem
            chain.append(add3)
            last = add3
        addend = []
        add4 = only_consumer(last.output[0])
        if add4 is not None and add4.op_type == "Add" and id(add4) not in replace and \
                other(add4, last.output[0]) not in (None, last.output[0], *inits) and \
                not channel_vector(other(add4, last.output[0])):
            addend = [other(add4, last.output[0])]
            chain.append(add4)
            last = add4
        fused = onnx.helper.make_node(
            FUSED_OP, [*node.input, other(add0, node.output[0]), prelu.input[1], b1, *addend],
            [last.output[0]], name=(node.name or node.output[0]) + ".fused", domain=FUSED_DOMAIN)
        fused.attribute.extend(node.attribute)
        fused.attribute.append(onnx.helper.make_attribute("residual", residual))
        picked = channel_selection(x, {id(node)} | ({id(add2)} if residual else set()))
        if picked is not None:
            source, index, producer = picked
            fused.input[0] = source
            fused.attribute.append(onnx.helper.make_attribute("channel_index", index))
            folded.setdefault(id(producer), set()).add(x)
            if folded[id(producer)] == set(producer.output):   # a Split: once all its parts
                remove.add(id(producer))
        replace[id(last)] = [*before, fused]
        remove.add(id(node))
        remove.update(id(c) for c in chain if c is not last)
    if not replace:
        return m, 0
    nodes = [n2 for n in g.node if id(n) not in remove for n2 in replace.get(id(n), [n])]
    del g.node[:]
    g.node.extend(nodes)
    if all(o.domain != FUSED_DOMAIN for o in m.opset_import):
        m.opset_import.append(onnx.helper.make_opsetid(FUSED_DOMAIN, 1))
    return m, len(replace)


def _unique_name(graph, stem: str) -> str:
    taken = {i.name for i in graph.initializer} | {o for n in graph.node for o in n.output} | \
        {i.name for i in graph.input}
    name, k = stem, 0
    while name in taken:
        k += 1
        name = f"{stem}_{k}"
    return name


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
        table[FUSED_OP] = BinaryConv2dRPReLU
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


def from_onnx(model, *, target: tvm.target.Target, fuse_epilogues: bool = True,
              **kwargs) -> tuple[tvm.IRModule, list]:
    """Import ``model`` (``onnx.ModelProto``) into Relax with BinaryConv2d kernels for ``target``.

    ``fuse_epilogues`` (default True): TaA's RPReLU and the identity shortcut after a binary conv
    run in the kernel's epilogue (:func:`fuse_binary_epilogues`) instead of separate passes.
    Returns ``(module, selected)`` where ``selected`` lists ``(kernel name, KernelVariant)`` for
    each binary conv, so callers and tests can see which schedule was used.
    ``kwargs`` go to ``tvm.relax.frontend.onnx.from_onnx`` (e.g. ``shape_dict``).
    """
    install()
    if fuse_epilogues:
        model, _ = fuse_binary_epilogues(model)
    selected: list = []
    with _import_context(target, selected):
        mod = onnx_frontend.from_onnx(model, **kwargs)
    return mod, selected
