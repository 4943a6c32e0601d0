"""The TVM backend: the artifact's compiled library through apache-tvm-ffi + libtvm_runtime.

No ``import tvm`` (that is the 240 MB compiler): ``libtvm_runtime.so`` is loaded with
``ctypes.CDLL(..., RTLD_GLOBAL)`` (it holds the Relax VM), then ``tvm_ffi.load_module(lib)``::

    vm = tvm_ffi.load_module(path)["vm_load_executable"]()
    vm["vm_initialization"](1, 0, 2)          # CPU (kDLCPU = 1), device 0, pooled allocator
    eps = vm["group_k"](x_t, cond, t)         # one function per timestep group (manifest)

- Threads: the TVM pool size is read from ``TVM_NUM_THREADS`` when the pool starts, so it is
  set before libtvm_runtime loads, always (default: the usable cores, ``resolve_threads``;
  TVM's own default is half the hardware threads on x86, one core on a 2-core VM without
  SMT). A later request for another count cannot take effect (a warning says so).
  Two more pool settings default here unless the caller set them: ``TVM_BIND_THREADS=0``
  (with TVM's core binding the shipped model's step was slower: 96-102 vs 80 ms) and
  ``TVM_THREAD_POOL_SPIN_COUNT=10000``: by default a worker busy-waits ~240 ms at 100% of a
  core after every call, which on a Pi burns power and steals a core from whatever runs next
  (onnxruntime in the same process measured 3x slower); the step time did not change.
- Inputs are copied into 64-byte-aligned buffers before they are handed over zero-copy: a
  misaligned buffer crashes inside the compiled kernels with no error.
- libtvm_runtime is looked up in ``$BIDIFF_TVM_RUNTIME`` (a file), else in the installed
  ``apache-tvm`` wheel's ``tvm/lib`` folder (found with importlib, without importing tvm).
- ``tvm_ffi`` imports torch when it is installed; the runtime blocks that import while loading
  tvm_ffi (unless torch is already loaded) so a device process stays small. tvm_ffi then simply
  lacks its optional torch integration, which this backend does not use.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
import threading
import warnings
from pathlib import Path

import numpy as np

from ..artifact import Artifact
from . import BackendError, resolve_threads

RUNTIME_ENV = "BIDIFF_TVM_RUNTIME"
ALIGN = 64
_KDL_CPU, _POOLED_ALLOCATOR = 1, 2

_load_lock = threading.Lock()
_loaded: dict[str, object] = {}     # "ffi": the tvm_ffi module, "threads": pool size at load


def find_libtvm_runtime() -> Path | None:
    """``$BIDIFF_TVM_RUNTIME``, else ``<site-packages>/tvm/lib/`` of an installed apache-tvm (not
    imported), else ``<sys.prefix>/lib/`` — where the Raspberry Pi instructions put the one file
    taken from the apache-tvm wheel, so a venv needs no environment variable."""
    env = os.environ.get(RUNTIME_ENV)
    if env:
        p = Path(env).expanduser()
        return p if p.is_file() else None
    try:
        spec = importlib.util.find_spec("tvm")
    except (ImportError, ValueError):
        spec = None
    names = ("libtvm_runtime.so", "libtvm_runtime.dylib")
    for base in (spec.submodule_search_locations or []) if spec else []:
        for sub in ("lib", "."):
            for n in names:
                p = Path(base) / sub / n
                if p.is_file():
                    return p
    for n in names:
        p = Path(sys.prefix) / "lib" / n
        if p.is_file():
            return p
    return None


def _import_tvm_ffi_without_torch():
    if "torch" in sys.modules:
        import tvm_ffi
        return tvm_ffi
    sentinel = object()
    prev = sys.modules.get("torch", sentinel)
    sys.modules["torch"] = None          # makes `import torch` raise ImportError inside tvm_ffi
    try:
        import tvm_ffi
    finally:
        if prev is sentinel:
            sys.modules.pop("torch", None)
        else:
            sys.modules["torch"] = prev
    return tvm_ffi


def load_tvm_runtime(threads: int | None = None):
    """Load libtvm_runtime (once per process, pool size fixed then) and return ``tvm_ffi``.

    threads: the pool size (None: ``resolve_threads``' default, the usable cores). Always set
    explicitly: TVM's own default is half the hardware threads on x86 (it assumes SMT)."""
    threads = resolve_threads(threads)
    with _load_lock:
        if "ffi" in _loaded:
            if threads != _loaded["threads"]:
                warnings.warn(f"the TVM runtime is already loaded with {_loaded['threads']} threads; "
                              f"threads={threads} cannot take effect in this process", stacklevel=3)
            return _loaded["ffi"]
        lib = find_libtvm_runtime()
        if lib is None:
            raise BackendError(f"libtvm_runtime.so not found: pip install 'bidiff[tvm]' or set "
                               f"{RUNTIME_ENV} to its path")
        os.environ["TVM_NUM_THREADS"] = str(threads)
        os.environ.setdefault("TVM_BIND_THREADS", "0")
        os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", str(SPIN_COUNT))
        try:
            tvm_ffi = _import_tvm_ffi_without_torch()
            ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
        except (ImportError, OSError) as e:
            raise BackendError(f"cannot load the TVM runtime ({' '.join(str(e).split())}): "
                               "reinstall bidiff[tvm]") from None
        _loaded["ffi"] = tvm_ffi
        _loaded["threads"] = threads
        _loaded["lib"] = str(lib)
        return tvm_ffi


SPIN_COUNT = 10_000   # TVM's worker spin before it sleeps (its default spins ~240 ms)


def aligned_empty(shape: tuple[int, ...], dtype, align: int = ALIGN) -> np.ndarray:
    """An uninitialised C-contiguous array whose data pointer is ``align``-byte aligned."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + align, dtype=np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off:off + nbytes].view(dtype).reshape(shape)


def aligned_copy(a: np.ndarray, align: int = ALIGN) -> np.ndarray:
    """``a`` copied into an ``align``-byte aligned buffer (what the compiled kernels need)."""
    out = aligned_empty(a.shape, a.dtype, align)
    out[...] = a
    return out


def load_vm(ffi, path: str | os.PathLike):
    """The Relax VM of a compiled library, initialised for the CPU with the pooled allocator."""
    vm = ffi.load_module(str(path))["vm_load_executable"]()
    vm["vm_initialization"](_KDL_CPU, 0, _POOLED_ALLOCATOR)
    return vm


class TVMBackend:
    name = "tvm"

    def __init__(self, artifact: Artifact, *, threads: int | None = None) -> None:
        m = artifact.manifest
        if not artifact.library_path:
            raise BackendError(f"artifact {artifact.source} has no native library")
        self.artifact = artifact
        self.tile = int(m.tile)
        self.input_multiple = int(m.input_multiple)
        self._ffi = load_tvm_runtime(threads)
        self.threads = int(_loaded["threads"])     # the pool's size (fixed by the first load)
        want = (m.versions or {}).get("tvm_ffi")
        have = getattr(self._ffi, "__version__", None)
        if want and have and want != have:
            raise BackendError(f"artifact was compiled against apache-tvm-ffi {want} but {have} is "
                               f"installed: pip install apache-tvm-ffi=={want} or re-export it")
        try:
            self._vm = load_vm(self._ffi, artifact.library_path)
            self._funcs = [self._vm[g.function or f"group_{g.index}"] for g in m.groups]
        except Exception as e:  # an ffi error from native code: name it, keep it one line
            raise BackendError(f"cannot load {artifact.library_path.name} "
                               f"({' '.join(str(e).split())[:200]}): re-export the artifact") from None
        s = self.tile
        self._x = aligned_empty((1, 3, s, s), np.float32)
        self._c = aligned_empty((1, 3, s, s), np.float32)
        self._t = aligned_empty((1, 1), np.int64)
        self._lock = threading.Lock()      # the VM and the input buffers are shared state

    def run(self, group: int, x_t: np.ndarray, cond: np.ndarray, t: np.ndarray) -> np.ndarray:
        with self._lock:
            self._x[...] = x_t
            self._c[...] = cond
            self._t[...] = t
            ffi = self._ffi
            out = self._funcs[group](ffi.from_dlpack(self._x), ffi.from_dlpack(self._c),
                                     ffi.from_dlpack(self._t))
            # The result lives in the VM's pooled memory: copy it out before the next call.
            return np.array(np.from_dlpack(out), dtype=np.float32, copy=True)

    def close(self) -> None:
        with self._lock:
            self._funcs = []
            self._vm = None
