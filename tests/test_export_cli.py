"""``export_artifact`` and ``bidiff-export``: a readable, verified artifact; bad input -> one line,
exit code 2, nothing left behind."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from bidiff import runtime
from bidiff.exporter import export_artifact
from bidiff.exporter.cli import main
from bidiff.models import create_model, get_config, save_checkpoint, set_deploy
from bidiff.runtime.artifact import read_artifact, sha256_file
from conftest import GOLDEN   # the one definition of where the golden data lives



@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(1)
    model = create_model("tiny-binary")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(path, model, get_config("tiny-binary"))
    return path


def _leftovers(parent: Path, name: str) -> list[str]:
    return [p for p in os.listdir(parent) if name in p]


def test_export_artifact_roundtrip(tiny_ckpt, tmp_path) -> None:
    out = tmp_path / "art"
    r = export_artifact(tiny_ckpt, out=out, tile=16, progress=False)
    art = read_artifact(out)                                   # verifies every checksum
    m = art.manifest
    assert m.model.name == "tiny-binary" and m.tile == 16 and m.target is None
    assert [(g.index, g.t_min, g.t_max) for g in m.groups] == [(k, 400 * k, 400 * k + 399) for k in range(5)]
    assert sorted(m.files) == ["onnx/group_0.onnx", "onnx/group_1.onnx", "onnx/group_2.onnx",
                               "onnx/group_3.onnx", "onnx/group_4.onnx", "onnx/weights.safetensors"]
    assert oct(out.stat().st_mode & 0o777) != oct(0o700)       # shareable, not mkdtemp's 0700
    # the artifact's graph runs and equals PyTorch deploy mode
    from bidiff.models import load_checkpoint
    model, _ = load_checkpoint(tiny_ckpt)
    set_deploy(model, True)
    rng = np.random.default_rng(0)
    feeds = {"x_t": rng.standard_normal((1, 3, 16, 16)).astype(np.float32),
             "cond": rng.random((1, 3, 16, 16)).astype(np.float32), "t": np.array([[1234]])}
    got = ort.InferenceSession(str(art.onnx_path(3)), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    with torch.no_grad():
        want = model(*(torch.from_numpy(feeds[k]) for k in ("x_t", "cond", "t"))).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    # sizes: packed binary weights >= 25x smaller than float32; artifact smaller than float ONNX
    assert r.binary_ratio >= 25 and r.float_onnx_bytes > r.artifact_bytes
    # deterministic: a second export is byte-identical, file by file (manifest included)
    r2 = export_artifact(tiny_ckpt, out=tmp_path / "art2", tile=16, progress=False,
                         float_onnx=tmp_path / "float")
    assert r2.float_onnx_path == tmp_path / "float" and r2.float_onnx_bytes == r.float_onnx_bytes
    assert sorted(os.listdir(tmp_path / "float")) == [f"group_{k}.onnx" for k in range(5)] + ["weights.safetensors"]
    for rel in [*m.files, "manifest.json"]:
        assert (out / rel).read_bytes() == (tmp_path / "art2" / rel).read_bytes(), rel


def test_default_steps_come_from_the_checkpoint_or_the_flag(tmp_path) -> None:
    """A checkpoint's ``default_steps`` metadata becomes the artifact's default; --steps wins;
    without either it is 50; a damaged value is a one-line error."""
    model = create_model("tiny-binary")
    plain, tuned, bad = (tmp_path / f"{n}.safetensors" for n in ("plain", "tuned", "bad"))
    save_checkpoint(plain, model, get_config("tiny-binary"))
    save_checkpoint(tuned, model, get_config("tiny-binary"), extra_metadata={"default_steps": "12"})
    save_checkpoint(bad, model, get_config("tiny-binary"), extra_metadata={"default_steps": "x"})
    kw = dict(tile=16, progress=False, measure_float=False)
    for ckpt, steps, want in [(plain, None, 50), (tuned, None, 12), (tuned, 7, 7)]:
        out = tmp_path / f"{ckpt.stem}-{steps}"
        export_artifact(ckpt, out=out, steps=steps, **kw)
        assert read_artifact(out).manifest.default_steps == want
    with pytest.raises(ValueError, match="bad.safetensors: metadata default_steps must be an integer"):
        export_artifact(bad, out=tmp_path / "bad-art", **kw)
    assert not (tmp_path / "bad-art").exists()


def test_sampler_settings_come_from_the_checkpoint(tmp_path) -> None:
    """A checkpoint's tuned ``time_shift`` and ``back_projection`` reach the manifest (0 without
    them), the runtime samples with them; a damaged value is a one-line error and no artifact."""
    model = create_model("tiny-binary")
    names = ("plain", "shifted", "projected", "table", "bad_shift", "bad_bp")
    plain, shifted, projected, table, bad_shift, bad_bp = (tmp_path / f"{n}.safetensors" for n in names)
    for ckpt, meta in [(plain, {}), (shifted, {"time_shift": "160"}), (projected, {"back_projection": "2"}),
                       (table, {"time_shifts": '{"3": 0, "2": 900}'}),
                       (bad_shift, {"time_shift": "2000"}), (bad_bp, {"back_projection": "x"})]:
        save_checkpoint(ckpt, model, get_config("tiny-binary"), extra_metadata=meta)
    kw = dict(tile=16, progress=False, measure_float=False, steps=3)
    for ckpt, want in [(plain, (0, 0)), (shifted, (160, 0)), (projected, (0, 2))]:
        export_artifact(ckpt, out=tmp_path / ckpt.stem, **kw)
        m = read_artifact(tmp_path / ckpt.stem).manifest
        assert (m.time_shift, m.back_projection) == want
        assert m.model.checkpoint_sha256 == sha256_file(ckpt)
    lr = np.random.default_rng(0).random((8, 8, 3)).astype(np.float32)
    with runtime.load(tmp_path / "plain", backend="onnxruntime") as a, \
            runtime.load(tmp_path / "shifted", backend="onnxruntime") as b, \
            runtime.load(tmp_path / "projected", backend="onnxruntime") as c:
        base = a.upscale(lr)
        assert not np.array_equal(base, b.upscale(lr)) and not np.array_equal(base, c.upscale(lr))
        assert np.array_equal(base, c.upscale(lr, back_projection=0))
        assert np.array_equal(c.upscale(lr), a.upscale(lr, back_projection=2))
    export_artifact(table, out=tmp_path / "table", **kw)
    assert read_artifact(tmp_path / "table").manifest.time_shifts == {"2": 900, "3": 0}
    with runtime.load(tmp_path / "table", backend="onnxruntime") as d:     # the shift per step count
        assert np.array_equal(d.upscale(lr, steps=2), d.upscale(lr, steps=2, time_shift=900))
        assert not np.array_equal(d.upscale(lr, steps=2), d.upscale(lr, steps=2, time_shift=0))
        assert np.array_equal(d.upscale(lr), base)
    trained_at = tmp_path / "trained_at_8.safetensors"                # the tile: its metadata
    save_checkpoint(trained_at, model, get_config("tiny-binary"), extra_metadata={"tile": "8"})
    assert export_artifact(trained_at, out=tmp_path / "t8", **{**kw, "tile": None}).manifest.tile == 8
    assert export_artifact(plain, out=tmp_path / "t128", **{**kw, "tile": None}).manifest.tile == 128
    assert export_artifact(trained_at, out=tmp_path / "t16", **kw).manifest.tile == 16
    bad_tile = tmp_path / "bad_tile.safetensors"
    save_checkpoint(bad_tile, model, get_config("tiny-binary"), extra_metadata={"tile": "12"})
    with pytest.raises(ValueError, match=r"^bad_tile.safetensors: metadata tile 12 must be a positive multiple of 8"):
        export_artifact(bad_tile, out=tmp_path / "bad-art", **{**kw, "tile": None})
    for ckpt, message in [(bad_shift, "time_shift must be an integer in 0\\.\\.1999, got 2000"),
                          (bad_bp, "back_projection must be an integer in 0\\.\\.16, got 'x'")]:
        with pytest.raises(ValueError, match=rf"^{ckpt.name}: metadata {message}$"):
            export_artifact(ckpt, out=tmp_path / "bad-art", **kw)
        assert not (tmp_path / "bad-art").exists()


def test_shipped_checkpoint_carries_its_tuned_sampler() -> None:
    """The shipped model's measured sampler settings (README table, scripts/tune_sampler.py)
    travel in its metadata."""
    from bidiff.models import SHIPPED_CHECKPOINT
    from bidiff.models.checkpoint import read_metadata
    assert Path(SHIPPED_CHECKPOINT).is_file(), f"the package lacks its checkpoint {SHIPPED_CHECKPOINT}"
    meta = read_metadata(SHIPPED_CHECKPOINT)
    assert json.loads(meta["config"])["formulation"]["prediction"] == "sample"
    assert (meta["default_steps"], meta["timestep_spacing"], meta["back_projection"]) == ("1", "trailing", "2")
    assert meta["tile"] == str(json.loads(meta["train_config"])["patch"]) == "128"  # the default tile
    assert "time_shift" not in meta and "time_shifts" not in meta


def test_shipped_checkpoint_is_the_training_checkpoint_in_sign_bits() -> None:
    """Every install carries the shipped weights, so their 1-bit convs are stored as sign bits
    (5 MB, not 16); checkpoints/ holds the same step with int8 latents for ``--init``, with the
    same metadata, signs and alphas: one network in two forms."""
    import torch
    from safetensors import safe_open
    from bidiff.models import SHIPPED_CHECKPOINT, load_checkpoint
    from bidiff.models.checkpoint import binary_weight_keys, read_metadata
    training = Path(__file__).resolve().parents[1] / "checkpoints" / Path(SHIPPED_CHECKPOINT).name
    shipped, _ = load_checkpoint(SHIPPED_CHECKPOINT)
    trained, _ = load_checkpoint(training)
    assert read_metadata(SHIPPED_CHECKPOINT) == read_metadata(training)
    with safe_open(str(SHIPPED_CHECKPOINT), framework="pt") as f:
        assert all(f.get_tensor(k).dtype == torch.uint8 for k in binary_weight_keys(shipped))
    assert Path(SHIPPED_CHECKPOINT).stat().st_size < 0.4 * training.stat().st_size
    b = dict(trained.named_modules())
    for name, m in shipped.named_modules():
        if hasattr(m, "scaling_factor"):
            assert torch.equal(torch.sign(m.weight), torch.sign(b[name].weight)), name
            torch.testing.assert_close(m.scaling_factor(), b[name].scaling_factor(), rtol=1e-6, atol=0)
        elif isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            assert torch.equal(m.weight, b[name].weight), name


def test_cli_success_force_and_archive(tiny_ckpt, tmp_path) -> None:
    out = tmp_path / "a.bidiff"
    proc = subprocess.run([sys.executable, "-m", "bidiff.exporter.cli", str(tiny_ckpt), "--out", str(out),
                           "--tile", "16", "--no-progress"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "bit-packed" in proc.stdout and "plain float ONNX" in proc.stdout and "smaller" in proc.stdout
    assert read_artifact(out, cache_dir=tmp_path / "cache").manifest.tile == 16
    before = out.read_bytes()
    assert main([str(tiny_ckpt), "--out", str(out), "--tile", "24", "--force", "--no-progress"]) == 0
    assert out.read_bytes() != before and _leftovers(tmp_path, ".a.bidiff") == []


def _bad(argv, capsys, needle: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bidiff-export: error:"), err
    assert needle in err, err


def test_cli_bad_input_battery(tiny_ckpt, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    base = ["--out", str(out), "--no-progress", "--tile", "16"]
    _bad([str(tiny_ckpt), *base, "--config", "nope"], capsys, "valid configs: ")
    _bad([str(tiny_ckpt), *base, "--target", "riscv"], capsys, "valid targets: onnx, x86_64")
    _bad([str(tiny_ckpt), "--out", str(out), "--tile", "20"], capsys, "multiple of 8")
    _bad([str(tiny_ckpt), "--out", str(out), "--tile", "abc"], capsys, "abc")
    _bad([str(tiny_ckpt), *base, "--steps", "0"], capsys,
         "steps must be an integer between 1 and 1000, got 0")
    _bad([str(tmp_path / "missing.safetensors"), *base], capsys, "does not exist")
    golden = GOLDEN / "small" / "net_g.pth"
    _bad([str(golden), *base, "--config", "tiny-binary"], capsys, "does not fit config 'tiny-binary'")
    _bad([str(golden), *base], capsys, "pass its config name")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    _bad([str(tiny_ckpt), "--out", str(blocker / "sub" / "art"), "--no-progress", "--tile", "16"],
         capsys, "cannot write")
    assert not out.exists() and _leftovers(tmp_path, "out") == []       # nothing left behind
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _bad([str(tiny_ckpt), *base], capsys, "already exists")
    assert os.listdir(out) == ["keep.txt"] and _leftovers(tmp_path, ".out") == []


def test_native_target_without_tvm_backend(tiny_ckpt, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "bidiff.exporter.tvm.build", None)     # import -> ImportError
    _bad([str(tiny_ckpt), "--out", str(tmp_path / "o"), "--target", "x86_64", "--no-progress"],
         capsys, "target x86_64 needs the TVM compiler, which is not installed: pip install "
                 "'bidiff[export]' (apache-tvm 0.27.0.post1), or use --target onnx")
    assert os.listdir(tmp_path) == []


def test_native_target_manifest_wiring(tiny_ckpt, tmp_path, monkeypatch) -> None:
    """The TVM build is the TVM engineer's (tested there); here a stand-in checks the wiring."""
    from bidiff.exporter.tvm import build

    calls = {}

    def build_library(paths, spec, out_path):
        calls["groups"] = sorted(paths)
        assert all(Path(p).is_file() for p in paths.values())
        Path(out_path).write_bytes(b"not really a library")
        return build.LibraryInfo(path=Path(out_path), functions={k: f"group_{k}" for k in paths},
                                 inputs=("x_t", "cond", "t"), outputs=("eps",),
                                 triple="aarch64-linux-gnu", mcpu="cortex-a72", mattr=spec.mattr)

    monkeypatch.setattr(build, "build_library", build_library)
    r = export_artifact(tiny_ckpt, out=tmp_path / "o", target="rpi4", tile=16, progress=False,
                        measure_float=False)
    m = read_artifact(r.path).manifest
    assert calls["groups"] == [0, 1, 2, 3, 4] and m.library == "model.so" and "model.so" in m.files
    assert (m.target.name, m.target.arch, m.target.cpu) == ("rpi4", "aarch64", "cortex-a72")
    assert m.target.features == ["asimd"] and [g.function for g in m.groups] == [f"group_{k}" for k in range(5)]

    def failing_build(paths, spec, out_path):
        raise build.BuildError("cross compiler 'aarch64-linux-gnu-gcc'\nnot found")

    monkeypatch.setattr(build, "build_library", failing_build)
    with pytest.raises(ValueError, match=r"^cannot build target rpi4: cross compiler "
                                         r"'aarch64-linux-gnu-gcc' not found$"):
        export_artifact(tiny_ckpt, out=tmp_path / "f", target="rpi4", tile=16, progress=False,
                        measure_float=False)
    assert not (tmp_path / "f").exists()

def test_required_cpu_features_per_target() -> None:
    """The manifest's features come from the one table in ``exporter.targets``, spelt as
    /proc/cpuinfo does; a host-CPU target records the kernel features the build host has."""
    from bidiff.exporter.targets import get_target, required_features
    assert required_features(get_target("rpi5")) == ["asimd", "asimddp"]
    assert required_features(get_target("x86_64-avx2")) == ["avx", "avx2", "bmi1", "bmi2", "f16c",
                                                            "fma", "movbe"]
    avx512 = required_features(get_target("x86_64-avx512"))
    assert {"avx512f", "avx512bw", "avx512vl", "avx512_vpopcntdq", "avx2"} <= set(avx512)
    assert required_features(get_target("x86_64"), {"avx2", "fma", "sse2", "popcnt"}) == \
        ["avx2", "fma", "popcnt"]
