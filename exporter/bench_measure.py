"""Measuring a bench bundle on this machine through the device runtime (apache-tvm-ffi +
libtvm_runtime, never ``import tvm``), so a CPU without the TVM compiler runs what it runs in
production. Part c also needs torch here (its float ONNX and PyTorch contender are rebuilt).

Timings are medians over interleaved rounds (``bidiff.runtime.benchmark.interleaved``: each
round times a block of at least ``repeat`` calls and ``min_block_ms`` of every contender in
turn, in an order that rotates per round, after a short pause and one untimed call), so load
from other jobs hits all contenders alike; on a busy machine absolute times mean little, ratios
more. Every TVM contender is checked against a reference before it is timed.
"""
from __future__ import annotations

import collections
import json
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .bench import BUNDLE_FILE, BUNDLE_VERSION, BenchOptions


def _timer(fn, repeat):
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat * 1e3


def interleaved_blocks(contenders: dict, rounds: int, repeat: int,
                 min_block_ms: float = 0.0) -> dict[str, list[float]]:
    """``bidiff.runtime.benchmark.interleaved`` (rotating order, pause, one untimed call per
    block) with blocks of ``repeat`` calls, or as many as fill ``min_block_ms`` (calibrated once
    per contender): sub-millisecond ops timed 10 calls at a time measured mostly the wake-up of
    idle pool threads and the previous contender's still-spinning ones (a TVM add of 4 MB: 0.78
    ms per call in blocks of 10, 0.14 ms back to back; onnxruntime 0.43 vs 0.18-0.24 ms)."""
    from bidiff.runtime.benchmark import interleaved
    calls = {}
    for k, fn in contenders.items():
        fn()
        t = _timer(fn, repeat)
        calls[k] = max(repeat, int(min_block_ms / max(t, 1e-6)) + 1 if min_block_ms else 0)
    return interleaved(contenders, rounds, calls)


def _medians(samples: dict[str, list[float]]) -> dict[str, float]:
    import numpy as np
    return {k: float(np.median(v)) for k, v in samples.items()}


def _ort_session(path: Path, threads: int):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class _Loader:
    """Loads bundle libraries through the device runtime's TVM loader (no ``import tvm``)."""

    def __init__(self, threads: int):
        from bidiff.runtime.backends import tvm as backend
        self.ffi = backend.load_tvm_runtime(threads)
        self._backend = backend

    def tensor(self, a):
        buf = self._backend.aligned_copy(a)
        return buf, self.ffi.from_dlpack(buf)     # keep buf alive with the tensor

    def function(self, lib: Path, name: str):
        return self.ffi.load_module(str(lib))[name]

    def vm(self, lib: Path):
        return self._backend.load_vm(self.ffi, lib)


def _run_a(spec: dict, root: Path, opts: BenchOptions) -> dict:
    import numpy as np

    from bidiff.runtime.binary_op import binary_conv2d_reference
    c, s, k = spec["channels"], spec["size"], spec["kernel"]
    data = np.load(root / spec["inputs"])
    x, w, wp, scale, thr = (data[n] for n in ("x", "w", "wp", "scale", "thr"))
    ref = binary_conv2d_reference(x, wp, scale, channels=c, kernel=k)
    load = _Loader(opts.threads)
    keep, contenders = [], {}
    for variant, lib in spec["kernels"].items():
        fn = load.function(root / lib, "k")
        pairs = [load.tensor(a) for a in (x, wp, scale, thr)]
        out_np, out = load.tensor(np.zeros((1, c, s, s), np.float32))
        keep += pairs
        targs = [t for _, t in pairs]
        fn(*targs, out)
        err = float(np.abs(out_np - ref).max())
        if err > 1e-3:
            raise SystemExit(f"TVM {variant} kernel disagrees with the reference: {err}")
        contenders[f"TVM binary ({variant})"] = (lambda fn=fn, a=targs, o=out: fn(*a, o))
    sess = _ort_session(root / spec["onnx"], opts.threads)
    contenders["onnxruntime fp32 Conv"] = lambda: sess.run(None, {"x": x})
    torch = _optional_torch(opts.threads)
    if torch is not None:
        tx, tw = torch.from_numpy(x), torch.from_numpy(w)

        def torch_conv():
            with torch.no_grad():
                torch.nn.functional.conv2d(tx, tw, padding=k // 2)
        contenders["torch fp32 conv2d"] = torch_conv
    for fn in contenders.values():          # warm-up
        for _ in range(3):
            fn()
    med = _medians(interleaved_blocks(contenders, opts.rounds, opts.repeat, opts.min_block_ms))
    base = med["onnxruntime fp32 Conv"]
    rows = [{"kernel": name, "median_ms": med[name], "speedup_vs_onnxruntime": base / med[name]}
            for name in contenders]
    return {"part": "a", "layer": f"binary conv {c}->{c}, {k}x{k}, 1x{c}x{s}x{s}", "rows": rows}


def _run_b(spec: dict, root: Path, opts: BenchOptions) -> dict:
    import numpy as np
    load = _Loader(opts.threads)
    rows = []
    for case in spec["cases"]:
        rng = np.random.default_rng(case["seed"])
        feeds = {n: rng.standard_normal(shape).astype(np.float32)
                 for n, shape in case["inputs"].items()}
        names = list(feeds)
        f = load.vm(root / case["lib"])["main"]
        pairs = [load.tensor(feeds[n]) for n in names]
        targs = [t for _, t in pairs]
        sess = _ort_session(root / case["onnx"], opts.threads)
        got = np.from_dlpack(f(*targs)).copy()
        ref = sess.run(None, feeds)[0]
        err = float(np.abs(got - ref).max() / max(1.0, float(np.abs(ref).max())))
        contenders = {"tvm": lambda f=f, a=targs: f(*a), "ort": lambda: sess.run(None, feeds)}
        med = _medians(interleaved_blocks(contenders, opts.rounds, opts.repeat, opts.min_block_ms))
        rows.append({"op": case["op"], "tvm_ms": med["tvm"], "onnxruntime_ms": med["ort"],
                     "tvm_over_onnxruntime": med["tvm"] / med["ort"], "max_rel_err": err})
        del pairs
    return {"part": "b", "rows": rows}


def _run_c(spec: dict, root: Path, opts: BenchOptions) -> dict:
    import numpy as np
    load = _Loader(opts.threads)       # before torch: tvm_ffi's optional torch hooks stay off
    torch = _optional_torch(opts.threads)
    if torch is None:
        raise SystemExit("part c needs torch on the measuring machine (the float ONNX baseline "
                         "and the PyTorch contender are rebuilt there): pip install torch")
    from bidiff.exporter.onnx_export import write_onnx_graphs
    from bidiff.models import load_or_random

    s = spec["tile"]
    ckpt = spec["checkpoint"]
    model = load_or_random(ckpt, spec["config"])
    data = np.load(root / spec["inputs"])
    x, cond, t = data["x_t"], data["cond"], data["t"]
    feeds = {"x_t": x, "cond": cond, "t": t}
    f = load.vm(root / spec["lib"])["group_0"]
    pairs = [load.tensor(a) for a in (x, cond, t)]
    targs = [p for _, p in pairs]
    with tempfile.TemporaryDirectory() as tmp:
        binary = write_onnx_graphs(model, Path(tmp) / "bin", tile=s, groups=[0], check=False)
        plain = write_onnx_graphs(model, Path(tmp) / "float", tile=s, groups=[0], binary=False,
                                  check=False)
        s_bin = _ort_session(binary[0], opts.threads)
        s_flt = _ort_session(plain[0], opts.threads)
    # the library was compiled from the same seeded/loaded weights: equal within fp32 noise.
    # Except where a sign() flips: an activation within rounding of its threshold takes the
    # other sign under another summation order, and the network carries that on (the shipped
    # model on AVX-512: one flipped input bit of one 3x3 conv, 288 outputs of it). onnxruntime
    # against itself with x_t perturbed by 1e-6 (relative, random) shows how far apart two
    # correct runs can land.
    y_bin = s_bin.run(None, feeds)[0]
    diff = np.abs(np.from_dlpack(f(*targs)) - y_bin)
    err = float(diff.max())
    noise = np.random.default_rng(0).standard_normal(x.shape).astype(np.float32)
    nudged = dict(feeds, x_t=x + np.float32(1e-6) * np.abs(x) * noise)
    floor = float(np.abs(s_bin.run(None, nudged)[0] - y_bin).max())
    tx, tc, tt = torch.from_numpy(x), torch.from_numpy(cond), torch.from_numpy(t)

    def torch_step():
        with torch.no_grad():
            model(tx, tc, tt)
    contenders = {"TVM (bidiff library)": lambda: f(*targs),
                  "onnxruntime, binary ONNX": lambda: s_bin.run(None, feeds),
                  "onnxruntime, float ONNX": lambda: s_flt.run(None, feeds),
                  "PyTorch fp32": torch_step}
    med = _medians(interleaved_blocks(contenders, opts.rounds, opts.repeat, opts.min_block_ms))
    base = med["onnxruntime, float ONNX"]
    rows = [{"runtime": k, "median_ms": v, "speedup_vs_onnxruntime_float": base / v}
            for k, v in med.items()]
    return {"part": "c", "config": spec["config"], "tile": s, "build_s": spec["build_s"],
            "tvm_vs_onnxruntime_binary_max_abs_err": err,
            "tvm_vs_onnxruntime_binary_share_over_1e-3": float((diff > 1e-3).mean()),
            "onnxruntime_binary_perturbed_max_abs_diff": floor, "rows": rows}


def _run_k(spec: dict, root: Path, opts: BenchOptions) -> dict:
    import numpy as np

    from bidiff.runtime.binary_op import binary_conv2d_reference
    load = _Loader(opts.threads)
    rows = []
    for case in spec["cases"]:
        c, f, h, w, k = (case[n] for n in ("channels", "filters", "height", "width", "kernel"))
        data = np.load(root / case["inputs"])
        index = case.get("channel_index")
        x = data["x"] if index is None else data["x"][:, index]
        ref = binary_conv2d_reference(x, data["wp"], data["scale"], channels=c,
                                      kernel=k, threshold=data["thr"])
        names = ["x", "wp", "scale", "thr"]
        if case["epilogue"] == "rprelu":
            names += ["b0", "slope", "b1"]
            z = ref + data["b0"][None, :, None, None]
            ref = np.where(z >= 0, z, data["slope"][None, :, None, None] * z) + \
                data["b1"][None, :, None, None]
        if case["residual"]:
            ref = ref + x
        if case.get("addend"):
            names.append("addend")
            ref = ref + data["addend"]
        pairs = [load.tensor(data[n]) for n in names]
        out_np, out = load.tensor(np.zeros((1, f, h, w), np.float32))
        load.function(root / case["lib"], "k")(*[t for _, t in pairs], out)
        err = float(np.abs(out_np - ref).max())
        rows.append({**{n: case[n] for n in ("variant", "channels", "filters", "height", "width",
                                              "kernel", "epilogue", "residual")},
                     "source": data["x"].shape[1] if index is not None else 0,
                     "addend": bool(case.get("addend")),
                     "max_abs_err": err,
                     "ok": bool(np.allclose(out_np, ref, rtol=1e-5, atol=1e-4))})
    return {"part": "k", "rows": rows}


@dataclass
class StepProfile:
    """Every VM call of ``steps`` calls of one function, timed through ``set_instrument``."""

    step_ms: list[float]                 # each whole step, instrumented
    kernel_ms: dict[str, float]          # per callee: the median over steps of its total
    calls: dict[str, int]                # per callee: calls per step


def profile_vm(ffi, vm, name: str, args: list, steps: int) -> StepProfile:
    """Profile ``steps`` calls of ``vm[name](*args)`` after one warm-up call. The instrument
    stays installed on ``vm``: time uninstrumented calls before this."""
    fn = vm[name]
    fn(*args)
    totals: dict[str, list[float]] = collections.defaultdict(list)
    calls: collections.Counter[str] = collections.Counter()
    current: dict[str, float] = collections.defaultdict(float)
    started: dict[str, float] = {}

    def instrument(func, callee, before, ret, *call_args):
        if before:
            started[callee] = time.perf_counter()
        else:
            current[callee] += time.perf_counter() - started[callee]
            calls[callee] += 1
        return 0

    vm["set_instrument"](ffi.convert(instrument))
    step_ms = []
    for _ in range(steps):
        current.clear()
        t0 = time.perf_counter()
        fn(*args)
        step_ms.append((time.perf_counter() - t0) * 1e3)
        for callee, sec in current.items():
            totals[callee].append(sec * 1e3)
    return StepProfile(step_ms, {k: statistics.median(v) for k, v in totals.items()},
                       {k: n // steps for k, n in calls.items()})


class _PoolThreads:
    """Switches the TVM pool between thread counts up to its size at load
    (``runtime.config_threadpool``; TVM keeps the workers and uses that many)."""

    def __init__(self, ffi):
        self._config = ffi.get_global_func("runtime.config_threadpool")
        self.current = None

    def use(self, n: int) -> None:
        if n != self.current:
            self._config(1, n)
            self.current = n


def _run_r(spec: dict, root: Path, opts: BenchOptions) -> dict:
    import numpy as np

    from bidiff.runtime.backends import usable_cores

    from .bench_roofline import ideal, measured_by_class, work_from_json
    counts = tuple(dict.fromkeys(opts.thread_counts))
    load = _Loader(max(opts.threads, *counts))
    rng = np.random.default_rng(0)
    peaks, keep = {}, []
    lib = load.ffi.load_module(str(root / spec["peaks_lib"]))
    for p in spec["peaks"]:
        pairs = [load.tensor(rng.integers(0, 1 << 31, size=shape).astype(dtype)
                             if dtype.startswith("uint") else
                             rng.standard_normal(shape).astype(dtype))
                 for shape, dtype in p["inputs"]]
        out = load.tensor(np.zeros(p["output"][0], p["output"][1]))
        keep += [*pairs, out]
        peaks[p["name"]] = (lambda fn=lib[p["name"]], a=[t for _, t in pairs], o=out[1]:
                            fn(*a, o))
    med = _medians(interleaved_blocks(peaks, opts.rounds, opts.repeat, opts.min_block_ms))
    rates = {p["name"]: p["work"] / (med[p["name"]] / 1e3) for p in spec["peaks"]}

    data = np.load(root / spec["inputs"])
    feeds = {n: data[n] for n in ("x_t", "cond", "t")}
    pairs = [load.tensor(feeds[n]) for n in ("x_t", "cond", "t")]
    targs = [t for _, t in pairs]
    vm = load.vm(root / spec["lib"])
    step = vm["group_0"]
    pool = _PoolThreads(load.ffi)
    contenders = {}
    for n in counts:
        sess = _ort_session(root / spec["float_onnx"], n)
        contenders[f"tvm {n}"] = lambda n=n: (pool.use(n), step(*targs))
        contenders[f"ort {n}"] = lambda s=sess: s.run(None, feeds)
    med = _medians(interleaved_blocks(contenders, opts.rounds, opts.repeat, opts.min_block_ms))
    scaling = [{"threads": n, "tvm_ms": med[f"tvm {n}"], "onnxruntime_float_ms": med[f"ort {n}"],
                "speedup_vs_onnxruntime_float": med[f"ort {n}"] / med[f"tvm {n}"],
                "tvm_vs_1_thread": med[f"tvm {counts[0]}"] / med[f"tvm {n}"]} for n in counts]

    pool.use(opts.threads)
    prof = profile_vm(load.ffi, vm, "group_0", targs, max(3, opts.rounds))
    by_class = measured_by_class(prof.kernel_ms, prof.calls)
    classes = {c.cls: c for c in ideal(work_from_json(spec["work"]), rates, opts.threads)}
    rows = []
    for cls in dict.fromkeys([*classes, *by_class]):
        c, (ms, calls) = classes.get(cls), by_class.get(cls, (0.0, 0))
        ideal_ms = c.ideal_s * 1e3 if c else 0.0
        rows.append({"class": cls, "nodes": c.nodes if c else 0, "calls": calls,
                     "words": {str(b): v for b, v in c.words.items()} if c else {},
                     "macs": c.macs if c else 0.0, "flops": c.flops if c else 0.0,
                     "bytes": c.bytes if c else 0.0, "ideal_ms": ideal_ms,
                     "bound": max(c.bound, key=c.bound.get) if c and c.bound else "",
                     "measured_ms": ms, "measured_over_ideal": ms / ideal_ms if ideal_ms else None})
    rows.sort(key=lambda r: -r["measured_ms"])
    ideal_ms = sum(r["ideal_ms"] for r in rows)
    step_ms = next(r["tvm_ms"] for r in scaling if r["threads"] == opts.threads) \
        if opts.threads in counts else statistics.median(prof.step_ms)
    return {"part": "r", "config": spec["config"], "tile": spec["tile"],
            "rates": rates, "peaks": [{k: p[k] for k in ("name", "unit", "work")}
                                      for p in spec["peaks"]],
            "rows": rows, "ideal_ms": ideal_ms, "step_ms": step_ms,
            "instrumented_step_ms": statistics.median(prof.step_ms),
            "step_over_ideal": step_ms / ideal_ms, "scaling": scaling,
            "cores": usable_cores()}


def _optional_torch(threads: int):
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    return torch



def measure_bundle(root: Path, opts: BenchOptions) -> dict:
    """Measure the bundle at ``root`` (``bench_build.build_bundle``) here: its part's result rows plus
    the threads, the target and this machine."""
    meta = json.loads((root / BUNDLE_FILE).read_text())
    if meta.get("version") != BUNDLE_VERSION:
        raise SystemExit(f"{root}: bench bundle version {meta.get('version')}, this script "
                         f"reads {BUNDLE_VERSION}: rebuild it with --bundle")
    run = {"a": _run_a, "b": _run_b, "c": _run_c, "k": _run_k, "r": _run_r}[meta["part"]]
    result = run(meta["spec"], root, opts)
    result.update(threads=opts.threads, target=meta["target"], machine=_machine())
    return result


def _machine() -> dict:
    from bidiff.runtime.artifact import host_info
    host = host_info()
    return {"cpu": _cpu_name(), "arch": host.arch,
            "features": sorted(f for f in (host.features or ()) if f.startswith(("avx", "asimd"))),
            "platform": platform.platform(), "python": platform.python_version()}


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith(("model name", "Model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"

