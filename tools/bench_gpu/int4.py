"""Int4 against fp16 and onnxruntime-genai's int4 on one checkpoint (`--int4`): ours fp16, ours
`--quantize int4` at each block size (round to nearest with zero points, the graph an AWQ or GPTQ
checkpoint of that group size gets), genai's builder `-p int4` with and without CUDA graph; batch-1
decode and prefill of the prompt and of 4,096 tokens, peak memory, each decode against the floor of
its own bytes, and the decode step's kernels (where the time goes: the MatMulNBits GEMVs by shape).

Artifacts are built one at a time and removed after timing, so the device's disk holds the checkpoint
and one artifact (fp16: ~30 GB at Qwen2-7B shapes).

    PYTHONPATH=. python -m tools.bench_gpu --workdir /tmp/bench --out $OUT --shapes qwen2-7b --int4"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from graphs.artifact import optimize_artifact
from qwen2_export.export import export_checkpoint
from qwen2_export.staging import folder_bytes

from .measure import DEVICE, GREEDY, PeakMemory
from .ours import ours_timings
from .peers import genai_timings
from .prepare import SHAPES, decode_read_bytes, prepare
from .profiles import captured_step, kernel_profile


def int4_artifact(checkpoint: Path, folder: Path, block_size: int) -> Path:
    if not (folder / "onnx" / "model_cuda.onnx").is_file():
        export_checkpoint(checkpoint, folder, dtype="fp16", force=True, quantize="int4", block_size=block_size)
        optimize_artifact(folder, "cuda", "float16")
    return folder


def timed(model, prompt: list[int], long_prompt: list[int], new_tokens: int) -> dict:
    result = ours_timings(model, [prompt], new_tokens, runs=2, **GREEDY)
    result["prefill_4096_ms"] = ours_timings(model, [long_prompt], 2, runs=2, **GREEDY)["prefill_ms"]
    return result


def decode_kernels(model, context: int) -> dict:
    captured, session, _, _ = captured_step(model, context)
    return kernel_profile(lambda: session.run_with_iobinding(captured.binding, captured.run_options), 20)


def int4_speed(workdir: Path, shape: str, prompt_tokens: int, new_tokens: int, copy_tb_s: float, genai: bool,
               profiles: list[Callable[[], None]], block_sizes: tuple[int, ...] = (32, 128)) -> dict:
    """Each build timed, then removed (its loaded model stays for the kernel profile `profiles` runs last)."""
    from runtime import Model

    config_json = SHAPES[shape]
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, 400, size=prompt_tokens).tolist()
    long_prompt = rng.integers(0, 400, size=4096).tolist()
    report: dict = {"shape": shape, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "copy_tb_s": copy_tb_s}
    checkpoint, fp16 = prepare(workdir, shape)
    for name, block in [("fp16", None)] + [(f"int4_block{b}", b) for b in block_sizes]:
        artifact = fp16 if block is None else int4_artifact(checkpoint, workdir / f"{shape}-{name}", block)
        with PeakMemory() as memory:
            model = Model.load(artifact, device=DEVICE, cuda_graph=True)
            model.generate(prompt, max_new_tokens=2, **GREEDY)
        result = ours_timings(model, [prompt], new_tokens, runs=2, **GREEDY)
        result["prefill_4096_ms"] = ours_timings(model, [long_prompt], 2, runs=2, **GREEDY)["prefill_ms"]
        floor_ms = decode_read_bytes(config_json, block) / (copy_tb_s * 1e12) * 1e3  # as speed(): bytes over copy rate
        result.update(peak_gib=memory.gib, floor_ms_per_token=floor_ms, floor_ratio=result["decode_ms_per_token"] / floor_ms,
                      artifact_gb=folder_bytes(artifact) / 1e9,
                      tokens_first_16=result.pop("tokens")[:16])
        report[f"ours_{name}"] = result
        print(name, result, flush=True)
        profiles.append(lambda result=result, model=model: result.update(
            decode_kernels=decode_kernels(model, prompt_tokens + new_tokens // 2)))
        shutil.rmtree(artifact)  # the session holds its weights on the GPU; the disk is needed for the next
    if genai:
        report["genai_int4"] = genai_timings(checkpoint, workdir, prompt, new_tokens, precision="int4")
    return report
