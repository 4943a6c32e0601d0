"""Estimate one step (and a whole upscale's network time) on a device we cannot measure here,
from a roofline measured here (``scripts/bench.py --part r --json R.json``).

    python scripts/estimate_device.py R.json [--device rpi4] [--calls 108]

Each kernel class's measured time is scaled by its ideal time on the device over its ideal
time here (``bidiff.exporter.bench_roofline.estimate_on``): the work is counted from the same
graph the device's artifact is compiled from, the device's peak rates come from its core's
published throughputs (``RPI4``), and the kernels are assumed to reach the same fraction of
their roofline there as here. An estimate, not a measurement: say so wherever it is quoted.
"""
from __future__ import annotations

import argparse
import json
import sys

from bidiff.exporter.bench_roofline import RPI4, estimate_on

DEVICES = {"rpi4": (RPI4, lambda bits: 16)}   # NEON kernels count 16-bit words (binary_conv)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("result", help="JSON of a part-r run (scripts/bench.py --part r --json)")
    p.add_argument("--device", choices=sorted(DEVICES), default="rpi4")
    p.add_argument("--calls", type=int, default=108,
                   help="network calls of the whole upscale (default 108: 640x480 at tile 128, "
                        "1 step)")
    args = p.parse_args(argv)
    with open(args.result) as f:
        result = json.load(f)
    if result.get("part") != "r":
        p.error(f"{args.result} is not a part-r result (bench.py --part r --json)")
    device, bits = DEVICES[args.device]
    rows, step_ms = estimate_on(result, device, bits)
    print(f"### Estimated on {device.name}, from {result['config']} at {result['tile']}x"
          f"{result['tile']} measured at {result['threads']} threads on {result['target']}\n")
    print("| class | measured here ms | estimated there ms |")
    print("|---|---|---|")
    measured = {r["class"]: r["measured_ms"] for r in result["rows"]}
    for cls, ms in sorted(rows, key=lambda kv: -kv[1]):
        print(f"| {cls} | {measured[cls]:.2f} | {ms:.2f} |")
    print(f"| **step** (sum of the classes) | {sum(measured.values()):.1f} | **{step_ms:.1f}** |")
    print(f"\n{args.calls} network calls: {args.calls * step_ms / 1e3:.1f} s of network time "
          f"(rates: {device.source})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
