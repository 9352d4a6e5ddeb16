"""Decode steps captured once as a CUDA graph and replayed (onnxruntime's `enable_cuda_graph`).

A replay reuses the captured kernels and every buffer address, so a decode step must keep its shapes
and bindings: the KV cache is the shared buffer (fixed capacity), the attention mask has the buffer's
width (runtime/padding.py), and input_ids, attention_mask, logits and the token candidates live in
device buffers that are bound once and overwritten in place each step. Prefill runs in the same
session with gpu_graph_id -1, which onnxruntime never captures.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnxruntime as ort

from .kv_cache import KVCache
from .manifest import CANDIDATE_OUTPUTS, TOTAL_LENGTH_INPUT, GraphInfo

_graph_ids = itertools.count(1)  # one captured graph per decode buffer set


def no_capture() -> ort.RunOptions:
    options = ort.RunOptions()
    options.add_run_config_entry("gpu_graph_id", "-1")
    return options


class CapturedDecode:
    """Fixed device buffers and a binding for the decode steps of one KV cache."""

    def __init__(self, session: ort.InferenceSession, cache: KVCache, batch: int, vocab: int, graph: GraphInfo):
        assert cache.capacity is not None, "graph capture needs the shared KV buffer"

        def device_buffer(shape: list[int], dtype: type) -> ort.OrtValue:
            return ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, "cuda", 0)

        self.input_ids = device_buffer([batch, 1], np.int64)
        self.attention_mask = device_buffer([batch, cache.capacity], np.int64)
        self.logits = device_buffer([batch, 1, vocab], np.float32)
        # GroupQueryAttention reads the total length from host memory; it is the capacity at every step
        total_length = ort.OrtValue.ortvalue_from_numpy(np.array(cache.capacity, np.int32))
        k = graph.token_candidates
        self.candidates = [device_buffer([batch, k], dtype) for dtype in (np.float32, np.int64)] if k else []
        self.binding = session.io_binding()
        self.binding.bind_ortvalue_input("input_ids", self.input_ids)
        self.binding.bind_ortvalue_input("attention_mask", self.attention_mask)
        if TOTAL_LENGTH_INPUT in graph.input_names:
            self.binding.bind_ortvalue_input(TOTAL_LENGTH_INPUT, total_length)
        self._total_length = total_length  # the binding does not keep it alive
        for name, value in zip(cache.past_names(), cache.values, strict=True):
            self.binding.bind_ortvalue_input(name, value)
        self.binding.bind_ortvalue_output("logits", self.logits)
        for name, value in zip(CANDIDATE_OUTPUTS, self.candidates, strict=False):
            self.binding.bind_ortvalue_output(name, value)
        for name, value in zip(cache.present_names(), cache.values, strict=True):
            self.binding.bind_ortvalue_output(name, value)
        self.run_options = ort.RunOptions()
        self.run_options.add_run_config_entry("gpu_graph_id", str(next(_graph_ids)))

    def step(self, session: ort.InferenceSession, input_ids: np.ndarray,
             attention_mask: np.ndarray) -> tuple[ort.OrtValue, list[np.ndarray]]:
        """Write this step's inputs into the bound buffers, run (capture or replay); returns the device
        logits and the candidates copied to the host (empty when the graph has none)."""
        self.input_ids.update_inplace(np.ascontiguousarray(input_ids, dtype=np.int64))
        self.attention_mask.update_inplace(np.ascontiguousarray(attention_mask, dtype=np.int64))
        session.run_with_iobinding(self.binding, self.run_options)
        return self.logits, [value.numpy() for value in self.candidates]
