"""The ONNX writer: one static graph per timestep group, all sharing one weights file.

Why a hand-written graph (``onnx.helper``, walking the module tree) and not ``torch.onnx.export``:
the graph must contain things tracing cannot produce — one ``bidiff::BinaryConv2d`` node per
binary conv with its TaR bias folded into the threshold and alpha into the scale, bit-packed
weights, initializers that are *shared by name* across the five group graphs (one external data
file), stable node/tensor names, and byte-identical output on re-export. Walking the modules
gives all of that directly, the graph reads like docs/MODEL.md, and an unknown module type fails
loudly (``NotImplementedError`` naming its path) instead of being traced into something else.

Who writes what: each block of ``bidiff.models`` defines its structure in ``emit_onnx`` next to
its ``forward`` (which child runs on which tensor, skips, concat / split / pixel shuffle,
attention), against the interface of ``bidiff.models.graph.GraphBuilder``; the builder here
owns the primitive leaves (``PRIMITIVE_MODULES``: Conv2d, GroupNorm, Linear, BIConv, Sequential,
Identity/Dropout), naming, constants and initializers. A new block type is one change, in models/.

Graph interface (docs/CONTRACTS.md): inputs ``x_t`` float32 [1, 3, S, S], ``cond`` float32
[1, 3, S, S], ``t`` int64 [1, 1]; output ``eps`` float32 [1, 3, S, S]; S = the tile fixed at
export; batch 1 only (shapes are static; the group is fixed per graph). The timestep MLP is
inside the graph (Cast -> Mul by the frequency table -> Sin/Cos -> Gemm -> Swish -> Gemm).

Op mapping: Conv2d -> Conv; GroupNorm -> GroupNormalization (opset 21; onnxruntime's is the most
accurate of the decompositions measured: 2e-6 vs 4e-6 for InstanceNormalization at 32x128x128);
Swish -> x * Sigmoid(x); Linear -> Gemm (transB); BIConv -> BinaryConv2d, then TaA's RPReLU as
Add / PRelu / Add, then the residual Add; SelfAttention -> Conv 1x1, Reshape, Split, MatMul,
Div by sqrt(C) (as torch divides), Softmax, MatMul; PixelShuffle -> DepthToSpace (mode CRD equals
torch's ordering); PixelUnshuffle -> Reshape/Transpose/Reshape (ONNX SpaceToDepth orders the
channels differently from torch); CS-Fusion's odd/even channel mix -> Gather on the channel
axis of the concatenation (one node per fused input, exactly ``channel_shuffle_halves``);
CS-Fusion-FP -> one 1x1 Conv on the concatenation whose weight holds both convs' columns in the
mixed order (the Gathers, the second conv and the Add folded away).

``binary=False`` writes the plain float network instead (no custom op): the binarised input
(``Where(x >= threshold, 1, -1)``) goes through a standard Conv with alpha * sign(W) weights.
It is for size comparison and the benchmark baseline; it is not part of the artifact by default.

Weights: every initializer taken from the checkpoint lives in one safetensors file next to the
graphs (ONNX external data points into it: offset = 8 + header length + tensor offset); shared
tensors (packed bits, scales, full-precision weights) appear once under their module path, the
per-group ones (``<path>.g<k>.threshold`` / ``.bias0`` / ``.slope`` / ``.bias1``) once per
group. Small constants the writer derives (shapes, indices, the frequency table) are inline.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import set_external_data

from bidiff.models.graph import GraphBuilder
from bidiff.models.layers import BIConv
from bidiff.runtime.binary_op import OP_VERSION

from .onnx_binary_op import make_binary_conv_node, make_model
from .unroll import FoldedBIConv, fold_biconv, group_table

__all__ = ["WEIGHTS_FILE", "PRIMITIVE_MODULES", "GroupGraph", "build_group_graph",
           "write_onnx_graphs", "read_safetensors_index"]

WEIGHTS_FILE = "weights.safetensors"


@dataclass
class GroupGraph:
    """One group's graph before the weights are externalised."""
    model: onnx.ModelProto
    params: dict[str, np.ndarray]  # initializer name -> array (to go to the shared weights file)


@dataclass
class _Builder(GraphBuilder):
    """The ``GraphBuilder`` the modules' ``emit_onnx`` write into, for one group."""
    binary: bool
    group: int
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    consts: list[onnx.TensorProto] = field(default_factory=list)
    params: dict[str, np.ndarray] = field(default_factory=dict)
    _counts: dict[str, int] = field(default_factory=dict)

    # -- naming
    def fresh(self, base: str) -> str:
        n = self._counts.get(base, 0)
        self._counts[base] = n + 1
        return base if n == 0 else f"{base}__{n}"

    def const(self, base: str, value: np.ndarray) -> str:
        name = self.fresh("c:" + base)
        self.consts.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def param(self, name: str, value: np.ndarray) -> str:
        value = np.ascontiguousarray(value)
        if name in self.params:
            raise ValueError(f"parameter {name} written twice")
        self.params[name] = value
        return name

    def op(self, op_type: str, inputs: list[str], base: str, n_out: int = 1, **attrs) -> str | list[str]:
        outs = [self.fresh(base if n_out == 1 else f"{base}:{i}") for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=outs[0], **attrs))
        return outs[0] if n_out == 1 else outs

    def cast(self, x: str, dtype: type, base: str) -> str:
        return self.op("Cast", [x], base, to=helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))

    # -- primitive leaves (module, input tensor name, state_dict path -> output tensor name)
    def conv2d(self, m: torch.nn.Conv2d, x: str, path: str) -> str:
        w = m.weight.detach().float().numpy()
        ins = [x, self.param(f"{path}.weight", w)]
        if m.bias is not None:
            ins.append(self.param(f"{path}.bias", m.bias.detach().float().numpy()))
        (ph, pw), (sh, sw) = m.padding, m.stride
        return self.op("Conv", ins, path, kernel_shape=list(w.shape[2:]), pads=[ph, pw, ph, pw],
                       strides=[sh, sw])

    def linear(self, m: torch.nn.Linear, x: str, path: str) -> str:
        return self.op("Gemm", [x, self.param(f"{path}.weight", m.weight.detach().float().numpy()),
                                self.param(f"{path}.bias", m.bias.detach().float().numpy())],
                       path, transB=1)

    def group_norm(self, m: torch.nn.GroupNorm, x: str, path: str) -> str:
        return self.op("GroupNormalization",
                       [x, self.param(f"{path}.weight", m.weight.detach().float().numpy()),
                        self.param(f"{path}.bias", m.bias.detach().float().numpy())],
                       path, num_groups=int(m.num_groups), epsilon=float(m.eps))

    def biconv(self, m: torch.nn.Module, x: str, path: str) -> str:
        f: FoldedBIConv = fold_biconv(m, self.group, path)
        g = f"{path}.g{self.group}"
        thr = self.param(f"{g}.threshold", f.threshold)
        if self.binary:
            h = self.fresh(path + ".binary_conv")
            self.nodes.append(make_binary_conv_node(
                x, self.param(f"{path}.binary_conv.packed", f.packed),
                self.param(f"{path}.binary_conv.scale", f.scale), thr, h, kernel=f.kernel,
                channels=f.channels, pad=f.pad, stride=f.stride, name=h))
        else:
            pos = self.op("GreaterOrEqual", [x, self.op("Reshape", [thr, self.const("shape_c111", np.array([1, -1, 1, 1], np.int64))], path + ".threshold")], path + ".ge")
            pm1 = self.op("Where", [pos, self.const("plus_one", np.array(1.0, np.float32)),
                                    self.const("minus_one", np.array(-1.0, np.float32))], path + ".sign")
            p, s = f.pad, f.stride
            h = self.op("Conv", [pm1, self.param(f"{path}.binary_conv.weight_float", f.float_weight())],
                        path + ".binary_conv", kernel_shape=[f.kernel, f.kernel], pads=[p, p, p, p],
                        strides=[s, s])
        c = f.out_channels
        h = self.op("Add", [h, self.param(f"{g}.bias0", f.bias0.reshape(1, c, 1, 1))], path + ".TaA.bias0")
        h = self.op("PRelu", [h, self.param(f"{g}.slope", f.slope.reshape(c, 1, 1))], path + ".TaA.prelu")
        h = self.op("Add", [h, self.param(f"{g}.bias1", f.bias1.reshape(1, c, 1, 1))], path + ".TaA.bias1")
        return self.op("Add", [h, x], path)

    def sequential(self, m: torch.nn.Sequential, x: str, path: str) -> str:
        for name, child in m.named_children():
            x = self.module(child, x, f"{path}.{name}")
        return x

    def identity(self, m: torch.nn.Module, x: str, path: str) -> str:
        return x

    def module(self, m: torch.nn.Module, x: str, path: str, *args: Any) -> Any:
        """Emit ``m`` on tensor ``x``: a primitive leaf here, any other module through its own
        ``emit_onnx(builder, x, path, *args)`` (its structure is defined next to its forward)."""
        leaf = PRIMITIVE_MODULES.get(type(m))
        if leaf is not None:
            return leaf(self, m, x, path, *args)
        if hasattr(m, "emit_onnx"):
            return m.emit_onnx(self, x, path, *args)
        raise NotImplementedError(f"the ONNX writer does not know module {path} ({type(m).__name__}): "
                                  "it is no primitive leaf and has no emit_onnx method")


# The leaves the builder lowers itself, by exact type (a subclass may compute something else);
# every other module emits its own structure. Dropout is the identity in eval mode.
PRIMITIVE_MODULES: dict[type, Callable[..., str]] = {
    torch.nn.Conv2d: _Builder.conv2d, torch.nn.GroupNorm: _Builder.group_norm,
    torch.nn.Linear: _Builder.linear, BIConv: _Builder.biconv,
    torch.nn.Sequential: _Builder.sequential,
    torch.nn.Identity: _Builder.identity, torch.nn.Dropout: _Builder.identity,
}


def build_group_graph(model: torch.nn.Module, *, group: int, tile: int, binary: bool = True,
                      metadata: dict[str, str] | None = None) -> GroupGraph:
    """The graph of timestep group ``group`` at HR tile ``tile`` (weights still in memory)."""
    if tile % model.input_multiple:
        raise ValueError(f"tile {tile} is not a multiple of {model.input_multiple}")
    b = _Builder(binary=binary, group=group)
    with torch.no_grad():
        y = model.emit_onnx(b, "x_t", "cond", "t", tile)
    b.nodes.append(helper.make_node("Identity", [y], ["eps"], name="eps"))
    c_in = model.in_channel - model.out_channel
    inputs = [helper.make_tensor_value_info("x_t", TensorProto.FLOAT, [1, model.out_channel, tile, tile]),
              helper.make_tensor_value_info("cond", TensorProto.FLOAT, [1, c_in, tile, tile]),
              helper.make_tensor_value_info("t", TensorProto.INT64, [1, 1])]
    corr = model.final_conv.correction
    c_out = model.out_channel + (0 if corr is None else corr.out_channels)
    outputs = [helper.make_tensor_value_info("eps", TensorProto.FLOAT, [1, c_out, tile, tile])]
    # params become initializers here (with data, for an in-memory model); write_onnx_graphs
    # moves them to the shared file.
    inits = [numpy_helper.from_array(v, k) for k, v in b.params.items()] + b.consts
    graph = helper.make_graph(b.nodes, f"bidiff_group_{group}", inputs, outputs, initializer=inits)
    m = make_model(graph, custom_op=binary)
    m.producer_version = (metadata or {}).get("bidiff_version", "")
    helper.set_model_props(m, dict(sorted((metadata or {}).items())))
    return GroupGraph(model=m, params=b.params)


# --------------------------------------------------------------------------- shared weights

_ST_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.uint32): "U32", np.dtype(np.int64): "I64"}


def _write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> dict[str, tuple[int, int]]:
    """Write a standard safetensors file; returns name -> (absolute file offset, length).

    Tensors are laid out contiguously in sorted-name order (the format requires contiguous
    data), so the file is a function of the inputs only and re-exports are byte-identical. The
    header is padded to a multiple of 8, so every float32/uint32 tensor is 4-byte aligned.
    """
    names = sorted(tensors)
    header: dict = {"__metadata__": dict(sorted(metadata.items()))}
    pos = 0
    for n in names:
        a = tensors[n]
        if a.dtype not in _ST_DTYPES:
            raise TypeError(f"parameter {n} has unsupported dtype {a.dtype}")
        header[n] = {"dtype": _ST_DTYPES[a.dtype], "shape": list(a.shape),
                     "data_offsets": [pos, pos + a.nbytes]}
        pos += a.nbytes
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * ((-len(hb)) % 8)
    start = 8 + len(hb)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for n in names:
            a = np.ascontiguousarray(tensors[n])
            f.write(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes())
    return {n: (start + header[n]["data_offsets"][0], tensors[n].nbytes) for n in names}


def read_safetensors_index(path: str | os.PathLike) -> tuple[dict, int]:
    """(header dict, data start offset) of a safetensors file (for tests and tools)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


def write_onnx_graphs(model: torch.nn.Module, out_dir: str | os.PathLike, *, tile: int,
                      binary: bool = True, groups: Iterable[int] | None = None,
                      metadata: dict[str, str] | None = None,
                      progress: Callable[[str], None] | None = None, check: bool = True) -> dict[int, Path]:
    """Write ``group_<k>.onnx`` for each group plus the shared ``weights.safetensors``.

    ``check``: run ``onnx.checker.check_model(path, full_check=True)`` on every graph written.

    ``metadata`` (str -> str) goes into every graph's metadata_props, plus ``group``,
    ``t_min``, ``t_max``, ``tile`` and ``binary``. Returns group -> graph path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = {k: (lo, hi) for k, lo, hi in group_table(model)}
    groups = list(table) if groups is None else [int(k) for k in groups]
    built: dict[int, GroupGraph] = {}
    shared: dict[str, np.ndarray] = {}
    for k in groups:
        lo, hi = table[k]
        meta = dict(metadata or {})
        meta.update(group=str(k), t_min=str(lo), t_max=str(hi), tile=str(tile),
                    binary="packed" if binary else "float", op_version=str(OP_VERSION))
        gg = build_group_graph(model, group=k, tile=tile, binary=binary, metadata=meta)
        for name, arr in gg.params.items():
            if name in shared:
                if shared[name].dtype != arr.dtype or not np.array_equal(shared[name], arr):
                    raise AssertionError(f"shared parameter {name} differs between groups")
            else:
                shared[name] = arr
        built[k] = gg
        if progress:
            progress(f"graph {k}")
    offsets = _write_safetensors(out / WEIGHTS_FILE, shared,
                                 {"format": "bidiff-onnx-weights-1",
                                  "binary": "packed" if binary else "float"})
    paths = {}
    for k, gg in built.items():
        for init in gg.model.graph.initializer:
            if init.name in offsets:
                off, length = offsets[init.name]
                set_external_data(init, WEIGHTS_FILE, offset=off, length=length)
                init.data_location = TensorProto.EXTERNAL
                init.ClearField("raw_data")
        p = out / f"group_{k}.onnx"
        p.write_bytes(gg.model.SerializeToString(deterministic=True))
        if check:       # full check (shape inference through the function body); ~0.1 s a graph
            onnx.checker.check_model(str(p), full_check=True)
        paths[k] = p
    return paths
