"""KV-cache buffers owned by the runtime, kept on the session's device between steps.

concat (portable graph): present.* = concat(past, new) are bound on the device and become the next
    step's past_key_values.*; they never visit the host.
shared_buffer (GroupQueryAttention graphs): one buffer per layer and kind of `capacity` positions,
    bound as both past_key_values.* and present.*; the op writes new keys in place, so shapes stay
    fixed from step to step.
The cache also remembers the token ids it holds per row, so a chat can reuse it when the next prompt
extends them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import onnxruntime as ort

from .manifest import GraphInfo, Manifest

# ONNX TensorProto element types: bf16 has no numpy type, so allocate by ONNX type id
ONNX_ELEMENT_TYPES = {"float32": 1, "float16": 10, "bfloat16": 16}


@dataclass
class KVCache:
    values: list[ort.OrtValue]  # key_0, value_0, key_1, ... each [B, Hkv, length or capacity, Dh]
    layout: str
    capacity: int | None = None  # shared_buffer only
    tokens: list[list[int]] = field(default_factory=list)  # ids whose keys and values are held, per row
    captured: dict[int, Any] = field(default_factory=dict)  # new tokens per row -> cuda_graph.CapturedStep
    pipeline: Any = None  # cuda_graph.DecodePipeline of this cache's batch-1 greedy decode, made on first use
    busy: bool = False  # a decode loop runs on it or a chat keeps it: the session must not hand it out again

    def past_names(self) -> list[str]:
        return [f"past_key_values.{i // 2}.{'key' if i % 2 == 0 else 'value'}" for i in range(len(self.values))]

    def present_names(self) -> list[str]:
        return [name.replace("past_key_values", "present") for name in self.past_names()]

    def reusable_prefix(self, prompt: list[int], needed_capacity: int) -> int:
        """How many leading ids of a batch-1 `prompt` are already cached (0 when it does not extend them
        or the buffer is too small for the request)."""
        if len(self.tokens) != 1 or (self.capacity is not None and self.capacity < needed_capacity):
            return 0
        held = self.tokens[0]
        return len(held) if len(held) < len(prompt) and prompt[: len(held)] == held else 0


def new_cache(manifest: Manifest, graph: GraphInfo, batch: int, device: str, capacity: int) -> KVCache:
    """Empty past tensors (concat) or zeroed buffers of `capacity` positions (shared_buffer) on `device`."""
    length = capacity if graph.kv_layout == "shared_buffer" else 0
    shape = [batch, manifest.num_kv_heads, length, manifest.head_dim]
    element_type = ONNX_ELEMENT_TYPES[graph.activation_dtype or manifest.dtype]
    values = [ort.OrtValue.ortvalue_from_shape_and_type(shape, element_type, device, 0) for _ in range(2 * manifest.num_layers)]
    return KVCache(values, graph.kv_layout, capacity if length else None, [[] for _ in range(batch)])
