"""Peak resident memory of `bidiff.runtime` upscales, one fresh process per image size.

    python scripts/peak_memory.py --artifact ARTIFACT [--sizes 256 512 1024] [--steps 2]
                                  [--backend auto] [--threads 2] [--json out.json]

For each LR size N, a child process loads the artifact, upscales an N x N photo-like image
(seeded noise smoothed, so it is deterministic) and reports its peak RSS (``ru_maxrss``)
after loading and after upscaling, plus the size of the image buffers the sampler must hold
(x_t, cond and the blended ε, 3 x H x W float32 each). The per-step cost does not depend on the
step count, so a few steps measure the peak of a 50-step run. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

CHILD = r"""
import json, resource, sys, time
import numpy as np
from bidiff import runtime
art, n, steps, backend, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024      # MiB (Linux: kB)
base = rss()
up = runtime.load(art, backend=backend, threads=None if threads == "0" else int(threads))
loaded = rss()
rng = np.random.default_rng(0)
img = (np.cumsum(rng.standard_normal((n, n, 3)), axis=1) % 1 * 255).astype(np.uint8)
t0 = time.perf_counter()
out = up.upscale(img, steps=steps, seed=0)
dt = time.perf_counter() - t0
print(json.dumps({"lr": n, "hr": out.shape[0], "backend": up.backend_name, "steps": steps,
                  "import_mib": round(base, 1), "loaded_mib": round(loaded, 1),
                  "peak_mib": round(rss(), 1), "seconds": round(dt, 2),
                  "image_buffer_mib": round(3 * out.shape[0] * out.shape[1] * 4 / 2**20, 1)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", required=True)
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="0: the backend's default")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    a = ap.parse_args()
    rows = []
    for n in a.sizes:
        t0 = time.time()
        r = subprocess.run([sys.executable, "-c", CHILD, a.artifact, str(n), str(a.steps), a.backend,
                            str(a.threads)], capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"size {n} failed:\n{r.stderr[-3000:]}")
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(f"# {n}: done in {time.time() - t0:.0f} s", file=sys.stderr)
    print("| LR | HR | backend | steps | RSS after import (MiB) | after load | peak | one 3xHxW f32 buffer | time (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['lr']}² | {r['hr']}² | {r['backend']} | {r['steps']} | {r['import_mib']} | "
              f"{r['loaded_mib']} | **{r['peak_mib']}** | {r['image_buffer_mib']} | {r['seconds']} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
