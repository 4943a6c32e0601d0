"""Backend threads: the default is the usable cores (the process's CPU affinity), for both
backends, and the pools really start that many threads, observed from outside the backend.

onnxruntime: a session's intra-op pool starts threads - 1 workers (the caller is the first),
counted in /proc/self/task. TVM: tests/test_runtime_tvm_backend.py runs a parallel kernel that
records which thread ran each iteration. Each case runs in a fresh process, whose affinity it
may narrow without touching the test process's."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bidiff.runtime import backends
from bidiff.runtime.backends import BackendError, resolve_threads, usable_cores
from test_runtime_artifact import make_fake_artifact

CORES = len(os.sched_getaffinity(0))
FIRST_CPU = min(os.sched_getaffinity(0))


def test_usable_cores_follow_the_affinity_mask(monkeypatch) -> None:
    monkeypatch.delenv(backends.THREADS_ENV, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3, 5, 7})
    assert usable_cores() == resolve_threads(None) == 3
    monkeypatch.delattr(os, "sched_getaffinity")                    # macOS, Windows
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert usable_cores() == resolve_threads(None) == 6
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert usable_cores() == 1


def test_explicit_count_and_env_win_over_the_default(monkeypatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setenv(backends.THREADS_ENV, "3")
    assert resolve_threads(None) == 3 and resolve_threads(1) == 1
    monkeypatch.setenv(backends.THREADS_ENV, "many")
    with pytest.raises(BackendError, match="BIDIFF_THREADS='many' is not an integer"):
        resolve_threads(None)
    with pytest.raises(BackendError, match="threads must be >= 1"):
        resolve_threads(0)


@pytest.fixture(scope="module")
def art(tmp_path_factory) -> Path:
    return make_fake_artifact(tmp_path_factory.mktemp("threads") / "fake")


ORT_SCRIPT = """
import os, sys
cpus, threads, art = sys.argv[1:]
if cpus != "all":
    os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})
from bidiff import runtime
up = runtime.load(art, backend="onnxruntime", threads=None if threads == "default" else int(threads))
before = set(os.listdir("/proc/self/task"))
up.backend.session(0)
print(up.backend.threads, len(set(os.listdir("/proc/self/task")) - before))
"""


def run_script(script: str, *args: object, env: dict[str, str] | None = None) -> list[int]:
    base = {k: v for k, v in os.environ.items() if k not in (backends.THREADS_ENV, "TVM_NUM_THREADS")}
    r = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True,
                       text=True, timeout=300, env={**base, **(env or {})})
    assert r.returncode == 0, r.stderr[-2000:]
    return [int(w) for w in r.stdout.split()]


@pytest.mark.parametrize("cpus,threads,env,expected", [
    ("all", "default", None, CORES),                       # all the usable cores
    (str(FIRST_CPU), "default", None, 1),                  # ... as the affinity mask says
    ("all", "1", None, 1),                                 # an explicit count wins
    ("all", "default", {"BIDIFF_THREADS": "1"}, 1),        # so does $BIDIFF_THREADS
    (str(FIRST_CPU), "2", None, 2),                        # even above the usable cores
])
def test_onnxruntime_pool_starts_that_many_threads(art: Path, cpus, threads, env, expected) -> None:
    configured, started = run_script(ORT_SCRIPT, cpus, threads, art, env=env)
    assert (configured, started) == (expected, expected - 1)


def test_cli_upscale_default_is_the_usable_cores(art: Path, tmp_path: Path, monkeypatch) -> None:
    """`bidiff upscale` without --threads opens its backend on the usable cores, with it on N."""
    import numpy as np
    from PIL import Image

    from bidiff.runtime import api
    from bidiff.runtime.cli import main
    monkeypatch.delenv(backends.THREADS_ENV, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    opened = []
    real_load = api.load

    def load(*args, **kw):
        opened.append(real_load(*args, **kw))
        return opened[-1]
    monkeypatch.setattr(api, "load", load)
    Image.fromarray(np.zeros((12, 10, 3), np.uint8)).save(tmp_path / "x.png")
    for extra, expected in (([], 3), (["--threads", "1"], 1)):
        with pytest.raises(SystemExit) as e:
            main(["upscale", str(tmp_path / "x.png"), "-o", str(tmp_path / "out"), "--artifact",
                  str(art), "--backend", "onnxruntime", "--steps", "1", "-q", *extra])
        assert e.value.code == 0
        backend = opened[-1].backend
        assert backend.threads == expected and backend._options().intra_op_num_threads == expected
