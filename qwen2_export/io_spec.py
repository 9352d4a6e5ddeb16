"""The portable graph's inputs and outputs as tracing needs them: the contract's specs with torch dtypes,
and example inputs.

Names and dims come from artifact.contract (the optimum / transformers.js convention, so existing
onnxruntime loops can drive the graph); this module only adds what tracing needs.
"""

from __future__ import annotations

import torch

from artifact import contract

from .config import Qwen2Config

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.int64: "int64"}
# by ONNX element type number (contract.ELEMENT_TYPES), as onnx_ir's DataType values are
TORCH_DTYPES = {contract.ELEMENT_TYPES[name]: dtype for dtype, name in DTYPE_NAMES.items()}


def graph_inputs(config: Qwen2Config, dtype: torch.dtype) -> tuple[contract.TensorSpec, ...]:
    if config.task != contract.TEXT_GENERATION:
        return contract.classification_inputs()
    return contract.portable_inputs(config.num_hidden_layers, config.num_key_value_heads, config.head_dim, DTYPE_NAMES[dtype])


def graph_outputs(config: Qwen2Config, dtype: torch.dtype) -> tuple[contract.TensorSpec, ...]:
    if config.task != contract.TEXT_GENERATION:
        return contract.classification_outputs(config.task, config.head.num_labels if config.head else 0, config.hidden_size)
    return contract.portable_outputs(config.num_hidden_layers, config.num_key_value_heads, config.head_dim,
                                     config.vocab_size, DTYPE_NAMES[dtype])


def example_inputs(config: Qwen2Config, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, ...]:
    """Tracing inputs with distinct sizes > 1 (B=2, S=3, P=4) so no dim gets specialised."""
    batch, new, past = 2, 3, 4
    if config.task != contract.TEXT_GENERATION:
        return (torch.zeros(batch, new, dtype=torch.int64, device=device), torch.ones(batch, new, dtype=torch.int64, device=device))
    kv_shape = (batch, config.num_key_value_heads, past, config.head_dim)
    return (
        torch.zeros(batch, new, dtype=torch.int64, device=device),
        torch.ones(batch, past + new, dtype=torch.int64, device=device),
        torch.arange(past, past + new, device=device)[None].expand(batch, new).contiguous(),
        # one tensor object per input: torch.export treats a repeated object as one aliased input
        *(torch.zeros(kv_shape, dtype=dtype, device=device) for _ in range(2 * config.num_hidden_layers)),
    )
