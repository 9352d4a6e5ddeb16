"""Kernel and node profiles of ours, run after every timing of a run: the CUPTI profiler leaves launch
overhead behind in its process, which slowed everything timed after it (tools/gpu_notes.md, session 4)."""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import numpy as np
import torch


def kernel_profiles(model, context: int) -> dict:
    """The GPU kernels of a decode replay and of a prefill, by total time (CUPTI through torch.profiler
    sees onnxruntime's kernels). main() runs these after every timing (PROFILES)."""
    captured, session, _, _ = captured_step(model, context)
    try:
        prompt = [1] * (context - context // 8)
        return {"decode_kernels": kernel_profile(lambda: session.run_with_iobinding(captured.binding, captured.run_options), 20),
                "prefill_kernels": kernel_profile(lambda: model.generate(prompt, max_new_tokens=1, greedy=True), 3)}
    except Exception:  # the profile is a diagnostic; the timings stand without it
        return {"profile_error": traceback.format_exc(limit=2)}


def kernel_profile(call, repeats: int) -> dict:
    """GPU kernels of `call` by total time per call (CUPTI through torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    call()
    with profile(activities=[ProfilerActivity.CUDA]) as trace:
        for _ in range(repeats):
            call()
        torch.cuda.synchronize()
    events = [(e.key, getattr(e, "device_time_total", 0) or getattr(e, "cuda_time_total", 0), e.count) for e in trace.key_averages()]
    events = sorted((e for e in events if e[1] > 0), key=lambda e: -e[1])
    return {"gpu_us": sum(e[1] for e in events) / repeats, "kernels": sum(e[2] for e in events) / repeats,
            "top_us": [(name[:90], round(total / repeats, 1), count / repeats) for name, total, count in events[:15]]}


def prefill_node_profile(model, prompt_tokens: int) -> dict:
    """onnxruntime's own profile of one warm, uncaptured prefill: host time inside each node's Compute
    (kernel launches are asynchronous, so this is host work) by op type, against the run's wall time.
    Made for the 7B prefill of 512 tokens, which took 15.5 ms for 13.4 ms of GPU kernels."""
    import tempfile

    import onnxruntime as ort

    from runtime.session import session_settings

    from runtime.padding import PADDINGS
    from runtime.steps import PlainSteps

    graph = model.session.graph
    options, providers = session_settings(graph, model.session.device, True, False, False)
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "prefill")
    profiled = ort.InferenceSession(str(model.artifact / graph.file), options, providers=providers)
    steps = PlainSteps(profiled, graph, model.session.device)
    inputs = PADDINGS[graph.padding](0).prefill([[1] * prompt_tokens], 0)
    for _ in range(3):  # the last run is warm
        steps.step(inputs, model.session.caches.take(1, prompt_tokens + 1))
    events = json.loads(Path(profiled.end_profiling()).read_text())
    run = [e for e in events if e.get("name") == "model_run"][-1]
    nodes = [e for e in events if e.get("cat") == "Node" and run["ts"] <= e["ts"] <= run["ts"] + run["dur"]
             and e["name"].endswith("_kernel_time")]
    by_op: dict = {}
    for event in nodes:
        op = event.get("args", {}).get("op_name", "?")
        total, count = by_op.get(op, (0.0, 0))
        by_op[op] = (total + event["dur"] / 1e3, count + 1)
    top = sorted(by_op.items(), key=lambda item: -item[1][0])[:12]
    return {"prompt_tokens": prompt_tokens, "run_wall_ms": run["dur"] / 1e3, "node_host_ms": sum(e["dur"] for e in nodes) / 1e3,
            "nodes": len(nodes), "by_op_ms": [(op, round(ms, 3), count) for op, (ms, count) in top]}


def captured_step(model, context: int):
    """The captured decode step of a cache whose attention reads `context` positions, as in the middle of
    a timed run, with that step's inputs. A sampled request runs captured steps one by one, never the
    pipelined pair."""
    loop = model.decode_loop([[1] * context], max_new_tokens=2, do_sample=True, top_k=1, seed=0)
    for _ in loop:
        pass
    mask = (np.arange(loop.cache.capacity) < context).astype(np.int64)[None]
    return model.session.steps.captured[loop.cache][1], model.session.session, np.ones((1, 1), np.int64), mask
