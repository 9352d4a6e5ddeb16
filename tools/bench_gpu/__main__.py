"""Run the GPU benchmark: ours against the peers, side by side in one run (see tools/bench_gpu/__init__.py)."""

from __future__ import annotations

import argparse
import json
import logging
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from . import __doc__ as DESCRIPTION
from .hosts import hosts_speed
from .int4 import int4_speed
from .measure import DEVICE, GREEDY, PeakMemory
from .ours import bucket_sweep, long_context, ours_timings, padded_prompt_same_tokens, replay_timings, variant_timings
from .peers import peer_timings
from .prepare import SHAPES, VARIANTS, bandwidth, decode_read_bytes, environment, prepare, yarn_artifact
from .profiles import kernel_profiles, prefill_node_profile
from .report import Report, print_table, with_ratios
from .whole_moe import whole_moe_int4


def speed(workdir: Path, shape: str, prompt_tokens: int, new_tokens: int, copy_tb_s: float, genai: bool,
          variants: tuple[str, ...], peers: bool, profiles: list[Callable[[], None]]) -> dict:
    """One shape: ours, then the peers; the kernel and node profiles are appended to `profiles`, to be run
    once every timing of the run is done (each fills its part of the returned report)."""
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
        model = Model.load(artifact, device=DEVICE, cuda_graph=True)
        model.generate(prompt, max_new_tokens=new_tokens, **GREEDY)
    report["ours_peak_gib"] = memory.gib
    report["ours_cuda_graph"] = ours_timings(model, [prompt], new_tokens, runs=2, **GREEDY)
    report["ours_cuda_graph"]["full_logits_reads"] = model.session.steps.full_logits_reads
    report["ours_padded_prompt_same_tokens"] = padded_prompt_same_tokens(model, prompt)
    reads = model.session.steps.full_logits_reads
    report["ours_sampling_qwen_defaults"] = ours_timings(model, [prompt], new_tokens, runs=1, do_sample=True, seed=1)
    report["ours_sampling_qwen_defaults"]["full_logits_reads"] = model.session.steps.full_logits_reads - reads
    prefill_4096 = ours_timings(model, [long_prompt], 2, runs=2, **GREEDY)
    report["ours_prefill_4096_ms"], report["ours_prefill_4096_cold_ms"] = prefill_4096["prefill_ms"], prefill_4096["cold_prefill_ms"]
    report["ours_batch8_cuda_graph"] = ours_timings(model, batch8, new_tokens, runs=2, **GREEDY)
    context = prompt_tokens + new_tokens // 2
    report["ours_replay"] = replay_timings(model, context)
    del model
    plain = Model.load(artifact, device=DEVICE)
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
    profiles.append(lambda: report["ours_replay"].update(kernel_profiles(Model.load(artifact, device=DEVICE, cuda_graph=True), context)))
    profiles.append(lambda: report.update(ours_prefill_nodes=prefill_node_profile(Model.load(artifact, device=DEVICE), prompt_tokens)))
    for variant in variants:
        report[f"ours_{variant}"], model = variant_timings(artifact, variant, prompt, long_prompt, new_tokens, context,
                                                           report["ours_cuda_graph"]["tokens"])
        profiles.append(lambda replay=report[f"ours_{variant}"]["replay"], model=model: replay.update(kernel_profiles(model, context)))
    return with_ratios(report) if peers else report


def main() -> None:
    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shapes", default="qwen2-0.5b", help="comma-separated: " + ", ".join(SHAPES))
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--no-genai", action="store_true", help="skip onnxruntime-genai even when it is installed")
    parser.add_argument("--long-context", default="", help="comma-separated prompt lengths for the YaRN run, e.g. 32768,130944")
    parser.add_argument("--prefill-chunk", type=int, default=8192)
    parser.add_argument("--prepare", action="store_true", help="only write the checkpoints and build the artifacts")
    parser.add_argument("--variants", default="", help="also time ours loaded these ways: " + ", ".join(VARIANTS))
    parser.add_argument("--bucket-sweep", default="", help="comma-separated prompt lengths: first and warm prefill, "
                        "memory, captured against plain steps, at each shape of --shapes")
    parser.add_argument("--ours-only", action="store_true", help="skip transformers and onnxruntime-genai")
    parser.add_argument("--int4", action="store_true", help="instead of the full comparison: ours fp16 and --quantize "
                        "int4 (blocks 32 and 128) against onnxruntime-genai int4, at each shape")
    parser.add_argument("--hosts", action="store_true", help="instead of the full comparison: the CUDA graph with "
                        "the total length computed inside against taken as an input, and onnxruntime-genai on it")
    parser.add_argument("--whole-57b", type=int, default=0, metavar="LAYERS", help="instead of the shapes: a GPTQ-Int4 "
                        "Qwen2-57B-A14B of LAYERS layers (28: the whole model) written, exported and run here")
    args = parser.parse_args()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    args.workdir.mkdir(parents=True, exist_ok=True)
    shapes = tuple(filter(None, args.shapes.split(",")))
    if args.whole_57b:
        report = Report(args.out)
        copy_tb_s = 0.0 if args.prepare else report.run("bandwidth", bandwidth).get("copy_tb_s", 3.0)
        report.run("whole_57b_int4", whole_moe_int4, args.workdir, args.whole_57b, args.prompt_tokens,
                   args.new_tokens, copy_tb_s, args.prepare)
        report.save()
        return
    if args.prepare:  # checkpoints and artifacts only (CPU work), e.g. while onnxruntime-gpu is still arriving
        for shape in shapes:
            started = time.perf_counter()
            prepare(args.workdir, shape)
            print(f"prepared {shape} in {time.perf_counter() - started:.0f} s", flush=True)
        if args.long_context:
            yarn_artifact(args.workdir)
            print("prepared the YaRN artifact", flush=True)
        return

    report = Report(args.out)
    peers_available = report.run("environment", environment).get("onnxruntime_genai") is not None
    copy_tb_s = report.run("bandwidth", bandwidth).get("copy_tb_s", 3.0)
    genai = not args.no_genai and peers_available
    variants = tuple(filter(None, args.variants.split(",")))
    sweep = tuple(int(n) for n in filter(None, args.bucket_sweep.split(",")))
    profiles: list[Callable[[], None]] = []
    for shape in shapes:
        if sweep:
            report.run(f"bucket_sweep/{shape}", bucket_sweep, args.workdir, shape, sweep)
        elif args.hosts:
            report.run(f"hosts/{shape}", hosts_speed, args.workdir, shape, args.prompt_tokens, args.new_tokens, genai)
        elif args.int4:
            report.run(f"int4/{shape}", int4_speed, args.workdir, shape, args.prompt_tokens, args.new_tokens, copy_tb_s,
                       genai, profiles)
        else:
            report.run(f"speed/{shape}", speed, args.workdir, shape, args.prompt_tokens, args.new_tokens, copy_tb_s,
                       genai, variants, not args.ours_only, profiles)
    if args.long_context:
        lengths = tuple(int(n) for n in args.long_context.split(","))
        report.run("long_context", long_context, args.workdir, lengths, args.new_tokens, args.prefill_chunk)
    # last: the profiler leaves per-launch overhead behind in the process, which slowed every later timing
    for profile in profiles:
        try:
            profile()
        except Exception:  # a diagnostic; the timings stand without it
            traceback.print_exc()
    report.save()
    print_table(report.parts)


if __name__ == "__main__":
    main()
