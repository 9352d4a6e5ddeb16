"""The facts export knows, put into the artifact contract's manifest: sizes, rope facts (resolved: the
attention factor is a number, not a rule), the portable graph's entry and the tokenizer's ids."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from artifact import contract

from . import io_spec
from .config import Qwen2Config
from .errors import CheckpointError
from .rope import rope_parameters


def portable_manifest(artifact: Path, config: Qwen2Config, dtype: torch.dtype,
                      tokens: contract.TokenFacts) -> contract.Manifest:
    """The manifest of a freshly exported artifact folder, whose files are all written."""
    graph_file = contract.graph_file()
    files = [graph_file, f"{contract.GRAPH_FOLDER}/{contract.data_file()}"]
    generation = config.task == contract.TEXT_GENERATION
    portable = contract.GraphEntry(
        name=contract.PORTABLE_GRAPH, file=graph_file, target="any",  # standard ONNX ops only
        files={name: contract.FileRecord.of(artifact / name) for name in files},
        opset=contract.PORTABLE_OPSET,
        # classification graphs number positions 0..S-1 (transformers' default): right padding keeps each row
        # as it is alone; their logits are per sequence or per token
        kv_layout=contract.CONCAT if generation else contract.NO_CACHE, padding=contract.LEFT if generation else contract.RIGHT,
        logits=contract.ALL_POSITIONS if generation else config.task,
        inputs=io_spec.graph_inputs(config, dtype), outputs=io_spec.graph_outputs(config, dtype),
    )
    return contract.Manifest(
        architecture=config.architecture, model_type=config.model_type, dtype=io_spec.DTYPE_NAMES[dtype],
        model=model_facts(config), rope=rope_facts(config), graphs=(portable,), tokenizer=tokens,
        quantization=None if config.quantization is None else quant_facts(config),
        files={name: contract.FileRecord.of(artifact / name)
               for name in contract.CHECKPOINT_FILES + contract.OPTIONAL_CHECKPOINT_FILES if (artifact / name).is_file()},
        task=config.task,
        head=None if config.head is None else contract.HeadFacts(config.head.labels, config.head.problem_type,
                                                                 config.head.pad_token_id),
    )


def quant_facts(config: Qwen2Config) -> contract.QuantFacts:
    linears, experts = contract.quantized_weights(config.num_hidden_layers, config.sparse_layers)
    modules = dict.fromkeys(name.split(".", 3)[3].removesuffix(".weight") for name in linears + experts)
    q = config.quantization
    return contract.QuantFacts(q.method, q.bits, q.group_size, symmetric=q.symmetric, projections=tuple(modules))


def model_facts(config: Qwen2Config) -> contract.ModelFacts:
    moe = config.moe
    return contract.ModelFacts(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim, context_length=config.context_length,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=config.tie_word_embeddings, qkv_bias=config.qkv_bias, layer_types=tuple(config.layer_types),
        sliding_window=config.sliding_window,
        moe=None if moe is None else contract.MoeFacts(
            num_experts=moe.num_experts, num_experts_per_tok=moe.num_experts_per_tok,
            moe_intermediate_size=moe.moe_intermediate_size,
            shared_expert_intermediate_size=moe.shared_expert_intermediate_size, norm_topk_prob=moe.norm_topk_prob,
            sparse_layers=config.sparse_layers),
    )


def rope_facts(config: Qwen2Config) -> contract.RopeFacts:
    rope = config.rope
    _, attention_factor = rope_parameters(rope, config.head_dim)
    yarn = rope.rope_type == "yarn"
    return contract.RopeFacts(
        type=rope.rope_type, theta=rope.theta, factor=rope.factor,
        original_max_position_embeddings=rope.original_max_position_embeddings,
        beta_fast=rope.beta_fast if yarn else None, beta_slow=rope.beta_slow if yarn else None,
        attention_factor=attention_factor,
    )


def token_facts(checkpoint: Path) -> contract.TokenFacts:
    """The tokenizer's facts from the checkpoint's files; CheckpointError when one cannot be read."""
    tokenizer = read_tokenizer(checkpoint / contract.TOKENIZER_FILE)
    tokenizer_config = read_json_object(checkpoint / contract.TOKENIZER_CONFIG_FILE)
    generation_path = checkpoint / contract.GENERATION_CONFIG_FILE
    generation = read_json_object(generation_path) if generation_path.is_file() else {}
    special = {token.content: token_id for token_id, token in tokenizer.get_added_tokens_decoder().items() if token.special}

    def id_of(token: Any) -> int | None:
        if isinstance(token, dict):  # older tokenizer_config files store AddedToken dicts
            token = token.get("content")
        return None if token is None else tokenizer.token_to_id(token)

    eos = generation.get("eos_token_id", id_of(tokenizer_config.get("eos_token")))
    return contract.TokenFacts(
        vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
        special_tokens=dict(sorted(special.items(), key=lambda item: item[1])),
        bos_token_id=generation.get("bos_token_id", id_of(tokenizer_config.get("bos_token"))),
        eos_token_id=eos,
        pad_token_id=generation.get("pad_token_id", id_of(tokenizer_config.get("pad_token"))),
        stop_token_ids=tuple(sorted(set(eos if isinstance(eos, list) else [eos] if eos is not None else []))),
        has_chat_template=bool(tokenizer_config.get("chat_template")) or (checkpoint / contract.CHAT_TEMPLATE_FILE).is_file(),
        add_bos_token=bool(tokenizer_config.get("add_bos_token", False)),
    )


def read_tokenizer(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises a bare Exception
        raise CheckpointError(f"{path} is not a tokenizer the `tokenizers` library can read ({error}); "
                              "download it again") from error


def read_json_object(path: Path) -> dict[str, Any]:
    try:
        return contract.read_json_object(path)
    except contract.NotAJsonObject as error:
        raise CheckpointError(f"{error}; download it again") from error
