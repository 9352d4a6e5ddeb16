"""KV-cache buffers owned by the runtime, kept on the session's device between steps.

Concat layout (the portable graph): each step's present.* outputs are bound on the device and become
the next step's past_key_values.* without touching the host. The cache also remembers the token ids
it holds per row, so a chat can reuse it when the next prompt extends them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnxruntime as ort

from .manifest import Manifest

# ONNX TensorProto element types: bf16 has no numpy type, so allocate by ONNX type id
ONNX_ELEMENT_TYPES = {"float32": 1, "float16": 10, "bfloat16": 16}


@dataclass
class KVCache:
    values: list[ort.OrtValue]  # key_0, value_0, key_1, ... each [B, Hkv, P, Dh]
    tokens: list[list[int]] = field(default_factory=list)  # ids whose keys and values are held, per row

    @property
    def length(self) -> int:
        return self.values[0].shape()[2]

    def past_names(self) -> list[str]:
        return [f"past_key_values.{i // 2}.{'key' if i % 2 == 0 else 'value'}" for i in range(len(self.values))]

    def reusable_prefix(self, prompt: list[int]) -> int:
        """How many leading ids of a batch-1 `prompt` are already cached (0 when it does not extend them)."""
        if len(self.tokens) != 1:
            return 0
        held = self.tokens[0]
        return len(held) if len(held) < len(prompt) and prompt[: len(held)] == held else 0


def empty_cache(manifest: Manifest, batch: int, device: str) -> KVCache:
    """Zero-length past tensors on `device` for a first step."""
    shape = [batch, manifest.num_kv_heads, 0, manifest.head_dim]
    element_type = ONNX_ELEMENT_TYPES[manifest.dtype]
    values = [ort.OrtValue.ortvalue_from_shape_and_type(shape, element_type, device, 0) for _ in range(2 * manifest.num_layers)]
    return KVCache(values, [[] for _ in range(batch)])
