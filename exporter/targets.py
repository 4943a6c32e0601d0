"""Named export targets: one place maps a user-facing name to a compiler target and to the CPU
features its code needs.

``onnx`` exports only the portable graphs; every other name also compiles a native library with
TVM for that CPU. Valid names are listed in error messages, so keep them short.

Feature names here are LLVM's (what ``mattr`` and TVM's ``target_has_features`` speak); the
manifest stores them as ``/proc/cpuinfo`` spells them (``bidiff.runtime.artifact.cpuinfo_feature``),
which is what the runtime compares with the host.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class TargetSpec:
    name: str
    description: str
    arch: str | None = None            # "x86_64" | "aarch64" | None (portable ONNX only)
    triple: str | None = None
    mcpu: str | None = None            # None: the host CPU at export time
    mattr: tuple[str, ...] = field(default_factory=tuple)
    cc: str | None = None              # cross compiler for the shared library (None: host cc)

    @property
    def native(self) -> bool:
        return self.arch is not None


TARGETS: dict[str, TargetSpec] = {t.name: t for t in [
    TargetSpec("onnx", "portable ONNX graphs only (run with onnxruntime anywhere)"),
    TargetSpec("x86_64", "this machine's x86_64 CPU and its features (AVX-512 when present)",
               arch="x86_64", triple="x86_64-linux-gnu"),
    TargetSpec("x86_64-avx2", "any x86_64 CPU with AVX2 (x86-64-v3)",
               arch="x86_64", triple="x86_64-linux-gnu", mcpu="x86-64-v3"),
    TargetSpec("x86_64-avx512", "x86_64 CPUs with AVX-512 and VPOPCNTDQ (x86-64-v4: Ice Lake "
               "server, Sapphire Rapids, Zen 4 and later)",
               arch="x86_64", triple="x86_64-linux-gnu", mcpu="x86-64-v4",
               mattr=("+avx512vpopcntdq",)),
    TargetSpec("arm64", "generic 64-bit ARM (armv8-a + NEON)",
               arch="aarch64", triple="aarch64-linux-gnu", mcpu="generic", mattr=("+neon",),
               cc="aarch64-linux-gnu-gcc"),
    TargetSpec("rpi4", "Raspberry Pi 4 (Cortex-A72, 64-bit OS)",
               arch="aarch64", triple="aarch64-linux-gnu", mcpu="cortex-a72", mattr=("+neon",),
               cc="aarch64-linux-gnu-gcc"),
    TargetSpec("rpi5", "Raspberry Pi 5 (Cortex-A76, dotprod, 64-bit OS)",
               arch="aarch64", triple="aarch64-linux-gnu", mcpu="cortex-a76",
               mattr=("+neon", "+dotprod"), cc="aarch64-linux-gnu-gcc"),
]}


# Features that code compiled for an LLVM mcpu relies on, beyond the target's mattr.
MCPU_FEATURES: dict[str, tuple[str, ...]] = {
    "x86-64-v3": ("avx", "avx2", "fma", "bmi", "bmi2", "f16c", "movbe"),
    "x86-64-v4": ("avx", "avx2", "fma", "bmi", "bmi2", "f16c", "movbe",
                  "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"),
    "generic": (), "cortex-a72": ("neon",), "cortex-a76": ("neon", "dotprod"),
}
# The features the kernels and schedules select on or LLVM uses for their vector code: what a
# host-CPU build records (those the host has) and ``LibraryInfo.features`` reports.
KERNEL_FEATURES = ("avx", "avx2", "fma", "popcnt", "avx512f", "avx512bw", "avx512dq", "avx512vl",
                   "avx512vpopcntdq", "neon", "dotprod", "fp-armv8")


def required_features(spec: TargetSpec, host_features: Iterable[str] | None = None) -> list[str]:
    """The CPU features (cpuinfo spelling, sorted) a machine needs to run ``spec``'s library.

    A target for a named CPU needs its mattr and its mcpu's features; a host-CPU target
    (``mcpu`` None) needs those of :data:`KERNEL_FEATURES` that the build host has
    (``host_features``, cpuinfo spelling), since LLVM compiled for all of them."""
    from bidiff.runtime.artifact import cpuinfo_feature
    feats = {cpuinfo_feature(f) for f in (*spec.mattr, *MCPU_FEATURES.get(spec.mcpu or "", ()))}
    if spec.mcpu is None:
        feats |= {cpuinfo_feature(f) for f in KERNEL_FEATURES} & set(host_features or ())
    return sorted(feats)


def get_target(name: str) -> TargetSpec:
    try:
        return TARGETS[name]
    except KeyError:
        raise ValueError(f"unknown target {name!r}; valid targets: {', '.join(TARGETS)}") from None
