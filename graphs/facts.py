"""What the exporter knows about the model, read from manifest.json, so passes verify instead of guess."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

TARGET_DTYPES = {"cpu": ("float32",), "cuda": ("float16", "bfloat16")}


@dataclass(frozen=True)
class ModelFacts:
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

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> "ModelFacts":
        model, rope = manifest["model"], manifest["rope"]
        moe = model.get("moe") or {}
        windows = tuple(model["sliding_window"] if t == "sliding_attention" else None for t in model["layer_types"])
        return cls(
            num_layers=model["num_hidden_layers"],
            num_heads=model["num_attention_heads"],
            num_kv_heads=model["num_key_value_heads"],
            head_dim=model["head_dim"],
            hidden_size=model["hidden_size"],
            rms_norm_eps=model["rms_norm_eps"],
            windows=windows,
            sparse_layers=tuple(moe.get("sparse_layers", ())),
            experts_per_token=moe.get("num_experts_per_tok", 0),
            normalize_routing=bool(moe.get("norm_topk_prob", False)),
            context_length=model["context_length"],
            attention_factor=rope["attention_factor"],
            inv_freq_initializer=rope["inv_freq_initializer"],
            tied_embeddings=model["tie_word_embeddings"],
            tokenizer_vocab_size=manifest["tokenizer"]["vocab_size"],
        )
