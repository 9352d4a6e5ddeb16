"""An onnxruntime session for one graph and the IOBinding call that runs one step.

Token inputs are small host arrays; past_key_values.* are the cache's device OrtValues; present.* are
bound on the device and handed back to the cache, so on CUDA the cache never crosses to the host.
Only the last position's logits come back to the host.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from .errors import RuntimeInputError
from .cuda_graph import CapturedDecode, no_capture
from .kv_cache import KVCache
from .manifest import GraphInfo

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
SUPPORTED_CONTRACTS = {("concat", "left"), ("shared_buffer", "right")}


class GraphSession:
    def __init__(self, graph: GraphInfo, device: str = "cpu", optimize: bool = True, cuda_graph: bool = False):
        """`cuda_graph` captures the decode step once and replays it (CUDA, shared-buffer graphs only)."""
        if device not in PROVIDERS:
            raise RuntimeInputError(f"--device {device!r} is not supported; choose one of {sorted(PROVIDERS)}")
        if PROVIDERS[device] not in ort.get_available_providers():
            raise RuntimeInputError(
                f"onnxruntime here has no {PROVIDERS[device]}; for --device cuda install onnxruntime-gpu "
                "(pip install 'qwen2-onnx[cuda]') instead of onnxruntime"
            )
        if (graph.kv_layout, graph.padding) not in SUPPORTED_CONTRACTS:
            raise RuntimeInputError(
                f"graph {graph.name!r} uses KV layout {graph.kv_layout!r} with {graph.padding!r} padding, which this "
                f"runtime does not drive (it knows {sorted(SUPPORTED_CONTRACTS)}); update qwen2-onnx"
            )
        options = ort.SessionOptions()
        if not optimize:  # tests switch onnxruntime's own rewrites off so they cannot hide ours
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if cuda_graph and (device != "cuda" or graph.kv_layout != "shared_buffer"):
            raise RuntimeInputError("CUDA-graph decoding needs --device cuda and a graph with the shared KV buffer "
                                    "(qwen2-onnx optimize ARTIFACT --target cuda)")
        cuda_options = {"enable_cuda_graph": "1"} if cuda_graph else {}
        providers = [PROVIDERS[device]] if device == "cpu" else [(PROVIDERS[device], cuda_options), PROVIDERS["cpu"]]
        self.device = device
        self.cuda_graph = cuda_graph
        self.graph = graph
        self.session = ort.InferenceSession(str(graph.path), options, providers=providers)
        self._vocab = self.session.get_outputs()[0].shape[-1]

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray | None,
             cache: KVCache) -> np.ndarray:
        """Run one call; returns the logits of each row's last token [B, V] (float32, host) and advances `cache`."""
        if self.cuda_graph and input_ids.shape[1] == 1 and attention_mask.shape[1] == cache.capacity:
            if cache.captured is None:
                cache.captured = CapturedDecode(self.session, cache, len(input_ids), self._vocab)
            return cache.captured.step(self.session, input_ids, attention_mask)
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(attention_mask, dtype=np.int64))
        if "position_ids" in self.graph.input_names:
            binding.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, dtype=np.int64))
        for name, value in zip(cache.past_names(), cache.values, strict=True):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        shared = cache.layout == "shared_buffer"
        for name, value in zip(cache.present_names(), cache.values, strict=True):
            if shared:  # the op writes the new keys and values into the past buffer itself
                binding.bind_ortvalue_output(name, value)
            else:
                binding.bind_output(name, self.device, 0)
        self.session.run_with_iobinding(binding, no_capture() if self.cuda_graph else None)
        logits, *presents = binding.get_outputs()
        if not shared:
            cache.values = presents
        return logits.numpy()[:, -1, :].astype(np.float32)
