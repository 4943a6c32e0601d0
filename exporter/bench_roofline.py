"""Roofline of one denoising step (bench part r): per kernel class, the ideal time of its work
at this CPU's measured peak rates (``bench_peaks``) next to the time the compiled step spends
in that class (the per-call profile of the Relax VM).

Work is counted from the step's binary ONNX graph after the import's own epilogue fusion
(``exporter.tvm.frontend.fuse_binary_epilogues``: a binary conv node carries its RPReLU,
shortcut, addend and folded channel map, as its kernel does), with shapes from ONNX shape
inference (binary convs stand in as plain Convs of their shape for it):

- binary convs: popcount words at the kernel's word width (``word_bits``) and binary MACs
  (F * H * W * k^2 * C); their float part (packing compares, epilogue) as FLOPs;
- float convs, MatMul, Gemm: 2 FLOPs per multiply-add (the direct algorithm: Winograd does
  fewer multiplies, so such a conv can beat its ideal);
- GroupNormalization 7 FLOPs per element, exp-like ops (Sigmoid, Exp, Sin, Cos, Tanh, Erf) 10,
  Softmax 13, other elementwise ops 1; views (Reshape, Unsqueeze, ...) nothing;
- bytes: every tensor a node reads and writes once, except tensors passed inside a fused chain.

Classes follow the kernels TVM compiles: elementwise ops whose input comes only to elementwise
consumers of a conv, matmul or GroupNorm join that class (TVM's FuseOps does the same: conv +
bias + residual add, GroupNorm + affine + Swish, matmul + scale), and the VM's call names are
classified by :func:`classify_kernel`. A node's ideal time is the larger of its compute time
(popcount words and FLOPs at their rates) and its memory time (bytes at the stream rate).
Counting needs onnx; the report only the counts and the measured times.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

BINARY_OPS = ("BinaryConv2d", "BinaryConv2dRPReLU")
FLOAT_CONV = "float conv"
GROUPNORM = "GroupNorm + Swish"
MATMUL = "matmul, softmax (attention, timestep MLP)"
ELEMENTWISE = "elementwise, copies"
VM_BUILTIN = "VM (allocation, reshape)"
VIEW_OPS = ("Reshape", "Unsqueeze", "Squeeze", "Identity", "Flatten", "Shape", "Constant")
TRANSCENDENTAL_OPS = ("Sigmoid", "Exp", "Sin", "Cos", "Tanh", "Erf", "Log")
ELEMENTWISE_OPS = ("Add", "Sub", "Mul", "Div", "PRelu", "Relu", "Neg", "Sqrt", "Pow", "Max",
                   "Min", "Cast", *TRANSCENDENTAL_OPS)
GROUPNORM_FLOPS, TRANSCENDENTAL_FLOPS, SOFTMAX_FLOPS = 7, 10, 13


@dataclass
class NodeWork:
    """The work of one node (or fused binary conv) of the graph."""

    cls: str
    words: float = 0.0        # popcount words at ``word_bits``
    word_bits: int = 0
    macs: float = 0.0         # binary multiply-accumulates
    flops: float = 0.0
    bytes: float = 0.0


@dataclass
class ClassWork:
    """A kernel class: its nodes' work summed and its ideal time in seconds."""

    cls: str
    nodes: int = 0
    words: dict[int, float] = field(default_factory=dict)
    macs: float = 0.0
    flops: float = 0.0
    bytes: float = 0.0
    ideal_s: float = 0.0
    bound: dict[str, float] = field(default_factory=dict)   # seconds per limiting rate


def binary_class(channels: int, filters: int, height: int, width: int, kernel: int) -> str:
    """The shape class of a binary conv, as the graph and the kernel name both give it."""
    return f"binary {kernel}x{kernel} {channels}->{filters} @{height}x{width}"


_BCONV_NAME = re.compile(r"^bidiff_bconv_[a-z0-9_]+?_c(\d+)_f(\d+)_h(\d+)_w(\d+)_k(\d+)")


def classify_kernel(name: str) -> str:
    """The class of a VM call by its name (``frontend.kernel_name`` for binary convs, TVM's
    fused-function names for the rest)."""
    m = _BCONV_NAME.match(name)
    if m:
        c, f, h, w, k = (int(v) for v in m.groups())
        return binary_class(c, f, h, w, k)
    if name.startswith("vm."):
        return VM_BUILTIN
    if "conv2d" in name:
        return FLOAT_CONV
    if "group_norm" in name:
        return GROUPNORM
    if "matmul" in name or "softmax" in name:
        return MATMUL
    return ELEMENTWISE


def _attr(node, name: str, default=None):
    from onnx import helper
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _shapes(model) -> dict[str, tuple[int, ...]]:
    """Static shapes of every tensor: ONNX shape inference on a copy where each binary conv
    stands in as a Conv of its shape and each GroupNormalization as an Identity (inference
    sees into neither: a custom op, and a function op it leaves untyped in onnx 1.23)."""
    import onnx
    from onnx import TensorProto, helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {i.name: tuple(i.dims) for i in m.graph.initializer}
    nodes = []
    for node in m.graph.node:
        if node.op_type in BINARY_OPS:
            k, filters = int(_attr(node, "kernel", 3)), inits[node.input[1]][0]
            stand_in = f"{node.output[0]}.roofline_w"
            m.graph.input.append(helper.make_tensor_value_info(
                stand_in, TensorProto.FLOAT, [filters, "channels", k, k]))
            node = helper.make_node("Conv", [node.input[0], stand_in], [node.output[0]],
                                    pads=[k // 2] * 4)
        elif node.op_type == "GroupNormalization":
            node = helper.make_node("Identity", [node.input[0]], [node.output[0]])
        nodes.append(node)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    m = onnx.shape_inference.infer_shapes(m, strict_mode=False)
    shapes = dict(inits)
    for vi in (*m.graph.value_info, *m.graph.input, *m.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = tuple(d.dim_value for d in dims)
    return shapes


def _classes(graph) -> list[str]:
    """Each node's class: by op type, then elementwise epilogues joined to their producer."""
    base = []
    for node in graph.node:
        op = node.op_type
        base.append(BINARY_OPS[0] if op in BINARY_OPS else FLOAT_CONV if op == "Conv" else
                    GROUPNORM if op == "GroupNormalization" else
                    MATMUL if op in ("MatMul", "Gemm", "Softmax") else ELEMENTWISE)
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(graph.node):
        for t in node.input:
            consumers.setdefault(t, []).append(i)
    outputs = {o.name for o in graph.output}
    cls = list(base)
    for i, node in enumerate(graph.node):       # topological order: chains extend forward
        if cls[i] not in (FLOAT_CONV, GROUPNORM, MATMUL):
            continue
        for t in node.output:
            users = consumers.get(t, [])
            if t in outputs or not all(graph.node[j].op_type in ELEMENTWISE_OPS for j in users):
                continue
            for j in users:
                if cls[j] == ELEMENTWISE:
                    cls[j] = cls[i]
    return cls


def count_work(model, word_bits: Callable[[int, int], int]) -> list[NodeWork]:
    """The work of every node of ``model`` (an ``onnx.ModelProto`` of one step, binary convs
    fused as the import fuses them: see the module docstring). ``word_bits(channels, kernel)``:
    the packed word width the target's binary kernel uses for that layer."""
    graph = model.graph
    shapes = _shapes(model)
    cls = _classes(graph)
    inits = {i.name for i in graph.initializer}
    producer = {t: i for i, node in enumerate(graph.node) for t in node.output}
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(graph.node):
        for t in node.input:
            consumers.setdefault(t, []).append(i)
    outputs = {o.name for o in graph.output}

    def size(t: str) -> int:
        if t not in shapes:
            raise ValueError(f"roofline: no static shape for tensor {t!r}")
        return math.prod(shapes[t])

    def internal(t: str) -> bool:        # passed inside one fused chain: never in memory
        i = producer.get(t)
        return i is not None and t not in outputs and cls[i] != BINARY_OPS[0] and \
            all(cls[j] == cls[i] for j in consumers.get(t, []))

    out: list[NodeWork] = []
    for i, node in enumerate(graph.node):
        op = node.op_type
        if op in VIEW_OPS:
            out.append(NodeWork(cls[i]))
            continue
        ins = [t for t in dict.fromkeys(node.input) if t]
        y = size(node.output[0])
        moved = sum(size(t) for t in ins if t in inits or not internal(t)) + \
            sum(size(t) for t in node.output if t and not internal(t))
        work = NodeWork(cls[i], bytes=4.0 * moved)
        if op in BINARY_OPS:
            work = _binary_work(node, shapes, word_bits)
        elif op == "Conv":
            w = shapes[node.input[1]]
            work.flops = 2.0 * y * math.prod(w[1:]) + (y if len(ins) > 2 else 0)
        elif op in ("MatMul", "Gemm"):
            a = shapes[node.input[0]]
            depth = a[0] if op == "Gemm" and _attr(node, "transA", 0) else a[-1]
            work.flops = 2.0 * y * depth + (y if op == "Gemm" and len(ins) > 2 else 0)
        elif op == "GroupNormalization":
            work.flops = GROUPNORM_FLOPS * y
        elif op == "Softmax":
            work.flops = SOFTMAX_FLOPS * y
        elif op in TRANSCENDENTAL_OPS:
            work.flops = TRANSCENDENTAL_FLOPS * y
        elif op in ELEMENTWISE_OPS:
            work.flops = float(y)
        out.append(work)
    return out


def _binary_work(node, shapes: dict, word_bits: Callable[[int, int], int]) -> NodeWork:
    """A (fused) binary conv: popcount words and MACs, plus its float packing and epilogue,
    and its bytes: the channels it packs, the packed weights and per-filter parameters, its
    output and an addend (a residual re-reads the packed input, counted once)."""
    index = _attr(node, "channel_index")
    _, src, h, w = shapes[node.input[0]]
    c = len(index) if index else src
    f, k = shapes[node.input[1]][0], int(_attr(node, "kernel", 3))
    bits = word_bits(c, k)
    pixels = float(f * h * w)
    rprelu = node.op_type == BINARY_OPS[1]
    residual = bool(_attr(node, "residual", 0))
    addend = rprelu and len(node.input) > 7 and bool(node.input[7])
    epilogue = 2 + (4 if rprelu else 0) + residual + addend
    params = sum(math.prod(shapes[t]) for t in node.input[1:7] if t)
    return NodeWork(binary_class(c, f, h, w, k), words=pixels * k * k * -(-c // bits),
                    word_bits=bits, macs=pixels * k * k * c,
                    flops=float(c * h * w) + epilogue * pixels,
                    bytes=4.0 * (c * h * w + params + pixels * (1 + addend)))


def work_to_json(work: list[NodeWork]) -> list[dict]:
    return [asdict(w) for w in work]


def work_from_json(rows: list[dict]) -> list[NodeWork]:
    return [NodeWork(**r) for r in rows]


def ideal(work: list[NodeWork], rates: dict[str, float], threads: int) -> list[ClassWork]:
    """Per class (in first-seen order), the work summed and the ideal seconds at ``threads``
    times the per-thread ``rates`` (``popcount<bits>`` words/s, ``fma`` FLOP/s, ``stream``
    bytes/s). Each node takes the larger of its compute and memory time; ``bound`` says how
    much of the class's ideal each limit accounts for."""
    classes: dict[str, ClassWork] = {}
    for w in work:
        c = classes.setdefault(w.cls, ClassWork(w.cls))
        c.nodes += 1
        if w.words:
            c.words[w.word_bits] = c.words.get(w.word_bits, 0.0) + w.words
        c.macs += w.macs
        c.flops += w.flops
        c.bytes += w.bytes
        popcount = w.words / (threads * rates[f"popcount{w.word_bits}"]) if w.words else 0.0
        fma = w.flops / (threads * rates["fma"])
        memory = w.bytes / (threads * rates["stream"])
        limit = ("memory", memory) if memory >= popcount + fma else \
            ("popcount", popcount + fma) if popcount >= fma else ("FMA", popcount + fma)
        c.ideal_s += limit[1]
        c.bound[limit[0]] = c.bound.get(limit[0], 0.0) + limit[1]
    return list(classes.values())


def measured_by_class(kernel_ms: dict[str, float], kernel_calls: dict[str, int]
                      ) -> dict[str, tuple[float, int]]:
    """(ms, calls) per class of a step's per-kernel profile."""
    out: dict[str, tuple[float, int]] = {}
    for name, ms in kernel_ms.items():
        cls = classify_kernel(name)
        t, n = out.get(cls, (0.0, 0))
        out[cls] = (t + ms, n + kernel_calls.get(name, 0))
    return out


@dataclass(frozen=True)
class DeviceRates:
    """Peak rates of a device we cannot measure here, per core, from its core's published
    instruction throughputs (not measured: an estimate is only as good as these)."""

    name: str
    cores: int
    rates: dict[str, float]      # popcount<bits> words/s, fma FLOP/s, stream bytes/s (all cores)
    source: str


# Cortex-A72 at 1.5 GHz (Raspberry Pi 4), Arm's software optimisation guide: ASIMD CNT and EOR
# issue on both FP pipes, UADALP (the accumulate of a 16-bit count) on one: one 128-bit vector of
# 16-bit words a cycle; FMLA .4s on both pipes: 16 FLOP a cycle; LPDDR4-3200 on a 32-bit bus,
# ~4 GB/s measured by STREAM-like copies for all four cores together.
RPI4 = DeviceRates("rpi4 (Cortex-A72, 4 cores at 1.5 GHz)", 4,
                   {"popcount16": 8 * 1.5e9, "popcount32": 4 * 1.5e9, "popcount64": 2 * 1.5e9,
                    "fma": 16 * 1.5e9, "stream": 4e9 / 4},
                   "Cortex-A72 software optimisation guide throughputs; STREAM-like copy ~4 GB/s")


def _class_ideal_s(row: dict, rates: dict[str, float], cores: int,
                   bits: Callable[[int], int]) -> float:
    """A class's ideal seconds from its summed work (the larger of compute and memory), with
    its popcount words re-counted at ``bits(word_bits_here)``."""
    popcount = sum(v * int(b) / bits(int(b)) / (cores * rates[f"popcount{bits(int(b))}"])
                   for b, v in row["words"].items())
    return max(popcount + row["flops"] / (cores * rates["fma"]),
               row["bytes"] / (cores * rates["stream"]))


def estimate_on(result: dict, device: DeviceRates, bits: Callable[[int], int]
                ) -> tuple[list[tuple[str, float]], float]:
    """Per class and for the step, the ms a part-r ``result`` measured here predicts on
    ``device``: each class's measured time scaled by its ideal time there over its ideal time
    here, both from the class's summed work (the kernels are assumed to reach the same
    fraction of the roofline on both CPUs). ``bits(word_bits_here)``: the word width of the
    device's binary kernels for layers that use that width here. Classes without a work
    model (the VM's own calls) are taken as measured."""
    out = []
    for r in result["rows"]:
        here = _class_ideal_s(r, result["rates"], result["threads"], lambda b: b)
        there = _class_ideal_s(r, device.rates, device.cores, bits)
        out.append((r["class"], r["measured_ms"] * there / here if here else r["measured_ms"]))
    return out, sum(ms for _, ms in out)
