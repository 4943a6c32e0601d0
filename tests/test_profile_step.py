"""scripts/profile_step.py: a per-kernel table of one TVM step that accounts for the step."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path


def test_profile_table_lists_the_binary_kernels(capsys) -> None:
    spec = importlib.util.spec_from_file_location(
        "profile_step", Path(__file__).parents[1] / "scripts" / "profile_step.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--config", "tiny-binary", "--tile", "16", "--top", "1000"]) == 0
    out = capsys.readouterr().out
    step = float(re.search(r"thread\(s\): ([0-9.]+) ms", out).group(1))
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ")][1:]
    names = [r[0].strip() for r in rows]
    assert any(n.startswith("bidiff_bconv_") for n in names), names
    ms = [float(r[2]) for r in rows]
    assert ms == sorted(ms, reverse=True)
    # the calls cannot take more than the step (medians); how much of it they take is no test
    # matter: at tile 16 the VM's own dispatch, and on a loaded machine a preempted core, can
    # be most of a step (1.1 of 6.3 ms measured so, beside two training runs)
    assert 0 < sum(ms) <= step * 1.1


def test_profile_of_a_prebuilt_library(tmp_path, capsys) -> None:
    """--library: a library compiled elsewhere (for another CPU) is profiled without a build."""
    import argparse
    spec = importlib.util.spec_from_file_location(
        "profile_step", Path(__file__).parents[1] / "scripts" / "profile_step.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    lib = mod._build(argparse.Namespace(checkpoint=None, config="tiny-binary", tile=16), tmp_path)
    assert mod.main(["--library", str(lib), "--tile", "16", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "tile 16, 1 thread(s)" in out and "median of 2" in out
    assert "| bidiff_bconv_" in out
