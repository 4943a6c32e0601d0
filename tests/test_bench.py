"""bidiff.exporter.bench and its command (scripts/bench.py): bundles built here are measured
through the device runtime, and part k reports (and fails on) a kernel that disagrees with the
reference."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from bidiff.exporter import bench_build
from bidiff.exporter import bench_cli as bench
from bidiff.exporter.bench_measure import interleaved_blocks


def test_part_a_bundle_round_trip(tmp_path, capsys) -> None:
    small = ["--channels", "32", "--size", "16", "--rounds", "1", "--repeat", "1"]
    assert bench.main(["--part", "a", "--target", "x86_64-avx2", "--bundle", str(tmp_path / "b"),
                       *small]) == 0
    meta = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert meta["part"] == "a" and meta["target"] == "x86_64-avx2"
    assert list(meta["spec"]["kernels"]) == ["x86_avx2"]
    assert bench.main(["--run", str(tmp_path / "b"), "--threads", "1", "--json",
                       str(tmp_path / "a.json"), *small]) == 0
    result = json.loads((tmp_path / "a.json").read_text())
    names = [r["kernel"] for r in result["rows"]]
    assert names[0] == "TVM binary (x86_avx2)" and "onnxruntime fp32 Conv" in names
    assert all(r["median_ms"] > 0 for r in result["rows"])
    assert result["target"] == "x86_64-avx2" and result["machine"]["arch"] == "x86_64"
    assert "### Part a: binary conv 32->32, 3x3, 1x32x16x16, 1 threads" in capsys.readouterr().out


def test_bundle_of_another_version_is_refused(tmp_path) -> None:
    (tmp_path / "bench.json").write_text(json.dumps({"version": 99, "part": "a", "spec": {}}))
    with pytest.raises(SystemExit, match="bench bundle version 99, this script reads 1: "
                                         "rebuild it with --bundle"):
        bench.main(["--run", str(tmp_path)])


def test_part_k_flags_a_wrong_kernel(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(bench_build, "kernel_cases",
                        lambda: [(33, 32, 7, 9, 3, "none", False, 0, False),
                                 (32, 32, 9, 7, 3, "rprelu", True, 0, False),
                                 (16, 16, 9, 11, 3, "rprelu", True, 32, True),
                                 (8, 8, 5, 7, 1, "rprelu", True, 12, False)])
    root = tmp_path / "k"
    assert bench.main(["--part", "k", "--target", "x86_64-avx2", "--bundle", str(root)]) == 0
    assert bench.main(["--run", str(root), "--threads", "1"]) == 0
    assert "4 binary-conv kernels vs the numpy reference" in capsys.readouterr().out
    # a kernel that computes something else: the bundle now says the 2nd one has no residual
    # add, so the reference leaves it out while the compiled kernel still adds it
    meta = json.loads((root / "bench.json").read_text())
    meta["spec"]["cases"][1]["residual"] = False
    # and one that reads other channels than the folded map the reference is given
    meta["spec"]["cases"][2]["channel_index"] = meta["spec"]["cases"][2]["channel_index"][::-1]
    (root / "bench.json").write_text(json.dumps(meta))
    assert bench.main(["--run", str(root), "--threads", "1"]) == 1
    out = capsys.readouterr().out
    assert ": 2 mismatches" in out and "| 32: 16 -> 16 | 9x11 | 3x3 | rprelu + residual + addend" \
        in out and out.count("| NO |") == 2


def test_blocks_last_at_least_min_block_ms() -> None:
    """A sub-microsecond contender is timed in blocks of many calls, not --repeat calls."""
    calls = {"n": 0}

    def tick():
        calls["n"] += 1

    def per_block(min_block_ms):
        calls["n"] = 0
        interleaved_blocks({"tick": tick}, 2, 3, min_block_ms)
        return (calls["n"] - 1 - 3 - 2) / 2      # warm-up + calibration + one untimed per round

    assert per_block(0) == 3
    assert per_block(5.0) > 100


def test_bench_kit_refuses_an_existing_folder(tmp_path) -> None:
    """The kit script never builds into (and mixes with) an existing folder."""
    import subprocess
    kit = tmp_path / "kit"
    kit.mkdir()
    (kit / "keep.txt").write_text("x")
    script = Path(__file__).parents[1] / "scripts" / "bench_kit.sh"
    r = subprocess.run([str(script), str(kit)], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr == f"scripts/bench_kit.sh: {kit} exists; remove it or name a new folder\n"
    assert [p.name for p in kit.iterdir()] == ["keep.txt"]


def test_contender_order_rotates_per_round() -> None:
    """No contender always runs right after the same other one."""
    order = []
    contenders = {k: (lambda k=k: order.append(k)) for k in ("a", "b", "c")}
    interleaved_blocks(contenders, 3, 1, 0)
    timed = order[6:]                            # after the warm-up and calibration calls
    firsts = [timed[i] for i in range(0, len(timed), 2 * 3)]   # untimed + timed call each
    assert firsts == ["a", "b", "c"]
