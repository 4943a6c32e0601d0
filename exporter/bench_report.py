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
