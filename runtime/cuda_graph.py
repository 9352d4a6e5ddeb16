"""Steps captured once as a CUDA graph and replayed (onnxruntime's `enable_cuda_graph`).

A replay reuses the captured kernels and every buffer address, so a step must keep its shapes and
bindings: the KV cache is the shared buffer (fixed capacity), the attention mask has the buffer's
width (runtime/padding.py), and input_ids, attention_mask, logits and the token candidates live in
device buffers that are bound once and overwritten in place each step. One graph is captured per
number of new tokens a step feeds: 1 for decode (mask of the buffer's width) and, when prefill is
captured too, each bucket length a fresh batch-1 prompt is padded to (mask of that length). Other
prefills run with gpu_graph_id -1, never captured.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnxruntime as ort

from .kv_cache import KVCache
from .manifest import CANDIDATE_OUTPUTS, TOTAL_LENGTH_INPUT, GraphInfo

_graph_ids = itertools.count(1)  # one captured graph per step shape and KV buffer set
LONGEST_CAPTURED_PROMPT = 4096  # longer prompts are GPU-bound: a capture's memory would not pay


def no_capture() -> ort.RunOptions:
    options = ort.RunOptions()
    options.add_run_config_entry("gpu_graph_id", "-1")
    return options


class CapturedStep:
    """Fixed buffers and a binding for the steps of one KV cache that feed `tokens` new tokens per row
    with a mask `width` wide.

    A step moves two small transfers, not four: input_ids and the attention mask are two views of one
    int64 buffer (one upload), and the candidates' ids and logits two views of another (one download);
    each transfer costs a synchronous copy's latency whatever its size. `device` is "cuda" for capture;
    the same bookkeeping runs on "cpu" (tests), where onnxruntime ignores the graph id."""

    def __init__(self, session: ort.InferenceSession, cache: KVCache, batch: int, tokens: int, width: int,
                 vocab: int, graph: GraphInfo, device: str = "cuda"):
        assert cache.capacity is not None, "graph capture needs the shared KV buffer"

        def buffer(shape: list[int], dtype: type) -> ort.OrtValue:
            return ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, device, 0)

        def bind_view(bind, name: str, base: ort.OrtValue, offset_bytes: int, dtype: type, shape: list[int]) -> None:
            bind(name, device, 0, dtype, shape, base.data_ptr() + offset_bytes)

        self.batch, self.width, self.k = batch, width, graph.token_candidates
        self.binding = session.io_binding()
        self.inputs = buffer([batch * (tokens + self.width)], np.int64)  # [input_ids | attention_mask]
        bind_view(self.binding.bind_input, "input_ids", self.inputs, 0, np.int64, [batch, tokens])
        bind_view(self.binding.bind_input, "attention_mask", self.inputs, 8 * batch * tokens, np.int64, [batch, self.width])
        # GroupQueryAttention reads the total length from host memory: the mask's width, fixed per graph
        self._total_length = ort.OrtValue.ortvalue_from_numpy(np.array(self.width, np.int32))  # kept alive here
        if TOTAL_LENGTH_INPUT in graph.input_names:
            self.binding.bind_ortvalue_input(TOTAL_LENGTH_INPUT, self._total_length)
        for name, value in zip(cache.past_names(), cache.values, strict=True):
            self.binding.bind_ortvalue_input(name, value)
        self.logits = buffer([batch, 1, vocab], np.float32)
        self.binding.bind_ortvalue_output("logits", self.logits)
        self.candidates = None
        if self.k:  # [top_ids | top_logits], the fp32 half padded to whole int64 words
            cells = batch * self.k
            self.candidates = buffer([cells + -(-cells // 2)], np.int64)
            logits_name, ids_name = CANDIDATE_OUTPUTS
            bind_view(self.binding.bind_output, ids_name, self.candidates, 0, np.int64, [batch, self.k])
            bind_view(self.binding.bind_output, logits_name, self.candidates, 8 * cells, np.float32, [batch, self.k])
        for name, value in zip(cache.present_names(), cache.values, strict=True):
            self.binding.bind_ortvalue_output(name, value)
        self.run_options = ort.RunOptions()
        self.run_options.add_run_config_entry("gpu_graph_id", str(next(_graph_ids)))

    def step(self, session: ort.InferenceSession, input_ids: np.ndarray,
             attention_mask: np.ndarray) -> tuple[ort.OrtValue, list[np.ndarray]]:
        """Write this step's inputs into the bound buffer, run (capture or replay); returns the device
        logits and the candidates [top_logits, top_ids] on the host (empty when the graph has none)."""
        inputs = np.concatenate([np.ravel(input_ids), np.ravel(attention_mask)]).astype(np.int64, copy=False)
        self.inputs.update_inplace(inputs)
        session.run_with_iobinding(self.binding, self.run_options)
        if self.candidates is None:
            return self.logits, []
        cells = self.batch * self.k
        words = self.candidates.numpy()
        top_ids = words[:cells].reshape(self.batch, self.k)
        top_logits = words[cells:].view(np.float32)[:cells].reshape(self.batch, self.k)
        return self.logits, [top_logits, top_ids]
