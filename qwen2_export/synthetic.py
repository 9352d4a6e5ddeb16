"""Seeded random checkpoints in the exact Hugging Face hub layout, written tensor by tensor.

Used by the tests (tiny variants), the offline demo and tools/export_memory.py (Qwen2-7B and
Qwen2-57B-A14B shapes, tens of GB: nothing is held in memory beyond one chunk). Tensor names are the
hub's (per-expert `mlp.experts.{e}.gate_proj.weight`), config.json is written the way published
checkpoints write it (transformers 4.x keys), and the weights are spread wide enough that greedy
choices are not near-ties.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .config import Qwen2Config, parse_config
from .tiny_tokenizer import SPECIAL_TOKENS, build_tiny_tokenizer

DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int32: "I32"}
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_TINY = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_act": "silu",
    "vocab_size": 512,  # larger than the tokenizer (459), as on the hub: the tail rows are padding
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "sliding_window": 256,
    "max_window_layers": 2,
    "attention_dropout": 0.0,
    "torch_dtype": "float32",
}
_MOE = {
    "architectures": ["Qwen2MoeForCausalLM"],
    "model_type": "qwen2_moe",
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 96,
    "norm_topk_prob": False,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
}

# name -> (config.json overrides, shard count)
TINY_VARIANTS: dict[str, tuple[dict[str, Any], int]] = {
    "dense_tied": ({"tie_word_embeddings": True}, 1),
    "dense_untied_sharded": ({"num_hidden_layers": 3}, 3),
    "moe_shared": ({**_MOE, "num_hidden_layers": 2}, 2),
    "moe_mlp_only_norm": ({**_MOE, "num_hidden_layers": 3, "mlp_only_layers": [1], "norm_topk_prob": True}, 1),
    "yarn": (
        {"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}},
        1,
    ),
    "sliding_window": ({"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1}, 1),
}

# Published shapes, for the memory tool (values from the hub config.json copies in the architecture notes).
QWEN2_7B = {
    **_TINY,
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "sliding_window": 131072,
    "max_window_layers": 28,
    "torch_dtype": "bfloat16",
}
QWEN2_0_5B = {
    **QWEN2_7B,
    "vocab_size": 151936,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "max_window_layers": 24,
    "tie_word_embeddings": True,
}
QWEN2_57B_A14B = {
    **QWEN2_7B,
    **_MOE,
    "vocab_size": 151936,
    "max_position_embeddings": 131072,
    "num_experts": 64,
    "num_experts_per_tok": 8,
    "moe_intermediate_size": 2560,
    "shared_expert_intermediate_size": 20480,
}


def tiny_config(variant: str) -> dict[str, Any]:
    """config.json contents of a tiny variant."""
    overrides, _ = TINY_VARIANTS[variant]
    return {**_TINY, **overrides}


def hub_tensor_shapes(config: Qwen2Config) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor a hub checkpoint of this config holds, with hub names and shapes."""
    d, h, hkv, dh = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
    shapes = [("model.embed_tokens.weight", (config.vocab_size, d))]
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes += [(p + "input_layernorm.weight", (d,)), (p + "post_attention_layernorm.weight", (d,))]
        for name, rows in (("q_proj", h * dh), ("k_proj", hkv * dh), ("v_proj", hkv * dh)):
            shapes.append((f"{p}self_attn.{name}.weight", (rows, d)))
            if config.qkv_bias:
                shapes.append((f"{p}self_attn.{name}.bias", (rows,)))
        shapes.append((p + "self_attn.o_proj.weight", (d, h * dh)))
        if config.is_sparse_layer(i):
            moe = config.moe
            assert moe is not None
            shapes.append((p + "mlp.gate.weight", (moe.num_experts, d)))
            for e in range(moe.num_experts):
                shapes += _mlp_shapes(f"{p}mlp.experts.{e}.", d, moe.moe_intermediate_size)
            shapes += _mlp_shapes(p + "mlp.shared_expert.", d, moe.shared_expert_intermediate_size)
            shapes.append((p + "mlp.shared_expert_gate.weight", (1, d)))
        else:
            shapes += _mlp_shapes(p + "mlp.", d, config.intermediate_size)
    shapes.append(("model.norm.weight", (d,)))
    if config.head is not None:  # a classification checkpoint: the score head instead of lm_head
        shapes.append(("score.weight", (config.head.num_labels, d)))
        if config.head.bias:
            shapes.append(("score.bias", (config.head.num_labels,)))
    elif not config.tie_word_embeddings:
        shapes.append(("lm_head.weight", (config.vocab_size, d)))
    return shapes


def _mlp_shapes(prefix: str, d: int, i: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(prefix + "gate_proj.weight", (i, d)), (prefix + "up_proj.weight", (i, d)), (prefix + "down_proj.weight", (d, i))]


def random_chunks(name: str, shape: tuple[int, ...], seed: int, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """Seeded random values for one tensor, a few million at a time; the scale depends on its role."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    fan_in = shape[-1]
    if name.endswith("norm.weight"):
        mean, std = 1.0, 0.1
    elif name == "model.embed_tokens.weight":
        mean, std = 0.0, 1.0
    elif name == "lm_head.weight":  # wide logits: greedy choices are not near-ties
        mean, std = 0.0, 4.0 / math.sqrt(fan_in)
    elif name.endswith(".bias"):
        mean, std = 0.0, 0.5
    elif name.endswith("mlp.gate.weight"):  # router: decisive top-k choices
        mean, std = 0.0, 3.0 / math.sqrt(fan_in)
    else:
        mean, std = 0.0, 1.0 / math.sqrt(fan_in)
    total = math.prod(shape)
    step = 1 << 22
    for begin in range(0, total, step):
        values = torch.randn(min(step, total - begin), generator=generator) * std + mean
        yield values.to(dtype)


@dataclass(frozen=True)
class TensorSource:
    """One checkpoint tensor to write: its values come a few million at a time."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    values: Callable[[], Iterator[torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def random_tensors(config: Qwen2Config, seed: int, dtype: torch.dtype) -> list[TensorSource]:
    """Every float tensor of a hub checkpoint of `config`, seeded random."""
    return [TensorSource(name, shape, dtype, partial(random_chunks, name, shape, seed, dtype))
            for name, shape in hub_tensor_shapes(config)]


def write_safetensors(path: Path, tensors: list[TensorSource]) -> None:
    """Write one safetensors file, streaming each tensor's chunks straight to disk."""
    offsets, header = 0, {}
    for tensor in tensors:
        header[tensor.name] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                               "data_offsets": [offsets, offsets + tensor.nbytes]}
        offsets += tensor.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format pads the header to 8 bytes
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for tensor in tensors:
            for chunk in tensor.values():
                f.write(chunk.view(torch.uint8).numpy().tobytes())


def split_shards(tensors: list[TensorSource], shards: int) -> list[list[TensorSource]]:
    """Split the tensor list into `shards` runs of about equal byte size, keeping hub order."""
    sizes = [tensor.nbytes for tensor in tensors]
    target, groups, current, filled = sum(sizes) / shards, [], [], 0
    for tensor, size in zip(tensors, sizes, strict=True):
        current.append(tensor)
        filled += size
        if filled >= target * (len(groups) + 1) and len(groups) < shards - 1:
            groups.append(current)
            current = []
    return groups + [current] if current else groups


def write_checkpoint(
    out_dir: str | Path,
    config_json: dict[str, Any],
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    shards: int = 1,
    tensors: list[TensorSource] | None = None,
) -> Path:
    """A random checkpoint folder in the hub layout: config, generation config, tokenizer, weights
    (`tensors`, by default every float tensor of the config, seeded random, in `dtype`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = parse_config(config_json)
    (out / "config.json").write_text(json.dumps(config_json, indent=2))
    tokenizer = build_tiny_tokenizer()
    tokenizer.save(str(out / "tokenizer.json"))
    ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    (out / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(ids), indent=2))
    generation = {
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "pad_token_id": ids["<|endoftext|>"],
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.8,
        "top_k": 20,
        "repetition_penalty": 1.05,
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))

    tensors = random_tensors(config, seed, dtype) if tensors is None else tensors
    groups = split_shards(tensors, shards)
    if len(groups) == 1:
        write_safetensors(out / "model.safetensors", groups[0])
        return out
    weight_map = {}
    for k, group in enumerate(groups):
        filename = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        write_safetensors(out / filename, group)
        weight_map.update({tensor.name: filename for tensor in group})
    index = {"metadata": {"total_size": sum(tensor.nbytes for tensor in tensors)}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out


def write_tiny_checkpoint(out_dir: str | Path, variant: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """One of TINY_VARIANTS, seeded."""
    _, shards = TINY_VARIANTS[variant]
    return write_checkpoint(out_dir, tiny_config(variant), seed=seed, dtype=dtype, shards=shards)


def _tokenizer_config(ids: dict[str, int]) -> dict[str, Any]:
    added = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
        for t, i in ids.items()
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": QWEN2_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
