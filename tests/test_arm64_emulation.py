"""The Raspberry Pi path, proven under emulation: the arm64 artifact, run by the device install a
Pi user gets (``pip install "bidiff[tvm]"`` wheels for aarch64 + libtvm_runtime.so, no torch /
onnx / TVM compiler) on an arm64 Debian Python 3.11 under qemu-aarch64, computes what the x86_64
artifact computes natively for the same seed.

``scripts/arm64_emulate.sh setup`` builds the emulated device (cached in .cache/arm64; the first
run downloads ~130 MB of Debian packages and wheels). Deselect with ``-m "not arm64"``.
Outputs: the ``bidiff upscale`` PNGs (uint8) are compared exactly; the float32 outputs of the
same sampling through the runtime API must agree within 1e-4 per pixel (observed: bit-identical,
as are the shipped model's outputs at tile 128). The same device as an RPC server
(``scripts/arm64_emulate.sh rpc-server``) behind a tracker on 127.0.0.1: ``bidiff upscale
--tracker`` writes the emulated local run's PNG, and refuses the x86_64 artifact.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.arm64, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
EMU = REPO / "scripts" / "arm64_emulate.sh"
TILE = 32                    # HR tile: a 16x16 input -> one 32x32 tile
STEPS = 4                    # DDIM steps (t = 1999, 1499, 999, 499: four different groups)
SEED = 7
ARM_TARGETS = ("rpi4", "arm64")      # the README's Pi 4 target and generic armv8-a + NEON
RPC_KEY = "emulated-arm64"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "BIDIFF_TVM_RUNTIME"}
    env.update(OMP_NUM_THREADS="1", TVM_NUM_THREADS="1", BIDIFF_THREADS="1", **extra)
    return env


def _run(cmd: list[str], what: str, timeout: float, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                       cwd=kw.pop("cwd", REPO), env=kw.pop("env", _env()), **kw)
    if r.returncode != 0:
        tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-15:])
        pytest.fail(f"{what} failed (exit {r.returncode}):\n{tail}", pytrace=False)
    return r


def emu(*args: str, what: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``scripts/arm64_emulate.sh run -- ARGS``: the device command under qemu-aarch64."""
    return _run(["bash", EMU, "run", "--", *args], what, timeout)


@pytest.fixture(scope="module")
def device() -> None:
    """The emulated Pi: qemu-user, cross compiler, sysroot, aarch64 wheels (cached)."""
    r = subprocess.run(["bash", EMU, "setup"], capture_output=True, text=True, timeout=1800, cwd=REPO)
    if r.returncode != 0:
        msg = (r.stderr.strip().splitlines() or ["(no message)"])[-1]
        pytest.fail(f"arm64 emulation setup failed: {msg}", pytrace=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    import torch
    from bidiff.models import create_model, get_config, save_checkpoint
    torch.manual_seed(0)
    model = create_model("tiny-binary").eval()
    with torch.no_grad():        # distinct experts per group, non-trivial biases / slopes
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(path, model, get_config("tiny-binary"))
    return path


@pytest.fixture(scope="module")
def artifacts(checkpoint, device, tmp_path_factory) -> dict[str, Path]:
    """``bidiff-export CKPT --target T --out DIR`` for x86_64 and the arm64 targets."""
    root = tmp_path_factory.mktemp("artifacts")
    out = {}
    for target in ("x86_64", *ARM_TARGETS):
        out[target] = root / f"tiny-{target}"
        _run([sys.executable, "-m", "bidiff.exporter.cli", checkpoint, "--target", target,
              "--out", out[target], "--tile", str(TILE), "--no-progress"], f"export {target}", 900)
    return out


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    from PIL import Image
    rng = np.random.default_rng(SEED)
    yy, xx = np.mgrid[0:16, 0:16]
    img = np.stack([yy * 15, xx * 15, (yy + xx) * 7], axis=-1) + rng.integers(0, 40, (16, 16, 3))
    path = tmp_path_factory.mktemp("in") / "photo.png"
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)
    return path


def _upscale_args(image: Path, out: Path, artifact: Path, tracker: str | None = None) -> list[str]:
    # the README's device command, plus a fixed step count, seed and thread count (the servers'
    # own with --tracker)
    where = ["--tracker", tracker, "--key", RPC_KEY] if tracker else ["--threads", "1"]
    return ["upscale", str(image), "-o", str(out), "--artifact", str(artifact),
            "--steps", str(STEPS), "--seed", str(SEED), *where]


@pytest.fixture(scope="module")
def x86_png(artifacts, image, tmp_path_factory) -> np.ndarray:
    from PIL import Image
    out = tmp_path_factory.mktemp("x86")
    _run([sys.executable, "-m", "bidiff.runtime.cli", *_upscale_args(image, out, artifacts["x86_64"])],
         "native bidiff upscale (x86_64)", 600)
    return np.asarray(Image.open(out / "photo_x2.png"))


@pytest.mark.parametrize("target", ARM_TARGETS)
def test_bidiff_upscale_under_qemu_equals_x86(target, artifacts, image, x86_png, tmp_path):
    from PIL import Image
    r = emu("bidiff", *_upscale_args(image, tmp_path, artifacts[target]),
            what=f"emulated bidiff upscale ({target})")
    png = tmp_path / "photo_x2.png"
    assert png.is_file(), r.stdout + r.stderr
    assert str(png) in r.stdout                  # the CLI names what it wrote
    got = np.asarray(Image.open(png))
    assert got.shape == (32, 32, 3) and got.dtype == np.uint8
    diff = np.abs(got.astype(int) - x86_png.astype(int))
    assert diff.max() == 0, (f"{target} under qemu vs x86_64: {int((diff > 0).sum())} values differ, "
                             f"max {int(diff.max())} levels")


@pytest.mark.skipif(os.environ.get("BIDIFF_ARM64_PI_VENV") != "1",
                    reason="set BIDIFF_ARM64_PI_VENV=1: README's Pi commands with pip itself emulated "
                           "(downloads from PyPI under qemu, ~5 min)")
def test_readme_pi_commands_in_a_venv(artifacts, image, x86_png, tmp_path):
    """README's commands on the Pi, literally (venv, pip install, pip download + extraction of
    libtvm_runtime.so, BIDIFF_TVM_RUNTIME, bidiff info, bidiff upscale), under qemu."""
    from PIL import Image
    _run(["bash", EMU, "pi-venv"], "emulated Pi venv (README commands)", 1800)
    pi = ["bash", EMU, "pi-run", "--", "bidiff"]
    r = _run([*pi, "info", artifacts["rpi4"]], "venv: bidiff info (rpi4)", 300)
    assert "target fits this machine" in r.stdout
    _run([*pi, *_upscale_args(image, tmp_path, artifacts["rpi4"])], "venv: bidiff upscale (rpi4)", 600)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "photo_x2.png")), x86_png)


@pytest.mark.skipif(os.environ.get("BIDIFF_ARM64_ORT") != "1",
                    reason="set BIDIFF_ARM64_ORT=1: the onnxruntime backend under qemu (+140 MB, ~1 min)")
def test_onnxruntime_backend_under_qemu(artifacts, image, x86_png, tmp_path):
    """The other backend on the same arm64 artifact (its portable ONNX graphs), aarch64 onnxruntime."""
    from PIL import Image
    _run(["bash", EMU, "setup", "--onnxruntime"], "setup --onnxruntime", 1800)
    _run(["bash", EMU, "run", "--", "bidiff", *_upscale_args(image, tmp_path, artifacts["rpi4"]),
          "--backend", "onnxruntime"], "emulated bidiff upscale (rpi4, onnxruntime)", 900,
         env=_env(ARM64_ONNXRUNTIME="1"))
    got = np.asarray(Image.open(tmp_path / "photo_x2.png")).astype(int)
    assert np.abs(got - x86_png.astype(int)).max() <= 1      # another backend: ±1 level allowed


def test_bidiff_info_under_qemu(artifacts):
    """README's check on the Pi: checksums intact and the target fits (the emulated Pi 4)."""
    r = emu("bidiff", "info", str(artifacts["rpi4"]), what="emulated bidiff info (rpi4)")
    assert "target fits this machine" in r.stdout, r.stdout
    assert "model.so" in r.stdout and "modified" not in r.stdout


FLOAT_SCRIPT = r"""
import sys, numpy as np
from bidiff import runtime
art, out, steps, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
from PIL import Image
img = np.asarray(Image.open(sys.argv[5]), dtype=np.float32) / 255      # float in -> float out
up = runtime.load(art, threads=1)                                     # auto -> tvm here
assert up.backend_name == "tvm", up.backend_name
res = up.upscale(img, steps=steps, seed=seed)
np.save(out, res)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "onnx", "onnxruntime", "tvm"))
import platform
print("arch", platform.machine(), "heavy", heavy)
"""


@pytest.fixture(scope="module")
def x86_float(artifacts, image, tmp_path_factory) -> np.ndarray:
    out = tmp_path_factory.mktemp("x86f") / "out.npy"
    _run([sys.executable, "-c", FLOAT_SCRIPT, artifacts["x86_64"], out, str(STEPS), str(SEED), image],
         "native runtime API, float (x86_64)", 600)
    return np.load(out)


def test_float_output_under_qemu_within_1e4(artifacts, image, x86_float, tmp_path):
    out = tmp_path / "out.npy"
    r = emu("python3", "-c", FLOAT_SCRIPT, str(artifacts["rpi4"]), str(out), str(STEPS), str(SEED),
            str(image), what="emulated runtime API, float (rpi4)")
    assert "arch aarch64 heavy []" in r.stdout, r.stdout      # aarch64, and no torch/onnx/tvm
    got = np.load(out)
    assert got.shape == x86_float.shape == (32, 32, 3) and got.dtype == np.float32
    err = float(np.abs(got - x86_float).max())
    print(f"\nrpi4 under qemu vs x86_64, float32 output: max |diff| = {err:.3g}"
          f" ({'bit-identical' if err == 0 else 'within tolerance'})")
    assert err <= 1e-4


def test_device_install_is_light(device, artifacts):
    """No torch, onnx or TVM compiler on the device; the footprint, and the artifacts per target."""
    paths = dict(line.split("=", 1) for line in
                 _run(["bash", EMU, "paths"], "paths", 60).stdout.split())
    site = Path(paths["SITE"])
    for heavy in ("torch", "onnx", "onnxruntime", "tvm"):
        assert not (site / heavy).exists(), f"{heavy} is installed on the device side"
    assert (site / "bidiff" / "runtime").is_dir() and (site / "tvm_ffi").is_dir()
    r = _run([sys.executable, REPO / "scripts" / "footprint.py", "--device", Path(paths["SITE"]).parent,
              *(a for t in artifacts.values() for a in ("--artifact", t)), "--json"], "footprint", 120)
    rep = json.loads(r.stdout)
    mb = {k: round(v / 1e6, 2) for k, v in rep["components"].items()}
    arts = {Path(k).name: round(v["total"] / 1e6, 2) for k, v in rep["artifacts"].items()}
    print(f"\ndevice footprint MB: {mb} total {rep['total'] / 1e6:.1f}\nartifacts MB: {arts}")
    assert rep["total"] < 150e6, mb
    assert rep["components"]["libtvm_runtime.so"] > 1e6


def test_missing_qemu_is_one_line(tmp_path):
    """Without qemu-aarch64 on PATH the wrapper says how to install it (no traceback)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("dirname", "cat", "mkdir", "mv", "printf"):
        if shutil.which(tool):
            (bindir / tool).symlink_to(shutil.which(tool))
    r = subprocess.run([shutil.which("bash"), EMU, "run", "--", "bidiff", "--help"], capture_output=True,
                       text=True, timeout=60, env={"PATH": str(bindir), "HOME": str(tmp_path)})
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "apt-get install qemu-user" in lines[0], r.stderr


@pytest.fixture
def arm64_server(device, tmp_path):
    """A tracker on 127.0.0.1 and ``scripts/arm64_emulate.sh rpc-server``, the emulated Pi as the
    only server of RPC_KEY, each in a process group of its own; teardown kills the groups and
    fails if any of their processes is left (tests/test_runtime_rpc.py's Cluster)."""
    from test_runtime_rpc import Cluster          # its torch import: only when run
    _run(["bash", EMU, "setup", "--rpc"], "setup --rpc", 1800)
    c = Cluster(tmp_path)
    try:
        c.add_server("arm64", bidiff=True, key=RPC_KEY, program=["bash", str(EMU), "rpc-server", "--"])
        # `import tvm` alone takes ~20 s emulated, and the server's worker imports it again
        c.wait_registered(1, RPC_KEY)
        yield c
    finally:
        c.stop()


def test_upscale_through_emulated_arm64_rpc_server(artifacts, image, arm64_server, tmp_path):
    """issue 20's extra: `bidiff upscale --tracker` on x86 with a real arm64 `bidiff device-server`
    process (emulated): the target check passes, the PNG equals the emulated local run's byte for
    byte, and the x86_64 artifact is refused in one line (check_remote_target)."""
    env = _env(BIDIFF_RPC_TIMEOUT="300")          # one remote operation, emulated on a busy host
    host = [sys.executable, "-m", "bidiff.runtime.cli"]
    tracker, server = arm64_server.address, arm64_server.servers["arm64"]
    r = _run([*host, *_upscale_args(image, tmp_path / "rpc", artifacts["arm64"], tracker)],
             "bidiff upscale --tracker (arm64 artifact, emulated server)", 600, env=env)
    assert f"photo.png on {server}" in r.stderr, r.stderr
    emu("bidiff", *_upscale_args(image, tmp_path / "local", artifacts["arm64"]),
        what="emulated local bidiff upscale (arm64)")
    remote, local = (tmp_path / d / "photo_x2.png" for d in ("rpc", "local"))
    assert remote.read_bytes() == local.read_bytes()

    r = subprocess.run([*host, *_upscale_args(image, tmp_path / "x86", artifacts["x86_64"], tracker)],
                       capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.strip().splitlines() == [
        f"bidiff: error: RPC server {server} cannot run artifact target x86_64 (x86_64): the server "
        "is aarch64; export for that device (bidiff-export --target ...) or use another --key"], r.stderr
    assert not (tmp_path / "x86").exists() or not any((tmp_path / "x86").iterdir())
