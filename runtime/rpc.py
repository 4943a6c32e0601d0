"""Remote devices through TVM's RPC tracker: one server's session as a backend, and the server.

TVM's own RPC system does the scheduling: ``python -m tvm.exec.rpc_tracker`` queues requests
per device key and hands out free servers; ``python -m tvm.exec.rpc_server --tracker HOST:PORT
--key KEY`` (or ``bidiff device-server``, :func:`serve`) runs on each device, one session at a
time. The host runs the sampler; a :class:`RemoteBackend` is one session that runs the
artifact's compiled library on its server::

    sess = RPCSession(tracker.request(key))            # a free server of the key
    check the server's CPU against manifest.target      # before any native code goes there
    upload model.so, download it back, compare its sha256 with the verified artifact's
    vm = relax.VirtualMachine(sess.load_module(name), sess.cpu())
    eps = vm["group_k"](x_t, cond, t)                   # per tile: 3 copies in, 1 call, 1 out

The server's CPU comes from ``bidiff.host_info`` where ``bidiff device-server`` registered it
(its /proc/cpuinfo flags, exactly what the local check reads), else from the LLVM host
detection every full TVM install has (``target.llvm_get_system_triple``,
``target.llvm_cpu_has_feature``).

Faults: every remote operation is bounded by ``timeout`` (``$BIDIFF_RPC_TIMEOUT``, default 60
s): a dead server fails at once (its socket closes), a hung one is cut off by :meth:`abort`,
which shuts the session's socket down under the blocked call. Either raises
:class:`ServerLost`; ``pool`` retries that work elsewhere. ``import tvm`` (the 240 MB compiler
package, which the RPC client lives in) happens only when a session opens.

Servers run whatever native code a client uploads: trusted networks only.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from .artifact import (_LLVM_TO_CPUINFO, Artifact, ArtifactError, HostInfo, cpuinfo_feature,
                       host_info, normalize_arch, target_mismatch)
from .backends import BackendError

TIMEOUT_ENV = "BIDIFF_RPC_TIMEOUT"
DEFAULT_TIMEOUT = 60.0
HOST_INFO_FUNC = "bidiff.host_info"
_TRACKER_MAGIC = 0x2F271            # tvm.rpc.base.RPC_TRACKER_MAGIC
_REQUEST, _SUCCESS, _SUMMARY = 4, 0, 6   # tvm.rpc.base.TrackerCode
_CPUINFO_TO_LLVM = {v: k for k, v in _LLVM_TO_CPUINFO.items()}


class NoServer(BackendError):
    """No server of the key answered within the timeout."""


class ServerLost(RuntimeError):
    """A session failed mid-work (server died, hung past the timeout, dropped the link):
    the work goes to another server. Never shown to the user as such."""


def rpc_timeout() -> float:
    """``$BIDIFF_RPC_TIMEOUT`` seconds, else :data:`DEFAULT_TIMEOUT`."""
    env = os.environ.get(TIMEOUT_ENV, "").strip()
    if not env:
        return DEFAULT_TIMEOUT
    try:
        value = float(env)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise BackendError(f"{TIMEOUT_ENV}={env!r} must be a positive number of seconds")
    return value


def parse_address(text: str, what: str = "--tracker") -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if sep and host and port.isdigit() and 0 < int(port) < 65536:
        return host.strip("[]"), int(port)
    raise BackendError(f"{what} {text!r} is not HOST:PORT (e.g. 127.0.0.1:9190)")


def _import_tvm_rpc():
    try:
        from tvm import relax, rpc                # noqa: PLC0415 (the compiler package: lazy)
    except ImportError as e:
        raise BackendError(f"the RPC client needs TVM ({' '.join(str(e).split())}): "
                           "pip install 'bidiff[rpc]'") from None
    return rpc, relax


def no_server(key: str, tracker: str, timeout: float) -> NoServer:
    return NoServer(f"no RPC server for key {key!r} at tracker {tracker} answered within "
                    f"{timeout:g} s: start one (bidiff device-server --tracker {tracker} "
                    f"--key {key}) or set {TIMEOUT_ENV}")


# --------------------------------------------------------------------------- tracker

class Tracker:
    """A connection to an RPC tracker that speaks its JSON protocol (``tvm.rpc.base``) on a
    socket of its own: connecting and waiting are bounded, and :meth:`abort` ends a wait from
    another thread (``tvm.rpc.TrackerSession`` retries a lost tracker for 60 s and waits for a
    server forever)."""

    def __init__(self, address: tuple[str, int], timeout: float) -> None:
        self.address, self.timeout = address, timeout
        self.where = f"{address[0]}:{address[1]}"
        try:
            self._sock = socket.create_connection(address, timeout=timeout)
            self._sock.sendall(struct.pack("<i", _TRACKER_MAGIC))
            magic = struct.unpack("<i", self._recv(4))[0]
        except OSError as e:
            raise BackendError(f"cannot reach the RPC tracker at {self.where} ({e.strerror or e}): "
                               "start it with python -m tvm.exec.rpc_tracker") from None
        if magic != _TRACKER_MAGIC:
            self.close()
            raise BackendError(f"{self.where} is not an RPC tracker")

    def _recv(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self._sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("the tracker closed the connection")
            buf += chunk
        return buf

    def _call(self, msg: list[Any], timeout: float | None) -> Any:
        data = json.dumps(msg).encode()
        self._sock.settimeout(self.timeout)
        self._sock.sendall(struct.pack("<i", len(data)) + data)
        self._sock.settimeout(timeout)
        size = struct.unpack("<i", self._recv(4))[0]
        return json.loads(self._recv(size).decode())

    def servers(self, key: str) -> list[str]:
        """HOST:PORT of every server registered under ``key`` (free or busy)."""
        code, summary = self._call([_SUMMARY], self.timeout)
        if code != _SUCCESS:
            raise BackendError(f"the RPC tracker at {self.where} answered {code!r} to a summary")
        return [f"{s['addr'][0]}:{s['addr'][1]}" for s in summary.get("server_info", [])
                if s.get("key") == f"server:{key}"]

    def wait_for_servers(self, key: str, timeout: float) -> list[str]:
        """The servers of ``key``, waiting up to ``timeout`` for the first to register."""
        end = time.monotonic() + timeout
        while True:
            found = self.servers(key)
            if found:
                return found
            if time.monotonic() >= end:
                raise self.no_server(key, timeout)
            time.sleep(min(0.5, max(0.0, end - time.monotonic())))

    def request(self, key: str, timeout: float) -> tuple[str, int, str]:
        """(host, port, match key) of a free server of ``key``; NoServer after ``timeout``.
        A timed-out or aborted tracker is closed (the tracker drops its queued request)."""
        try:
            code, value = self._call([_REQUEST, key, "", 1], timeout)
        except (TimeoutError, socket.timeout):
            self.close()
            raise self.no_server(key, timeout) from None
        except (OSError, ValueError) as e:
            self.close()
            raise NoServer(f"lost the RPC tracker at {self.where} ({e}) while waiting for a "
                           f"server of key {key!r}") from None
        if code != _SUCCESS:
            raise BackendError(f"the RPC tracker at {self.where} refused a request for key {key!r}")
        host, port, matchkey = value
        return str(host), int(port), str(matchkey)

    def no_server(self, key: str, timeout: float) -> NoServer:
        return no_server(key, self.where, timeout)

    def abort(self) -> None:
        """End a :meth:`request` blocked in another thread."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass


# --------------------------------------------------------------------------- the server's CPU

@dataclass(frozen=True)
class RemoteHost:
    """What a server says about its CPU; ``source`` names how it was learned."""
    arch: str
    features: frozenset[str] | None       # cpuinfo spellings (LLVM: those of the artifact it has)
    cpu: str | None
    threads: int | None
    source: str

    def describe(self) -> str:
        return ", ".join(filter(None, [self.arch, self.cpu and f"cpu {self.cpu}",
                                       self.threads and f"TVM threads {self.threads}"]))


def host_info_json() -> str:
    """What ``bidiff device-server`` answers to :data:`HOST_INFO_FUNC`: this machine's arch and
    /proc/cpuinfo flags (the local target check's facts) and its TVM thread count."""
    h = host_info()
    threads = os.environ.get("TVM_NUM_THREADS", "")
    return json.dumps({"arch": h.arch, "features": sorted(h.features) if h.features is not None else None,
                       "cpu": None, "threads": int(threads) if threads.isdigit() else None})


def remote_host(sess: Any, features: list[str]) -> RemoteHost:
    """The server's CPU; ``features`` (the artifact's, cpuinfo spellings) are the ones asked of
    LLVM where the server has no :data:`HOST_INFO_FUNC`."""
    try:
        d = json.loads(sess.get_function(HOST_INFO_FUNC)())
        feats = d.get("features")
        return RemoteHost(normalize_arch(d["arch"]), frozenset(feats) if feats is not None else None,
                          d.get("cpu"), d.get("threads"), "bidiff device-server")
    except AttributeError:                 # "Module has no function ...": a stock rpc_server
        pass
    try:
        triple = str(sess.get_function("target.llvm_get_system_triple")())
        cpu = str(sess.get_function("target.llvm_get_system_cpu")())
        target = sess.get_function("target.Target")(json.dumps({"kind": "llvm", "mtriple": triple,
                                                                 "mcpu": cpu}))
        has = sess.get_function("target.llvm_cpu_has_feature")
        present = {f for f in features
                   if has(_CPUINFO_TO_LLVM.get(cpuinfo_feature(f), cpuinfo_feature(f)), target)}
    except AttributeError:
        raise BackendError("the RPC server cannot tell its CPU (neither bidiff device-server nor a "
                           "TVM with LLVM): start it with bidiff device-server") from None
    return RemoteHost(normalize_arch(triple.split("-", 1)[0]),
                      frozenset(cpuinfo_feature(f) for f in present), cpu, None, "LLVM host detection")


def check_remote_target(artifact: Artifact, host: RemoteHost, where: str) -> None:
    """Refuse (one line) an artifact whose native target does not fit the server ``where``."""
    m = artifact.manifest
    t = m.target
    feats = host.features
    if t is None or target_mismatch(m, HostInfo(host.arch, feats)) is None:
        return
    if normalize_arch(t.arch) != host.arch:
        why = f"the server is {host.arch}"
    else:
        lacking = sorted({cpuinfo_feature(f) for f in t.features} - set(feats or ()))
        why = f"the server's CPU lacks {', '.join(lacking)}"
    raise ArtifactError(f"RPC server {where} cannot run artifact target {t.name} ({t.arch}): {why}; "
                        f"export for that device (bidiff-export --target ...) or use another --key")


# --------------------------------------------------------------------------- remote backend

class RemoteBackend:
    """The artifact's TVM library on one RPC server: the ``EpsModel`` the sampler runs on.

    :meth:`start` connects, checks the server's CPU, uploads ``model.so`` under its sha256, reads
    it back and compares, then loads it into a Relax VM there. Not thread-safe, except
    :meth:`abort`, which also cuts a :meth:`start` that hangs.
    """

    def __init__(self, artifact: Artifact, host: str, port: int, matchkey: str, *,
                 timeout: float) -> None:
        if not artifact.library_path:
            raise BackendError(f"artifact {artifact.source} has no native library: the RPC servers "
                               "run TVM libraries; export one for their target")
        m = artifact.manifest
        self.artifact, self.timeout = artifact, timeout
        self._address, self._matchkey = (host, port), matchkey
        self.where = f"{host}:{port}"
        self.name = f"tvm on {self.where}"
        self.tile, self.input_multiple = int(m.tile), int(m.input_multiple)
        self.host: RemoteHost | None = None
        self._lock = threading.Lock()
        self._busy_since: float | None = None
        self._aborted = self._closed = False
        self._sess = self._vm = None
        self._funcs: list[Any] = []

    def start(self) -> "RemoteBackend":
        m = self.artifact.manifest
        rpc, relax = _import_tvm_rpc()
        with self._remote("connect"):
            self._sess = rpc.connect(*self._address, self._matchkey)
        with self._remote("tell its CPU"):
            self.host = remote_host(self._sess, m.target.features if m.target else [])
        check_remote_target(self.artifact, self.host, self.where)
        data = self.artifact.library_path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest != m.files.get(m.library):
            raise ArtifactError(f"artifact file {m.library} changed since it was verified: re-export it")
        name = f"bidiff-{digest[:16]}.so"
        with self._remote("take the library"):
            self._sess.upload(bytearray(data), target=name)
            back = hashlib.sha256(bytes(self._sess.download(name))).hexdigest()
        if back != digest:
            raise ServerLost(f"server {self.where} stored {name} with sha256 {back[:12]}, not {digest[:12]}")
        with self._remote("load the library"):
            dev = self._sess.cpu()
            self._vm = relax.VirtualMachine(self._sess.load_module(name), dev)
            self._funcs = [self._vm[g.function or f"group_{g.index}"] for g in m.groups]
            s = self.tile
            self._x = _remote_tensor(np.zeros((1, 3, s, s), np.float32), dev)
            self._c = _remote_tensor(np.zeros((1, 3, s, s), np.float32), dev)
            self._t = _remote_tensor(np.zeros((1, 1), np.int64), dev)
            self._dev = dev
        return self

    def _remote(self, what: str) -> "_RemoteCall":
        return _RemoteCall(self, what)

    def run(self, group: int, x_t: np.ndarray, cond: np.ndarray, t: np.ndarray) -> np.ndarray:
        with self._remote("run the network"):
            self._x.copyfrom(np.ascontiguousarray(x_t, dtype=np.float32))
            self._c.copyfrom(np.ascontiguousarray(cond, dtype=np.float32))
            self._t.copyfrom(np.ascontiguousarray(t, dtype=np.int64))
            out = self._funcs[group](self._x, self._c, self._t).numpy()
        return np.asarray(out, dtype=np.float32)

    def device_times_ms(self, group: int, rounds: int, calls: int) -> list[float]:
        """Milliseconds per call measured on the server (``time_evaluator``: no transfers),
        one figure per round of ``calls`` calls."""
        with self._remote("time the network"):
            fn = self._vm.time_evaluator(self.artifact.manifest.groups[group].function
                                         or f"group_{group}", self._dev, number=calls, repeat=rounds)
            return [r * 1e3 for r in fn(self._x, self._c, self._t).results]

    def abort(self) -> bool:
        """Cut a remote operation that has run past the timeout (from another thread): the
        sockets to the server are shut down, so the blocked call raises. True if one was cut.

        The sockets are found by address (psutil): while this session lasts, the server is
        nobody else's, so every socket of this process to it is this session's."""
        import psutil                              # noqa: PLC0415 (bidiff[rpc])
        with self._lock:
            if self._busy_since is None or self._closed or \
                    time.monotonic() - self._busy_since < self.timeout:
                return False
            self._aborted = True
            host, port = self._address
            try:
                ips = {ai[4][0] for ai in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)}
            except OSError:
                ips = {host}
            for c in psutil.Process().net_connections("tcp"):
                if c.raddr and c.raddr.port == port and c.raddr.ip in ips and c.fd >= 0:
                    try:
                        with socket.socket(fileno=os.dup(c.fd)) as s:
                            s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
            return True

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._funcs = []
        self._x = self._c = self._t = self._vm = self._dev = None
        self._sess = None         # the last reference: TVM closes the session


class _RemoteCall:
    """Marks a remote operation as in flight (for :meth:`RemoteBackend.abort`) and turns any
    failure inside it into :class:`ServerLost`."""

    def __init__(self, backend: RemoteBackend, what: str) -> None:
        self.b, self.what = backend, what

    def __enter__(self) -> None:
        with self.b._lock:
            self.b._busy_since = time.monotonic()

    def __exit__(self, typ, exc, tb) -> bool:
        with self.b._lock:
            self.b._busy_since = None
            aborted = self.b._aborted
        if exc is None or isinstance(exc, (ServerLost, KeyboardInterrupt, SystemExit)):
            return False
        if isinstance(exc, (BackendError, ArtifactError)) and not aborted:
            return False
        why = f"no answer within {self.b.timeout:g} s" if aborted else \
            (" ".join(str(exc).split())[-160:] or type(exc).__name__)
        raise ServerLost(f"server {self.b.where} failed to {self.what} ({why})") from None


def _remote_tensor(a: np.ndarray, dev: Any) -> Any:
    import tvm                                     # noqa: PLC0415 (loaded by _import_tvm_rpc)
    return tvm.runtime.tensor(a, dev)


def open_remote(artifact: Artifact, tracker: Tracker, key: str, *, timeout: float) -> RemoteBackend:
    """A :class:`RemoteBackend` on the next free server of ``key``. A server that fails to
    start a session (the tracker can hand out one still ending another client's session, or
    one that just died) is passed over for the next, until ``timeout``: then NoServer."""
    end = time.monotonic() + timeout
    while True:
        host, port, matchkey = tracker.request(key, max(0.1, end - time.monotonic()))
        backend = RemoteBackend(artifact, host, port, matchkey, timeout=timeout)
        try:
            return backend.start()
        except ServerLost:
            backend.close()
            if time.monotonic() >= end:
                raise tracker.no_server(key, timeout) from None
        except BaseException:
            backend.close()
            raise


# --------------------------------------------------------------------------- the device side

def _register_host_info() -> None:
    """Runs in the server's worker process before it serves: sessions are forked from it."""
    import tvm_ffi                                 # noqa: PLC0415
    tvm_ffi.register_global_func(HOST_INFO_FUNC, host_info_json, override=True)


def serve(tracker: tuple[str, int], key: str, *, host: str = "0.0.0.0", port: int = 9090,
          port_end: int = 9199, custom_addr: str | None = None, threads: int | None = None) -> None:
    """Serve ``key`` for ``tracker`` until SIGTERM / SIGINT: ``tvm.rpc.Server`` plus
    :data:`HOST_INFO_FUNC`, the runtime's TVM thread settings, and a shutdown that also ends
    the session processes (TVM's server leaves them running when it is terminated)."""
    from .backends import resolve_threads
    from .backends.tvm import SPIN_COUNT
    os.environ["TVM_NUM_THREADS"] = str(resolve_threads(threads))
    os.environ.setdefault("TVM_BIND_THREADS", "0")
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", str(SPIN_COUNT))
    rpc, _ = _import_tvm_rpc()
    server = rpc.Server(host, port, port_end, key=key, tracker_addr=tracker,
                        custom_addr=custom_addr, server_init_callback=_register_host_info)
    print(f"bidiff device-server: {host}:{server.port}, key {key!r}, tracker "
          f"{tracker[0]}:{tracker[1]}, {os.environ['TVM_NUM_THREADS']} threads", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.is_set() and server.proc.is_alive():
            stop.wait(0.5)
    finally:
        server.terminate()          # PopenWorker.kill: the session processes first (psutil)

__all__ = ["DEFAULT_TIMEOUT", "TIMEOUT_ENV", "NoServer", "ServerLost", "RemoteBackend", "RemoteHost",
           "Tracker", "check_remote_target", "open_remote", "parse_address", "remote_host",
           "rpc_timeout", "serve"]
