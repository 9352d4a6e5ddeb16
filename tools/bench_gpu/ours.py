"""Our runtime timed through its public API: decode and prefill, the captured step's parts, variants,
prompt-bucket sweeps and long context."""

from __future__ import annotations

import statistics
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from .measure import DEVICE, GREEDY, PeakMemory, device_used_gib, gc_collect
from .prepare import VARIANTS, prepare, yarn_artifact
from .profiles import captured_step


def ours_timings(model, prompts: list[list[int]], new_tokens: int, runs: int = 3, **options) -> dict:
    """Time to first token and decode ms/token (per step, all rows together) of our runtime, median of
    `runs` after one identical warm-up call (whose prefill is reported as `cold_prefill_ms`: it pays
    onnxruntime's first-use costs for a new shape, the MoE kernel's tactic profiling among them)."""
    results, generations = [], None
    for _ in range(runs + 1):
        generations = model.generate_batch(prompts, max_new_tokens=new_tokens, ignore_eos=True, **options)
        t = model.last_timings
        steps = t.decode_tokens / len(prompts)
        results.append({"prefill_ms": t.time_to_first_token_s * 1e3, "decode_ms_per_token": t.decode_s * 1e3 / max(steps, 1),
                        "tokens_per_s": t.decode_tokens / t.decode_s if t.decode_s else 0.0})
    result = {key: statistics.median(r[key] for r in results[1:]) for key in results[0]}
    result["cold_prefill_ms"] = results[0]["prefill_ms"]
    result["tokens"] = generations[0].output_ids
    return result


def replay_timings(model, context: int, steps: int = 200) -> dict:
    """Where a captured decode step's time goes: replays alone (GPU work + launch) against the whole
    step as the runtime does it (input updates, replay, candidates to the host)."""
    captured, session, ids, mask = captured_step(model, context)

    def replay():
        session.run_with_iobinding(captured.binding, captured.run_options)

    def async_replay():  # returns at the launch if onnxruntime honours the option for a replay
        session.run_with_iobinding(captured.binding, no_sync)

    import onnxruntime as ort

    no_sync = ort.RunOptions()
    no_sync.add_run_config_entry("gpu_graph_id", captured.run_options.get_run_config_entry("gpu_graph_id"))
    no_sync.add_run_config_entry("disable_synchronize_execution_providers", "1")
    write = model.session.steps.write
    calls = {"replay_only_ms": replay, "whole_step_ms": lambda: captured.step(session, ids, mask, write),
             "inputs_upload_ms": lambda: captured.inputs.update_inplace(np.concatenate([ids.ravel(), mask.ravel()])),
             "candidates_download_ms": lambda: captured.candidates.numpy(),
             "async_replay_return_ms": async_replay}
    timings = {}
    for name, call in calls.items():
        call()
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(steps):
            call()
        timings[name] = (time.perf_counter() - started) * 1e3 / steps
        torch.cuda.synchronize()
    timings.update(loop_breakdown(model, context))
    return timings


def loop_breakdown(model, prompt_tokens: int, new_tokens: int = 128) -> dict:
    """A real greedy decode with the runner's steps timed: per token, the step (inputs, replay,
    candidates) against everything around it (token choice, bookkeeping, the next step's inputs)."""
    steps, spent = model.session.steps, []
    loop = model.decode_loop([[1] * prompt_tokens], max_new_tokens=new_tokens, ignore_eos=True, **GREEDY)
    started = time.perf_counter()
    for _ in loop:
        spent.append(time.perf_counter() - started)
        started = time.perf_counter()
    t = loop.timings
    pipelines = list(getattr(steps, "pipelines", {}).values())
    return {"loop_ms_per_token": t.decode_s * 1e3 / t.decode_tokens,
            "step_and_choice_ms": sum(spent[1:]) * 1e3 / max(len(spent) - 1, 1),
            "pipeline_reruns": sum(p.reruns for p in pipelines) if pipelines else None}


def variant_timings(artifact: Path, variant: str, prompt: list[int], long_prompt: list[int], new_tokens: int,
                    context: int, default_tokens: list[int]) -> tuple[dict, object]:
    """Ours built or loaded another way, same prompts: decode with CUDA graph, prefills, replay timings,
    and whether its greedy tokens equal the default's. Returns the report and the loaded model (for the
    profiles at the very end)."""
    from runtime import Model

    options = VARIANTS[variant]
    with PeakMemory() as memory:  # load, and a first prefill of each timed length (captures, if any)
        model = Model.load(artifact, device=DEVICE, **options["load"], cuda_graph=True)
        first_prefill_ms = []
        for first in (prompt, long_prompt):
            model.generate(first, max_new_tokens=2, **GREEDY)
            first_prefill_ms.append(model.last_timings.time_to_first_token_s * 1e3)
    result = {"cuda_graph": ours_timings(model, [prompt], new_tokens, runs=2, **GREEDY), "peak_gib": memory.gib,
              "first_prefill_ms": first_prefill_ms}
    result["same_tokens_as_default"] = result["cuda_graph"]["tokens"] == default_tokens
    result["padded_prompt_same_tokens"] = padded_prompt_same_tokens(model, prompt)
    result["prefill_4096_ms"] = ours_timings(model, [long_prompt], 2, runs=2, **GREEDY)["prefill_ms"]
    result["replay"] = replay_timings(model, context)
    return result, model


def padded_prompt_same_tokens(model, prompt: list[int]) -> bool:
    """A prompt padded to its captured bucket (500 -> 512) gives the tokens of the same prompt unpadded
    (a model of plain steps on the same artifact)."""
    from runtime import Model

    odd = prompt[:500]
    padded = model.generate(odd, max_new_tokens=32, **GREEDY).output_ids
    plain = Model.load(model.artifact, device=DEVICE)
    return padded == plain.generate(odd, max_new_tokens=32, **GREEDY).output_ids


def bucket_sweep(workdir: Path, shape: str, lengths: tuple[int, ...]) -> dict:
    """Prompts of many lengths, each a new bucket: time to first token (first use, then warm) and the
    device memory in use after it, with prefill uncaptured and captured. Shows whether every captured
    bucket graph keeps memory of its own and what each length gains."""
    from runtime import Model

    _, artifact = prepare(workdir, shape)
    rng = np.random.default_rng(1)
    prompts = {n: rng.integers(0, 400, size=n).tolist() for n in lengths}
    result = {}
    for name, cuda_graph in (("uncaptured", False), ("captured", True)):
        gc_collect()
        base = device_used_gib()
        model = Model.load(artifact, device=DEVICE, cuda_graph=cuda_graph)
        rows = []
        for n, prompt in prompts.items():
            first = ttft_ms(model, prompt)
            warm = statistics.median(ttft_ms(model, prompt) for _ in range(3))
            rows.append({"tokens": n, "first_ms": first, "warm_ms": warm, "used_gib": device_used_gib() - base})
        tokens = model.generate(prompts[lengths[-1]], max_new_tokens=16, **GREEDY).output_ids
        result[name] = {"rows": rows, "tokens": tokens}
        del model
    result["same_tokens"] = result["captured"]["tokens"] == result["uncaptured"]["tokens"]
    return result


def ttft_ms(model, prompt: list[int]) -> float:
    model.generate(prompt, max_new_tokens=1, **GREEDY)
    return model.last_timings.time_to_first_token_s * 1e3


def long_context(workdir: Path, prompt_lengths: tuple[int, ...], new_tokens: int, chunk: int) -> dict:
    """Qwen2-7B shapes with YaRN factor 4 (context 131,072): chunked prefill, then CUDA-graph decode."""
    from runtime import Model

    artifact = yarn_artifact(workdir)
    model = Model.load(artifact, device=DEVICE, cuda_graph=True)
    results = {"context_length": model.manifest.context_length, "prefill_chunk": chunk}
    for length in prompt_lengths:
        prompt = np.random.default_rng(length).integers(0, 400, size=length).tolist()
        try:
            cold = model.generate(prompt, max_new_tokens=new_tokens, **GREEDY,
                                  prefill_chunk=chunk, ignore_eos=True)
            cold_prefill = model.last_timings.time_to_first_token_s
            with PeakMemory() as memory:  # the second, warm run (buffers and CUDA graph already made)
                warm = model.generate(prompt, max_new_tokens=new_tokens, **GREEDY,
                                      prefill_chunk=chunk, ignore_eos=True)
            t = model.last_timings
            results[str(length)] = {"prefill_s": t.time_to_first_token_s, "cold_prefill_s": cold_prefill,
                                    "decode_ms_per_token": t.decode_s * 1e3 / t.decode_tokens,
                                    "peak_gib_above_weights": memory.gib, "new_tokens": t.decode_tokens + 1,
                                    "same_tokens_twice": cold.output_ids == warm.output_ids}
        except Exception:
            results[str(length)] = {"error": traceback.format_exc(limit=4)}
        print(length, results[str(length)], flush=True)
    return results
