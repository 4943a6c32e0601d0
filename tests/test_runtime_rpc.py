"""`bidiff upscale --tracker` and `bidiff bench --tracker` against a real TVM RPC tracker and
servers on 127.0.0.1: the pool writes the bytes of a local run (whole images, and one large
image's tiles shared by two servers), opens no more sessions than the images' tiles per step,
survives servers that die or hang mid-run, refuses a foreign artifact and a key without servers
in one line.

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
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from PIL import Image

from bidiff import exporter
from bidiff.models import create_model, get_config, save_checkpoint
from bidiff.runtime.artifact import host_info, read_artifact
from bidiff.runtime.rpc import Tracker
from bidiff.runtime.tiling import TileGrid, default_overlap

pytestmark = pytest.mark.slow

TILE, STEPS, KEY = 32, 10, "bidiff-test"
# img0 takes 1 tile, the others 25 each: the worker that finishes img0 is known to be free
# while the others are mid-image
SIZES = [(16, 16), (64, 64), (60, 64), (64, 60)]
# hang bounds, not timings: a process coming up (4 servers importing TVM at once take minutes on
# two loaded cores; a server that dies fails at once, see Cluster.wait_registered), one CLI run
START_S, RUN_S = 600, 180


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
        self.keys: dict[str, str] = {}           # server name -> its key

    def _start(self, name: str, args: list[str], program: list[str] | None = None) -> None:
        log = open(self.log_dir / f"{name}.log", "wb")
        self.procs[name] = subprocess.Popen([*(program or [sys.executable]), *args], stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()

    def _tracker_up(self) -> bool:
        try:
            Tracker(("127.0.0.1", self.port), 2).close()
            return True
        except ValueError:
            return False

    def registered(self, key: str = KEY) -> list[str]:
        t = Tracker(("127.0.0.1", self.port), 5)
        try:
            return t.servers(key)
        finally:
            t.close()

    def add_server(self, name: str, *, bidiff: bool, key: str = KEY,
                   program: list[str] | None = None) -> None:
        """``bidiff device-server`` (else TVM's rpc_server) of ``key`` on a free port; ``program``
        takes device-server's arguments in place of this Python's (tests/test_arm64_emulation.py:
        the emulated arm64 device)."""
        port = free_port()
        common = ["--tracker", self.address, "--key", key, "--host", "127.0.0.1",
                  "--port", str(port), "--port-end", str(port + 1)]
        device_server = [*common, "--threads", "1"]
        if program:
            self._start(name, device_server, program)
        else:
            self._start(name, ["-m", "bidiff.runtime.cli", "device-server", *device_server]
                        if bidiff else ["-m", "tvm.exec.rpc_server", *common])
        self.servers[name] = f"127.0.0.1:{port}"
        self.keys[name] = key

    def wait_registered(self, n: int, key: str = KEY) -> None:
        """Wait until ``n`` servers of ``key`` are registered; fail at once, with its log, if the
        tracker or a server of ``key`` has exited meanwhile."""
        def up() -> bool:
            dead = [name for name, p in self.procs.items()
                    if self.keys.get(name, key) == key and p.poll() is not None]
            if dead:
                log = (self.log_dir / f"{dead[0]}.log").read_text(errors="replace").strip().splitlines()
                pytest.fail(f"{dead[0]} exited:\n" + "\n".join(log[-15:]), pytrace=False)
            return len(self.registered(key)) == n
        wait_until(up, START_S, f"{n} servers of {key} to register")

    def signal(self, name: str, sig: int) -> None:
        os.killpg(self.procs[name].pid, sig)

    def stop(self, names: list[str] | None = None) -> None:
        """Kill the process groups of ``names`` (default: all) and wait until nothing of them is left."""
        procs = [self.procs.pop(n) for n in (names if names is not None else list(self.procs))]
        groups = [p.pid for p in procs]
        for pgid in groups:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in procs:
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
        c.wait_registered(4)
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


class Running:
    """A ``bidiff`` command in the background whose stderr lines are read as they come."""

    def __init__(self, args: tuple, env: dict | None) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "bidiff.runtime.cli", *map(str, args)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        self.err: list[str] = []
        self._lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for ln in self.proc.stderr:
            self.err.append(ln)
            self._lines.put(ln)

    def wait_for(self, match) -> str:
        """The first stderr line (from here on) that ``match``es; bounded by RUN_S."""
        while not match(line := self._lines.get(timeout=RUN_S)):
            pass
        return line


@contextmanager
def running(*args, env: dict | None = None):
    """:class:`Running`; on leaving, waits for the command to end (bounded), else kills it."""
    run = Running(args, env)
    try:
        yield run
        run.proc.wait(timeout=RUN_S)
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait(timeout=30)
        run._reader.join(timeout=30)


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


def servers_of(line: str) -> dict[str, int]:
    """HOST:PORT -> network calls from a CLI line ``[i/n] NAME on A + B (ca + cb network calls, T s)``
    (calls: 0 where the line names one server)."""
    on, _, rest = line.split(" on ", 1)[1].partition(" (")
    names = on.split(" + ")
    calls = rest.split(" network calls")[0].split(" + ") if len(names) > 1 else ["0"]
    return dict(zip(names, map(int, calls)))


def test_pool_writes_the_local_bytes(cluster: Cluster, artifact: Path, photos: Path, local: Path,
                                     tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = bidiff("upscale", photos, "-o", out, "--artifact", artifact, "--steps", STEPS,
               "--tracker", cluster.address, "--key", KEY, "--devices", 2)
    assert r.returncode == 0, r.stderr
    assert_same(out, local)
    lines = r.stderr.splitlines()
    done = [ln for ln in lines if ln.startswith("[")]
    assert len(done) == len(SIZES), r.stderr
    # --devices 2 caps the sessions: images start on, and tiles are shared by, at most 2 servers
    # (2 exactly on a slow CPU; on a fast one the first session may finish the folder before the
    # second is set up, so that is not asserted)
    used = {ln.split(" starts on ")[1] for ln in lines if " starts on " in ln}
    used |= {s for ln in done for s in servers_of(ln)}
    assert 1 <= len(used) <= 2 and used <= set(cluster.servers.values()), r.stderr


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


def lacking_x86_feature() -> str:
    """An AVX-512 feature this machine's CPU lacks (the servers run here): CI lands on AVX2-only
    and on AVX-512 machines alike."""
    have = host_info().features or frozenset()
    for f in ("avx512_vpopcntdq", "avx512_bitalg", "avx512_vbmi2", "avx512_bf16", "avx512_fp16"):
        if f not in have:
            return f
    pytest.skip("this CPU has every AVX-512 feature the servers are asked about")


def test_foreign_target_is_refused(cluster: Cluster, artifact: Path, photos: Path, tmp_path: Path) -> None:
    """An rpi4 artifact (here: the x86 one relabelled, so its files still verify) is refused by
    the x86 servers before anything is uploaded; so is one needing a CPU feature they lack."""
    lacking = lacking_x86_feature()
    for target, words in [({"name": "rpi4", "arch": "aarch64", "features": ["neon"]},
                           "cannot run artifact target rpi4 (aarch64): the server is x86_64"),
                          ({"name": "x86_64-avx512", "features": ["avx2", lacking]},
                           f"the server's CPU lacks {lacking}")]:
        art = tmp_path / target["name"]
        shutil.copytree(artifact, art)
        m = json.loads((art / "manifest.json").read_text())
        m["target"].update(target)
        (art / "manifest.json").write_text(json.dumps(m))
        out = tmp_path / f"out-{target['name']}"
        r = bidiff("upscale", photos, "-o", out, "--artifact", art, "--tracker", cluster.address,
                   "--key", KEY)
        assert r.returncode == 2, r.stderr
        *retries, last = r.stderr.strip().splitlines()
        assert last.startswith("bidiff: error: ") and words in last, r.stderr
        # a server the tracker hands out while it still ends a session is passed over, noted
        assert all(line.endswith("asking for another server") for line in retries), r.stderr
        assert not out.exists()


def test_servers_dying_and_hanging(cluster: Cluster, artifact: Path, photos: Path, local: Path,
                                   tmp_path: Path) -> None:
    """One server killed before the run; then, as soon as two servers each hold one of the
    25-tile images (their ``starts on`` lines), one is killed and the other stopped (SIGSTOP: it
    hangs past the timeout and is cut off). Their images go to the one left.

    The victims are picked from what the run says, not from timing: a server may still be
    setting up its session when another has finished the 1-tile image."""
    cluster.signal("server0", signal.SIGKILL)
    wait_until(lambda: len(cluster.registered()) == 3, 30, "the tracker to drop server0")
    by_addr = {cluster.servers[n]: n for n in ("server1", "server2", "server3")}
    large = {f"img{i}.png" for i, (w, h) in enumerate(SIZES) if w * h > TILE * TILE}
    holding: dict[str, str] = {}           # HOST:PORT -> the large image it works on
    out = tmp_path / "out"
    with running("upscale", photos, "-o", out, "--artifact", artifact, "--steps", STEPS,
                 "--tracker", cluster.address, "--key", KEY, env={"BIDIFF_RPC_TIMEOUT": "6"}) as run:
        while len(holding) < 2:
            ln = run.wait_for(lambda ln: " starts on " in ln or ln.startswith("["))
            if " starts on " in ln:
                name, where = ln.removeprefix("bidiff: ").strip().split(" starts on ")
                if name in large:
                    holding[where] = name
            else:
                finished = ln.split("] ", 1)[1].split(" on ")[0]
                holding = {w: n for w, n in holding.items() if n != finished}
        killed, stopped = holding
        cluster.signal(by_addr[killed], signal.SIGKILL)
        cluster.signal(by_addr[stopped], signal.SIGSTOP)
    proc, err = run.proc, run.err
    text = "".join(err)
    assert proc.returncode == 0, text
    assert_same(out, local)
    (survivor,) = set(by_addr) - {killed, stopped}
    assert f"bidiff: server {killed} failed to run the network" in text, text
    assert f"bidiff: server {stopped} failed to " in text, text
    assert f"server {stopped} gave no answer within 6 s: cut off" in text, text
    for name in holding.values():   # finished by the one left: as a helper, or redone from the start
        (line,) = [ln for ln in err if ln.startswith("[") and f"] {name} on " in ln]
        assert survivor in servers_of(line), text


# ----------------------------------------------------------------- one large image, its tiles shared

LARGE, LARGE_STEPS = (96, 80), 30          # about 8 x 7 tiles of 32, 30 steps


@pytest.fixture(scope="module")
def large(work: Path, artifact: Path) -> tuple[Path, bytes]:
    """One image of many tiles and the bytes a local TVM run writes for it."""
    d = work / "large"
    d.mkdir()
    w, h = LARGE
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / "big.png")
    out = work / "large-local.png"
    r = bidiff("upscale", d / "big.png", "-o", out, "--artifact", artifact, "--backend", "tvm",
               "--steps", LARGE_STEPS, "-q")
    assert r.returncode == 0, r.stderr
    return d / "big.png", out.read_bytes()


@contextmanager
def own_servers(cluster: Cluster, request, n: int):
    """``n`` ``bidiff device-server`` of a key of their own (so the run gets exactly these),
    stopped on leaving: (key, names)."""
    key = f"tiles-{request.node.name}".replace("[", "-").replace("]", "")
    names = [f"{key}-{i}" for i in range(n)]
    try:
        for name in names:
            cluster.add_server(name, bidiff=True, key=key)
        cluster.wait_registered(n, key)
        yield key, names
    finally:
        cluster.stop([name for name in names if name in cluster.procs])


@pytest.fixture
def pair(cluster: Cluster, request) -> tuple[str, list[str]]:
    """Two servers of a key of their own (:func:`own_servers`)."""
    with own_servers(cluster, request, 2) as got:
        yield got


def test_one_large_image_shares_its_tiles(cluster: Cluster, artifact: Path, large, pair,
                                          tmp_path: Path) -> None:
    """Two servers, one image: both evaluate its tiles, and the file is the local one."""
    (src, expect), (key, names) = large, pair
    out = tmp_path / "big_x2.png"
    r = bidiff("upscale", src, "-o", out, "--artifact", artifact, "--steps", LARGE_STEPS,
               "--tracker", cluster.address, "--key", key)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == expect
    assert os.listdir(tmp_path) == ["big_x2.png"]
    done = [ln for ln in r.stderr.splitlines() if ln.startswith("[1/1] ")]
    calls = servers_of(done[0])
    assert set(calls) == {cluster.servers[n] for n in names}, r.stderr
    assert all(c > 0 for c in calls.values()), r.stderr
    m = read_artifact(artifact).manifest
    w, h = (side * m.model.scale for side in LARGE)
    tiles = len(TileGrid.create(h, w, TILE, default_overlap(TILE), align=m.input_multiple))
    assert tiles > 1 and sum(calls.values()) == tiles * LARGE_STEPS, r.stderr


@pytest.mark.parametrize("victim", ["own", "helper"])
def test_large_image_survives_a_server_killed_mid_image(cluster: Cluster, artifact: Path, large, pair,
                                                        tmp_path: Path, victim: str) -> None:
    """Once the second server takes tiles, one of the two is killed: the image's own (the
    sampler carries on with the helper) or the helper (its tile goes back). Same bytes."""
    (src, expect), (key, names) = large, pair
    by_addr = {cluster.servers[n]: n for n in names}
    out = tmp_path / "big_x2.png"
    with running("upscale", src, "-o", out, "--artifact", artifact, "--steps", LARGE_STEPS,
                 "--tracker", cluster.address, "--key", key) as run:
        joined = run.wait_for(lambda ln: " takes tiles of the image on " in ln)
        helper, own = joined.split("bidiff: server ")[1].split(" takes tiles of the image on ")
        killed = own.strip() if victim == "own" else helper
        cluster.signal(by_addr[killed], signal.SIGKILL)
    err = run.err
    text = "".join(err)
    assert run.proc.returncode == 0, text
    assert out.read_bytes() == expect
    assert os.listdir(tmp_path) == ["big_x2.png"]
    assert f"bidiff: server {killed} failed to run the network" in text, text
    assert "its tiles go to the image's other servers" in text, text
    assert len([ln for ln in err if ln.startswith("[1/1] ")]) == 1, text


# ----------------------------------------------------------------- no more sessions than tiles

@pytest.mark.parametrize("copies", [1, 2])
def test_no_session_beyond_the_tiles_per_step(cluster: Cluster, artifact: Path, photos: Path,
                                              local: Path, tmp_path: Path, request, monkeypatch,
                                              copies: int) -> None:
    """Three servers, ``copies`` images of one tile each (img0): the pool opens one session per
    tile per step, ``copies``, not one per server (a session uploads the artifact and loads it
    there, and the extra ones would never get a tile). Same bytes. In-process, so the sessions
    started are counted on the client (``RemoteBackend.start``)."""
    from click.testing import CliRunner

    from bidiff.runtime import pool
    from bidiff.runtime.cli import cli

    m = read_artifact(artifact).manifest
    w, h = (side * m.model.scale for side in SIZES[0])
    assert len(TileGrid.create(h, w, TILE, default_overlap(TILE), align=m.input_multiple)) == 1
    src = tmp_path / "in"
    src.mkdir()
    for i in range(copies):
        shutil.copy(photos / "img0.png", src / f"copy{i}.png")
    sessions: list[str] = []

    class Counted(pool.RemoteBackend):
        def start(self):
            super().start()
            sessions.append(self.where)       # list.append: atomic across the workers
            return self

    monkeypatch.setattr(pool, "RemoteBackend", Counted)
    with own_servers(cluster, request, 3) as (key, names):
        out = tmp_path / "out"
        r = CliRunner().invoke(cli, ["upscale", str(src), "-o", str(out), "--artifact", str(artifact),
                                     "--steps", str(STEPS), "--tracker", cluster.address, "--key", key])
    assert r.exit_code == 0, (r.output, r.exception)
    expect = (local / "img0_x2.png").read_bytes()
    assert sorted(p.name for p in out.iterdir()) == [f"copy{i}_x2.png" for i in range(copies)]
    assert all(p.read_bytes() == expect for p in out.iterdir())
    # one per image in practice (the workers ask for servers at once); no lower bound of
    # ``copies``: a session still being set up when the run ends is not counted
    assert 1 <= len(sessions) <= copies, (sessions, r.output)
    assert set(sessions) <= {cluster.servers[n] for n in names}, (sessions, r.output)
