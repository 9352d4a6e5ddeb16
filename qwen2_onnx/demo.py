"""`qwen2-onnx demo`: the whole pipeline offline in seconds.

Builds a seeded tiny checkpoint in the hub layout, exports it, generates with the onnxruntime
session loop, and checks the greedy tokens and logits against the torch model on the same weights.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from qwen2_export.checkpoint import load_model
from qwen2_export.config import load_config
from qwen2_export.export import export_checkpoint
from qwen2_export.synthetic import write_tiny_checkpoint
from runtime import Model  # the session loop, exactly as a deployment uses it
from runtime.steps import StepInputs

DEMO_VARIANT = "moe_mlp_only_norm"
MESSAGES = [{"role": "user", "content": "Tell me a story about a robot who learns to paint."}]


@torch.no_grad()
def torch_greedy(model: torch.nn.Module, prompt: list[int], steps: int, repetition_penalty: float, vocab: int) -> tuple[list[int], np.ndarray]:
    """Greedy tokens from our torch model (full recomputation each step, no cache) and the first logits row."""
    ids, tokens, first = list(prompt), [], None
    config = model.config
    empty = [torch.zeros(1, config.num_key_value_heads, 0, config.head_dim)] * (2 * config.num_hidden_layers)
    for _ in range(steps):
        row = model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), torch.arange(len(ids))[None], *empty)[0][0, -1]
        row = row.clone()
        row[vocab:] = -float("inf")
        first = row.numpy().copy() if first is None else first
        seen = torch.tensor(sorted(set(ids)))
        values = row[seen]
        row[seen] = torch.where(values < 0, values * repetition_penalty, values / repetition_penalty)
        tokens.append(int(row.argmax()))
        ids.append(tokens[-1])
    return tokens, first


def run_demo(workdir: Path | None = None, steps: int = 32, say: Callable[[str], None] = print) -> bool:
    """Run the demo in `workdir` (a temporary folder by default); True when the parity checks pass."""
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(workdir or scratch)
        started = time.perf_counter()
        checkpoint = write_tiny_checkpoint(root / "checkpoint", DEMO_VARIANT, seed=0)
        say(f"1. tiny {DEMO_VARIANT} checkpoint (hub layout, seeded) in {checkpoint}")
        artifact = export_checkpoint(checkpoint, root / "artifact", force=True)
        say(f"2. exported to {artifact} ({time.perf_counter() - started:.1f}s so far)")

        model = Model.load(artifact, device="cpu")
        prompt = model.encode(MESSAGES)
        result = model.generate(prompt, max_new_tokens=steps, greedy=True, stop_strings=())
        timings = model.last_timings
        say(f"3. onnxruntime generated {len(result.output_ids)} tokens (random weights, so the text is noise; "
            f"what matters is step 4): {result.text!r}")
        say(f"   time to first token {timings.time_to_first_token_s * 1e3:.1f} ms, "
            f"decode {timings.decode_tokens_per_s:.0f} tokens/s (tiny random model, CPU)")

        reference = load_model(checkpoint, load_config(checkpoint))
        penalty = model.sampling(greedy=True).repetition_penalty
        vocab = model.manifest.tokenizer.vocab_size
        expected, first_row = torch_greedy(reference, prompt, len(result.output_ids), penalty, vocab)
        cache = model.session.caches.take(1, len(prompt))
        inputs = StepInputs(np.array([prompt]), np.ones((1, len(prompt)), np.int64), np.arange(len(prompt))[None])
        session_row = model.session.steps.step(inputs, cache).full()[0]
        difference = float(np.abs(session_row[:vocab] - first_row[:vocab]).max())
        same = expected == result.output_ids
        say(f"4. parity with the torch model on the same weights: greedy tokens {'identical' if same else 'DIFFER'} "
            f"({len(expected)} tokens), max |logit difference| {difference:.2e}")
        say(f"done in {time.perf_counter() - started:.1f}s")
        return same and difference < 1e-4
