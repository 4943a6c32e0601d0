"""runtime.artifact: manifest round trip, atomic publish, archives, and every refusal."""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest

from bidiff.runtime import artifact as A
from bidiff.runtime import schedule

TILE = 32


def tiny_manifest(*, tile: int = TILE, scale: int = 2, target=None, library=None) -> A.Manifest:
    groups = [A.GroupInfo(index=k, t_min=lo, t_max=hi, onnx=f"onnx/group_{k}.onnx", function=f"group_{k}")
              for k, (lo, hi) in enumerate(schedule.group_ranges())]
    return A.Manifest(model=A.ModelInfo(name="fake", network={}, scale=scale,
                                        formulation={"type": "official"}),
                      groups=groups, tile=tile, input_multiple=8, default_steps=50, target=target,
                      library=library, backends=["onnxruntime"] if library is None else ["tvm", "onnxruntime"],
                      versions={"bidiff": "test"})


def fake_group_onnx(k: int, tile: int) -> bytes:
    """A stand-in network for group k (onnx is a test-only dependency): the ideal ε for the
    target x0 = cond · (1 - 0.02k), i.e. eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t),
    with abar looked up from a constant table by t. Pointwise, so tiling cannot change it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    ac = schedule.alphas_cumprod().astype(np.float64)
    sa = numpy_helper.from_array(np.sqrt(ac).astype(np.float32), "sqrt_abar")
    s1 = numpy_helper.from_array(np.sqrt(1 - ac).astype(np.float32), "sqrt_1m_abar")
    gain = numpy_helper.from_array(np.array(1 - 0.02 * k, np.float32), "gain")
    nodes = [
        helper.make_node("Reshape", ["t", "shape1"], ["t1"]),
        helper.make_node("Gather", ["sqrt_abar", "t1"], ["a"]),
        helper.make_node("Gather", ["sqrt_1m_abar", "t1"], ["b"]),
        helper.make_node("Mul", ["cond", "gain"], ["x0"]),
        helper.make_node("Mul", ["x0", "a"], ["ax0"]),
        helper.make_node("Sub", ["x_t", "ax0"], ["num"]),
        helper.make_node("Div", ["num", "b"], ["eps"]),
    ]
    shape1 = numpy_helper.from_array(np.array([1], np.int64), "shape1")
    g = helper.make_graph(
        nodes, f"group_{k}",
        [helper.make_tensor_value_info("x_t", TensorProto.FLOAT, [1, 3, tile, tile]),
         helper.make_tensor_value_info("cond", TensorProto.FLOAT, [1, 3, tile, tile]),
         helper.make_tensor_value_info("t", TensorProto.INT64, [1, 1])],
        [helper.make_tensor_value_info("eps", TensorProto.FLOAT, [1, 3, tile, tile])],
        initializer=[sa, s1, gain, shape1])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(m)
    return m.SerializeToString()


def make_fake_artifact(out: Path, *, tile: int = TILE, target=None, library_bytes: bytes | None = None,
                       force: bool = False) -> Path:
    m = tiny_manifest(tile=tile, target=target, library="model.so" if library_bytes else None)
    with A.ArtifactWriter(out, force=force) as w:
        (w.staging / "onnx").mkdir()
        for g in m.groups:
            (w.staging / g.onnx).write_bytes(fake_group_onnx(g.index, tile))
        if library_bytes:
            (w.staging / "model.so").write_bytes(library_bytes)
        return w.finish(m)


def edit_manifest(root: Path, **changes) -> None:
    p = root / A.MANIFEST
    d = json.loads(p.read_text())
    d.update(changes)
    p.write_text(json.dumps(d))


@pytest.fixture(scope="module")
def art(tmp_path_factory) -> Path:
    return make_fake_artifact(tmp_path_factory.mktemp("art") / "fake")


def test_round_trip_and_checksums(art: Path) -> None:
    a = A.read_artifact(art)
    m = a.manifest
    assert m.format_version == 2 and m.tile == TILE and m.model.scale == 2   # an ε-model: 2
    assert sorted(m.files) == [f"onnx/group_{k}.onnx" for k in range(5)]
    for rel, digest in m.files.items():
        assert A.sha256_file(art / rel) == digest
    assert A.Manifest.from_dict(m.to_dict()) == m
    assert [m.group_for(t).index for t in (0, 399, 400, 1999)] == [0, 0, 1, 4]
    assert not any(p.name.startswith(".") for p in art.parent.iterdir())   # no staging left


def test_modified_missing_and_future_version(tmp_path: Path) -> None:
    root = make_fake_artifact(tmp_path / "a")
    (root / "onnx/group_3.onnx").write_bytes(b"tampered")
    with pytest.raises(A.ArtifactError, match=r"group_3.onnx was modified \(checksum mismatch\): re-export"):
        A.read_artifact(root)
    (root / "onnx/group_3.onnx").unlink()
    with pytest.raises(A.ArtifactError, match="group_3.onnx is missing"):
        A.read_artifact(root)
    edit_manifest(root, format_version=A.FORMAT_VERSION + 1)
    with pytest.raises(A.ArtifactError, match=rf"artifact format {A.FORMAT_VERSION + 1} is newer than this runtime supports "
                                              rf"\({A.FORMAT_VERSION}\): upgrade bidiff"):
        A.read_artifact(root)
    edit_manifest(root, format_version=1, files={"../etc/passwd": "0" * 64})
    with pytest.raises(A.ArtifactError, match="unsafe path"):
        A.read_artifact(root)
    with pytest.raises(A.ArtifactError, match="not a bidiff artifact"):
        A.read_artifact(tmp_path)


def test_version_1_artifact_reads_with_the_papers_sampler(tmp_path: Path) -> None:
    """A format-1 manifest (before the sampler fields) still reads; its sampler is the paper's."""
    root = make_fake_artifact(tmp_path / "a")
    d = json.loads((root / A.MANIFEST).read_text())
    for key in ("time_shift", "time_shifts", "back_projection"):
        d.pop(key)
    d["format_version"] = 1
    (root / A.MANIFEST).write_text(json.dumps(d))
    m = A.read_artifact(root).manifest
    assert (m.format_version, m.time_shift, m.time_shifts, m.back_projection) == (1, 0, {}, 0)
    assert m.time_shift_for(50) == 0


@pytest.mark.parametrize("formulation,spacing,version", [
    ({"type": "official"}, "leading", 2),
    ({"type": "residual", "residual_scale": 4.0}, "leading", 2),
    ({"type": "residual", "residual_scale": 4.0, "prediction": "sample"}, "leading", 3),
    ({"type": "official"}, "trailing", 3),
    ({"type": "residual", "residual_scale": 4.0, "prediction": "sample"}, "linspace", 4),
    ({"type": "residual", "residual_scale": 4.0, "prediction": "sample", "lr_correction": True}, "trailing", 5),
])
def test_x0_prediction_and_spacing_round_trip_as_format_3_or_4(tmp_path: Path, formulation, spacing,
                                                               version) -> None:
    """The writer stamps the lowest version that describes the sampler, so an older reader
    refuses exactly the artifacts it would sample wrongly; the fields survive the round trip,
    and a manifest claiming a lower version than its sampler needs is malformed."""
    m = tiny_manifest()
    m.model.formulation, m.timestep_spacing = formulation, spacing
    root = tmp_path / "a"
    with A.ArtifactWriter(root) as w:
        for k in range(5):
            (w.staging / "onnx").mkdir(exist_ok=True)
            (w.staging / f"onnx/group_{k}.onnx").write_bytes(fake_group_onnx(k, TILE))
        w.finish(m)
    d = json.loads((root / A.MANIFEST).read_text())
    assert d["format_version"] == version
    assert ("timestep_spacing" in d) == (version >= 3)       # version-2 manifests keep their bytes
    got = A.read_artifact(root).manifest
    assert (got.model.formulation, got.timestep_spacing) == (formulation, spacing)
    if version > 2:
        edit_manifest(root, format_version=version - 1)
        with pytest.raises(A.ArtifactError, match=rf"^manifest is malformed \(format_version {version - 1} "
                                                  rf"cannot describe its sampler .*: needs {version}\): "
                                                  r"re-export the artifact$"):
            A.read_artifact(root)


@pytest.mark.parametrize("field,bad,message", [
    ("time_shift", -5, r"time_shift must be an integer in 0\.\.1999, got -5"),
    ("back_projection", 17, r"back_projection must be an integer in 0\.\.16, got 17"),
    ("time_shifts", {"20": -1}, r"time_shift must be an integer in 0\.\.1999, got -1"),
])
def test_sampler_fields(tmp_path: Path, field: str, bad: int, message: str) -> None:
    """Optional: absent (older artifacts) means 0, the official sampler; out of range is a
    one-line 'malformed' error."""
    root = make_fake_artifact(tmp_path / "a")
    d = json.loads((root / A.MANIFEST).read_text())
    empty = {} if field == "time_shifts" else 0
    assert d[field] == empty
    del d[field]
    (root / A.MANIFEST).write_text(json.dumps(d))
    assert getattr(A.read_artifact(root).manifest, field) == empty
    edit_manifest(root, **{field: bad})
    with pytest.raises(A.ArtifactError, match=rf"^manifest is malformed \({message}\): re-export the artifact$"):
        A.read_artifact(root)


def test_unknown_spacing_or_prediction_is_malformed(tmp_path: Path) -> None:
    root = make_fake_artifact(tmp_path / "a")
    edit_manifest(root, timestep_spacing="middle")
    with pytest.raises(A.ArtifactError, match=r"^manifest is malformed \(timestep_spacing must be one of "
                                              r"leading, trailing, linspace, got 'middle'\): re-export the artifact$"):
        A.read_artifact(root)
    edit_manifest(root, timestep_spacing="trailing",
                  model={"name": "fake", "network": {}, "scale": 2,
                         "formulation": {"type": "residual", "prediction": "v"}})
    with pytest.raises(A.ArtifactError, match=r"^manifest is malformed \(unknown prediction 'v'; valid: "
                                              r"epsilon, sample\): re-export the artifact$"):
        A.read_artifact(root)
    edit_manifest(root, model={"name": "fake", "network": {}, "scale": 2,
                               "formulation": {"type": "residual", "prediction": "sample", "lr_correction": 1}})
    with pytest.raises(A.ArtifactError, match=r"^manifest is malformed \(lr_correction must be true or false, "
                                              r"got 1\): re-export the artifact$"):
        A.read_artifact(root)
    edit_manifest(root, model={"name": "fake", "network": {}, "scale": 2,
                               "formulation": {"type": "official", "lr_correction": True}})
    with pytest.raises(A.ArtifactError, match=r"^manifest is malformed \(lr_correction needs the residual "
                                              r"formulation predicting the sample \(x0\)\): re-export the artifact$"):
        A.read_artifact(root)


def test_time_shift_for_uses_the_table_then_the_scalar(tmp_path: Path) -> None:
    root = make_fake_artifact(tmp_path / "a")
    edit_manifest(root, time_shift=240, time_shifts={"50": 240, "20": 40})
    m = A.read_artifact(root).manifest
    assert [m.time_shift_for(n) for n in (10, 20, 50, 100)] == [40, 40, 240, 240]
    assert "steps       50 by default, time shift 240 (20 steps: 40)\n" in m.summary()
    edit_manifest(root, time_shifts={})
    assert A.read_artifact(root).manifest.time_shift_for(10) == 240


def test_target_checks() -> None:
    x86 = A.TargetInfo(name="x86_64", arch="x86_64", features=["avx2", "+avx512vpopcntdq"])
    m = tiny_manifest(target=x86, library="model.so")
    assert A.target_mismatch(m, A.HostInfo("x86_64", frozenset({"avx2", "avx512_vpopcntdq"}))) is None
    why = A.target_mismatch(m, A.HostInfo("x86_64", frozenset({"avx2"})))
    assert "avx512_vpopcntdq" in why and "\n" not in why
    arm = tiny_manifest(target=A.TargetInfo(name="rpi4", arch="aarch64", features=["+neon"]), library="model.so")
    with pytest.raises(A.ArtifactError, match="is for aarch64 but this machine is x86_64"):
        A.check_target(arm, A.HostInfo("x86_64", None))
    assert A.target_mismatch(arm, A.HostInfo("aarch64", frozenset({"asimd", "fp"}))) is None
    assert A.target_mismatch(tiny_manifest(), A.HostInfo("riscv64", None)) is None   # portable
    assert A.normalize_arch("AMD64") == "x86_64" and A.normalize_arch("arm64") == "aarch64"


def test_publish_force_and_failure_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "a"
    make_fake_artifact(out)
    before = A.read_artifact(out).manifest.files
    with pytest.raises(A.ArtifactError, match="already exists"):
        make_fake_artifact(out)
    with pytest.raises(RuntimeError, match="boom"):
        with A.ArtifactWriter(out, force=True) as w:
            (w.staging / "half-written").write_bytes(b"x")
            raise RuntimeError("boom")
    assert A.read_artifact(out).manifest.files == before             # old one untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]         # no staging dir left
    make_fake_artifact(out, tile=16, force=True)
    assert A.read_artifact(out).manifest.tile == 16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_archive_deterministic_and_readable(tmp_path: Path, art: Path) -> None:
    z1, z2 = tmp_path / "one.bidiff", tmp_path / "two.bidiff"
    A.pack_archive(art, z1)
    os.utime(art / "onnx/group_0.onnx", (1, 1))                       # mtimes must not matter
    A.pack_archive(art, z2)
    assert z1.read_bytes() == z2.read_bytes()
    assert zipfile.ZipFile(z1).namelist() == sorted(zipfile.ZipFile(z1).namelist())
    a = A.read_artifact(z1, cache_dir=tmp_path / "cache")
    assert a.root.is_relative_to(tmp_path / "cache") and a.manifest.tile == TILE
    assert A.read_artifact(z1, cache_dir=tmp_path / "cache").root == a.root   # extracted once
    (a.root / "onnx/group_1.onnx").write_bytes(b"x")                 # tampering with the cache
    with pytest.raises(A.ArtifactError, match="checksum mismatch"):
        A.read_artifact(z1, cache_dir=tmp_path / "cache")
    # publishing to a .bidiff path writes the zip
    s = A.make_staging_dir(tmp_path / "p.bidiff")
    import shutil
    shutil.copytree(art, s, dirs_exist_ok=True)
    A.publish(s, tmp_path / "p.bidiff")
    assert (tmp_path / "p.bidiff").read_bytes() == z1.read_bytes() and not s.exists()


def test_the_runtime_runs_the_group_the_manifest_names(tmp_path: Path) -> None:
    """The sampler takes the timestep -> group map from the manifest, not from constants: a
    table unlike the paper's is what runs."""
    from bidiff import runtime
    root = make_fake_artifact(tmp_path / "a")
    d = json.loads((root / A.MANIFEST).read_text())
    ranges = [(0, 999), (1000, 1000), (1001, 1001), (1002, 1002), (1003, 1999)]
    for g, (lo, hi) in zip(d["groups"], ranges):
        g["t_min"], g["t_max"] = lo, hi
    (root / A.MANIFEST).write_text(json.dumps(d))
    seen = []
    with runtime.load(root, backend="onnxruntime", threads=1) as up:
        run = up.backend.run
        up.backend.run = lambda group, *a: seen.append((group, int(a[2][0, 0]))) or run(group, *a)
        up.upscale(np.zeros((TILE // 2, TILE // 2, 3), np.uint8), steps=4)
    assert seen == [(4, 1500), (1, 1000), (0, 500), (0, 0)]      # the constants: 3, 2, 1, 0
