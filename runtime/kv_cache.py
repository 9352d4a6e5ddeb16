"""KV-cache buffers owned by the runtime, kept on the session's device between steps.

concat (portable graph): present.* = concat(past, new) are bound on the device and become the next
    step's past_key_values.*; they never visit the host.
shared_buffer (GroupQueryAttention graphs): one buffer per layer and kind of `capacity` positions,
    bound as both past_key_values.* and present.*; the op writes new keys in place, so shapes stay
    fixed from step to step.
A cache holds its buffers and the token ids whose keys and values they hold per row, so a chat can
reuse it when the next prompt extends them. Nothing else: captured steps belong to the step runner.
A shared buffer's rows are contiguous, so `view` gives a cache of some of its rows, bound by address:
the batcher (runtime/batcher.py) prefills a joining request in its row and decodes the first rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnxruntime as ort

from artifact import contract


@dataclass(eq=False)  # compared and hashed by identity: step runners key their captured steps by cache
class KVCache:
    values: list[ort.OrtValue]  # key_0, value_0, key_1, ... each [B, Hkv, length or capacity, Dh]
    layout: str
    capacity: int | None = None  # shared_buffer only
    tokens: list[list[int]] = field(default_factory=list)  # ids whose keys and values are held, per row
    rows: tuple[int, int] | None = None  # a view: (first row, row count) of `values`; None: every row

    def view(self, first: int, count: int) -> "KVCache":
        """Rows [first, first + count) of this shared buffer, as a cache of their own (same memory)."""
        assert self.layout == contract.SHARED_BUFFER and self.rows is None
        return KVCache(self.values, self.layout, self.capacity, [[] for _ in range(count)], (first, count))

    def past_names(self) -> list[str]:
        return contract.kv_names(len(self.values) // 2, contract.PAST)

    def present_names(self) -> list[str]:
        return contract.kv_names(len(self.values) // 2, contract.PRESENT)

    def reusable_prefix(self, prompt: list[int], needed_capacity: int) -> int:
        """How many leading ids of a batch-1 `prompt` are already cached (0 when it does not extend them
        or the buffer is too small for the request)."""
        if len(self.tokens) != 1 or (self.capacity is not None and self.capacity < needed_capacity):
            return 0
        held = self.tokens[0]
        return len(held) if len(held) < len(prompt) and prompt[: len(held)] == held else 0


def bind_kv(binding: ort.IOBinding, cache: KVCache, device: str) -> None:
    """Bind the cache's tensors as past_key_values.*, and for a shared buffer also as present.* (the op
    writes into them): whole OrtValues, or a view's rows by address."""
    shared = cache.layout == contract.SHARED_BUFFER
    for past, present, value in zip(cache.past_names(), cache.present_names(), cache.values, strict=True):
        if cache.rows is None:
            binding.bind_ortvalue_input(past, value)
            if shared:
                binding.bind_ortvalue_output(present, value)
            continue
        (first, count), shape = cache.rows, value.shape()
        address = value.data_ptr() + first * value.tensor_size_in_bytes() // shape[0]
        for bind, name in ((binding.bind_input, past), (binding.bind_output, present)):
            bind(name, device, 0, value.element_type(), [count, *shape[1:]], address)


def new_cache(manifest: contract.Manifest, graph: contract.GraphEntry, batch: int, device: str, capacity: int) -> KVCache:
    """Empty past tensors (concat) or zeroed buffers of `capacity` positions (shared_buffer) on `device`."""
    model = manifest.model
    length = capacity if graph.kv_layout == contract.SHARED_BUFFER else 0
    shape = [batch, model.num_key_value_heads, length, model.head_dim]
    element_type = contract.ELEMENT_TYPES[graph.activation_dtype or manifest.dtype]
    values = [ort.OrtValue.ortvalue_from_shape_and_type(shape, element_type, device, 0)
              for _ in range(2 * model.num_hidden_layers)]
    return KVCache(values, graph.kv_layout, capacity if length else None, [[] for _ in range(batch)])


class KVPool:
    """Hands out caches and keeps the last one returned for the next request of the same batch and
    capacity: its captured graphs stay valid (onnxruntime keeps every captured graph, so a capture per
    request would also pile them up) and no device memory is allocated. Old contents need no clearing:
    the attention mask says which positions hold keys. A cache handed out (to a decode loop, or kept
    by a chat) is never handed out again until it is returned."""

    def __init__(self, manifest: contract.Manifest, graph: contract.GraphEntry, device: str):
        self.manifest, self.graph, self.device = manifest, graph, device
        self.spare: KVCache | None = None  # returned, free for the next request that fits

    def take(self, batch: int, capacity: int) -> KVCache:
        spare = self.spare
        if self.graph.kv_layout != contract.SHARED_BUFFER or spare is None or len(spare.tokens) != batch or spare.capacity != capacity:
            return new_cache(self.manifest, self.graph, batch, self.device, capacity)
        self.spare = None
        spare.tokens = [[] for _ in range(batch)]
        return spare

    def give_back(self, cache: KVCache) -> None:
        if cache.layout == contract.SHARED_BUFFER:
            self.spare = cache
