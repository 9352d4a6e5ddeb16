"""GPU check and benchmark, run on the lent device in one call (see README, "CUDA").

1. environment: GPU, torch, onnxruntime and its providers;
2. device-to-device copy bandwidth (torch), the basis of each floor;
3. correctness: tiny random checkpoints (dense and MoE) exported, optimized for CUDA (fp16 and
   bf16), greedy through our runtime on CUDA against transformers on the same GPU and weights;
   whether every node of our graph is assigned to the CUDA EP;
4. speed at published shapes (random weights): prefill of --prompt-tokens and decode ms/token for our
   runtime and transformers eager, each also as a ratio to the bandwidth floor.

    PYTHONPATH=. python tools/bench_gpu.py --workdir /tmp/bench --out $OUT --shapes qwen2-0.5b
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch

from graphs.artifact import optimize_artifact
from qwen2_export.export import export_checkpoint
from qwen2_export.synthetic import QWEN2_0_5B, QWEN2_7B, write_checkpoint, write_tiny_checkpoint

SHAPES = {"qwen2-0.5b": QWEN2_0_5B, "qwen2-7b": QWEN2_7B}
REPORT: dict = {}


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

    return {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "onnxruntime": ort.__version__,
            "providers": ort.get_available_providers()}


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
    artifact = export_checkpoint(checkpoint, folder, dtype=dtype, force=True)
    optimize_artifact(artifact, "cuda", {"fp16": "float16", "bf16": "bfloat16"}[dtype])
    return artifact


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
            model = Model.load(artifact, device="cuda")
            ours = model.generate(prompt, max_new_tokens=32, greedy=True, repetition_penalty=1.0).output_ids
            reference = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch_dtype).cuda().eval()
            reference.generation_config = transformers.GenerationConfig(
                do_sample=False, eos_token_id=None, pad_token_id=0,
                suppress_tokens=list(range(model.manifest.tokenizer_vocab_size, reference.config.vocab_size)))
            with torch.no_grad():
                theirs = reference.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=32)[0, len(prompt):].tolist()
            theirs = theirs[: len(ours)]
            top3_agreement = _top3_agreement(reference, prompt, ours, theirs, model.manifest.tokenizer_vocab_size)
            graphed = Model.load(artifact, device="cuda", cuda_graph=True)
            replayed = graphed.generate(prompt, max_new_tokens=32, greedy=True, repetition_penalty=1.0).output_ids
            with torch.no_grad():  # the first step's greedy margin in transformers fp32: small ones flip in bf16
                first = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).cuda()(
                    torch.tensor([prompt], device="cuda")).logits[0, -1, : model.manifest.tokenizer_vocab_size].topk(2).values
            results[f"{variant}/{dtype}"] = {
                "fp32_first_margin": float(first[0] - first[1]),
                "cuda_graph_same_tokens": replayed == ours,
                "graph": model.session.graph.name, "identical": ours == theirs,
                "first_difference": next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), None),
                "each_in_other_top3": top3_agreement,
                "cuda_only": cuda_only_assignment(model.session.graph.path),
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

    from runtime.kv_cache import new_cache
    from runtime.manifest import load_manifest
    from runtime.padding import PADDINGS
    from runtime.session import GraphSession

    prompt = [456, 40, 300, 17, 250, 99, 3, 12, 7]
    results = {}
    for variant in ("dense_untied_sharded", "moe_shared"):
        checkpoint = workdir / f"tiny-{variant}"
        reference = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).cuda().eval()
        with torch.no_grad():
            expected = reference(torch.tensor([prompt], device="cuda")).logits[0, -1].float().cpu().numpy()
        for dtype in ("fp16", "bf16"):
            manifest = load_manifest(workdir / f"tiny-{variant}-{dtype}")
            for graph in manifest.graphs:
                session = GraphSession(graph, "cuda")
                cache = new_cache(manifest, graph, 1, "cuda", 64)
                ids, mask, positions = PADDINGS[graph.padding](manifest.pad_token_id).prefill([prompt], 0)
                row = session.step(ids, mask, positions, cache)[0][: expected.shape[0]]
                results[f"{variant}/{dtype}/{graph.name}"] = {
                    "max_abs_diff": float(np.abs(row - expected).max()), "scale": float(np.abs(expected).max()),
                    "same_top1": int(row.argmax()) == int(expected.argmax()), "finite": bool(np.isfinite(row).all()),
                }
    return results


@section("speed")
def speed(workdir: Path, shape: str, prompt_tokens: int, new_tokens: int, copy_tb_s: float) -> dict:
    import transformers

    from runtime import Model

    checkpoint = workdir / f"{shape}-checkpoint"
    if not (checkpoint / "config.json").is_file():
        write_checkpoint(checkpoint, SHAPES[shape], seed=0, dtype=torch.bfloat16, shards=4)
    artifact = build_artifact(checkpoint, workdir / f"{shape}-fp16", "fp16")
    weight_bytes = (artifact / "onnx" / "model.onnx_data").stat().st_size
    # the floor: bytes one decode step reads over the measured copy bandwidth (read + write counted)
    floor_ms = weight_bytes / (copy_tb_s * 1e12) * 1e3
    prompt = np.random.default_rng(0).integers(0, 400, size=prompt_tokens).tolist()

    def run_ours(cuda_graph: bool) -> dict:
        model = Model.load(artifact, device="cuda", cuda_graph=cuda_graph)
        model.generate(prompt[:16], max_new_tokens=4, greedy=True)
        runs = []
        for _ in range(3):
            model.generate(prompt, max_new_tokens=new_tokens, greedy=True, repetition_penalty=1.0)
            runs.append(model.last_timings)
        return {"prefill_ms": statistics.median(t.time_to_first_token_s * 1e3 for t in runs),
                "decode_ms_per_token": statistics.median(t.decode_s * 1e3 / t.decode_tokens for t in runs)}

    ours, ours_graph = run_ours(False), run_ours(True)

    reference = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float16).cuda().eval()
    ids = torch.tensor([prompt], device="cuda")
    with torch.no_grad():
        reference.generate(ids[:, :16], max_new_tokens=4, do_sample=False)
        torch.cuda.synchronize()
        started = time.perf_counter()
        reference(ids)
        torch.cuda.synchronize()
        prefill = (time.perf_counter() - started) * 1e3
        started = time.perf_counter()
        reference.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        torch.cuda.synchronize()
        total = (time.perf_counter() - started) * 1e3
    eager = {"prefill_ms": prefill, "decode_ms_per_token": (total - prefill) / (new_tokens - 1)}
    return {"shape": shape, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "weights_gb": weight_bytes / 1e9,
            "floor_ms_per_token": floor_ms, "ours": ours, "ours_cuda_graph": ours_graph, "transformers_eager": eager,
            "ours_over_floor": ours["decode_ms_per_token"] / floor_ms,
            "ours_cuda_graph_over_floor": ours_graph["decode_ms_per_token"] / floor_ms,
            "eager_over_ours": eager["decode_ms_per_token"] / ours["decode_ms_per_token"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shapes", default="qwen2-0.5b", help="comma-separated: " + ", ".join(SHAPES))
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--skip-correctness", action="store_true")
    args = parser.parse_args()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    args.workdir.mkdir(parents=True, exist_ok=True)

    environment()
    bandwidth()
    if not args.skip_correctness:
        correctness(args.workdir)
        logits_check(args.workdir)
    copy_tb_s = REPORT.get("bandwidth", {}).get("copy_tb_s", 3.0)
    for shape in filter(None, args.shapes.split(",")):
        speed(args.workdir, shape, args.prompt_tokens, args.new_tokens, copy_tb_s)
        REPORT[f"speed/{shape}"] = REPORT.pop("speed")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_gpu.json").write_text(json.dumps(REPORT, indent=2, default=str))


if __name__ == "__main__":
    main()
