"""The TVM backend's calling convention, with a stand-in library compiled here by TVM (the test
may use the compiler; the runtime must not). The library computes the same pointwise ideal ε
as the fake ONNX graphs of test_runtime_artifact, so both backends must agree."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bidiff.runtime import artifact as A
from bidiff.runtime import schedule
from test_runtime_artifact import TILE, fake_group_onnx, tiny_manifest

pytestmark = pytest.mark.slow        # compiles a small library (~15 s)


def build_fake_library(path: Path, tile: int) -> None:
    import tvm
    from tvm import relax
    ac = schedule.alphas_cumprod().astype(np.float64)
    bb = relax.BlockBuilder()
    for k in range(schedule.NUM_GROUPS):
        x = relax.Var("x_t", relax.TensorType((1, 3, tile, tile), "float32"))
        c = relax.Var("cond", relax.TensorType((1, 3, tile, tile), "float32"))
        t = relax.Var("t", relax.TensorType((1, 1), "int64"))
        with bb.function(f"group_{k}", [x, c, t]):
            with bb.dataflow():
                t1 = bb.emit(relax.op.reshape(t, (1,)))
                a = bb.emit(relax.op.take(relax.const(np.sqrt(ac).astype(np.float32)), t1, axis=0))
                b = bb.emit(relax.op.take(relax.const(np.sqrt(1 - ac).astype(np.float32)), t1, axis=0))
                x0 = bb.emit(relax.op.multiply(c, relax.const(np.float32(1 - 0.02 * k))))
                num = bb.emit(relax.op.subtract(x, relax.op.multiply(x0, a)))
                eps = bb.emit_output(relax.op.divide(num, b))
            bb.emit_func_output(eps)
    ex = tvm.compile(bb.get(), target=tvm.target.Target("llvm"))
    ex.export_library(str(path))


@pytest.fixture(scope="module")
def tvm_art(tmp_path_factory) -> Path:
    import tvm_ffi
    out = tmp_path_factory.mktemp("tvm") / "fake-native"
    host = A.host_info()
    m = tiny_manifest(target=A.TargetInfo(name="host", arch=host.arch, triple=None, cpu=None),
                      library="model.so")
    m.versions["tvm_ffi"] = tvm_ffi.__version__
    with A.ArtifactWriter(out) as w:
        (w.staging / "onnx").mkdir()
        for g in m.groups:
            (w.staging / g.onnx).write_bytes(fake_group_onnx(g.index, TILE))
        build_fake_library(w.staging / "model.so", TILE)
        return w.finish(m)


SCRIPT = """
import sys, numpy as np
from bidiff import runtime
img = np.random.default_rng(0).integers(0, 256, (40, 36, 3), dtype=np.uint8)
tvm_up = runtime.load(sys.argv[1], threads=2)                # auto -> tvm
assert tvm_up.backend_name == "tvm", tvm_up.backend_name
a = tvm_up.upscale(img, steps=4, seed=3)
b = tvm_up.upscale(img, steps=4, seed=3)
assert a.tobytes() == b.tobytes()
heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'onnx', 'tvm'))
ort = runtime.load(sys.argv[1], backend="onnxruntime", threads=1).upscale(img, steps=4, seed=3)
import os
print("threads", os.environ.get("TVM_NUM_THREADS"), "heavy", heavy,
      "bind", os.environ.get("TVM_BIND_THREADS"), "spin", os.environ.get("TVM_THREAD_POOL_SPIN_COUNT"),
      "maxdiff", int(np.abs(a.astype(int) - ort.astype(int)).max()))
"""


def test_tvm_backend_matches_onnxruntime_and_stays_light(tvm_art: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in ("TVM_BIND_THREADS", "TVM_THREAD_POOL_SPIN_COUNT")}
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tvm_art)], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    words = r.stdout.split()
    assert words[:2] == ["threads", "2"] and r.stdout.split("heavy ")[1].startswith("[]"), r.stdout
    assert int(words[-1]) <= 1, r.stdout          # float32 on both sides; uint8 rounding may differ by 1
    assert words[words.index("bind") + 1] == "0", r.stdout    # TVM's core binding off by default
    assert words[words.index("spin") + 1] == "10000", r.stdout  # no 240 ms busy-wait per call


@pytest.fixture(scope="module")
def thread_ids_kernel(tmp_path_factory) -> Path:
    """``tids(out int32[64])``: a parallel loop whose iterations store gettid() of the thread
    that ran them, so the distinct values are the pool threads that really worked."""
    import tvm
    from tvm.script import tirx as T

    @T.prim_func
    def tids(out: T.Buffer((64,), "int32")):
        T.func_attr({"global_symbol": "tids", "tir.noalias": True})
        for i in T.parallel(64):
            out[i] = T.call_extern("int32", "gettid")

    path = tmp_path_factory.mktemp("tids") / "tids.so"
    tvm.compile(tvm.IRModule({"tids": tids}), target="llvm").export_library(str(path))
    return path


THREADS_SCRIPT = """
import os, sys, numpy as np
cpus, threads, art, kernel = sys.argv[1:]
if cpus != "all":
    os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})
from bidiff import runtime
from bidiff.runtime.backends.tvm import load_tvm_runtime
up = runtime.load(art, backend="tvm", threads=None if threads == "default" else int(threads))
up.upscale(np.zeros((20, 20, 3), np.uint8), steps=1)
ffi = load_tvm_runtime(up.backend.threads)                  # the same runtime, no second pool
out = np.zeros(64, np.int32)
ffi.load_module(kernel)["tids"](ffi.from_dlpack(out))
print(up.backend.threads, len(set(out.tolist())), ffi.get_global_func("runtime.NumThreads")())
"""

CORES = len(os.sched_getaffinity(0))
FIRST_CPU = min(os.sched_getaffinity(0))


@pytest.mark.parametrize("cpus,threads,env,expected", [
    ("all", "default", None, CORES),            # TVM alone would take half: 1 on 2 cores
    (str(FIRST_CPU), "default", None, 1),       # the affinity mask bounds the default
    ("all", "1", None, 1),                      # an explicit count wins
    ("all", "default", {"BIDIFF_THREADS": "1"}, 1),
])
def test_tvm_pool_runs_that_many_threads(tvm_art: Path, thread_ids_kernel: Path, cpus, threads,
                                         env, expected) -> None:
    base = {k: v for k, v in os.environ.items() if k not in ("BIDIFF_THREADS", "TVM_NUM_THREADS")}
    r = subprocess.run([sys.executable, "-c", THREADS_SCRIPT, cpus, threads, str(tvm_art),
                        str(thread_ids_kernel)], capture_output=True, text=True, timeout=300,
                       env={**base, **(env or {})})
    assert r.returncode == 0, r.stderr[-2000:]
    configured, ran, pool = map(int, r.stdout.split())
    assert configured == ran == pool == expected, r.stdout


def test_tvm_backend_refusals(tvm_art: Path, tmp_path: Path) -> None:
    from bidiff import runtime
    from bidiff.runtime.backends import resolve_backend
    art = A.read_artifact(tvm_art)
    assert resolve_backend(art, "tvm") == "tvm"
    from test_runtime_artifact import make_fake_artifact
    onnx_only = A.read_artifact(make_fake_artifact(tmp_path / "onnx-only"))
    with pytest.raises(runtime.BackendError, match="no native library"):
        resolve_backend(onnx_only, "tvm")
    assert resolve_backend(onnx_only, "auto") == "onnxruntime"


def test_libtvm_runtime_found_in_the_venv_lib(tmp_path, monkeypatch):
    """The Pi install copies libtvm_runtime.so to <venv>/lib: found without BIDIFF_TVM_RUNTIME."""
    import importlib.util
    import sys

    from bidiff.runtime.backends import tvm as tvm_backend
    lib = tmp_path / "lib" / "libtvm_runtime.so"
    lib.parent.mkdir()
    lib.write_bytes(b"\x7fELF")
    monkeypatch.delenv("BIDIFF_TVM_RUNTIME", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)   # no apache-tvm installed
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    assert tvm_backend.find_libtvm_runtime() == lib
    lib.unlink()
    assert tvm_backend.find_libtvm_runtime() is None
