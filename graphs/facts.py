"""What the passes know: the exporter's facts about the model (from the manifest), so passes verify
instead of guess, and what earlier passes established, handed on as values rather than node names."""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from artifact import contract

from .attention_inputs import AttentionLengths

TARGET_DTYPES = {"cpu": ("float32",), "cuda": ("float16", "bfloat16")}


@dataclass(frozen=True)
class ModelFacts:
    task: str  # contract.TASKS: generation graphs carry a KV cache and logits; the others neither
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    rms_norm_eps: float
    windows: tuple[int | None, ...]  # per layer; None = full attention
    sparse_layers: tuple[int, ...]
    experts_per_token: int
    normalize_routing: bool
    context_length: int
    attention_factor: float
    inv_freq_initializer: str
    tied_embeddings: bool
    tokenizer_vocab_size: int  # ids the tokenizer can produce; embedding rows past it are padding
    quantized_linears: int  # int4 Linear weights (DequantizeLinear + MatMul in the portable graph)

    @classmethod
    def from_manifest(cls, manifest: contract.Manifest) -> "ModelFacts":
        model, moe = manifest.model, manifest.model.moe
        return cls(
            task=manifest.task, num_layers=model.num_hidden_layers, num_heads=model.num_attention_heads,
            num_kv_heads=model.num_key_value_heads, head_dim=model.head_dim, hidden_size=model.hidden_size,
            rms_norm_eps=model.rms_norm_eps, windows=tuple(model.window_of(i) for i in range(model.num_hidden_layers)),
            sparse_layers=moe.sparse_layers if moe else (), experts_per_token=moe.num_experts_per_tok if moe else 0,
            normalize_routing=bool(moe and moe.norm_topk_prob), context_length=model.context_length,
            attention_factor=manifest.rope.attention_factor, inv_freq_initializer=manifest.rope.inv_freq_initializer,
            tied_embeddings=model.tie_word_embeddings, tokenizer_vocab_size=manifest.tokenizer.vocab_size,
            quantized_linears=len(contract.quantized_weights(model.num_hidden_layers, moe.sparse_layers if moe else ())[0])
            if manifest.quantization else 0,
        )


@dataclass(frozen=True)
class PassFacts:
    """Handed from pass to pass: a pass's build returns these facts, updated where it changed them."""

    model: ModelFacts
    lengths: AttentionLengths  # seqlens_k and the total-length input, made once before the passes
    float_type: str  # the target's float type (contract.FLOAT_TYPES): weights, activations and KV
    int4_accuracy: int  # MatMulNBits accuracy_level (int4_matmul.EXACT or INT8_ACTIVATIONS)
    last_token_logits: bool = False  # the final norm and lm_head see one position per row
    final_hidden: ir.Value | None = None  # the final norm's output, once the norm passes made it

    @property
    def cached(self) -> bool:
        """Whether the graph carries past and present keys and values (text generation only)."""
        return self.model.task == contract.TEXT_GENERATION
