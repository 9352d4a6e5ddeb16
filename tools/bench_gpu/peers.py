"""The peers on the same checkpoint and prompts: transformers (eager, static cache + torch.compile) and
onnxruntime-genai (its own builder, with and without CUDA graph), and the token comparisons with them."""

from __future__ import annotations

import json
import shutil
import statistics
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from .measure import DEVICE, PeakMemory


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


def genai_timings(checkpoint: Path, workdir: Path, prompt: list[int], new_tokens: int, precision: str = "fp16") -> dict:
    """onnxruntime-genai's own builder on the same checkpoint (`precision` fp16 or int4, CUDA), then
    og.Generator greedy, with the builder's settings and with enable_cuda_graph."""
    import subprocess
    import sys

    import onnxruntime_genai as og

    folder = workdir / f"{checkpoint.name}-genai-{precision}"
    if not (folder / "genai_config.json").is_file():
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint), "-o", str(folder),
                        "-p", precision, "-e", "cuda", "-c", str(workdir / "genai-cache")], check=True,
                       stdout=subprocess.DEVNULL)
    results = {}
    for variant in ("default", "cuda_graph"):
        config = og.Config(str(folder))
        if variant == "cuda_graph":
            config.set_provider_option("cuda", "enable_cuda_graph", "1")
        results[variant] = genai_generate_timings(og.Model(config), prompt, new_tokens)
        results[variant].pop("tokens")
    return results


def genai_generate_timings(model, prompt: list[int], new_tokens: int, runs: int = 2) -> dict:
    """Prefill (+ first token) ms and decode ms/token of og.Generator greedy on `model`, median of `runs`
    after a warm-up; the tokens of the last run."""
    import onnxruntime_genai as og

    results = []
    for attempt in range(runs + 1):
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(prompt) + new_tokens, min_length=len(prompt) + new_tokens)
        generator = og.Generator(model, params)
        stamps, tokens = [time.perf_counter()], []
        generator.append_tokens(np.array(prompt, np.int32))
        while not generator.is_done():
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))  # the token to the host, as a caller would
            stamps.append(time.perf_counter())
        if attempt:
            results.append({"prefill_ms": (stamps[1] - stamps[0]) * 1e3,
                            "decode_ms_per_token": (stamps[-1] - stamps[1]) / (len(stamps) - 2) * 1e3})
        del generator
    result = {key: statistics.median(r[key] for r in results) for key in results[0]}
    result["tokens"] = tokens
    return result


def top3_agreement(reference, prompt: list[int], ours: list[int], theirs: list[int], vocab: int) -> bool:
    """Up to and including the first difference (after it the contexts differ), is each of our tokens in
    transformers' top 3 at the same step? Ids past the tokenizer (the embedding's random padding rows) are
    excluded, as both generators exclude them."""
    differ = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), len(ours) - 1)
    with torch.no_grad():
        logits = reference(torch.tensor([prompt + theirs], device="cuda")).logits[0, len(prompt) - 1 : -1, :vocab]
    top3 = logits.topk(3, dim=-1).indices.tolist()
    return all(ours[i] in top3[i] for i in range(min(differ + 1, len(top3))))


def same_tokens(ours: list[int], theirs: list[int], reference, prompt: list[int], vocab: int) -> dict:
    n = min(32, len(ours), len(theirs))
    return {"identical_32": ours[:n] == theirs[:n],
            "each_in_other_top3": top3_agreement(reference, prompt, ours[:n], theirs[:n], vocab)}


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
        shutil.rmtree(workdir / f"{checkpoint.name}-genai-fp16", ignore_errors=True)  # disk for the variants
    return report


def moe_logits_check(artifact: Path, checkpoint: Path) -> dict:
    """Last-token logits of our fp16 CUDA graph (com.microsoft::MoE) against transformers in fp32 on the GPU."""
    import transformers

    from runtime import Model
    from runtime.kv_cache import new_cache
    from runtime.padding import RightPadding

    prompt = np.random.default_rng(7).integers(0, 400, size=24).tolist()
    ours = Model.load(artifact, device=DEVICE)
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
