#!/usr/bin/env python3
"""Device-side footprint: bytes installed per component of a `pip install --target` of
"bidiff[tvm]" (+ libtvm_runtime.so), and optionally the size of artifacts per target.

    python3 scripts/footprint.py --device .cache/arm64/device [--sysroot ...] [--artifact DIR ...] [--json]

Components are grouped by top-level import name with their .dist-info and bundled-library
folders (e.g. ``pillow.libs``); ``bin/`` (console scripts) and ``__pycache__`` count with bidiff.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

# top-level names in site-packages -> component
GROUPS = [
    ("numpy", r"^(numpy|numpy\.libs|numpy-.*\.dist-info)$"),
    ("pillow", r"^(PIL|pillow\.libs|pillow-.*\.dist-info)$"),
    ("click", r"^(click|click-.*\.dist-info)$"),
    ("apache-tvm-ffi", r"^(tvm_ffi|apache_tvm_ffi.*|apache_tvm_ffi-.*\.dist-info)$"),
    ("typing-extensions (tvm-ffi dep)", r"^(typing_extensions\.py|typing_extensions-.*\.dist-info|__pycache__)$"),
    ("bidiff", r"^(bidiff|bidiff-.*\.dist-info|bin)$"),
]


def tree_bytes(p: Path) -> int:
    if p.is_symlink():
        return 0
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())


def site_components(site: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for entry in sorted(site.iterdir()):
        name = next((g for g, rx in GROUPS if re.match(rx, entry.name)), f"other: {entry.name}")
        out[name] = out.get(name, 0) + tree_bytes(entry)
    return out


def bidiff_parts(site: Path) -> dict[str, int]:
    """bidiff's subpackages: the device imports only runtime/ (models/ holds the shipped training
    checkpoint, exporter/ the export code; both come with the one wheel)."""
    root = site / "bidiff"
    return {d.name: tree_bytes(d) for d in sorted(root.iterdir()) if d.is_dir()} if root.is_dir() else {}


def mb(n: int) -> str:
    return f"{n / 1e6:8.2f} MB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", type=Path, required=True, help="folder with site/ and lib/")
    ap.add_argument("--sysroot", type=Path, help="the emulated OS (reported, not counted)")
    ap.add_argument("--artifact", type=Path, action="append", default=[], help="artifact folder(s)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    comps = site_components(a.device / "site")
    lib = a.device / "lib" / "libtvm_runtime.so"
    comps["libtvm_runtime.so"] = tree_bytes(lib) if lib.exists() else 0
    total = sum(comps.values())
    report = {"components": comps, "total": total,
              "bidiff_parts": bidiff_parts(a.device / "site")}
    if a.sysroot and a.sysroot.is_dir():
        report["sysroot"] = tree_bytes(a.sysroot)
    arts = {}
    for art in a.artifact:
        files = {str(f.relative_to(art)): f.stat().st_size for f in sorted(art.rglob("*")) if f.is_file()}
        arts[str(art)] = {"total": sum(files.values()), "files": files}
    report["artifacts"] = arts
    if a.json:
        print(json.dumps(report, indent=2))
        return 0
    print("device install (pip install --target of bidiff[tvm] + libtvm_runtime.so):")
    for k, v in sorted(comps.items(), key=lambda kv: -kv[1]):
        print(f"  {k:<32} {mb(v)}")
    print(f"  {'total':<22} {mb(total)}")
    parts = ", ".join(f"{k}/ {v / 1e6:.2f}" for k, v in report["bidiff_parts"].items())
    print(f"  (bidiff in MB: {parts}; the device imports only runtime/)")
    if "sysroot" in report:
        print(f"emulated OS (Debian arm64 python3.11 sysroot, not part of the footprint): {mb(report['sysroot']).strip()}")
    for k, v in arts.items():
        print(f"artifact {k}: {mb(v['total']).strip()}")
        for f, n in v["files"].items():
            print(f"  {f:<32} {mb(n)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
