"""The bidiff artifact format: defined once here; the exporter writes it, the runtime reads it.

An artifact is a directory (or the same tree zipped into one ``.bidiff`` file)::

    manifest.json          this module's ``Manifest`` as JSON, written last
    onnx/group_<k>.onnx    one portable graph per timestep group (onnxruntime runs them)
    params.safetensors     shared weights, if not embedded in the graphs / library (optional)
    model.so               TVM-compiled library for ``manifest.target`` (optional)

Every graph has inputs ``x_t`` float32 [1, 3, S, S], ``cond`` float32 [1, 3, S, S] and
``t`` int64 [1, 1], and the output ``eps`` float32 [1, C, S, S], where S = ``manifest.tile``
(the HR tile size fixed at export) and C = 3, or 6 for a model with an LR correction
(``model.formulation.lr_correction``). The native library exposes one Relax VM function per group,
named ``manifest.groups[k].function``, with the same signature.

``manifest.files`` maps every other file's POSIX path (relative to the root) to its sha256 hex.
The reader refuses an artifact whose format version is newer than ``FORMAT_VERSION`` (older
ones are read), whose
files are missing or modified, or (``check_target``) whose native target does not fit the host.

``target.features`` are CPU feature names as the host reports them in ``/proc/cpuinfo``
(x86: ``avx2``, ``avx512f``, ``avx512_vpopcntdq``; aarch64: ``asimd``, ``asimddp``). LLVM
spellings (``+avx512vpopcntdq``, ``+neon``, ``+dotprod``) are accepted and normalised by
``cpuinfo_feature``, so the exporter may pass its ``mattr`` through.

Writer side::

    with ArtifactWriter(out_path, force=False) as w:   # staging dir next to out_path
        ... write files under w.staging ...
        w.finish(manifest)                              # checksums + manifest.json, then publish

or ``write_artifact(staging, manifest)`` + ``publish(staging, out_path, force=...)`` by hand.
An ``out_path`` ending in ``.bidiff`` is published as a single deterministic zip.

All errors are ``ArtifactError`` (a ``ValueError``) with a one-line message that names the
problem and what to do about it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from .consistency import check_back_projection
from .formulation import Formulation
from .schedule import check_time_shift, check_time_shifts, check_timestep_spacing, time_shift_for

FORMAT_VERSION = 5
# 1: the first format. 2: the sampler fields ``time_shift``, ``time_shifts``, ``back_projection``
# (a version-1 reader ignores unknown keys, so it would sample such an artifact differently
# without a word; it refuses version 2 instead). Version-1 artifacts read as ever (the fields
# absent = 0 / {} = the paper's sampler). 3: ``model.formulation.prediction`` ("sample": the
# graphs output x0, not ε) and ``timestep_spacing`` ("trailing"). The writer stamps the lowest
# version that describes the artifact, so an ε-model with the paper's spacing stays version 2
# (byte-identical re-exports) and a version-2 reader refuses exactly the artifacts it would
# sample wrongly. 4: ``timestep_spacing`` "linspace" (a version-3 reader would call it
# malformed); every other artifact keeps its version. 5: ``model.formulation.lr_correction``
# (the graphs output 6 channels; a version-4 reader would back-project onto the uncorrected LR).
MANIFEST = "manifest.json"
ARCHIVE_SUFFIX = ".bidiff"
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
_CHUNK = 1 << 20


class ArtifactError(ValueError):
    """A bad, foreign or unusable artifact; the message is one line and says what to do."""


# --------------------------------------------------------------------------- manifest

@dataclass
class ModelInfo:
    name: str
    network: dict[str, Any]
    scale: int
    formulation: dict[str, Any] = field(default_factory=lambda: {"type": "official"})
    checkpoint_sha256: str | None = None     # of the exported checkpoint (older artifacts: absent)


@dataclass
class GroupInfo:
    index: int
    t_min: int
    t_max: int
    onnx: str | None            # relative path of the group's ONNX graph, e.g. "onnx/group_0.onnx"
    function: str | None = None  # function name in the native library, e.g. "group_0"


@dataclass
class TargetInfo:
    name: str                   # export target name (exporter.targets), e.g. "x86_64", "rpi4"
    arch: str                   # "x86_64" | "aarch64"
    triple: str | None = None
    cpu: str | None = None
    features: list[str] = field(default_factory=list)   # cpuinfo names the code requires


@dataclass
class Manifest:
    model: ModelInfo
    groups: list[GroupInfo]
    tile: int
    input_multiple: int = 1
    default_steps: int = 50
    time_shift: int = 0         # sampler: eps at max(0, t - time_shift) (schedule.DDIMScheduler)
    time_shifts: dict[str, int] = field(default_factory=dict)   # per measured step count (JSON keys)
    back_projection: int = 0    # sampler: LR-consistency iterations (consistency.back_project)
    timestep_spacing: str = "leading"   # sampler: schedule.DDIMScheduler's spacing
    value_range: list[float] = field(default_factory=lambda: [0.0, 1.0])
    target: TargetInfo | None = None
    library: str | None = None
    backends: list[str] = field(default_factory=lambda: ["onnxruntime"])
    versions: dict[str, str | None] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    bidiff_version: str = field(default_factory=lambda: _bidiff_version())
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        # Accept plain dicts for the nested parts (JSON, or an exporter building one by hand).
        # Unknown keys are ignored: a later bidiff may add optional fields within a format version.
        if isinstance(self.model, dict):
            self.model = ModelInfo(**_known(ModelInfo, self.model))
        self.groups = [GroupInfo(**_known(GroupInfo, g)) if isinstance(g, dict) else g for g in self.groups]
        if isinstance(self.target, dict):
            self.target = TargetInfo(**_known(TargetInfo, self.target))

    # -- JSON
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        order = ["format_version", "bidiff_version", "model", "groups", "tile", "input_multiple",
                 "default_steps", "time_shift", "time_shifts", "back_projection", "timestep_spacing",
                 "value_range", "target", "library", "backends", "versions", "files"]
        if self.required_version() < 3:
            order.remove("timestep_spacing")
        return {k: d[k] for k in order}

    def required_version(self) -> int:
        """The lowest format version whose readers sample this artifact correctly."""
        return required_format_version(self.model.formulation, self.timestep_spacing)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "manifest") -> "Manifest":
        if not isinstance(d, dict):
            raise ArtifactError(f"{source} is not a JSON object: re-export the artifact")
        check_format_version(d.get("format_version"), source=source)
        try:
            m = cls(**{k: d[k] for k in d if k in _MANIFEST_FIELDS})
            m.validate()
        except ArtifactError:
            raise
        except (TypeError, ValueError, KeyError) as e:
            raise ArtifactError(f"{source} is malformed ({_one_line(e)}): re-export the artifact") from None
        return m

    def validate(self) -> None:
        """Structural checks (raise ArtifactError); does not touch the file system."""
        def bad(msg: str) -> ArtifactError:
            return ArtifactError(f"manifest is malformed ({msg}): re-export the artifact")
        if not isinstance(self.tile, int) or self.tile < 8:
            raise bad(f"tile {self.tile!r} must be an int >= 8")
        if not isinstance(self.model.scale, int) or self.model.scale < 1:
            raise bad(f"scale {self.model.scale!r} must be a positive int")
        if self.tile % self.model.scale:
            raise bad(f"tile {self.tile} is not a multiple of the scale {self.model.scale}")
        try:
            check_time_shift(self.time_shift)
            check_time_shifts(self.time_shifts)
            check_back_projection(self.back_projection)
            check_timestep_spacing(self.timestep_spacing)
            Formulation.from_dict(self.model.formulation)
        except (ValueError, TypeError) as e:
            raise bad(str(e)) from None
        if self.required_version() > max(self.format_version, 2):   # 1 reads as 2's defaults
            raise bad(f"format_version {self.format_version} cannot describe its sampler "
                      f"(timestep_spacing {self.timestep_spacing!r}, {self.model.formulation}): "
                      f"needs {self.required_version()}")
        if not self.groups:
            raise bad("no groups")
        if [g.index for g in self.groups] != list(range(len(self.groups))):
            raise bad("group indices must be 0..K-1 in order")
        for g in self.groups:
            if not 0 <= g.t_min <= g.t_max:
                raise bad(f"group {g.index} has t range {g.t_min}..{g.t_max}")
        for p in self._referenced_paths():
            _check_relpath(p)
        if self.target is not None and self.target.arch not in ("x86_64", "aarch64"):
            raise bad(f"target arch {self.target.arch!r} (valid: x86_64, aarch64)")

    def _referenced_paths(self) -> list[str]:
        paths = [g.onnx for g in self.groups if g.onnx]
        if self.library:
            paths.append(self.library)
        return paths + list(self.files)

    def _sampler_summary(self) -> str:
        others = {n: v for n, v in check_time_shifts(self.time_shifts).items() if n != self.default_steps}
        shift = (f", time shift {self.time_shift}" if self.time_shift or others else "") + (
            " (" + ", ".join(f"{n} steps: {v}" for n, v in sorted(others.items(), reverse=True)) + ")"
            if others else "")
        return (f", {self.timestep_spacing} spacing" if self.timestep_spacing != "leading" else "") \
            + shift + (f", back-projection x{self.back_projection}" if self.back_projection else "")

    def time_shift_for(self, steps: int) -> int:
        """The sampler time shift measured for ``steps`` (``schedule.time_shift_for``); artifacts
        without a table use ``time_shift`` at every step count."""
        return time_shift_for(steps, check_time_shifts(self.time_shifts), self.time_shift)

    def group_for(self, t: int) -> GroupInfo:
        for g in self.groups:
            if g.t_min <= t <= g.t_max:
                return g
        raise ArtifactError(f"no group of this artifact covers timestep {t}: re-export it")

    def summary(self) -> str:
        tgt = "portable (onnx only)" if self.target is None else \
            f"{self.target.name} ({self.target.arch}, cpu {self.target.cpu or '?'}" \
            + (f", {' '.join(self.target.features)}" if self.target.features else "") + ")"
        lines = [
            f"format      {self.format_version} (bidiff {self.bidiff_version})",
            f"model       {self.model.name}  x{self.model.scale}  formulation "
            f"{self.model.formulation.get('type', 'official')}, predicts "
            f"{self.model.formulation.get('prediction', 'epsilon')}"
            + (" and an LR correction" if self.model.formulation.get("lr_correction") else ""),
            f"tile        {self.tile}x{self.tile} HR, input multiple {self.input_multiple}",
            f"steps       {self.default_steps} by default" + self._sampler_summary(),
            "groups      " + ", ".join(f"{g.index}: t {g.t_min}-{g.t_max}" for g in self.groups),
            f"target      {tgt}",
            f"library     {self.library or '-'}",
            f"backends    {', '.join(self.backends)}",
            "versions    " + ", ".join(f"{k} {v}" for k, v in self.versions.items() if v),
        ]
        return "\n".join(lines)


_MANIFEST_FIELDS = {f.name for f in dataclasses.fields(Manifest)}


def _known(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names}


def required_format_version(formulation: dict[str, Any], timestep_spacing: str) -> int:
    """5 for a model with an LR correction, 4 for the linspace spacing, 3 for an x0-predicting
    model or the trailing spacing (see ``FORMAT_VERSION``), else 2."""
    if formulation.get("lr_correction", False):
        return 5
    if timestep_spacing == "linspace":
        return 4
    if timestep_spacing != "leading" or formulation.get("prediction", "epsilon") != "epsilon":
        return 3
    return 2


def check_format_version(v: Any, *, source: str = "manifest") -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ArtifactError(f"{source} has no valid format_version ({v!r}): re-export the artifact")
    if v > FORMAT_VERSION:
        raise ArtifactError(f"artifact format {v} is newer than this runtime supports "
                            f"({FORMAT_VERSION}): upgrade bidiff")
    return v


def _bidiff_version() -> str:
    try:
        from importlib.metadata import version
        return version("bidiff")
    except Exception:  # not installed as a distribution (e.g. a vendored runtime)
        return "unknown"


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _check_relpath(p: str) -> str:
    pp = PurePosixPath(p)
    if not p or pp.is_absolute() or ".." in pp.parts or "\\" in p or p == MANIFEST:
        raise ArtifactError(f"manifest names an unsafe path {p!r}: re-export the artifact")
    return p


# --------------------------------------------------------------------------- hashing

def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _tree_files(root: Path) -> list[str]:
    """Relative POSIX paths of every regular file under root except the manifest, sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


# --------------------------------------------------------------------------- writer

def write_artifact(staging_dir: str | os.PathLike, manifest: Manifest) -> Manifest:
    """Checksum every file under ``staging_dir`` into ``manifest.files`` and write manifest.json.

    The manifest is written last (via a temp file + rename), so a directory with a manifest is a
    complete one. Returns the manifest with ``files`` filled in.
    """
    root = Path(staging_dir)
    manifest.files = {rel: sha256_file(root / rel) for rel in _tree_files(root)}
    manifest.format_version = manifest.required_version()
    if manifest.target is not None:
        manifest.target.features = sorted({cpuinfo_feature(f) for f in manifest.target.features})
    manifest.validate()
    for p in [g.onnx for g in manifest.groups if g.onnx] + ([manifest.library] if manifest.library else []):
        if p not in manifest.files:
            raise ArtifactError(f"manifest names {p} but the staging dir has no such file")
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(manifest.to_json(), encoding="utf-8")
    os.replace(tmp, root / MANIFEST)
    return manifest


def make_staging_dir(out_path: str | os.PathLike) -> Path:
    """A fresh empty directory next to ``out_path`` (same file system, so publish can rename)."""
    out = Path(out_path).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    umask = os.umask(0)                   # mkdtemp makes it 0700; a published artifact is shared
    os.umask(umask)
    d.chmod(0o777 & ~umask)
    return d


def publish(staging_dir: str | os.PathLike, out_path: str | os.PathLike, *, force: bool = False) -> Path:
    """Move a fully written staging dir to ``out_path`` atomically (a ``.bidiff`` path: zip it).

    Refuses an existing ``out_path`` unless ``force``; with ``force`` the old artifact is replaced
    only once the new one is in place next to it. On any failure nothing partial is left at
    ``out_path`` (the old artifact, if any, is restored) and the staging dir is removed.
    """
    staging, out = Path(staging_dir).absolute(), Path(out_path).absolute()
    try:
        if not (staging / MANIFEST).is_file():
            raise ArtifactError(f"staging dir {staging} has no {MANIFEST}: call write_artifact first")
        if out.exists() and not force:
            raise ArtifactError(f"{out} already exists: pass force=True (--force) to replace it")
        if out.suffix == ARCHIVE_SUFFIX:
            fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
            os.close(fd)
            try:
                pack_archive(staging, tmp)
                if out.is_dir():
                    raise ArtifactError(f"{out} is a directory: remove it or choose another name")
                os.replace(tmp, out)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            return out
        old = None
        if out.exists() or out.is_symlink():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        try:
            os.replace(staging, out)
        except BaseException:
            if old is not None:
                os.replace(old, out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        return out
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


class ArtifactWriter:
    """Context manager: a staging dir next to ``out_path``, published by ``finish(manifest)``.

    Leaving the block without ``finish`` (or with an exception) removes the staging dir and
    leaves ``out_path`` untouched.
    """

    def __init__(self, out_path: str | os.PathLike, *, force: bool = False) -> None:
        self.out_path = Path(out_path)
        self.force = force
        if self.out_path.exists() and not force:
            raise ArtifactError(f"{self.out_path} already exists: pass force=True (--force) to replace it")
        self.staging: Path | None = None
        self.published: Path | None = None

    def __enter__(self) -> "ArtifactWriter":
        if self.staging is None:          # idempotent: entering twice keeps one staging dir
            self.staging = make_staging_dir(self.out_path)
        return self

    def finish(self, manifest: Manifest) -> Path:
        assert self.staging is not None, "use ArtifactWriter as a context manager"
        write_artifact(self.staging, manifest)
        self.published = publish(self.staging, self.out_path, force=self.force)
        return self.published

    def __exit__(self, *exc: object) -> None:
        if self.staging is not None and self.staging.exists():
            shutil.rmtree(self.staging, ignore_errors=True)


def pack_archive(artifact_dir: str | os.PathLike, out_file: str | os.PathLike) -> Path:
    """Zip an artifact dir into one file, deterministically (sorted entries, fixed timestamps)."""
    root = Path(artifact_dir)
    if not (root / MANIFEST).is_file():
        raise ArtifactError(f"{root} is not an artifact (no {MANIFEST})")
    names = _tree_files(root) + [MANIFEST]
    with zipfile.ZipFile(out_file, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for rel in sorted(names):
            info = zipfile.ZipInfo(rel, date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            with open(root / rel, "rb") as src, z.open(info, "w") as dst:
                shutil.copyfileobj(src, dst, _CHUNK)
    return Path(out_file)


# --------------------------------------------------------------------------- reader

@dataclass(frozen=True)
class Artifact:
    """A verified artifact on disk: ``root`` holds the files named by ``manifest``."""
    root: Path
    manifest: Manifest
    source: Path                   # what the user gave (the dir or the .bidiff file)

    def path(self, rel: str) -> Path:
        return self.root / _check_relpath(rel)

    def onnx_path(self, group: int) -> Path:
        g = self.manifest.groups[group]
        if not g.onnx:
            raise ArtifactError(f"artifact {self.source} has no ONNX graph for group {group}: "
                                "re-export it with the onnx graphs")
        return self.path(g.onnx)

    @property
    def library_path(self) -> Path | None:
        return self.path(self.manifest.library) if self.manifest.library else None


SHIPPED_MODEL = "bidiff-m2-x2"
"""Config name of the shipped model, the default artifact's network. Its weights are
``bidiff/models/weights/<SHIPPED_MODEL>.safetensors``; the one place that names them, kept here
(torch-free, the lowest layer) because the runtime's default artifact, the exporter and the
models all need it."""


def default_cache_dir() -> Path:
    """``$BIDIFF_CACHE`` or ``~/.cache/bidiff`` (XDG_CACHE_HOME respected)."""
    env = os.environ.get("BIDIFF_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bidiff"


def read_artifact(path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
                  verify: bool = True) -> Artifact:
    """Open an artifact directory or ``.bidiff`` file and verify it (version, files, checksums).

    A ``.bidiff`` zip is extracted once into ``<cache_dir>/extracted/<sha256 prefix>``
    (default cache: ``default_cache_dir()``) and verified there on every read. The target is not
    checked here (``check_target``): the portable graphs of a foreign artifact are still usable.
    """
    src = Path(path).expanduser()
    if not src.exists():
        raise ArtifactError(f"artifact {src} does not exist: export one (bidiff-export) or fix the path")
    if src.is_dir():
        root = src
    elif zipfile.is_zipfile(src):
        root = _extract_archive(src, Path(cache_dir) if cache_dir else default_cache_dir())
    else:
        raise ArtifactError(f"{src} is neither an artifact directory nor a {ARCHIVE_SUFFIX} archive")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"{src} is not a bidiff artifact (no {MANIFEST}): export one with bidiff-export")
    try:
        raw = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{src}/{MANIFEST} is unreadable ({_one_line(e)}): re-export the artifact") from None
    manifest = Manifest.from_dict(raw, source=f"{src}/{MANIFEST}")
    if verify:
        verify_files(root, manifest, source=src)
    return Artifact(root=root, manifest=manifest, source=src)


def verify_files(root: Path, manifest: Manifest, *, source: Path | None = None) -> None:
    """Every referenced file is listed, present and unmodified (sha256)."""
    for p in [g.onnx for g in manifest.groups if g.onnx] + ([manifest.library] if manifest.library else []):
        if p not in manifest.files:
            raise ArtifactError(f"artifact file {p} has no checksum in the manifest: re-export it")
    for rel, digest in manifest.files.items():
        f = root / rel
        if not f.is_file():
            raise ArtifactError(f"artifact file {rel} is missing from {source or root}: "
                                "re-export it or copy the whole artifact")
        if sha256_file(f) != digest:
            raise ArtifactError(f"artifact file {rel} was modified (checksum mismatch): re-export it")


def file_status(artifact_dir: str | os.PathLike, manifest: Manifest) -> list[tuple[str, str]]:
    """(path, "ok" | "missing" | "MODIFIED") for every listed file, for ``bidiff info``."""
    root = Path(artifact_dir)
    out = []
    for rel, digest in sorted(manifest.files.items()):
        f = root / rel
        out.append((rel, "missing" if not f.is_file() else
                    "ok" if sha256_file(f) == digest else "MODIFIED"))
    return out


def _extract_archive(src: Path, cache_dir: Path) -> Path:
    digest = sha256_file(src)
    dest = cache_dir / "extracted" / digest[:32]
    if (dest / MANIFEST).is_file():
        return dest
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    except OSError as e:
        raise ArtifactError(f"cannot extract {src} into {cache_dir} ({_one_line(e)}): "
                            "set BIDIFF_CACHE to a writable folder") from None
    try:
        with zipfile.ZipFile(src) as z:
            for info in z.infolist():
                if info.is_dir():
                    continue
                rel = info.filename
                if rel != MANIFEST:
                    _check_relpath(rel)
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                with z.open(info) as s, open(target, "wb") as d:
                    shutil.copyfileobj(s, d, _CHUNK)
        try:
            os.replace(tmp, dest)
        except OSError:
            if not (dest / MANIFEST).is_file():   # another process won the race: use theirs
                raise
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ArtifactError(f"{src} is a damaged archive ({_one_line(e)}): copy or export it again") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


# --------------------------------------------------------------------------- target vs host

_ARCH_ALIASES = {"x86_64": "x86_64", "amd64": "x86_64", "x64": "x86_64",
                 "aarch64": "aarch64", "arm64": "aarch64", "armv8": "aarch64"}

# LLVM -mattr spelling -> /proc/cpuinfo spelling, where they differ.
_LLVM_TO_CPUINFO = {
    "neon": "asimd", "dotprod": "asimddp", "fp-armv8": "fp", "crc": "crc32", "fullfp16": "fphp",
    "i8mm": "i8mm", "sve": "sve", "sve2": "sve2", "bf16": "bf16",
    "avx512vpopcntdq": "avx512_vpopcntdq", "avx512vnni": "avx512_vnni",
    "avx512bitalg": "avx512_bitalg", "avx512vbmi2": "avx512_vbmi2", "avx512bf16": "avx512_bf16",
    "avx512fp16": "avx512_fp16", "sse4.1": "sse4_1", "sse4.2": "sse4_2", "sse3": "pni",
    "bmi": "bmi1",
}


def normalize_arch(machine: str) -> str:
    return _ARCH_ALIASES.get(machine.lower(), machine.lower())


def cpuinfo_feature(name: str) -> str:
    """A feature name as /proc/cpuinfo spells it (accepts LLVM ``+name`` spellings)."""
    n = name.strip().lstrip("+").lower()
    return _LLVM_TO_CPUINFO.get(n, n)


@dataclass(frozen=True)
class HostInfo:
    arch: str
    features: frozenset[str] | None      # None: unknown (not Linux / no /proc/cpuinfo)


def host_info() -> HostInfo:
    """This machine's architecture and CPU feature flags (Linux: /proc/cpuinfo)."""
    arch = normalize_arch(platform.machine())
    feats: set[str] | None = None
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                for line in f:
                    key, _, val = line.partition(":")
                    if key.strip().lower() in ("flags", "features"):
                        feats = set(val.split())
                        break
        except OSError:
            feats = None
    return HostInfo(arch=arch, features=frozenset(feats) if feats is not None else None)


def target_mismatch(manifest: Manifest, host: HostInfo | None = None) -> str | None:
    """Why the artifact's native library cannot run on ``host`` (None: it can, or there is none)."""
    t = manifest.target
    if t is None or not manifest.library:
        return None
    host = host or host_info()
    if normalize_arch(t.arch) != host.arch:
        return (f"artifact target {t.name} is for {t.arch} but this machine is {host.arch}: "
                f"export one for this host (bidiff-export --target ...) or use --backend onnxruntime")
    if host.features is not None:
        missing = sorted({cpuinfo_feature(f) for f in t.features} - host.features)
        if missing:
            return (f"artifact target {t.name} needs CPU features this machine lacks "
                    f"({', '.join(missing)}): export for this host or use --backend onnxruntime")
    return None


def check_target(manifest: Manifest, host: HostInfo | None = None) -> None:
    """Raise ArtifactError if the artifact's native target does not fit this host."""
    why = target_mismatch(manifest, host)
    if why:
        raise ArtifactError(why)


__all__ = [
    "FORMAT_VERSION", "MANIFEST", "ARCHIVE_SUFFIX", "ArtifactError", "ModelInfo", "GroupInfo",
    "TargetInfo", "Manifest", "Artifact", "ArtifactWriter", "write_artifact", "make_staging_dir",
    "publish", "pack_archive", "read_artifact", "verify_files", "file_status", "sha256_file",
    "check_format_version", "required_format_version", "check_target", "target_mismatch", "host_info", "HostInfo",
    "normalize_arch", "cpuinfo_feature", "default_cache_dir",
]
