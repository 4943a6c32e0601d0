"""A measured bench result as a markdown section (what ``scripts/bench.py`` prints)."""
from __future__ import annotations


def report(result: dict) -> str:
    """The markdown of a ``bench_measure.measure_bundle`` result: a heading and a table."""
    out: list[str] = []
    head = f"{result['threads']} threads, target {result['target']} ({result['machine']['cpu']})"
    if result["part"] == "a":
        out.append(f"### Part a: {result['layer']}, {head}\n")
        out.append("| kernel | median ms | speed-up vs onnxruntime |")
        out.append("|---|---|---|")
        for r in result["rows"]:
            out.append(f"| {r['kernel']} | {r['median_ms']:.3f} | {r['speedup_vs_onnxruntime']:.2f}x |")
    elif result["part"] == "c":
        out.append(f"### Part c: one denoising step, {result['config']} at {result['tile']}x"
                   f"{result['tile']}, {head}\n")
        out.append("| runtime | median ms | speed-up vs onnxruntime float |")
        out.append("|---|---|---|")
        for r in result["rows"]:
            out.append(f"| {r['runtime']} | {r['median_ms']:.2f} | "
                       f"{r['speedup_vs_onnxruntime_float']:.2f}x |")
        out.append(f"\nTVM vs onnxruntime (binary ONNX) max abs difference: "
                   f"{result['tvm_vs_onnxruntime_binary_max_abs_err']:.1e}")
        if "onnxruntime_binary_perturbed_max_abs_diff" in result:
            out.append(f"({100 * result['tvm_vs_onnxruntime_binary_share_over_1e-3']:.3f}% of outputs "
                       f"differ by more than 1e-3; onnxruntime against itself with x_t perturbed by "
                       f"1e-6: {result['onnxruntime_binary_perturbed_max_abs_diff']:.1e})")
    elif result["part"] == "r":
        out += _roofline(result, head)
    elif result["part"] == "k":
        bad = [r for r in result["rows"] if not r["ok"]]
        out.append(f"### Part k: {len(result['rows'])} binary-conv kernels vs the numpy reference, "
                   f"{head}: {len(bad)} mismatches\n")
        out.append("| variant | [source:] C -> F | H x W | kernel | epilogue | max abs err | ok |")
        out.append("|---|---|---|---|---|---|---|")
        for r in result["rows"]:
            epi = r["epilogue"] + (" + residual" if r["residual"] else "") + \
                (" + addend" if r.get("addend") else "")
            src = f"{r['source']}: " if r.get("source") else ""
            out.append(f"| {r['variant']} | {src}{r['channels']} -> {r['filters']} | {r['height']}x"
                       f"{r['width']} | {r['kernel']}x{r['kernel']} | {epi} | {r['max_abs_err']:.1e} | "
                       f"{'yes' if r['ok'] else 'NO'} |")
    else:
        out.append(f"### Part b: float op classes, {head}\n")
        out.append("| op | TVM ms | onnxruntime ms | TVM / onnxruntime | max rel err |")
        out.append("|---|---|---|---|---|")
        for r in result["rows"]:
            out.append(f"| {r['op']} | {r['tvm_ms']:.3f} | {r['onnxruntime_ms']:.3f} | "
                       f"{r['tvm_over_onnxruntime']:.2f} | {r['max_rel_err']:.1e} |")
    return "\n".join(out)


STEP_GOALS = {"avx512": 8.0, "avx2": 5.0}    # issue 18: the shipped step vs onnxruntime fp32
ROOFLINE_GOAL = 3.0                          # and within this factor of the roofline


def _roofline(result: dict, head: str) -> list[str]:
    """Part r: the peak rates, the per-class roofline table, the thread scaling and the goals."""
    rates = result["rates"]
    peaks = []
    for p in result["peaks"]:
        r = rates[p["name"]]
        if p["unit"] == "words":
            bits = int(p["name"].removeprefix("popcount"))
            peaks.append(f"popcount of {bits}-bit words {r / 1e9:.2f} G/s "
                         f"({r * bits / 1e9:.0f} G binary MAC/s)")
        else:
            peaks.append({"flop": f"FMA {r / 1e9:.1f} GFLOP/s",
                          "bytes": f"stream (y = a + b, 12 MiB) {r / 1e9:.1f} GB/s"}[p["unit"]])
    t = result["threads"]
    out = [f"### Part r: roofline of one step, {result['config']} at {result['tile']}x"
           f"{result['tile']}, {head}\n",
           "Peak rates per thread, measured in this run (TVM-compiled single-thread "
           "microbenchmarks, `bidiff.exporter.bench_peaks`): " + "; ".join(peaks) +
           f". Ideal = each node's larger of compute and memory time at {t} x these rates.\n",
           "| class | nodes / VM calls | binary MACs (G) | popcount words (M) | MFLOP | MB moved | "
           "bound | ideal ms | measured ms | measured / ideal |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        words = " + ".join(f"{v / 1e6:.1f}@{b}b" for b, v in r["words"].items()) or "-"
        ratio = f"{r['measured_over_ideal']:.1f}x" if r["measured_over_ideal"] else "-"
        out.append(f"| {r['class']} | {r['nodes']} / {r['calls']} | "
                   f"{r['macs'] / 1e9:.3f} | {words} | {r['flops'] / 1e6:.1f} | "
                   f"{r['bytes'] / 1e6:.1f} | {r['bound'] or '-'} | {r['ideal_ms']:.3f} | "
                   f"{r['measured_ms']:.2f} | {ratio} |")
    out.append(f"| **step** (uninstrumented median; instrumented {result['instrumented_step_ms']:.1f}"
               f" ms) | | | | | | | {result['ideal_ms']:.2f} | {result['step_ms']:.1f} | "
               f"**{result['step_over_ideal']:.1f}x** |")
    cores = result["cores"]
    out += ["", f"Thread scaling of the step ({cores} usable cores):\n",
            "| threads | TVM ms | onnxruntime float ms | TVM speed-up | TVM vs "
            f"{result['scaling'][0]['threads']} thread(s) |", "|---|---|---|---|---|"]
    for r in result["scaling"]:
        over = " (oversubscribed)" if r["threads"] > cores else ""
        out.append(f"| {r['threads']}{over} | {r['tvm_ms']:.1f} | {r['onnxruntime_float_ms']:.1f}"
                   f" | {r['speedup_vs_onnxruntime_float']:.2f}x | {r['tvm_vs_1_thread']:.2f}x |")
    isa = "avx512" if "avx512_vpopcntdq" in result["machine"].get("features", ()) else "avx2"
    at = next((r for r in result["scaling"] if r["threads"] == t), None)
    if at is not None:
        goal = STEP_GOALS[isa]
        out.append(f"\nAt {t} threads: {at['speedup_vs_onnxruntime_float']:.2f}x onnxruntime "
                   f"(goal >= {goal:g}x on {isa.upper()}: "
                   f"{'met' if at['speedup_vs_onnxruntime_float'] >= goal else 'not met'}); "
                   f"{result['step_over_ideal']:.1f}x the roofline (goal <= {ROOFLINE_GOAL:g}x: "
                   f"{'met' if result['step_over_ideal'] <= ROOFLINE_GOAL else 'not met'}).")
    return out
