"""TVM bit-serial BinaryConv2d kernels vs the numpy reference (``binary_conv2d_reference``).

The reference is plain numpy on +-1 floats (float64 sums, exact), so it cannot share a bug with
the xor + popcount kernels. Results must match to float32 rounding of ``scale * integer`` (the
kernel computes the integer exactly and multiplies once, like the reference), so the tolerance
is a few ulps; the RPReLU / residual epilogue adds float32 rounding of two more adds.
"""
from __future__ import annotations

import functools
import re
import subprocess

import numpy as np
import pytest
import tvm

from bidiff.exporter.targets import get_target
from bidiff.exporter.tvm.binary_conv import (
    BinaryConvShape, KernelVariant, binary_conv_primfunc, select_variant, word_bits)
from bidiff.exporter.tvm.target import host_target, tvm_target
from bidiff.runtime.binary_op import binary_conv2d_reference, pack_weights

FN = "bidiff_binary_conv2d"
AVX512_TARGET = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu",
                                   "mcpu": "sapphirerapids"})
AVX2_TARGET = tvm_target(get_target("x86_64-avx2"))
HOST_HAS_AVX512 = tvm.target.codegen.target_has_features("avx512vpopcntdq", host_target())

CHANNELS = (3, 16, 32, 33, 48, 64, 96)
SIZES = ((7, 9), (16, 16), (17, 31))


@functools.lru_cache(maxsize=None)
def _compiled(shape: BinaryConvShape, target_json: str):
    target = tvm.target.Target(target_json)
    func = binary_conv_primfunc(shape, select_variant(target), name=FN)
    return tvm.compile(tvm.IRModule({FN: func}), target=target)


@functools.lru_cache(maxsize=None)
def _jitted(shape: BinaryConvShape, target_json: str):
    return _compiled(shape, target_json).jit()


def _run(shape: BinaryConvShape, target, seed: int = 0):
    rng = np.random.default_rng(seed)
    c, f, h, w, k = shape.channels, shape.filters, shape.height, shape.width, shape.kernel
    index = list(shape.channel_map) or list(range(c))
    src = rng.standard_normal((1, shape.source_channels or c, h, w)).astype(np.float32)
    thr = (0.2 * rng.standard_normal(c)).astype(np.float32)
    # exact ties x == threshold must give bit 1 (v >= threshold -> +1)
    src[0, index, 0, 0] = thr
    x = src[:, index]                                    # what the conv reads
    wt = rng.standard_normal((f, c, k, k)).astype(np.float32)
    wt[0, 0] = 0.0                                       # packs as +1
    wp = pack_weights(wt)
    sc = (rng.random(f) + 0.5).astype(np.float32)
    ref = binary_conv2d_reference(x, wp, sc, channels=c, kernel=k, threshold=thr)
    args = [src, wp, sc, thr]
    if shape.epilogue == "rprelu":
        b0, slope, b1 = (rng.standard_normal(f).astype(np.float32) for _ in range(3))
        args += [b0, slope, b1]
        z = ref + b0[None, :, None, None]
        ref = np.where(z >= 0, z, slope[None, :, None, None] * z) + b1[None, :, None, None]
    if shape.residual:
        ref = ref + x
    if shape.addend:
        z = rng.standard_normal((1, f, h, w)).astype(np.float32)
        args.append(z)
        ref = ref + z
    dev = tvm.cpu()
    out = tvm.runtime.empty((1, f, h, w), "float32", dev)
    _jitted(shape, str(target))[FN](*[tvm.runtime.tensor(a, dev) for a in args], out)
    return out.numpy(), ref.astype(np.float32)


def _cases():
    cases = []
    for i, c in enumerate(CHANNELS):
        for k in (1, 3):
            h, w = SIZES[(i + k) % len(SIZES)]
            cases.append((c, 16 if c < 16 else c, h, w, k))
    for h, w in SIZES:                      # every size for a word-boundary channel count
        cases.append((33, 32, h, w, 3))
    return sorted(set(cases))


CASES = _cases()


def _ids(case):
    c, f, h, w, k = case
    return f"C{c}-F{f}-{h}x{w}-k{k}"


def test_variant_selection():
    assert select_variant(AVX512_TARGET) is KernelVariant.X86_AVX512
    assert select_variant(AVX2_TARGET) is KernelVariant.X86_AVX2
    for name in ("arm64", "rpi4", "rpi5"):
        assert select_variant(tvm_target(get_target(name))) is KernelVariant.ARM_NEON
    expected = KernelVariant.X86_AVX512 if HOST_HAS_AVX512 else KernelVariant.X86_AVX2
    assert select_variant(tvm_target(get_target("x86_64"))) is expected


def test_word_size():
    # x86: 64-bit words exactly when the channels fill them; otherwise the 32-bit packing as is
    for variant in (KernelVariant.X86_AVX2, KernelVariant.X86_AVX512, KernelVariant.GENERIC):
        assert word_bits(BinaryConvShape(64, 64, 8, 8), variant) == 64
        assert word_bits(BinaryConvShape(96, 32, 8, 8), variant) == 32
    # NEON: 16-bit words while a uint16 sum holds k*k*C popcounts
    neon = KernelVariant.ARM_NEON
    assert word_bits(BinaryConvShape(64, 64, 8, 8), neon) == 16
    assert word_bits(BinaryConvShape(7281, 8, 8, 8), neon) == 16
    assert word_bits(BinaryConvShape(7282, 8, 8, 8), neon) == 32
    assert word_bits(BinaryConvShape(7296, 8, 8, 8, kernel=1), neon) == 16
    with pytest.raises(ValueError, match="valid: none, rprelu"):
        BinaryConvShape(16, 16, 8, 8, epilogue="relu")


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_avx2_matches_reference(case):
    c, f, h, w, k = case
    out, ref = _run(BinaryConvShape(c, f, h, w, kernel=k), AVX2_TARGET)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not HOST_HAS_AVX512, reason="host CPU lacks AVX-512 VPOPCNTDQ: the AVX-512 "
                    "kernels are only compiled and inspected (test_avx512_codegen)")
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_avx512_matches_reference(case):
    c, f, h, w, k = case
    out, ref = _run(BinaryConvShape(c, f, h, w, kernel=k), AVX512_TARGET)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("c,h,w,k,residual", [(64, 16, 16, 3, True), (48, 17, 31, 3, False),
                                               (48, 17, 31, 3, True), (32, 7, 9, 1, True),
                                               (128, 5, 80, 3, True), (128, 3, 72, 1, True)])
@pytest.mark.parametrize("addend", [False, True])
def test_fused_epilogue(c, h, w, k, residual, addend):
    """(128 channels x 72-80 columns: accumulators over 32 KB per row, so the write-back runs
    per column tile instead of per row.)"""
    from bidiff.exporter.tvm.binary_conv import ROW_WRITE_BACK_BYTES
    target = AVX512_TARGET if HOST_HAS_AVX512 else AVX2_TARGET
    row_bytes = c * -(-w // 16) * 16 * 4                 # accumulators of a row (16-column tiles)
    assert (row_bytes > ROW_WRITE_BACK_BYTES) == (c == 128)   # both write-back paths covered
    out, ref = _run(BinaryConvShape(c, c, h, w, kernel=k, epilogue="rprelu", residual=residual,
                                    addend=addend), target, seed=1)
    # |y| <= scale * C * 9 ~ 1e3: two extra float32 adds round at ~1e-4 absolute
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-4)


def _cs_fusion_index(c: int, odd_first: bool) -> tuple[int, ...]:
    """CS-Fusion's mix of a 2c-channel concatenation (models.blocks.channel_shuffle_indices)."""
    a, b = (1, 0) if odd_first else (0, 1)
    return tuple(range(a, c, 2)) + tuple(c + i for i in range(b, c, 2))


@pytest.mark.parametrize("c,h,w,k,index", [
    (32, 7, 9, 1, _cs_fusion_index(32, True)),       # CS-Fusion: 2 runs of stride 2, 32-bit words
    (64, 16, 16, 1, _cs_fusion_index(64, False)),    # 64-bit words
    (48, 17, 31, 3, tuple(range(95, -1, -2))),        # one descending run, 3x3 with padding
    (16, 8, 8, 3, (10, 11, 12, 13, 0, 2, 4, 6, 8, 20, 21, 22, 23, 24, 25, 26)),   # 3 runs
])
def test_folded_channel_gather(c, h, w, k, index):
    """A channel Gather folded into the kernel: packing and residual read x[:, index]."""
    target = AVX512_TARGET if HOST_HAS_AVX512 else AVX2_TARGET
    shape = BinaryConvShape(c, c, h, w, kernel=k, epilogue="rprelu", residual=True,
                            channel_map=index, source_channels=max(index) + 1 + (c % 5))
    out, ref = _run(shape, target, seed=2)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-4)


def test_channel_map_validation():
    with pytest.raises(ValueError, match="channel_map needs 4 indices into 8 channels"):
        BinaryConvShape(4, 4, 8, 8, channel_map=(0, 1, 2), source_channels=8)
    with pytest.raises(ValueError, match="channel_map needs 4 indices into 8 channels"):
        BinaryConvShape(4, 4, 8, 8, channel_map=(0, 1, 2, 8), source_channels=8)
    with pytest.raises(ValueError, match="not piecewise affine in at most 4 pieces"):
        BinaryConvShape(10, 10, 8, 8, channel_map=(0, 9, 1, 8, 2, 7, 3, 6, 4, 5),
                        source_channels=10)


@pytest.mark.parametrize("c", [33, 64])
def test_avx512_codegen(c):
    ex = _compiled(BinaryConvShape(c, 32, 16, 16, kernel=3), str(AVX512_TARGET))
    asm = ex.mod.inspect_source("asm")
    assert re.search(r"\bvpopcnt[dq]\b", asm), "no AVX-512 VPOPCNTDQ instruction in the kernel"
    assert "zmm" in asm


def test_avx2_codegen():
    ex = _compiled(BinaryConvShape(64, 32, 16, 16, kernel=3), str(AVX2_TARGET))
    asm = ex.mod.inspect_source("asm")
    assert not re.search(r"\bvpopcnt[dq]\b", asm) and "zmm" not in asm
    assert "vpshufb" in asm and "ymm" in asm     # LLVM's nibble-lookup popcount on ymm


@pytest.mark.parametrize("c", [32, 64])
def test_arm64_cross_build_has_neon_cnt(c, tmp_path, cross_toolchain):
    target = tvm_target(get_target("arm64"))
    ex = _compiled(BinaryConvShape(c, 32, 16, 16, kernel=3), str(target))
    lib = tmp_path / "k.so"
    ex.export_library(str(lib), cc=get_target("arm64").cc)
    dis = subprocess.run(["aarch64-linux-gnu-objdump", "-d", str(lib)], check=True,
                         capture_output=True, text=True).stdout
    assert "file format elf64-littleaarch64" in dis
    # the kernel's own symbol (TVM emits the PrimFunc under its global symbol)
    m = re.search(rf"^[0-9a-f]+ <{FN}(?:_compute_)?>:\n(.*?)(?:\n\n|\Z)", dis, re.S | re.M)
    assert m, f"kernel symbol {FN} not in the disassembly"
    body = "\n".join(
        seg.group(1) for seg in re.finditer(rf"^[0-9a-f]+ <{FN}[^>]*>:\n(.*?)(?:\n\n|\Z)", dis,
                                            re.S | re.M))
    assert re.search(r"\bcnt\s+v\d+\.(8b|16b)", body), "no NEON cnt in the binary conv kernel"
    # 16-bit words (word_bits): each byte count is widened once, to .8h, never on to .4s / .2d
    widen = re.findall(r"\buada?lp\s+v\d+\.(\w+)", body)
    assert widen and set(widen) == {"8h"}, f"byte counts widened to {sorted(set(widen))}"


@functools.lru_cache(maxsize=None)
def _jitted_schedule_on_host(shape: BinaryConvShape, variant: KernelVariant):
    """A variant's schedule (tiling, padding, epilogue) compiled for this CPU: LLVM splits the
    wide vectors, so the loop structure of the AVX-512 / NEON schedules is checked numerically
    here even where their instructions cannot run."""
    func = binary_conv_primfunc(shape, variant, name=FN)
    return tvm.compile(tvm.IRModule({FN: func}), target=host_target()).jit()


@pytest.mark.parametrize("variant,c,f,h,w,k,epi,res", [
    (KernelVariant.X86_AVX512, 33, 24, 17, 31, 3, "none", False),
    (KernelVariant.X86_AVX512, 64, 64, 7, 9, 3, "rprelu", True),
    (KernelVariant.ARM_NEON, 64, 64, 7, 9, 3, "rprelu", True),
    (KernelVariant.ARM_NEON, 96, 48, 16, 16, 1, "none", False),
    (KernelVariant.ARM_NEON, 33, 16, 17, 31, 3, "none", False),
    (KernelVariant.ARM_NEON, 32, 32, 1, 1, 3, "rprelu", True),      # all 8 outer taps outside
    (KernelVariant.ARM_NEON, 48, 24, 2, 3, 3, "none", False),
    (KernelVariant.ARM_NEON, 16, 16, 5, 1, 3, "none", False),
], ids=lambda v: v.value if isinstance(v, KernelVariant) else str(v))
def test_every_schedule_matches_reference_on_host(variant, c, f, h, w, k, epi, res):
    shape = BinaryConvShape(c, f, h, w, kernel=k, epilogue=epi, residual=res)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, c, h, w)).astype(np.float32)
    thr = (0.2 * rng.standard_normal(c)).astype(np.float32)
    wp = pack_weights(rng.standard_normal((f, c, k, k)).astype(np.float32))
    sc = (rng.random(f) + 0.5).astype(np.float32)
    ref = binary_conv2d_reference(x, wp, sc, channels=c, kernel=k, threshold=thr)
    args = [x, wp, sc, thr]
    if epi == "rprelu":
        b0, slope, b1 = (rng.standard_normal(f).astype(np.float32) for _ in range(3))
        args += [b0, slope, b1]
        z = ref + b0[None, :, None, None]
        ref = np.where(z >= 0, z, slope[None, :, None, None] * z) + b1[None, :, None, None]
    if res:
        ref = ref + x
    dev = tvm.cpu()
    out = tvm.runtime.empty((1, f, h, w), "float32", dev)
    _jitted_schedule_on_host(shape, variant)[FN](*[tvm.runtime.tensor(a, dev) for a in args], out)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-4)
