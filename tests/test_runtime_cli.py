"""The `bidiff` CLI: a working run, and the bad-input battery (one line on stderr, exit 2, no
output file created, no existing file touched). Uses the fake ONNX artifact of
test_runtime_artifact (a pointwise stand-in network), so runs take milliseconds."""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bidiff.runtime import artifact as A
from bidiff.runtime.cli import main
from test_runtime_artifact import edit_manifest, make_fake_artifact


@pytest.fixture(scope="module")
def art(tmp_path_factory) -> Path:
    return make_fake_artifact(tmp_path_factory.mktemp("cli") / "fake")


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    p = tmp_path / "in" / "photo.png"
    p.parent.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(p)
    return p


def run(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return e.value.code, out, err


def test_upscale_file_folder_and_alpha(tmp_path: Path, art: Path, photo: Path, capsys) -> None:
    out = tmp_path / "out"
    code, _, err = run(["upscale", photo, "-o", out, "--artifact", art, "--steps", "2", "-q"], capsys)
    assert code == 0, err
    im = Image.open(out / "photo_x2.png")
    assert im.size == (20, 24) and im.mode == "RGB"
    first = (out / "photo_x2.png").read_bytes()
    # folder in -> folder out, sorted; RGBA stays RGBA (PNG); same seed -> same bytes
    Image.new("RGBA", (8, 8), (10, 200, 30, 128)).save(photo.parent / "a_alpha.png")
    Image.fromarray(np.full((9, 9), 77, np.uint8)).save(photo.parent / "b_grey.jpg")
    code, stdout, err = run(["upscale", photo.parent, "-o", out, "--artifact", art, "--steps", "2",
                             "--backend", "onnxruntime", "--threads", "1"], capsys)
    assert code == 0, err
    assert [Path(l).name for l in stdout.split()] == ["a_alpha_x2.png", "b_grey_x2.jpg", "photo_x2.png"]
    assert (out / "photo_x2.png").read_bytes() == first
    a = Image.open(out / "a_alpha_x2.png")
    assert a.mode == "RGBA" and a.size == (16, 16) and abs(np.asarray(a)[..., 3].astype(int) - 128).max() <= 1
    assert Image.open(out / "b_grey_x2.jpg").mode == "RGB"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]      # no temp files left
    # a single input to an explicit file name
    code, _, err = run(["upscale", photo, "-o", tmp_path / "single.webp", "--artifact", art,
                        "--steps", "1", "-q"], capsys)
    assert code == 0 and Image.open(tmp_path / "single.webp").size == (20, 24)


def test_sampler_flags_override_the_artifact(tmp_path: Path, art: Path, photo: Path, capsys,
                                             monkeypatch) -> None:
    """--time-shift, --back-projection and --ensemble reach the sampler; without them the
    artifact's own settings (0 here) and one pass do.
    (The fake network is the ideal one, whose last step is exact whatever the shift, so the
    sampler's call is checked, and its effect in test_runtime_sampler.)"""
    from bidiff.runtime import api
    seen = []

    def spy(*a, **kw):
        seen.append((kw["time_shift"], kw["back_projection"], kw["ensemble"]))
        return real(*a, **kw)
    real = api.sample_ensemble
    monkeypatch.setattr(api, "sample_ensemble", spy)
    for extra in ([], ["--time-shift", "900"], ["--back-projection", "4"], ["--ensemble", "4"]):
        code, _, err = run(["upscale", photo, "-o", tmp_path / "o.png", "--artifact", art,
                            "--steps", "2", "-q", *extra], capsys)
        assert code == 0, err
    assert seen == [(0, 0, 1), (900, 0, 1), (0, 4, 1), (0, 0, 4)]


def test_info(art: Path, tmp_path: Path, capsys) -> None:
    code, out, _ = run(["info", art], capsys)
    assert code == 0 and "fake  x2" in out and out.count(" ok") == 5 and "portable" in out
    bad = tmp_path / "bad"
    shutil.copytree(art, bad)
    (bad / "onnx/group_2.onnx").write_bytes(b"x")
    code, out, err = run(["info", bad], capsys)
    assert code == 2 and "MODIFIED" in out and err.count("\n") == 1 and "group_2.onnx" in err


def _png_header_only(w: int, h: int) -> bytes:
    """A PNG whose IHDR claims w x h: enough for Pillow's decompression-bomb check on open."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = lambda typ, data: struct.pack(">I", len(data)) + typ + data + \
        struct.pack(">I", zlib.crc32(typ + data) & 0xFFFFFFFF)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _bad_artifact(art: Path, tmp: Path, kind: str) -> Path:
    bad = tmp / f"art-{kind}"
    if kind == "modified":
        shutil.copytree(art, bad)
        (bad / "onnx/group_0.onnx").write_bytes((bad / "onnx/group_0.onnx").read_bytes() + b"\0")
    elif kind == "future":
        shutil.copytree(art, bad)
        edit_manifest(bad, format_version=A.FORMAT_VERSION + 1)
    elif kind == "other-arch":
        other = "aarch64" if A.host_info().arch == "x86_64" else "x86_64"
        make_fake_artifact(bad, target=A.TargetInfo(name="other", arch=other), library_bytes=b"\x7fELF")
    return bad


BATTERY = [
    # name, how to make the input / args, expected words in the message
    ("missing file", lambda d, p, a: [d / "nope.png"], "does not exist"),
    ("zero bytes", lambda d, p, a: [_write(d / "empty.png", b"")], "empty"),
    ("truncated png", lambda d, p, a: [_write(d / "t.png", p.read_bytes()[:60])], "truncated"),
    ("truncated jpeg", lambda d, p, a: [_truncated_jpeg(d)], "truncated"),
    ("text named png", lambda d, p, a: [_write(d / "notes.png", b"hello, not an image\n")], "not an image"),
    ("decompression bomb", lambda d, p, a: [_write(d / "bomb.png", _png_header_only(30000, 30000))],
     "BIDIFF_MAX_PIXELS"),
    ("1x1 image", lambda d, p, a: [_img(d / "dot.png", 1, 1)], "at least 4x4"),
    ("steps 0", lambda d, p, a: [p, "--steps", "0"], "steps"),
    ("steps 1001", lambda d, p, a: [p, "--steps", "1001"], "steps"),
    ("unknown backend", lambda d, p, a: [p, "--backend", "cuda"], "backend"),
    ("time shift 2000", lambda d, p, a: [p, "--time-shift", "2000"], "time-shift"),
    ("back-projection 17", lambda d, p, a: [p, "--back-projection", "17"], "back-projection"),
    ("ensemble 3", lambda d, p, a: [p, "--ensemble", "3"], "'--ensemble': '3' is not one of '1', '2', '4', '8'"),
    ("modified artifact", lambda d, p, a: [p, "--artifact", _bad_artifact(a, d, "modified")], "checksum mismatch"),
    ("other arch", lambda d, p, a: [p, "--artifact", _bad_artifact(a, d, "other-arch")], "this machine is"),
    ("future format", lambda d, p, a: [p, "--artifact", _bad_artifact(a, d, "future")], "upgrade bidiff"),
]


def _write(p: Path, data: bytes) -> Path:
    p.write_bytes(data)
    return p


def _img(p: Path, w: int, h: int) -> Path:
    Image.new("RGB", (w, h), (1, 2, 3)).save(p)
    return p


def _truncated_jpeg(d: Path) -> Path:
    src = d / "full.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(src, quality=90)
    return _write(d / "cut.jpg", src.read_bytes()[:700])


@pytest.mark.parametrize("name,make,words", BATTERY, ids=[b[0] for b in BATTERY])
def test_bad_input_battery(name, make, words, tmp_path: Path, art: Path, photo: Path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    existing = out / "photo_x2.png"
    existing.write_bytes(b"precious")
    args = make(tmp_path, photo, art)
    if "--artifact" not in args:
        args += ["--artifact", art]
    if "--steps" not in args:
        args += ["--steps", "1"]
    code, _, err = run(["upscale", *args, "-o", out, "-q"], capsys)
    assert code == 2, (name, err)
    assert err.count("\n") == 1 and err.startswith("bidiff: error: ") and "Traceback" not in err, err
    assert words.lower() in err.lower(), err
    assert sorted(p.name for p in out.iterdir()) == ["photo_x2.png"] and existing.read_bytes() == b"precious"


def test_output_not_writable(tmp_path: Path, art: Path, photo: Path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"x")
    code, _, err = run(["upscale", photo, "-o", blocker / "sub", "--artifact", art, "--steps", "1"], capsys)
    assert code == 2 and err.count("\n") == 1 and "not writable" in err
    if os.geteuid() != 0:                         # root ignores directory permissions
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        code, _, err = run(["upscale", photo, "-o", ro, "--artifact", art, "--steps", "1"], capsys)
        assert code == 2 and "not writable" in err and not list(ro.iterdir())


def test_bomb_limit_env(tmp_path: Path, art: Path, photo: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("BIDIFF_MAX_PIXELS", "50")
    code, _, err = run(["upscale", photo, "-o", tmp_path / "o", "--artifact", art], capsys)
    assert code == 2 and "BIDIFF_MAX_PIXELS=120" in err
    monkeypatch.setenv("BIDIFF_MAX_PIXELS", "0")
    code, _, err = run(["upscale", photo, "-o", tmp_path / "o", "--artifact", art, "--steps", "1", "-q"], capsys)
    assert code == 0, err


def test_console_script_subprocess(tmp_path: Path, art: Path) -> None:
    """The installed entry point, end to end in a fresh process (stderr: exactly one line)."""
    exe = shutil.which("bidiff")
    assert exe, "the bidiff console script is not installed"
    r = subprocess.run([exe, "upscale", str(tmp_path / "missing.png"), "-o", str(tmp_path / "o"),
                        "--artifact", str(art)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "does not exist" in r.stderr
    assert not (tmp_path / "o").exists()


def test_bench_that_loses_its_server_says_so_in_one_line(art: Path, capsys, monkeypatch) -> None:
    """A benchmark measures one server: if it dies mid-run, one line and exit 2, no retry."""
    from bidiff.runtime import benchmark, rpc

    class Remote:
        where = "10.0.0.7:9090"

        def close(self) -> None:
            pass

    def lost(remote, rounds):
        raise rpc.ServerLost(f"server {remote.where} failed to run group 0 (connection reset)")

    monkeypatch.setattr(rpc, "Tracker", lambda address, timeout: type(
        "T", (), {"close": lambda self: None})())
    monkeypatch.setattr(rpc, "open_remote", lambda art, trk, key, timeout: Remote())
    monkeypatch.setattr(benchmark, "time_remote_steps", lost)
    code, out, err = run(["bench", art, "--tracker", "127.0.0.1:9190", "--key", "k"], capsys)
    assert code == 2 and err == ("bidiff: error: server 10.0.0.7:9090 failed to run group 0 "
                                 "(connection reset): the benchmark lost its server; run it "
                                 "again\n")
