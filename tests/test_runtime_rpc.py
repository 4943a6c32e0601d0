"""`bidiff upscale --tracker` and `bidiff bench --tracker` against a real TVM RPC tracker and
servers on 127.0.0.1: the pool writes the bytes of a local run, survives servers that die or
hang mid-run, refuses a foreign artifact and a key without servers in one line.

Every process runs in its own process group, which teardown kills whole: a stock
``rpc_server`` runs its sessions in worker processes that outlive a plain SIGTERM of it. Every
wait is bounded. Ports are chosen free; nothing listens beyond 127.0.0.1.
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from PIL import Image

from bidiff import exporter
from bidiff.models import create_model, get_config, save_checkpoint
from bidiff.runtime.rpc import Tracker

pytestmark = pytest.mark.slow

TILE, STEPS, KEY = 32, 10, "bidiff-test"
# img0 takes 1 tile, the others 25 each: the worker that finishes img0 is known to be free
# while the others are mid-image
SIZES = [(16, 16), (64, 64), (60, 64), (64, 60)]
START_S, RUN_S = 120, 180            # bounds: a process coming up, one CLI run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(cond, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            pytest.fail(f"timed out after {timeout} s waiting for {what}", pytrace=False)
        time.sleep(0.2)


class Cluster:
    """A tracker and its servers, each started in a process group of its own."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen] = {}
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self._start("tracker", ["-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1",
                                "--port", str(self.port), "--port-end", str(self.port + 1)])
        wait_until(self._tracker_up, START_S, "the tracker")
        self.servers: dict[str, str] = {}        # name -> HOST:PORT

    def _start(self, name: str, args: list[str]) -> None:
        log = open(self.log_dir / f"{name}.log", "wb")
        self.procs[name] = subprocess.Popen([sys.executable, *args], stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()

    def _tracker_up(self) -> bool:
        try:
            Tracker(("127.0.0.1", self.port), 2).close()
            return True
        except ValueError:
            return False

    def registered(self) -> list[str]:
        t = Tracker(("127.0.0.1", self.port), 5)
        try:
            return t.servers(KEY)
        finally:
            t.close()

    def add_server(self, name: str, *, bidiff: bool) -> None:
        port = free_port()
        common = ["--tracker", self.address, "--key", KEY, "--host", "127.0.0.1",
                  "--port", str(port), "--port-end", str(port + 1)]
        self._start(name, ["-m", "bidiff.runtime.cli", "device-server", *common, "--threads", "1"]
                    if bidiff else ["-m", "tvm.exec.rpc_server", *common])
        self.servers[name] = f"127.0.0.1:{port}"

    def signal(self, name: str, sig: int) -> None:
        os.killpg(self.procs[name].pid, sig)

    def stop(self) -> None:
        groups = [p.pid for p in self.procs.values()]
        for pgid in groups:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in self.procs.values():
            p.wait(timeout=30)

        def left() -> list[psutil.Process]:
            out = []
            for p in psutil.process_iter(["pid", "status"]):
                try:
                    if os.getpgid(p.pid) in groups and p.info["status"] != psutil.STATUS_ZOMBIE:
                        out.append(p)
                except (ProcessLookupError, psutil.NoSuchProcess):
                    pass
            return out
        wait_until(lambda: not left(), 30, "the servers' processes to end")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("rpc")


@pytest.fixture(scope="module")
def cluster(work: Path):
    """A tracker and four servers of KEY: two stock ``tvm.exec.rpc_server`` (the server's CPU
    comes from LLVM there) and two ``bidiff device-server``."""
    c = Cluster(work)
    try:
        for i, bidiff in enumerate([False, True, False, True]):
            c.add_server(f"server{i}", bidiff=bidiff)
        wait_until(lambda: len(c.registered()) == 4, START_S, "4 servers to register")
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def artifact(work: Path) -> Path:
    """The tiny test network, exported for x86_64 at tile 32 (what the servers run)."""
    cfg = get_config("tiny-binary")
    torch.manual_seed(0)
    model = create_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() <= 2:
                p.add_(0.05 * torch.randn_like(p))
    ckpt = work / "tiny.safetensors"
    save_checkpoint(ckpt, model, cfg)
    return exporter.export_artifact(ckpt, target="x86_64", out=work / "tiny-x86_64", tile=TILE,
                                    progress=False, measure_float=False).path


@pytest.fixture(scope="module")
def photos(work: Path) -> Path:
    d = work / "photos"
    d.mkdir()
    rng = np.random.default_rng(3)
    for i, (w, h) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"img{i}.png")
    return d


def bidiff(*args, env: dict | None = None, timeout: float = RUN_S) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bidiff.runtime.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def local(work: Path, artifact: Path, photos: Path) -> Path:
    """What the same artifact writes here with the TVM backend: the bytes to match."""
    out = work / "local"
    r = bidiff("upscale", photos, "-o", out, "--artifact", artifact, "--backend", "tvm",
               "--steps", STEPS, "-q")
    assert r.returncode == 0, r.stderr
    assert len(list(out.iterdir())) == len(SIZES)
    return out


def assert_same(out: Path, ref: Path) -> None:
    names = sorted(p.name for p in ref.iterdir())
    assert sorted(p.name for p in out.iterdir()) == names      # no temp files left either
    for n in names:
        assert (out / n).read_bytes() == (ref / n).read_bytes(), n


def test_pool_writes_the_local_bytes(cluster: Cluster, artifact: Path, photos: Path, local: Path,
                                     tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = bidiff("upscale", photos, "-o", out, "--artifact", artifact, "--steps", STEPS,
               "--tracker", cluster.address, "--key", KEY, "--devices", 2)
    assert r.returncode == 0, r.stderr
    assert_same(out, local)
    done = [ln for ln in r.stderr.splitlines() if ln.startswith("[")]
    assert len(done) == len(SIZES), r.stderr
    used = {ln.split(" on ")[1].split()[0] for ln in done}
    assert len(used) == 2 and used <= set(cluster.servers.values()), r.stderr


def test_bench_over_rpc(cluster: Cluster, artifact: Path) -> None:
    r = bidiff("bench", artifact, "--tracker", cluster.address, "--key", KEY, "--rounds", 2,
               "--size", "16x16", "--steps", 2)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[1].startswith("server      127.0.0.1:") and "x86_64" in lines[1], r.stdout
    rows = {ln.split("  ")[1].strip(): ln for ln in lines[3:5]}
    assert set(rows) == {"on the server", "round trip from here"}, r.stdout
    for ln in rows.values():
        assert float(ln.split()[-4]) > 0, ln
    assert "one real upscale, PNG to PNG (tvm on 127.0.0.1:" in r.stdout


def test_no_server_for_the_key(cluster: Cluster, artifact: Path, photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    t0 = time.monotonic()
    r = bidiff("upscale", photos, "-o", out, "--artifact", artifact, "--tracker", cluster.address,
               "--key", "no-such-device", env={"BIDIFF_RPC_TIMEOUT": "2"})
    assert r.returncode == 2
    assert time.monotonic() - t0 < 60
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "'no-such-device'" in lines[0] and cluster.address in lines[0], lines[0]
    assert not out.exists()


def test_foreign_target_is_refused(cluster: Cluster, artifact: Path, photos: Path, tmp_path: Path) -> None:
    """An rpi4 artifact (here: the x86 one relabelled, so its files still verify) is refused by
    the x86 servers before anything is uploaded; so is one needing CPU features they lack."""
    for target, words in [({"name": "rpi4", "arch": "aarch64", "features": ["neon"]},
                           "cannot run artifact target rpi4 (aarch64): the server is x86_64"),
                          ({"name": "x86_64-avx512", "features": ["avx2", "avx512_vpopcntdq"]},
                           "the server's CPU lacks avx512_vpopcntdq")]:
        art = tmp_path / target["name"]
        shutil.copytree(artifact, art)
        m = json.loads((art / "manifest.json").read_text())
        m["target"].update(target)
        (art / "manifest.json").write_text(json.dumps(m))
        out = tmp_path / f"out-{target['name']}"
        r = bidiff("upscale", photos, "-o", out, "--artifact", art, "--tracker", cluster.address,
                   "--key", KEY)
        assert r.returncode == 2
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], r.stderr
        assert not out.exists()


def test_servers_dying_and_hanging(cluster: Cluster, artifact: Path, photos: Path, local: Path,
                                   tmp_path: Path) -> None:
    """One server killed before the run; once the first image is written, the two others with
    a session are killed and stopped (SIGSTOP: it hangs past the timeout and is cut off). Their
    work goes to the one left."""
    cluster.signal("server0", signal.SIGKILL)
    wait_until(lambda: len(cluster.registered()) == 3, 30, "the tracker to drop server0")
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "bidiff.runtime.cli", "upscale", str(photos),
                             "-o", str(out), "--artifact", str(artifact), "--steps", str(STEPS),
                             "--tracker", cluster.address, "--key", KEY],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "BIDIFF_RPC_TIMEOUT": "6"})
    lines: queue.Queue[str] = queue.Queue()
    err: list[str] = []

    def read() -> None:
        for ln in proc.stderr:
            err.append(ln)
            lines.put(ln)
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        first = ""
        while not first.startswith("[1/4]"):
            first = lines.get(timeout=RUN_S)
        free = first.split(" on ")[1].split()[0]
        busy = [n for n in ("server1", "server2", "server3") if cluster.servers[n] != free]
        assert len(busy) == 2, (first, cluster.servers)
        cluster.signal(busy[0], signal.SIGKILL)
        cluster.signal(busy[1], signal.SIGSTOP)
        proc.wait(timeout=RUN_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        reader.join(timeout=30)
    text = "".join(err)
    assert proc.returncode == 0, text
    assert_same(out, local)
    for name in busy:    # mid-image ("its image goes to another server") or still setting up
        assert f"bidiff: server {cluster.servers[name]} failed to " in text, text
    assert f"server {cluster.servers[busy[1]]} gave no answer within 6 s: cut off" in text, text
    later = [ln for ln in err if ln.startswith("[") and not ln.startswith("[1/4]")]
    assert len(later) == 3 and all(f" on {free} " in ln for ln in later), text
