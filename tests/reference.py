"""transformers as the reference implementation (test-only)."""

from __future__ import annotations

import torch
import transformers


def load_reference(checkpoint) -> torch.nn.Module:
    """transformers' model on the same weights, eager attention (the plain math we compare with)."""
    return transformers.AutoModelForCausalLM.from_pretrained(
        checkpoint, attn_implementation="eager", dtype=torch.float32
    ).eval()


@torch.no_grad()
def reference_greedy(model, prompt: list[int], steps: int) -> list[int]:
    """transformers' generate, plain greedy (the checkpoint's sampling defaults and repetition
    penalty would otherwise be merged in), never stopping early."""
    model.generation_config = transformers.GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=0)
    output = model.generate(
        torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), max_new_tokens=steps
    )
    return output[0, len(prompt):].tolist()


@torch.no_grad()
def reference_logits(model, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Full recomputation without a cache: what every cached step must reproduce."""
    return model(input_ids=ids, attention_mask=attention_mask).logits
