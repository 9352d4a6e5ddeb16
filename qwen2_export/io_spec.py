"""The graph's inputs and outputs, described once: names, element types and symbolic dims.

Follows the optimum / transformers.js convention so existing onnxruntime loops can drive the graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import Qwen2Config

ONNX_TYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.int64: "int64"}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    dims: tuple[str | int, ...]

    def describe(self) -> dict:
        """JSON form for the manifest."""
        return {"name": self.name, "dtype": ONNX_TYPE_NAMES[self.dtype], "dims": list(self.dims)}


def kv_names(layers: int, prefix: str) -> list[str]:
    """`past_key_values.{i}.key|value` or `present.{i}.key|value`, key before value, layer by layer."""
    return [f"{prefix}.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def graph_inputs(config: Qwen2Config, dtype: torch.dtype) -> list[TensorSpec]:
    kv_dims = ("batch_size", config.num_key_value_heads, "past_sequence_length", config.head_dim)
    return [
        TensorSpec("input_ids", torch.int64, ("batch_size", "sequence_length")),
        TensorSpec("attention_mask", torch.int64, ("batch_size", "total_sequence_length")),
        TensorSpec("position_ids", torch.int64, ("batch_size", "sequence_length")),
        *(TensorSpec(name, dtype, kv_dims) for name in kv_names(config.num_hidden_layers, "past_key_values")),
    ]


def graph_outputs(config: Qwen2Config, dtype: torch.dtype) -> list[TensorSpec]:
    kv_dims = ("batch_size", config.num_key_value_heads, "total_sequence_length", config.head_dim)
    return [
        TensorSpec("logits", torch.float32, ("batch_size", "sequence_length", config.vocab_size)),
        *(TensorSpec(name, dtype, kv_dims) for name in kv_names(config.num_hidden_layers, "present")),
    ]


def example_inputs(config: Qwen2Config, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, ...]:
    """Tracing inputs with distinct sizes > 1 (B=2, S=3, P=4) so no dim gets specialised."""
    batch, new, past = 2, 3, 4
    kv_shape = (batch, config.num_key_value_heads, past, config.head_dim)
    return (
        torch.zeros(batch, new, dtype=torch.int64, device=device),
        torch.ones(batch, past + new, dtype=torch.int64, device=device),
        torch.arange(past, past + new, device=device)[None].expand(batch, new).contiguous(),
        # one tensor object per input: torch.export treats a repeated object as one aliased input
        *(torch.zeros(kv_shape, dtype=dtype, device=device) for _ in range(2 * config.num_hidden_layers)),
    )
