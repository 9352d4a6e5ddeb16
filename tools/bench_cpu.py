"""CPU speed of the portable graph, the optimized graph and int4 graphs, side by side in one run.

Builds a random-weight checkpoint with Qwen2-0.5B shapes (24 layers, hidden 896, 14 heads, 2 kv
heads, vocab 151936, tied), exports it (fp32) with the CPU-optimized graph, and again with
`--quantize int4` (blocks of 32 and 128; MatMulNBits with int8 activations, the CPU default, and for
block 32 also float activations), then runs every graph through the same session loop (runtime.Model,
greedy, onnxruntime's default graph optimizations on) and prints prefill ms and decode ms/token with
the ratio to the fp32 optimized graph.

    python tools/bench_cpu.py --workdir /tmp/bench-cpu [--prompt-tokens 128 1024] [--new-tokens 32]

It also measures this machine's memory bandwidth (numpy copy of 1 GiB) and prints the decode floor:
the fp32 weight bytes one decode step must read divided by that bandwidth.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from qwen2_export.export import export_checkpoint
from qwen2_export.synthetic import QWEN2_0_5B, write_checkpoint
from graphs.artifact import optimize_artifact
from runtime import Model


def measure(artifact: Path, graph: str, prompt: list[int], new_tokens: int, repeats: int) -> dict[str, float]:
    model = Model.load(artifact, device="cpu", graph=graph)
    model.generate(prompt[:8], max_new_tokens=2, greedy=True)  # warm-up: allocations, kernel selection
    prefill, decode = [], []
    for _ in range(repeats):
        model.generate(prompt, max_new_tokens=new_tokens, greedy=True, repetition_penalty=1.0)
        timings = model.last_timings
        prefill.append(timings.time_to_first_token_s * 1e3)
        decode.append(timings.decode_s * 1e3 / max(timings.decode_tokens, 1))
    return {"prefill_ms": statistics.median(prefill), "decode_ms_per_token": statistics.median(decode)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--prompt-tokens", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    checkpoint, artifact = args.workdir / "qwen2-0.5b-checkpoint", args.workdir / "qwen2-0.5b-artifact"
    if not (checkpoint / "config.json").is_file():
        write_checkpoint(checkpoint, QWEN2_0_5B, seed=0)
    if not (artifact / "onnx" / "model_cpu.onnx").is_file():
        export_checkpoint(checkpoint, artifact, dtype="fp32", force=True)
        optimize_artifact(artifact, "cpu")
    builds = {"fp32 portable": (artifact, "portable"), "fp32 optimized": (artifact, "optimized-cpu")}
    for block, level in INT4_BUILDS:
        builds[f"int4 b{block} level {level}"] = (int4_artifact(checkpoint, args.workdir, block, level), "optimized-cpu")
    bandwidth = copy_bandwidth_gb_s()
    weight_gb = (artifact / "onnx" / "model.onnx_data").stat().st_size / 1e9
    print(f"Qwen2-0.5B shapes, CPU, {args.new_tokens} new tokens, median of {args.repeats}; memory copy bandwidth "
          f"{bandwidth:.1f} GB/s, so reading the {weight_gb:.2f} GB of fp32 weights takes {weight_gb / bandwidth * 1e3:.1f} ms")
    print(f"{'prompt':>7}  {'graph':<22}{'prefill ms':>12}{'decode ms/token':>18}{'prefill x':>11}{'decode x':>10}")
    report = {"bandwidth_gb_s": bandwidth, "weights_gb": weight_gb, "runs": []}
    for length in args.prompt_tokens:
        prompt = np.random.default_rng(0).integers(0, 400, size=length).tolist()
        results = {name: measure(folder, graph, prompt, args.new_tokens, args.repeats) for name, (folder, graph) in builds.items()}
        baseline = results["fp32 optimized"]
        for name, numbers in results.items():  # ratios: how many times faster than the fp32 optimized graph
            numbers["prefill_x"] = baseline["prefill_ms"] / numbers["prefill_ms"]
            numbers["decode_x"] = baseline["decode_ms_per_token"] / numbers["decode_ms_per_token"]
            print(f"{length:>7}  {name:<22}{numbers['prefill_ms']:>12.1f}{numbers['decode_ms_per_token']:>18.2f}"
                  f"{numbers['prefill_x']:>10.2f}x{numbers['decode_x']:>9.2f}x")
        report["runs"].append({"prompt_tokens": length, **results})
    print(json.dumps(report))


INT4_BUILDS = ((32, 4), (128, 4), (32, 1))  # (block size, MatMulNBits accuracy level)


def int4_artifact(checkpoint: Path, workdir: Path, block: int, level: int) -> Path:
    """`--quantize int4` export with its CPU graph at `level`, once per workdir."""
    artifact = workdir / f"qwen2-0.5b-int4-b{block}-level{level}"
    if not (artifact / "onnx" / "model_cpu.onnx").is_file():
        export_checkpoint(checkpoint, artifact, dtype="fp32", force=True, quantize="int4", block_size=block)
        optimize_artifact(artifact, "cpu", int4_accuracy=level)
    return artifact


def copy_bandwidth_gb_s(size_bytes: int = 1 << 30) -> float:
    """Bytes moved per second by a numpy copy (read + write), best of three."""
    source = np.ones(size_bytes // 4, np.float32)
    target = np.empty_like(source)
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        np.copyto(target, source)
        best = min(best, time.perf_counter() - started)
    return 2 * size_bytes / best / 1e9


if __name__ == "__main__":
    main()
