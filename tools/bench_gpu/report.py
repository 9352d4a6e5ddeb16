"""The run's report: each part's result or its error, the JSON file, ratios and the README's tables."""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path
from typing import Any, Callable


class Report:
    """Parts of one run, by name; a part that raises is recorded with its traceback and the run goes on."""

    def __init__(self, out: Path):
        self.out, self.parts = out, {}

    def run(self, name: str, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            self.parts[name] = function(*args, **kwargs)
        except Exception:  # a measurement script reports a broken part and carries on
            self.parts[name] = {"error": traceback.format_exc(limit=6)}
        print(f"== {name} ({time.perf_counter() - started:.1f}s): {json.dumps(self.parts[name], default=str)[:1500]}", flush=True)
        self.save()
        return self.parts[name]

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "bench_gpu.json").write_text(json.dumps(self.parts, indent=2, default=str))


def with_ratios(report: dict) -> dict:
    """Each decode figure over the floor, and each peer's decode time over ours (> 1: we are faster)."""
    ours = report["ours_cuda_graph"]["decode_ms_per_token"]
    layers = report["layers"]
    peers = {"transformers_eager": report.get("transformers_eager"),
             "transformers_static_compile": report.get("transformers_static_compile"),
             **{f"onnxruntime_genai_{k}": v for k, v in (report.get("onnxruntime_genai") or {}).items() if isinstance(v, dict)}}
    ratios = {"ours_cuda_graph_over_floor": ours / report["floor_ms_per_token"],
              "ours_plain_over_floor": report["ours_plain"]["decode_ms_per_token"] / report["floor_ms_per_token"],
              "ours_ms_per_layer": ours / layers, "floor_ms_per_layer": report["floor_ms_per_token"] / layers}
    for name, peer in peers.items():
        if peer and "decode_ms_per_token" in peer:
            ratios[f"{name}_over_ours"] = peer["decode_ms_per_token"] / ours
            ratios[f"{name}_over_floor"] = peer["decode_ms_per_token"] / report["floor_ms_per_token"]
    for key, variant in report.items():  # ours optimized another way (--variants), same run
        if key.startswith("ours_") and isinstance(variant, dict) and "cuda_graph" in variant:
            ratios[f"{key}_over_floor"] = variant["cuda_graph"]["decode_ms_per_token"] / report["floor_ms_per_token"]
            ratios[f"{key}_prefill_512_ms"] = variant["cuda_graph"]["prefill_ms"]
    ratios["batch8_ours_over_transformers_eager"] = (report["ours_batch8_cuda_graph"]["tokens_per_s"]
                                                     / report["transformers_batch8_eager_tokens_per_s"])
    ratios["prefill_4096_transformers_over_ours"] = report["transformers_prefill_4096_ms"] / report["ours_prefill_4096_ms"]
    report["ratios"] = ratios
    return report


def print_table(report: dict) -> None:
    """The README's table: decode ms/token (batch 1) with the ratio to the floor, then prefill, batch-8
    throughput and peak memory."""
    def ms(entry: dict | None, key: str = "decode_ms_per_token") -> str:
        return f"{entry[key]:.2f}" if isinstance(entry, dict) and key in entry else "–"

    rows = [(name.split("/", 1)[1], r) for name, r in report.items() if name.startswith("speed/") and "ratios" in r]
    print("\n| shape | floor | ours, CUDA graph (× floor) | ours, plain | transformers eager | transformers static+compile "
          "| genai | genai + CUDA graph | prefill 512 ours / transformers | prefill 4096 ours / transformers "
          "| batch 8 tok/s ours / transformers | peak GiB ours / transformers |")
    print("|" + "---|" * 12)
    for shape, r in rows:
        genai = r.get("onnxruntime_genai") or {}
        ours = r["ours_cuda_graph"]["decode_ms_per_token"]
        print(f"| {shape} | {r['floor_ms_per_token']:.2f} | {ours:.2f} ({r['ratios']['ours_cuda_graph_over_floor']:.2f}×) "
              f"| {ms(r['ours_plain'])} | {ms(r['transformers_eager'])} | {ms(r.get('transformers_static_compile'))} "
              f"| {ms(genai.get('default'))} | {ms(genai.get('cuda_graph'))} "
              f"| {r['ours_cuda_graph']['prefill_ms']:.1f} / {r['transformers_prefill_512_ms']:.1f} "
              f"| {r['ours_prefill_4096_ms']:.1f} / {r['transformers_prefill_4096_ms']:.1f} "
              f"| {r['ours_batch8_cuda_graph']['tokens_per_s']:.0f} / {r['transformers_batch8_eager_tokens_per_s']:.0f} "
              f"| {r['ours_peak_gib']:.1f} / {r['transformers_peak_gib']:.1f} |")
    print_variants(report)
    print_int4(report)


def print_int4(report: dict) -> None:
    """--int4: decode (with its own floor), prefill and memory of ours fp16 and int4 against genai int4."""
    rows = [(name.split("/", 1)[1], r) for name, r in report.items() if name.startswith("int4/") and "shape" in r]
    if not rows:
        return
    print("\n| shape | build | decode ms/token, CUDA graph (× its floor) | prefill 512 ms | prefill 4096 ms | peak GiB |")
    print("|" + "---|" * 6)
    for shape, r in rows:
        for key, entry in r.items():
            if key.startswith("ours_"):
                print(f"| {shape} | {key.removeprefix('ours_')} | {entry['decode_ms_per_token']:.2f} ({entry['floor_ratio']:.2f}×) "
                      f"| {entry['prefill_ms']:.1f} | {entry['prefill_4096_ms']:.1f} | {entry['peak_gib']:.1f} |")
        for variant, entry in (r.get("genai_int4") or {}).items():
            if isinstance(entry, dict):
                print(f"| {shape} | onnxruntime-genai int4, {variant} | {entry['decode_ms_per_token']:.2f} | "
                      f"{entry['prefill_ms']:.1f} | – | – |")


def print_variants(report: dict) -> None:
    """Ours as optimized by default against each --variants graph, same run."""
    def kernels_us(replay: dict, key: str) -> str:
        return f"{replay[key]['gpu_us']:.0f}" if key in replay else "–"

    print("\n| shape | graph | decode ms/token | prefill 512 ms | prefill 4096 ms | GPU µs per decode step | GPU µs per prefill "
          "| greedy tokens as default's |")
    print("|" + "---|" * 8)
    for name, r in report.items():
        if not name.startswith("speed/") or "ours_cuda_graph" not in r:
            continue
        graphs = [("default", r["ours_cuda_graph"], r["ours_prefill_4096_ms"], r["ours_replay"], True)]
        graphs += [(key[len("ours_"):], v["cuda_graph"], v["prefill_4096_ms"], v["replay"], v.get("same_tokens_as_default"))
                   for key, v in r.items() if key.startswith("ours_") and isinstance(v, dict) and "cuda_graph" in v]
        for graph, timed, prefill_4096, replay, same in graphs:
            print(f"| {name.split('/', 1)[1]} | {graph} | {timed['decode_ms_per_token']:.3f} | {timed['prefill_ms']:.2f} "
                  f"| {prefill_4096:.1f} | {kernels_us(replay, 'decode_kernels')} | {kernels_us(replay, 'prefill_kernels')} | {same} |")
