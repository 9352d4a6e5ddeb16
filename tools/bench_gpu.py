"""GPU check and benchmark, run on the lent device (see README, "CUDA").

1. environment: GPU, torch, onnxruntime(-genai) and the providers;
2. device-to-device copy bandwidth (torch), the basis of each floor;
3. correctness: tiny random checkpoints (dense and MoE) exported, optimized for CUDA (fp16 and
   bf16), greedy through our runtime on CUDA against transformers on the same GPU and weights;
   whether a session with the CPU fallback disabled accepts our graph;
4. per shape (random weights at published shapes, fp16): decode ms/token at batch 1 (ours plain, ours
   with CUDA graph, ours sampling with Qwen's defaults, transformers eager, transformers static cache +
   torch.compile, onnxruntime-genai with and without CUDA graph when installed), prefill of 512 and
   4096 tokens, batch-8 throughput, peak GPU memory, each decode figure as a ratio to the floor (bytes a
   decode step must read / measured bandwidth) and ours against each peer; greedy tokens of ours vs
   transformers at that shape; for the MoE shape a logits check against transformers fp32;
5. --long-context: a Qwen2-7B-shaped model with YaRN factor 4 prefills 32,768 tokens (then 130,944) in
   chunks and decodes 128 tokens;
6. --variants: ours optimized other ways (VARIANTS, e.g. two_gemm_gate_up) timed beside the default;
7. last, once every timing is done: CUPTI kernel profiles of a decode replay and a prefill per graph
   (the profiler leaves launch overhead behind in the process; anything timed after it runs slower),
   and onnxruntime's node profile of a warm prefill (host time per op type against the run's wall time).

    PYTHONPATH=. python tools/bench_gpu.py --workdir /tmp/bench --out $OUT --shapes qwen2-7b --variants two_gemm_gate_up
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from graphs.artifact import optimize_artifact
from runtime.cuda_graph import CapturedSteps
from qwen2_export.export import export_checkpoint
from qwen2_export.config import parse_config
from qwen2_export.synthetic import QWEN2_0_5B, QWEN2_7B, QWEN2_57B_A14B, hub_tensor_shapes, write_checkpoint, write_tiny_checkpoint

LOAD: dict = {"device": "cuda"}  # cpu_fallback=True is added when a graph is refused with the fallback disabled
SHAPES = {"qwen2-0.5b": QWEN2_0_5B, "qwen2-7b": QWEN2_7B,
          "qwen2-57b-a14b-4l": {**QWEN2_57B_A14B, "num_hidden_layers": 4, "max_window_layers": 4}}
REPORT: dict = {}
GREEDY = {"greedy": True, "repetition_penalty": 1.0}  # argmax of the raw logits, as transformers' greedy peers
# kernel and node profiles wait until every timing of the run is done; each fills its part of the report
PROFILES: list[Callable[[], None]] = []


def section(name):
    """Run one part, record its result or its error, and go on with the next part."""
    def wrap(function):
        def run(*args, **kwargs):
            started = time.perf_counter()
            try:
                REPORT[name] = function(*args, **kwargs)
            except Exception:  # a measurement script reports a broken part and carries on
                REPORT[name] = {"error": traceback.format_exc(limit=6)}
            print(f"== {name} ({time.perf_counter() - started:.1f}s): {json.dumps(REPORT[name], default=str)[:1500]}", flush=True)
        return run
    return wrap


@section("environment")
def environment() -> dict:
    import onnxruntime as ort
    import transformers

    try:
        import onnxruntime_genai

        genai = onnxruntime_genai.__version__
    except ImportError:
        genai = None
    return {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "transformers": transformers.__version__,
            "onnxruntime": ort.__version__, "onnxruntime_genai": genai, "providers": ort.get_available_providers()}


@section("bandwidth")
def bandwidth() -> dict:
    source = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        target.copy_(source)
    stop.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(stop) / 1e3 / 20
    return {"copy_tb_s": 2 * source.numel() / seconds / 1e12}


def build_artifact(checkpoint: Path, folder: Path, dtype: str) -> Path:
    """Export and optimize for CUDA, unless an earlier call of this run (or --prepare) did already."""
    if (folder / "onnx" / "model_cuda.onnx").is_file():
        return folder
    artifact = export_checkpoint(checkpoint, folder, dtype=dtype, force=True)
    optimize_artifact(artifact, "cuda", {"fp16": "float16", "bf16": "bfloat16"}[dtype])
    return artifact


# other ways to build or load ours, timed beside the default with --variants: graphs/ optimize options
# (a sibling artifact is built) and Model.load options (same artifact)
VARIANTS = {"two_gemm_gate_up": {"optimize": {"pack_gate_up": False}},
            # captured steps without the pipelined pair
            "unpipelined_decode": {"load": {"steps": CapturedSteps}}}


def graph_variant(artifact: Path, variant: str) -> Path:
    """A sibling artifact optimized as VARIANTS[variant] says. It shares the portable graph's data
    with `artifact` through a hard link (the device's disk holds one large shape at a time); the data
    moves into the sibling while it is optimized, as onnx_ir refuses to read a file with two links."""
    folder = artifact.with_name(f"{artifact.name}-{variant}")
    if (folder / "onnx" / "model_cuda.onnx").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(artifact, folder, ignore=shutil.ignore_patterns("*.onnx_data", "model_cuda.onnx"))
    data = [path.relative_to(artifact) for path in artifact.rglob("*.onnx_data") if not path.name.startswith("model_cuda.")]
    for name in data:
        os.rename(artifact / name, folder / name)
    try:
        optimize_artifact(folder, "cuda", "float16", **VARIANTS[variant]["optimize"])
    finally:
        for name in data:
            os.link(folder / name, artifact / name)
    return folder


def cuda_only_assignment(graph: Path) -> str:
    """'ok' when a session with CPU fallback disabled accepts the graph, else onnxruntime's reason."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    try:
        ort.InferenceSession(str(graph), options, providers=["CUDAExecutionProvider"])
        return "ok"
    except Exception as error:  # report the reason and where nodes went; the script goes on
        verbose = ort.SessionOptions()
        verbose.log_severity_level = 0  # onnxruntime then logs each provider's node placements
        ort.InferenceSession(str(graph), verbose, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        return str(error)[:400]


@section("correctness")
def correctness(workdir: Path) -> dict:
    import transformers

    from runtime import Model

    results = {}
    prompt = [456, 40, 300, 17, 250, 99, 3]
    for variant in ("dense_untied_sharded", "moe_shared"):
        checkpoint = write_tiny_checkpoint(workdir / f"tiny-{variant}", variant)
        for dtype, torch_dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
            artifact = build_artifact(checkpoint, workdir / f"tiny-{variant}-{dtype}", dtype)
            placement = cuda_only_assignment(artifact / "onnx" / "model_cuda.onnx")
            if placement != "ok":
                LOAD["cpu_fallback"] = True
            model = Model.load(artifact, **LOAD)
            ours = model.generate(prompt, max_new_tokens=32, **GREEDY).output_ids
            reference = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch_dtype).cuda().eval()
            reference.generation_config = transformers.GenerationConfig(
                do_sample=False, eos_token_id=None, pad_token_id=0,
                suppress_tokens=list(range(model.manifest.tokenizer.vocab_size, reference.config.vocab_size)))
            with torch.no_grad():
                theirs = reference.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=32)[0, len(prompt):].tolist()
            theirs = theirs[: len(ours)]
            top3_agreement = _top3_agreement(reference, prompt, ours, theirs, model.manifest.tokenizer.vocab_size)
            graphed = Model.load(artifact, **LOAD, cuda_graph=True)
            replayed = graphed.generate(prompt, max_new_tokens=32, **GREEDY).output_ids
            with torch.no_grad():  # the first step's greedy margin in transformers fp32: small ones flip in bf16
                first = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).cuda()(
                    torch.tensor([prompt], device="cuda")).logits[0, -1, : model.manifest.tokenizer.vocab_size].topk(2).values
            results[f"{variant}/{dtype}"] = {
                "fp32_first_margin": float(first[0] - first[1]),
                "cuda_graph_same_tokens": replayed == ours,
                "graph": model.session.graph.name, "identical": ours == theirs,
                "first_difference": next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), None),
                "each_in_other_top3": top3_agreement,
                "cuda_only": placement,
                "full_logits_reads": model.session.steps.full_logits_reads + graphed.session.steps.full_logits_reads,
                "chunked_prefill_same_tokens": graphed.generate(prompt, max_new_tokens=32, **GREEDY,
                                                                prefill_chunk=3).output_ids == ours,
            }
    return results


def _top3_agreement(reference, prompt: list[int], ours: list[int], theirs: list[int], vocab: int) -> bool:
    """Up to and including the first difference (after it the contexts differ), is each of our tokens in
    transformers' top 3 at the same step? Ids past the tokenizer (the embedding's random padding rows) are
    excluded, as both generators exclude them."""
    differ = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), len(ours) - 1)
    with torch.no_grad():
        logits = reference(torch.tensor([prompt + theirs], device="cuda")).logits[0, len(prompt) - 1 : -1, :vocab]
    top3 = logits.topk(3, dim=-1).indices.tolist()
    return all(ours[i] in top3[i] for i in range(min(differ + 1, len(top3))))


@section("logits")
def logits_check(workdir: Path) -> dict:
    """Last-position logits of one prompt: portable and optimized graphs on CUDA vs transformers fp32.
    Separates an export problem (portable off) from a fusion problem (only optimized off)."""
    import transformers

    from artifact.contract import read_manifest
    from runtime import Model
    from runtime.padding import PADDINGS

    prompt = [456, 40, 300, 17, 250, 99, 3, 12, 7]
    results = {}
    for variant in ("dense_untied_sharded", "moe_shared"):
        checkpoint = workdir / f"tiny-{variant}"
        reference = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).cuda().eval()
        with torch.no_grad():
            expected = reference(torch.tensor([prompt], device="cuda")).logits[0, -1].float().cpu().numpy()
        for dtype in ("fp16", "bf16"):
            artifact = workdir / f"tiny-{variant}-{dtype}"
            for graph in read_manifest(artifact).graphs:
                session = Model.load(artifact, device="cuda", graph=graph.name).session
                inputs = PADDINGS[graph.padding](0).prefill([prompt], 0)
                row = session.steps.step(inputs, session.caches.take(1, 64)).full()[0][: expected.shape[0]]
                results[f"{variant}/{dtype}/{graph.name}"] = {
                    "max_abs_diff": float(np.abs(row - expected).max()), "scale": float(np.abs(expected).max()),
                    "same_top1": int(row.argmax()) == int(expected.argmax()), "finite": bool(np.isfinite(row).all()),
                }
    return results


class PeakMemory:
    """Device-wide peak of used GPU memory above the level at entry, sampled every 2 ms (sees
    onnxruntime's allocations as well as torch's). Not used around timed runs: the sampling thread
    competes for the interpreter."""

    def __enter__(self) -> "PeakMemory":
        import threading

        gc_collect()  # sessions dropped before this point release their device memory now, not inside
        free, self.total = torch.cuda.mem_get_info()
        self.base, self.peak, self._stop = self.total - free, 0, threading.Event()

        def sample():
            while not self._stop.is_set():
                self.peak = max(self.peak, self.total - torch.cuda.mem_get_info()[0] - self.base)
                self._stop.wait(0.002)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def gib(self) -> float:
        return self.peak / 2**30


def decode_read_bytes(config_json: dict) -> int:
    """Bytes of fp16 weights one batch-1 decode step must read: every tensor but the embedding table
    (one row is gathered; a tied lm_head reads it whole), and k of E routed experts."""
    config = parse_config(config_json)
    total = 0
    for name, shape in hub_tensor_shapes(config):
        size = 2 * int(np.prod(shape))
        if name == "model.embed_tokens.weight" and not config.tie_word_embeddings:
            continue
        if ".mlp.experts." in name:
            size = size * config.moe.num_experts_per_tok // config.moe.num_experts
        total += size
    return total


class Stamps:
    """A transformers streamer that timestamps every token after a device sync (put #0 is the prompt)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def transformers_decode(model, ids: torch.Tensor, new_tokens: int, runs: int = 2, **options) -> dict:
    """Prefill (+ first token) ms and decode ms/token of transformers' generate, median of `runs` after a
    warm-up (the warm-up of the static cache also compiles)."""
    results = []
    for attempt in range(runs + 1):
        stamps = Stamps()
        # a static cache compiles for its length, so only its warm-up must be full length
        tokens = new_tokens if attempt or options else 8
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                                 min_new_tokens=tokens, do_sample=False, streamer=stamps, **options)
        t = stamps.times
        if attempt:
            results.append({"prefill_ms": (t[1] - t[0]) * 1e3, "decode_ms_per_token": (t[-1] - t[1]) / (len(t) - 2) * 1e3})
    result = {key: statistics.median(r[key] for r in results) for key in results[0]}
    result["tokens"] = out[0, ids.shape[1]:].tolist()
    return result


def forward_ms(model, ids: torch.Tensor, runs: int = 3) -> float:
    """Median time of one prefill forward (last position's logits only)."""
    times = []
    with torch.no_grad():
        model(ids, logits_to_keep=1)
        for _ in range(runs):
            torch.cuda.synchronize()
            started = time.perf_counter()
            model(ids, logits_to_keep=1)
            torch.cuda.synchronize()
            times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


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


def genai_timings(checkpoint: Path, workdir: Path, prompt: list[int], new_tokens: int) -> dict:
    """onnxruntime-genai's own builder on the same checkpoint (fp16, CUDA), then og.Generator greedy,
    with the builder's settings and with enable_cuda_graph."""
    import subprocess
    import sys

    import onnxruntime_genai as og

    folder = workdir / f"{checkpoint.name}-genai"
    if not (folder / "genai_config.json").is_file():
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint), "-o", str(folder),
                        "-p", "fp16", "-e", "cuda", "-c", str(workdir / "genai-cache")], check=True,
                       stdout=subprocess.DEVNULL)
    base = json.loads((folder / "genai_config.json").read_text())
    results = {}
    for variant in ("default", "cuda_graph"):
        config = json.loads(json.dumps(base))
        if variant == "cuda_graph":
            for provider in config["model"]["decoder"]["session_options"]["provider_options"]:
                provider.get("cuda", {})["enable_cuda_graph"] = "1"
        (folder / "genai_config.json").write_text(json.dumps(config, indent=1))
        model = og.Model(str(folder))
        runs = []
        for attempt in range(3):
            params = og.GeneratorParams(model)
            params.set_search_options(do_sample=False, max_length=len(prompt) + new_tokens, min_length=len(prompt) + new_tokens)
            generator = og.Generator(model, params)
            stamps = [time.perf_counter()]
            generator.append_tokens(np.array(prompt, np.int32))
            while not generator.is_done():
                generator.generate_next_token()
                generator.get_next_tokens()  # the token to the host, as a caller would
                stamps.append(time.perf_counter())
            if attempt:
                runs.append({"prefill_ms": (stamps[1] - stamps[0]) * 1e3,
                             "decode_ms_per_token": (stamps[-1] - stamps[1]) / (len(stamps) - 2) * 1e3})
            del generator
        results[variant] = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        del model
    (folder / "genai_config.json").write_text(json.dumps(base, indent=1))
    return results


def same_tokens(ours: list[int], theirs: list[int], reference, prompt: list[int], vocab: int) -> dict:
    n = min(32, len(ours), len(theirs))
    return {"identical_32": ours[:n] == theirs[:n],
            "each_in_other_top3": _top3_agreement(reference, prompt, ours[:n], theirs[:n], vocab)}


def prepare(workdir: Path, shape: str) -> tuple[Path, Path]:
    """Random checkpoint at the shape (bf16, 4 shards) and its fp16 CUDA artifact; CPU work only.
    (Graph variants are built when timed: with genai's build they would not fit the device's disk.)"""
    checkpoint = workdir / f"{shape}-checkpoint"
    if not (checkpoint / "config.json").is_file():
        write_checkpoint(checkpoint, SHAPES[shape], seed=0, dtype=torch.bfloat16, shards=4)
    return checkpoint, build_artifact(checkpoint, workdir / f"{shape}-fp16", "fp16")


def variant_timings(artifact: Path, variant: str, prompt: list[int], long_prompt: list[int], new_tokens: int,
                    context: int, default_tokens: list[int]) -> tuple[dict, object]:
    """Ours built or loaded another way, same prompts: decode with CUDA graph, prefills, replay timings,
    and whether its greedy tokens equal the default's. Returns the report and the loaded model (for the
    profiles at the very end)."""
    from runtime import Model

    options = VARIANTS[variant]
    folder = graph_variant(artifact, variant) if "optimize" in options else artifact
    with PeakMemory() as memory:  # load, and a first prefill of each timed length (captures, if any)
        model = Model.load(folder, **LOAD, **options.get("load", {}), cuda_graph=True)
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
    plain = Model.load(model.artifact, **LOAD)
    return padded == plain.generate(odd, max_new_tokens=32, **GREEDY).output_ids


@section("bucket_sweep")
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
        model = Model.load(artifact, **LOAD, cuda_graph=cuda_graph)
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


def gc_collect() -> None:
    """Release the device memory of sessions and tensors dropped so far."""
    import gc

    gc.collect()
    torch.cuda.empty_cache()


def device_used_gib() -> float:
    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2**30


def ttft_ms(model, prompt: list[int]) -> float:
    model.generate(prompt, max_new_tokens=1, **GREEDY)
    return model.last_timings.time_to_first_token_s * 1e3


@section("speed")
def speed(workdir: Path, shape: str, prompt_tokens: int, new_tokens: int, copy_tb_s: float, genai: bool,
          variants: tuple[str, ...] = (), peers: bool = True) -> dict:
    from runtime import Model

    config_json = SHAPES[shape]
    checkpoint, artifact = prepare(workdir, shape)
    report: dict = {"shape": shape, "layers": config_json["num_hidden_layers"], "prompt_tokens": prompt_tokens,
                    "new_tokens": new_tokens}
    # the floor: bytes one decode step reads over the measured copy bandwidth (read + write counted)
    floor = decode_read_bytes(config_json) / (copy_tb_s * 1e12) * 1e3
    report["floor_ms_per_token"] = floor
    rng = np.random.default_rng(0)
    vocab = 400  # the tiny tokenizer's ids; the weights behind them are random anyway
    prompt = rng.integers(0, vocab, size=prompt_tokens).tolist()
    batch8 = [rng.integers(0, vocab, size=prompt_tokens).tolist() for _ in range(8)]
    long_prompt = rng.integers(0, vocab, size=4096).tolist()

    with PeakMemory() as memory:
        model = Model.load(artifact, **LOAD, cuda_graph=True)
        model.generate(prompt, max_new_tokens=new_tokens, **GREEDY)
    report["ours_peak_gib"] = memory.gib
    report["ours_cuda_graph"] = ours_timings(model, [prompt], new_tokens, runs=2, **GREEDY)
    report["ours_cuda_graph"]["full_logits_reads"] = model.session.full_logits_reads
    report["ours_padded_prompt_same_tokens"] = padded_prompt_same_tokens(model, prompt)
    reads = model.session.full_logits_reads
    report["ours_sampling_qwen_defaults"] = ours_timings(model, [prompt], new_tokens, runs=1, do_sample=True, seed=1)
    report["ours_sampling_qwen_defaults"]["full_logits_reads"] = model.session.full_logits_reads - reads
    prefill_4096 = ours_timings(model, [long_prompt], 2, runs=2, **GREEDY)
    report["ours_prefill_4096_ms"], report["ours_prefill_4096_cold_ms"] = prefill_4096["prefill_ms"], prefill_4096["cold_prefill_ms"]
    report["ours_batch8_cuda_graph"] = ours_timings(model, batch8, new_tokens, runs=2, **GREEDY)
    context = prompt_tokens + new_tokens // 2
    report["ours_replay"] = replay_timings(model, context)
    del model
    plain = Model.load(artifact, **LOAD)
    # first-use costs moved to load: the first 4,096-token prompt after warm_up, against the CUDA-graph
    # model's first one above (ours_prefill_4096_cold_ms), which had no warm-up
    started = time.perf_counter()
    report["ours_warm_up"] = {"lengths": plain.warm_up(len(long_prompt)), "seconds": time.perf_counter() - started}
    plain.generate(long_prompt, max_new_tokens=1, greedy=True)
    report["ours_warm_up"]["first_prefill_4096_ms_after"] = plain.last_timings.time_to_first_token_s * 1e3
    report["ours_plain"] = ours_timings(plain, [prompt], new_tokens, runs=1, **GREEDY)
    del plain
    print("ours:", json.dumps({k: v for k, v in report.items()}, default=str)[:1500], flush=True)
    if peers:
        report.update(peer_timings(workdir, checkpoint, artifact, config_json, prompt, long_prompt, batch8, new_tokens,
                                   report["ours_cuda_graph"]["tokens"], genai))
    PROFILES.append(lambda: report["ours_replay"].update(kernel_profiles(Model.load(artifact, **LOAD, cuda_graph=True), context)))
    PROFILES.append(lambda: report.update(ours_prefill_nodes=prefill_node_profile(Model.load(artifact, **LOAD), prompt_tokens)))
    for variant in variants:  # after genai, whose build needs the disk a variant takes
        report[f"ours_{variant}"], model = variant_timings(artifact, variant, prompt, long_prompt, new_tokens, context,
                                                           report["ours_cuda_graph"]["tokens"])
        if "optimize" in VARIANTS[variant]:
            shutil.rmtree(graph_variant(artifact, variant))  # the loaded session keeps what it needs
        PROFILES.append(lambda replay=report[f"ours_{variant}"]["replay"], model=model: replay.update(kernel_profiles(model, context)))
    return with_ratios(report) if peers else report


def peer_timings(workdir: Path, checkpoint: Path, artifact: Path, config_json: dict, prompt: list[int],
                 long_prompt: list[int], batch8: list[list[int]], new_tokens: int, our_tokens: list[int], genai: bool) -> dict:
    """transformers (eager, static cache + compile) and onnxruntime-genai on the same checkpoint and prompts."""
    import transformers

    report: dict = {}

    with PeakMemory() as memory:
        reference = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float16).cuda().eval()
        reference.generation_config = transformers.GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=0)
        ids = torch.tensor([prompt], device="cuda")
        eager = transformers_decode(reference, ids, new_tokens, runs=1)
    report["transformers_peak_gib"] = memory.gib
    report["transformers_eager"] = eager
    # greedy tokens at this shape: transformers with the embedding's padding ids suppressed, as we do
    tokenizer_vocab = json.loads((artifact / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    with torch.no_grad():
        theirs = reference.generate(ids, max_new_tokens=32, do_sample=False,
                                    suppress_tokens=list(range(tokenizer_vocab, reference.config.vocab_size)))[0, len(prompt):].tolist()
    report["tokens_vs_transformers"] = same_tokens(our_tokens, theirs, reference, prompt, tokenizer_vocab)
    report["transformers_prefill_512_ms"] = forward_ms(reference, ids)
    report["transformers_prefill_4096_ms"] = forward_ms(reference, torch.tensor([long_prompt], device="cuda"))
    batch_ids = torch.tensor(batch8, device="cuda")
    batch_eager = transformers_decode(reference, batch_ids, new_tokens, runs=1)
    report["transformers_batch8_eager_tokens_per_s"] = 8 * 1e3 / batch_eager["decode_ms_per_token"]
    try:
        report["transformers_static_compile"] = transformers_decode(reference, ids, new_tokens, runs=2,
                                                                    cache_implementation="static")
    except Exception:  # a peer that fails to compile is reported, not fatal
        report["transformers_static_compile"] = {"error": traceback.format_exc(limit=3)}
    del reference
    torch.cuda.empty_cache()
    if "moe" in config_json.get("model_type", ""):
        report["moe_logits_vs_transformers_fp32"] = moe_logits_check(artifact, checkpoint)
    if genai and "moe" not in config_json.get("model_type", ""):
        try:
            report["onnxruntime_genai"] = genai_timings(checkpoint, workdir, prompt, new_tokens)
        except Exception:
            report["onnxruntime_genai"] = {"error": traceback.format_exc(limit=3)}
        shutil.rmtree(workdir / f"{checkpoint.name}-genai", ignore_errors=True)  # disk for the variants
    return report


def moe_logits_check(artifact: Path, checkpoint: Path) -> dict:
    """Last-token logits of our fp16 CUDA graph (com.microsoft::MoE) against transformers in fp32 on the GPU."""
    import transformers

    from runtime import Model
    from runtime.kv_cache import new_cache
    from runtime.padding import RightPadding

    prompt = np.random.default_rng(7).integers(0, 400, size=24).tolist()
    ours = Model.load(artifact, **LOAD)
    vocab = ours.manifest.tokenizer.vocab_size
    cache = new_cache(ours.manifest, ours.session.graph, 1, "cuda", 512)
    row = ours.session.step(*RightPadding(ours.manifest.pad_token_id).prefill([prompt], 0), cache).full()[0][:vocab]
    del ours, cache
    fp32 = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).cuda().eval()
    with torch.no_grad():
        expected = fp32(torch.tensor([prompt], device="cuda")).logits[0, -1, :vocab].float().cpu().numpy()
    del fp32
    torch.cuda.empty_cache()
    return {"max_abs_diff": float(np.abs(row - expected).max()), "logit_scale": float(np.abs(expected).max()),
            "same_top1": int(row.argmax()) == int(expected.argmax())}


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


def yarn_artifact(workdir: Path) -> Path:
    """The Qwen2-7B checkpoint's weights (linked, not copied) under a config with YaRN factor 4."""
    base = workdir / "qwen2-7b-checkpoint"
    if not (base / "config.json").is_file():
        write_checkpoint(base, SHAPES["qwen2-7b"], seed=0, dtype=torch.bfloat16, shards=4)
    checkpoint = workdir / "qwen2-7b-yarn4-checkpoint"
    checkpoint.mkdir(exist_ok=True)
    for item in base.iterdir():
        if item.name != "config.json" and not (checkpoint / item.name).exists():
            (checkpoint / item.name).symlink_to(item)
    config = {**SHAPES["qwen2-7b"], "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}
    (checkpoint / "config.json").write_text(json.dumps(config))
    return build_artifact(checkpoint, workdir / "qwen2-7b-yarn4-fp16", "fp16")


@section("long_context")
def long_context(workdir: Path, prompt_lengths: tuple[int, ...], new_tokens: int, chunk: int) -> dict:
    """Qwen2-7B shapes with YaRN factor 4 (context 131,072): chunked prefill, then CUDA-graph decode."""
    from runtime import Model

    artifact = yarn_artifact(workdir)
    model = Model.load(artifact, **LOAD, cuda_graph=True)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shapes", default="qwen2-0.5b", help="comma-separated: " + ", ".join(SHAPES))
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--skip-correctness", action="store_true")
    parser.add_argument("--no-genai", action="store_true", help="skip onnxruntime-genai even when it is installed")
    parser.add_argument("--long-context", default="", help="comma-separated prompt lengths for the YaRN run, e.g. 32768,130944")
    parser.add_argument("--prefill-chunk", type=int, default=8192)
    parser.add_argument("--prepare", action="store_true", help="only write the checkpoints and build the artifacts")
    parser.add_argument("--variants", default="", help="also time ours built or loaded these ways: " + ", ".join(VARIANTS))
    parser.add_argument("--bucket-sweep", default="", help="comma-separated prompt lengths: first and warm prefill, "
                        "memory, captured against uncaptured, at each shape of --shapes")
    parser.add_argument("--ours-only", action="store_true", help="skip transformers and onnxruntime-genai")
    args = parser.parse_args()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    args.workdir.mkdir(parents=True, exist_ok=True)
    variants = tuple(filter(None, args.variants.split(",")))
    if args.prepare:  # checkpoints and artifacts only (CPU work), e.g. while onnxruntime-gpu is still arriving
        for shape in filter(None, args.shapes.split(",")):
            started = time.perf_counter()
            prepare(args.workdir, shape)
            print(f"prepared {shape} in {time.perf_counter() - started:.0f} s", flush=True)
        if args.long_context:
            yarn_artifact(args.workdir)
            print("prepared the YaRN artifact", flush=True)
        return

    environment()
    bandwidth()
    if not args.skip_correctness:
        correctness(args.workdir)
        logits_check(args.workdir)
    copy_tb_s = REPORT.get("bandwidth", {}).get("copy_tb_s", 3.0)
    genai = not args.no_genai and REPORT["environment"].get("onnxruntime_genai") is not None
    args.out.mkdir(parents=True, exist_ok=True)
    sweep = tuple(int(n) for n in filter(None, args.bucket_sweep.split(",")))
    for shape in filter(None, args.shapes.split(",")) if sweep else ():
        bucket_sweep(args.workdir, shape, sweep)
        REPORT[f"bucket_sweep/{shape}"] = REPORT.pop("bucket_sweep")
        (args.out / "bench_gpu.json").write_text(json.dumps(REPORT, indent=2, default=str))
    for shape in filter(None, args.shapes.split(",")) if not sweep else ():
        speed(args.workdir, shape, args.prompt_tokens, args.new_tokens, copy_tb_s, genai, variants, not args.ours_only)
        REPORT[f"speed/{shape}"] = REPORT.pop("speed")
        (args.out / "bench_gpu.json").write_text(json.dumps(REPORT, indent=2, default=str))
    if args.long_context:
        long_context(args.workdir, tuple(int(n) for n in args.long_context.split(",")), args.new_tokens, args.prefill_chunk)
    # last: the profiler leaves per-launch overhead behind in the process, which slowed every later timing
    for profile in PROFILES:
        try:
            profile()
        except Exception:  # a diagnostic; the timings stand without it
            traceback.print_exc()
    (args.out / "bench_gpu.json").write_text(json.dumps(REPORT, indent=2, default=str))
    print_table(REPORT)


if __name__ == "__main__":
    main()
