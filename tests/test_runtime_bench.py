"""`bidiff bench`: step timing per backend and the whole-upscale estimate, on the fake ONNX
artifact of test_runtime_artifact (a pointwise stand-in network, so runs take milliseconds)."""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest

from bidiff.runtime import api
from bidiff.runtime.benchmark import format_duration, network_calls, time_steps
from test_runtime_artifact import TILE, make_fake_artifact
from test_runtime_cli import run


@pytest.fixture(scope="module")
def art(tmp_path_factory) -> Path:
    return make_fake_artifact(tmp_path_factory.mktemp("bench") / "fake")


@pytest.mark.parametrize("w,h", [(5, 5), (16, 16), (17, 16), (40, 23), (100, 9), (61, 20)])
def test_network_calls_match_the_sampler(art: Path, w: int, h: int) -> None:
    """The estimate counts exactly the network calls the sampler makes for that size, tiles
    aligned to the artifact's input multiple (8) as the sampler aligns them: at 61 x 20 that
    takes one tile column more than unaligned."""
    totals = []
    with api.load(art, backend="onnxruntime") as up:
        image = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
        up.upscale(image, steps=3, back_projection=0,
                   progress=lambda done, total: totals.append(total))
    tiles, calls = network_calls(w, h, scale=2, tile=TILE, steps=3, align=8)
    assert calls == totals[-1] == len(totals) and calls == 3 * tiles
    if (w, h) == (61, 20):
        assert network_calls(w, h, scale=2, tile=TILE, steps=3)[0] < tiles


def test_time_steps_times_every_backend_in_turn() -> None:
    order = []

    class Fake:
        tile = TILE

        def __init__(self, name):
            self.name = name

        def run(self, group, x_t, cond, t):
            assert x_t.shape == cond.shape == (1, 3, TILE, TILE) and t.dtype == np.int64
            order.append(self.name)
            return x_t

    out = time_steps({"a": Fake("a"), "b": Fake("b")}, tile=TILE, rounds=2, calls=2)
    assert [t.backend for t in out] == ["a", "b"] and all(t.calls == 4 for t in out)
    assert all(0 <= t.min_ms <= t.median_ms for t in out)
    # one untimed call + 2 timed per block; round 0: a then b, round 1: b then a
    assert order == ["a"] * 3 + ["b"] * 3 + ["b"] * 3 + ["a"] * 3
    with pytest.raises(ValueError, match="rounds and calls must be >= 1"):
        time_steps({"a": Fake("a")}, tile=TILE, rounds=0)


def test_format_duration() -> None:
    assert [format_duration(s) for s in (0.25, 12.4, 200, 7500)] == \
        ["0.2 s", "12 s", "3 min 20 s", "2 h 05 min"]


def test_bench_command(art: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("BIDIFF_THREADS", raising=False)
    code, out, err = run(["bench", art, "--rounds", "2", "--size", "40x23", "--steps", "3",
                          "--threads", "1"], capsys)
    assert code == 0, err
    tiles, calls = network_calls(40, 23, scale=2, tile=TILE, steps=3, align=8)
    assert f"(fake x2, tile {TILE}, target onnx)" in out
    assert re.search(r"^threads     1$", out, re.M), out
    assert re.search(r"^  onnxruntime +\d+\.\d\d ms  \(best \d+\.\d\d\)$", out, re.M), out
    assert f"upscaling a 40x23 input to 80x46 at 3 steps: {tiles} tile(s) x 3 = {calls} " in out
    assert "tvm" not in out            # an ONNX-only artifact: onnxruntime is all there is

    # the real upscale: its network calls, and a split of its wall time that adds up
    head = re.search(r"^one real upscale, PNG to PNG \(onnxruntime, 3 steps, (\d+) network calls\): "
                     r"(\d+\.\d\d) s wall$", out, re.M)
    assert head and int(head[1]) == calls, out
    rows = {m[1].strip(): (float(m[2]), float(m[3]))
            for m in re.finditer(r"^  (.+?) +(\d+\.\d{3}) s +(\d+\.\d)%$", out, re.M)}
    parts = ["decode the input", "input to float, bicubic condition, noise",
             "tile copies, blending, DDIM updates", "last update, back-projection, output",
             "encode and write the result"]
    assert list(rows) == ["network", "outside the network", *parts], out
    wall = float(head[2])
    assert rows["network"][0] + rows["outside the network"][0] == pytest.approx(wall, abs=0.011)
    assert sum(rows[p][0] for p in parts) == pytest.approx(rows["outside the network"][0], abs=0.006)
    assert rows["network"][1] + rows["outside the network"][1] == pytest.approx(100, abs=0.11)
    assert all(sec >= 0 for sec, _ in rows.values())


def test_bench_defaults(art: Path, capsys, monkeypatch) -> None:
    """No --threads: the usable cores; no --size: the 512x512 estimate only, nothing run."""
    monkeypatch.delenv("BIDIFF_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5})
    code, out, err = run(["bench", art, "--rounds", "1", "--steps", "2"], capsys)
    assert code == 0, err
    assert re.search(r"^threads     3 \(the usable cores\)$", out, re.M), out
    assert "upscaling a 512x512 input to 1024x1024 at 2 steps" in out
    assert "real upscale" not in out
    monkeypatch.setenv("BIDIFF_THREADS", "1")
    code, out, err = run(["bench", art, "--rounds", "1", "--steps", "2"], capsys)
    assert re.search(r"^threads     1 \(\$BIDIFF_THREADS\)$", out, re.M), out


@pytest.mark.parametrize("args,words", [
    (["--size", "640"], "--size '640' is not WIDTHxHEIGHT"),
    (["--size", "3x100"], "each >= 4"),
    (["--backend", "tvm"], "has no native library"),
    (["--rounds", "0"], "--rounds"),
])
def test_bench_bad_input(art: Path, args, words, capsys) -> None:
    code, out, err = run(["bench", art, *args], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1 and words in err, err
