"""runtime.load / Upscaler.upscale / runtime.upscale over the fake ONNX artifact: image kinds,
alpha, determinism, threads, the default artifact, and import lightness."""
from __future__ import annotations

import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bidiff import runtime
from bidiff.runtime import api, images
from bidiff.runtime.bicubic import upscale_condition
from test_runtime_artifact import make_fake_artifact


@pytest.fixture(scope="module")
def art(tmp_path_factory) -> Path:
    return make_fake_artifact(tmp_path_factory.mktemp("api") / "fake")


@pytest.fixture(scope="module")
def up(art: Path) -> api.Upscaler:
    return runtime.load(art, backend="onnxruntime", threads=1)


def rgb(h=12, w=10, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_kinds_in_kinds_out(up: api.Upscaler, tmp_path: Path) -> None:
    a = rgb()
    out = up.upscale(a, steps=2)
    assert out.dtype == np.uint8 and out.shape == (24, 20, 3)
    # The fake network's x0 at the last step (group 0) is the bicubic condition itself.
    ref = np.clip(upscale_condition(np.moveaxis(a / 255.0, -1, 0).astype(np.float32), 2), 0, 1)
    assert np.abs(out.astype(int) - np.round(np.moveaxis(ref, 0, -1) * 255)).max() <= 1
    f = up.upscale(a.astype(np.float32) / 255, steps=2)
    assert f.dtype == np.float32 and f.shape == (24, 20, 3) and 0 <= f.min() and f.max() <= 1
    u16 = up.upscale(a.astype(np.uint16) * 257, steps=2)
    assert u16.dtype == np.uint16 and np.abs(u16 // 257 - out.astype(int)).max() <= 1
    pil = up.upscale(Image.fromarray(a), steps=2)
    assert isinstance(pil, Image.Image) and pil.mode == "RGB" and np.array_equal(np.asarray(pil), out)
    p = tmp_path / "a.png"
    Image.fromarray(a).save(p)
    assert np.array_equal(np.asarray(up.upscale(p, steps=2)), out)          # path in -> PIL out
    grey = up.upscale(a[..., 0], steps=2)
    assert grey.shape == (24, 20, 3)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "I;16", "1", "CMYK"])
def test_modes(up: api.Upscaler, mode: str) -> None:
    base = Image.fromarray(rgb(8, 8)).convert("RGBA")
    base.putalpha(Image.fromarray(np.linspace(0, 255, 64).reshape(8, 8).astype(np.uint8)))
    im = Image.fromarray((np.asarray(base.convert("L")).astype(np.uint16) * 257)) if mode == "I;16" \
        else base.convert(mode)
    out = up.upscale(im, steps=1)
    has_alpha = mode in ("LA", "RGBA")
    assert out.mode == ("RGBA" if has_alpha else "RGB") and out.size == (16, 16)
    if has_alpha:   # alpha: plain bicubic of the input's alpha, reattached
        want = images.upscale_alpha(np.asarray(im.convert("RGBA"))[..., 3] / np.float32(255), 2)
        assert np.abs(np.asarray(out)[..., 3].astype(int) - np.round(want * 255)).max() <= 1


def test_same_seed_same_bytes_and_threads(up: api.Upscaler, art: Path) -> None:
    a = rgb(40, 36)                                   # HR 80 x 72: several tiles of 32
    first = up.upscale(a, steps=3, seed=7)
    assert up.upscale(a, steps=3, seed=7).tobytes() == first.tobytes()
    # one Upscaler from several threads: serialised, never mixed up
    results: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        results[i] = up.upscale(a, steps=3, seed=7 + i % 2)
    ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    other = up.upscale(a, steps=3, seed=8)
    for i, r in results.items():
        assert r.tobytes() == (first if i % 2 == 0 else other).tobytes()
    with pytest.raises(ValueError, match="between 1 and 1000"):
        up.upscale(a, steps=0)
    with pytest.raises(runtime.BackendError, match="valid: auto, tvm, onnxruntime"):
        runtime.load(art, backend="cuda")


def test_default_artifact_from_cache(art: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("BIDIFF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(api, "_default_artifact_key", lambda: None)          # no exporter
    monkeypatch.setattr(api, "_build_default_artifact", lambda cache, key: None)
    with pytest.raises(runtime.ArtifactError, match="no bidiff artifact in .*pip install 'bidiff\\[export\\]'"):
        api.default_artifact()
    shutil.copytree(art, tmp_path / "cache" / "default-onnx")
    assert api.default_artifact() == tmp_path / "cache" / "default-onnx"
    out = runtime.upscale(rgb(), steps=1)                      # loads once, then cached
    assert out.shape == (24, 20, 3)
    assert runtime.upscale(rgb(), steps=1).tobytes() == out.tobytes()
    assert len([k for k in api._cache if k[0] is None]) == 1


def test_default_artifact_is_keyed_by_checkpoint_and_exporter(art: Path, tmp_path: Path,
                                                               monkeypatch) -> None:
    """With the exporter installed, plain-named artifacts (built by an older bidiff, or of an
    older shipped model) are passed over for one named after the default-artifact key."""
    from bidiff.exporter import default_artifact_key
    key = default_artifact_key()
    assert len(key) == 64 and api._default_artifact_key() == key
    cache = tmp_path / "cache"
    monkeypatch.setenv("BIDIFF_CACHE", str(cache))
    for name in ("default-onnx", f"default-onnx-{'0' * 12}"):
        shutil.copytree(art, cache / name)
    monkeypatch.setattr(api, "_build_default_artifact", lambda cache, key: None)
    with pytest.raises(runtime.ArtifactError, match="no bidiff artifact in "):
        api.default_artifact()
    shutil.copytree(art, cache / f"default-onnx-{key[:12]}")
    assert api.default_artifact() == cache / f"default-onnx-{key[:12]}"
    monkeypatch.setattr(api, "_default_artifact_key", lambda: None)          # runtime only
    assert api.default_artifact() == cache / "default-onnx"


def test_default_artifact_key_follows_checkpoint_exporter_sources_and_versions(
        tmp_path: Path, monkeypatch) -> None:
    """The key changes with the shipped checkpoint, with any source file of the exporter or
    models package and with the TVM version; it is stable otherwise."""
    import importlib.metadata as md
    import importlib.util

    from bidiff.exporter import export
    monkeypatch.setattr(export, "default_checkpoint_sha256", lambda: "ab" * 32)
    fake = tmp_path / "exporter_pkg"
    fake.mkdir()
    (fake / "kernels.py").write_text("FAST = False\n")
    real_find = importlib.util.find_spec

    def find_spec(name, *a):
        spec = real_find(name, *a)
        if name == "bidiff.exporter":
            spec = importlib.util.spec_from_file_location(name, fake / "__init__.py",
                                                          submodule_search_locations=[str(fake)])
        return spec
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    base = export.default_artifact_key()
    assert export.default_artifact_key() == base
    (fake / "kernels.py").write_text("FAST = True\n")
    newer_code = export.default_artifact_key()
    assert newer_code != base
    monkeypatch.setattr(export, "default_checkpoint_sha256", lambda: "cd" * 32)
    newer_model = export.default_artifact_key()
    assert newer_model not in (base, newer_code)
    real_version = md.version
    monkeypatch.setattr(md, "version", lambda d: "9.9" if d == "apache-tvm" else real_version(d))
    assert export.default_artifact_key() not in (base, newer_code, newer_model)
    monkeypatch.setattr(export, "default_checkpoint_sha256", lambda: None)
    assert export.default_artifact_key() is None


def test_import_is_light() -> None:
    """Importing the runtime, its API and CLI loads no torch, onnx or TVM compiler (nor a backend)."""
    code = ("import sys, bidiff.runtime, bidiff.runtime.api, bidiff.runtime.cli, bidiff.runtime.backends\n"
            "import bidiff.runtime.benchmark\n"
            "from bidiff import runtime; runtime.load; runtime.upscale\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'onnx', 'tvm', 'onnxruntime', 'tvm_ffi', 'bidiff.models', 'bidiff.exporter')"
            " or m.startswith(('bidiff.models', 'bidiff.exporter')))\n"
            "print(bad)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def test_running_onnxruntime_backend_loads_no_torch_or_onnx(art: Path) -> None:
    code = ("import sys, numpy as np\nfrom bidiff import runtime\n"
            f"up = runtime.load({str(art)!r}, backend='onnxruntime', threads=1)\n"
            "up.upscale(np.zeros((8, 8, 3), np.uint8), steps=1)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'onnx', 'tvm')))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def test_default_artifact_built_by_exporter(art: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """First use with the exporter installed: it is called for this host (native first, ONNX if
    the native build fails); its user errors become one-line ArtifactErrors."""
    from bidiff import exporter
    calls = []

    def fake_export(checkpoint, *, target, out, force):
        calls.append(target)
        if target != "onnx":
            raise RuntimeError("compiler exploded")
        shutil.copytree(art, out)
    monkeypatch.setenv("BIDIFF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(exporter, "export_artifact", fake_export, raising=False)
    monkeypatch.setattr(api, "_default_target", lambda: "x86_64")
    monkeypatch.setattr(api, "_default_artifact_key", lambda: "ab" * 32)
    built = tmp_path / "cache" / "default-onnx-abababababab"
    assert api.default_artifact() == built
    assert calls == ["x86_64", "onnx"] and "compiler exploded" in capsys.readouterr().err
    assert api.default_artifact() == built and len(calls) == 2                      # cached
    # a new shipped checkpoint (weights or sampler settings): the old cache is not used
    monkeypatch.setattr(api, "_default_artifact_key", lambda: "cd" * 32)
    assert api.default_artifact() == tmp_path / "cache" / "default-onnx-cdcdcdcdcdcd"
    assert len(calls) == 4 and built.is_dir()

    def user_error(checkpoint, **kw):
        raise ValueError("the shipped model is not installed")
    monkeypatch.setattr(exporter, "export_artifact", user_error)
    monkeypatch.setenv("BIDIFF_CACHE", str(tmp_path / "cache2"))
    with pytest.raises(runtime.ArtifactError, match="cannot build the default artifact .*not installed"):
        api.default_artifact()
