"""manifest.json: everything a host in any language needs to drive the artifact without Python.

Sizes, rope facts (resolved: the attention factor is a number, not a rule), each graph file with its
sha256, each graph's inputs and outputs with dims and the KV/padding contract, and token ids.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from . import io_spec
from .config import Qwen2Config
from .files import file_record
from .rope import rope_parameters

FORMAT = "qwen2-onnx-artifact"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"


def write_manifest(artifact: Path, config: Qwen2Config, dtype: torch.dtype, graph_file: str, data_file: str) -> dict:
    """Write artifact/manifest.json describing the portable graph; returns the manifest."""
    graph_path = artifact / graph_file
    data_path = graph_path.parent / data_file
    files = [graph_path, data_path]
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "producer": "qwen2-onnx",
        "architecture": config.architecture,
        "model_type": config.model_type,
        "dtype": io_spec.ONNX_TYPE_NAMES[dtype],
        "model": _model_facts(config),
        "rope": _rope_facts(config),
        "graphs": [
            {
                "name": "portable",
                "file": graph_file,
                "target": "any",  # standard ONNX ops only
                "files": {str(p.relative_to(artifact)): file_record(p) for p in files},
                "opset": 23,
                # present = concat(past, new): past and present are separate buffers, present grows by S
                "kv_cache": {"layout": "concat", "order": "key, value per layer", "dims": "[batch, kv_heads, length, head_dim]"},
                # explicit attention_mask and position_ids: left padding works (mask 0 on pads,
                # position_ids = cumsum(mask) - 1 clipped at 0, as transformers computes them)
                "padding": "left",
                "logits": "all_positions",
                "inputs": [spec.describe() for spec in io_spec.graph_inputs(config, dtype)],
                "outputs": [spec.describe() for spec in io_spec.graph_outputs(config, dtype)],
            }
        ],
        "tokenizer": _token_facts(artifact),
    }
    (artifact / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _model_facts(config: Qwen2Config) -> dict[str, Any]:
    moe = config.moe
    return {
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "context_length": config.context_length,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_word_embeddings,
        "qkv_bias": config.qkv_bias,
        "layer_types": list(config.layer_types),
        "sliding_window": config.sliding_window,
        "moe": None
        if moe is None
        else {
            "num_experts": moe.num_experts,
            "num_experts_per_tok": moe.num_experts_per_tok,
            "moe_intermediate_size": moe.moe_intermediate_size,
            "shared_expert_intermediate_size": moe.shared_expert_intermediate_size,
            "norm_topk_prob": moe.norm_topk_prob,
            "sparse_layers": [i for i in range(config.num_hidden_layers) if config.is_sparse_layer(i)],
        },
    }


def _rope_facts(config: Qwen2Config) -> dict[str, Any]:
    rope = config.rope
    _, attention_factor = rope_parameters(rope, config.head_dim)
    return {
        "type": rope.rope_type,
        "theta": rope.theta,
        "factor": rope.factor,
        "original_max_position_embeddings": rope.original_max_position_embeddings,
        "beta_fast": rope.beta_fast if rope.rope_type == "yarn" else None,
        "beta_slow": rope.beta_slow if rope.rope_type == "yarn" else None,
        "attention_factor": attention_factor,  # multiplies cos and sin
        "layout": "rotate_half",
        "inv_freq_initializer": "model.rotary_emb.inv_freq",
    }


def _token_facts(artifact: Path) -> dict[str, Any]:
    tokenizer = Tokenizer.from_file(str(artifact / "tokenizer.json"))
    tokenizer_config = json.loads((artifact / "tokenizer_config.json").read_text())
    generation_path = artifact / "generation_config.json"
    generation = json.loads(generation_path.read_text()) if generation_path.is_file() else {}
    special = {token.content: token_id for token_id, token in tokenizer.get_added_tokens_decoder().items() if token.special}

    def id_of(token: Any) -> int | None:
        if isinstance(token, dict):  # older tokenizer_config files store AddedToken dicts
            token = token.get("content")
        return None if token is None else tokenizer.token_to_id(token)

    eos = generation.get("eos_token_id", id_of(tokenizer_config.get("eos_token")))
    stop = sorted(set(eos if isinstance(eos, list) else [eos] if eos is not None else []))
    return {
        "file": "tokenizer.json",
        "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
        "special_tokens": dict(sorted(special.items(), key=lambda item: item[1])),
        "bos_token_id": generation.get("bos_token_id", id_of(tokenizer_config.get("bos_token"))),
        "eos_token_id": eos,
        "pad_token_id": generation.get("pad_token_id", id_of(tokenizer_config.get("pad_token"))),
        "stop_token_ids": stop,
        "has_chat_template": bool(tokenizer_config.get("chat_template")),
        "add_bos_token": bool(tokenizer_config.get("add_bos_token", False)),
    }
