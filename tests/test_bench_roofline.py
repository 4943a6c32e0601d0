"""Bench part r (``bench_roofline`` + ``bench_peaks``): the work counted from the step's graph
names the same kernel classes the compiled step calls, the ideal time follows the stated
model, and the report shows the roofline and the thread scaling with the issue's goals."""
from __future__ import annotations

import json
import math

import pytest

from bidiff.exporter import bench_cli as bench
from bidiff.exporter.bench_roofline import (BINARY_OPS, DeviceRates, NodeWork, binary_class,
                                            classify_kernel, estimate_on, ideal)


def test_ideal_takes_the_larger_of_compute_and_memory_per_node() -> None:
    rates = {"popcount64": 1e9, "fma": 4e9, "stream": 1e9}
    work = [NodeWork("b", words=2e9, word_bits=64, flops=4e9, bytes=1e9),   # compute: 2 + 1 s
            NodeWork("b", words=1e9, word_bits=64, bytes=8e9),              # memory: 8 s
            NodeWork("f", flops=8e9, bytes=1e9)]                            # FMA: 2 s
    got = {c.cls: c for c in ideal(work, rates, threads=2)}
    assert got["b"].nodes == 2 and got["b"].words == {64: 3e9}
    assert math.isclose(got["b"].ideal_s, (3 + 8) / 2)
    assert got["b"].bound == pytest.approx({"popcount": 1.5, "memory": 4.0})
    assert math.isclose(got["f"].ideal_s, 1.0) and set(got["f"].bound) == {"FMA"}


def test_a_device_estimate_scales_each_class_by_its_roofline_ratio() -> None:
    result = {"threads": 2, "rates": {"popcount32": 1e9, "fma": 1e9, "stream": 1e9},
              "rows": [{"class": "b", "words": {"32": 4e9}, "flops": 0.0, "bytes": 1e9,
                        "measured_ms": 4000.0},      # ideal here: 4e9 / 2e9 = 2 s (popcount)
                       {"class": "m", "words": {}, "flops": 1e9, "bytes": 8e9,
                        "measured_ms": 8000.0},      # ideal here: 8e9 / 2e9 = 4 s (memory)
                       {"class": "VM", "words": {}, "flops": 0.0, "bytes": 0.0,
                        "measured_ms": 3.0}]}
    device = DeviceRates("d", 4, {"popcount16": 2e9, "fma": 1e9, "stream": 0.5e9}, "test")
    rows, step = estimate_on(result, device, lambda bits: 16)
    # b: 8e9 16-bit words at 4 x 2e9 = 1 s there (2 s here): 2000 ms; m: 8e9 B at 4 x 0.5e9
    # = 4 s there (4 s here): 8000 ms; VM calls as measured
    assert rows == [("b", pytest.approx(2000.0)), ("m", pytest.approx(8000.0)), ("VM", 3.0)]
    assert step == pytest.approx(10003.0)


def test_kernel_names_classify_like_the_graph() -> None:
    assert classify_kernel("bidiff_bconv_x86_avx2_c16_f32_h8_w8_k3_rprelu") == \
        binary_class(16, 32, 8, 8, 3) == "binary 3x3 16->32 @8x8"
    assert classify_kernel("vm.builtin.alloc_storage") == "VM (allocation, reshape)"
    assert classify_kernel("fused_conv2d_add") == "float conv"
    assert classify_kernel("fused_group_norm_sigmoid_multiply") == "GroupNorm + Swish"
    assert BINARY_OPS == ("BinaryConv2d", "BinaryConv2dRPReLU")


def test_part_r_reports_a_roofline_of_the_tiny_step(tmp_path, capsys) -> None:
    small = ["--config", "tiny-binary", "--tile", "16", "--rounds", "1", "--repeat", "1",
             "--min-block-ms", "0", "--thread-counts", "1"]
    assert bench.main(["--part", "r", "--bundle", str(tmp_path / "r"), *small]) == 0
    assert bench.main(["--run", str(tmp_path / "r"), "--threads", "1", "--json",
                       str(tmp_path / "r.json"), *small]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert set(result["rates"]) >= {"fma", "stream"} and \
        any(k.startswith("popcount") for k in result["rates"])
    assert all(v > 0 for v in result["rates"].values())
    binary = [r for r in result["rows"] if r["class"].startswith("binary ")]
    assert binary
    for r in binary:   # every counted binary class is called by the step, and vice versa
        assert r["nodes"] > 0 and r["calls"] > 0 and r["measured_over_ideal"] > 0, r
        c, f, hw, k = _parse_class(r["class"])
        assert r["macs"] == pytest.approx(r["nodes"] * f * hw * k * k * c), r
    assert result["ideal_ms"] > 0 and result["step_over_ideal"] > 0
    out = capsys.readouterr().out
    assert "### Part r: roofline of one step, tiny-binary at 16x16, 1 threads" in out
    assert "| **step** (uninstrumented median" in out
    assert "At 1 threads:" in out and "(goal <= 3x:" in out


def test_thread_counts_are_validated() -> None:
    with pytest.raises(SystemExit) as err:
        bench.main(["--part", "r", "--thread-counts", "0,2"])
    assert err.value.code == 2


def _parse_class(cls: str) -> tuple[int, int, int, int]:
    """'binary 3x3 16->32 @8x8' -> (16, 32, 64, 3)."""
    _, kk, cf, hw = cls.split()
    c, f = (int(v) for v in cf.split("->"))
    h, w = (int(v) for v in hw[1:].split("x"))
    return c, f, h * w, int(kk.split("x")[0])
