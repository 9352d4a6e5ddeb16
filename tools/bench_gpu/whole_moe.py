"""The whole Qwen2-57B-A14B in int4 on one GPU (`--whole-57b`): a random GPTQ-Int4 checkpoint at its
published shapes (28 layers, 64 experts, group 128, symmetric, as Qwen publishes it; ~31 GB) written on
this machine, exported, the checkpoint removed, the CUDA graph built (QMoE experts, MatMulNBits
elsewhere), loaded with CUDA graphs, 128 tokens generated after a 512-token prompt.

The disk holds the checkpoint and the portable graph (~62 GB), then the portable graph and the CUDA
graph (~59 GB): a 64 GiB disk takes it. Every step's seconds, the disk and host memory it needed.

    PYTHONPATH=. python -m tools.bench_gpu --workdir /root/bench --out $OUT --whole-57b 28"""

from __future__ import annotations

import resource
import shutil
import time
from pathlib import Path

import numpy as np

from graphs.artifact import optimize_artifact
from qwen2_export.export import export_checkpoint
from qwen2_export.staging import folder_bytes
from qwen2_export.synthetic import QWEN2_57B_A14B
from qwen2_export.synthetic_int4 import write_random_gptq_checkpoint

from .int4 import decode_kernels
from .measure import DEVICE, GREEDY, PeakMemory
from .ours import ours_timings
from .prepare import decode_read_bytes

GROUP_SIZE = 128


def folder_gb(folder: Path) -> float:
    return folder_bytes(folder) / 1e9


def build(workdir: Path, config_json: dict) -> tuple[Path, dict]:
    """The artifact with its CUDA graph, and what each step took (nothing, when an earlier run built it)."""
    artifact = workdir / f"qwen2-57b-a14b-{config_json['num_hidden_layers']}l-gptq-int4"
    steps: dict = {}
    if (artifact / "onnx" / "model_cuda.onnx").is_file():
        return artifact, steps
    checkpoint = workdir / f"qwen2-57b-a14b-{config_json['num_hidden_layers']}l-gptq-checkpoint"
    if not (checkpoint / "model.safetensors.index.json").is_file():  # written last
        shutil.rmtree(checkpoint, ignore_errors=True)
        started = time.perf_counter()
        write_random_gptq_checkpoint(checkpoint, config_json, group_size=GROUP_SIZE)
        steps["write_checkpoint"] = {"s": time.perf_counter() - started, "gb": folder_gb(checkpoint)}
    started = time.perf_counter()
    export_checkpoint(checkpoint, artifact, dtype="fp16", force=True)
    steps["export"] = {"s": time.perf_counter() - started, "artifact_gb": folder_gb(artifact),
                       "disk_free_gb": shutil.disk_usage(workdir).free / 1e9}
    shutil.rmtree(checkpoint)
    started = time.perf_counter()
    optimize_artifact(artifact, "cuda", "float16")
    steps["optimize_cuda"] = {"s": time.perf_counter() - started, "artifact_gb": folder_gb(artifact),
                              "disk_free_gb": shutil.disk_usage(workdir).free / 1e9}
    steps["host_peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return artifact, steps


def whole_moe_int4(workdir: Path, layers: int, prompt_tokens: int, new_tokens: int, copy_tb_s: float,
                   build_only: bool = False) -> dict:
    from runtime import Model

    config_json = {**QWEN2_57B_A14B, "num_hidden_layers": layers, "max_window_layers": layers}
    artifact, steps = build(workdir, config_json)
    report: dict = {"layers": layers, "experts": config_json["num_experts"], "group_size": GROUP_SIZE, **steps}
    print("built", report, flush=True)
    if build_only:
        return report
    prompt = np.random.default_rng(0).integers(0, 400, size=prompt_tokens).tolist()
    with PeakMemory() as memory:
        started = time.perf_counter()
        model = Model.load(artifact, device=DEVICE, cuda_graph=True)
        report["load_s"] = time.perf_counter() - started
        model.generate(prompt, max_new_tokens=2, **GREEDY)
    result = ours_timings(model, [prompt], new_tokens, runs=2, **GREEDY)
    floor_ms = decode_read_bytes(config_json, GROUP_SIZE) / (copy_tb_s * 1e12) * 1e3
    report.update(result, peak_gib=memory.gib, floor_ms_per_token=floor_ms,
                  floor_ratio=result["decode_ms_per_token"] / floor_ms, tokens_first_16=result.pop("tokens")[:16])
    print("timed", report, flush=True)
    report["decode_kernels"] = decode_kernels(model, prompt_tokens + new_tokens // 2)
    return report
