"""An onnxruntime session for one graph and the IOBinding call that runs one step.

Token inputs are small host arrays; past_key_values.* are the cache's device OrtValues; present.* are
bound on the device and handed back to the cache, so on CUDA the cache never crosses to the host.
When the graph computes each row's top-K next-token candidates (manifest `token_candidates`), only
those come back to the host; the full logits row stays on the device unless token choice asks for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import onnxruntime as ort

from .errors import RuntimeInputError
from .cuda_graph import LONGEST_CAPTURED_PROMPT, CapturedStep, DecodePipeline, no_capture
from .cuda_stream import DeviceStream
from .kv_cache import KVCache, new_cache
from .manifest import CANDIDATE_OUTPUTS, TOTAL_LENGTH_INPUT, GraphInfo, Manifest

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
# onnxruntime's sdpa_kernel bits (AttentionBackend): flash 1, memory-efficient 2, cuDNN 8. Unset,
# GroupQueryAttention prefers cuDNN on Hopper; "flash" also lets it fold rotary and the KV append into
# the decode kernel. Memory-efficient attention stays allowed as the fallback for shapes flash refuses.
ATTENTION_KERNELS = {"flash": 1 | 2, "cudnn": 8 | 1 | 2}
SUPPORTED_CONTRACTS = {("concat", "left"), ("shared_buffer", "right")}


@dataclass
class StepScores:
    """One step's scores: the top-K candidates per row ([B, K] each, host) when the graph makes them,
    and the full last-token logits [B, V] (fp32), copied to the host only when `full()` is called."""

    top_logits: np.ndarray | None
    top_ids: np.ndarray | None
    full: Callable[[], np.ndarray]


class GraphSession:
    def __init__(self, graph: GraphInfo, device: str = "cpu", optimize: bool = True, cuda_graph: bool = False,
                 cpu_fallback: bool = False, attention_kernel: str | None = None, capture_prefill: bool | None = None,
                 pipelined_decode: bool | None = None):
        """`cuda_graph` captures the decode step once and replays it (CUDA, shared-buffer graphs only);
        `capture_prefill` also captures fresh batch-1 prompts, one graph per bucket length (default: on
        with `cuda_graph`, see prefill_captured); `pipelined_decode` queues each batch-1 greedy step
        before the host has read the previous one (default: on with `cuda_graph`, see DecodePipeline);
        `cpu_fallback` lets onnxruntime place nodes of a CUDA-optimized graph on the CPU;
        `attention_kernel` ("flash", "cudnn") pins GroupQueryAttention's CUDA kernel family."""
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
        if cuda_graph and (device != "cuda" or graph.kv_layout != "shared_buffer"):
            raise RuntimeInputError("CUDA-graph decoding needs --device cuda and a graph with the shared KV buffer "
                                    "(qwen2-onnx optimize ARTIFACT --target cuda)")
        capture_prefill = prefill_captured(cuda_graph, capture_prefill)
        if attention_kernel is not None and (device != "cuda" or attention_kernel not in ATTENTION_KERNELS):
            raise RuntimeInputError(f"--attention-kernel {attention_kernel!r}: choose one of {sorted(ATTENTION_KERNELS)}, "
                                    "with --device cuda (the CPU has one attention kernel)")
        # onnxruntime computes on a stream of ours, so the decode loop can wait for one step at a time
        self.stream = compute_stream(cuda_graph, pipelined_decode)
        settings = session_settings(graph, device, optimize, cuda_graph, cpu_fallback, attention_kernel,
                                    self.stream.handle if self.stream else None)
        try:
            self.session = ort.InferenceSession(str(graph.path), *settings)
        except Exception as error:  # onnxruntime raises its own types; name the way out
            if "fallback" not in str(error).lower():
                raise
            raise RuntimeInputError(f"onnxruntime would run part of {graph.name!r} on the CPU ({error}); "
                                    "pass --cpu-fallback (Model.load(..., cpu_fallback=True)) to allow it") from error
        self.device = device
        self.cuda_graph = cuda_graph
        self.captures_prefill = capture_prefill  # the decode loop then pads fresh batch-1 prompts to buckets
        self.pipelines_decode = self.stream is not None  # batch-1 greedy steps are queued ahead (decode loop)
        self.graph = graph
        self._vocab = self.session.get_outputs()[0].shape[-1]
        self.full_logits_reads = 0  # steps whose whole logits row was copied to the host
        self._spare: KVCache | None = None  # the last shared-buffer cache, reused by the next request that fits

    def empty_cache(self, manifest: Manifest, batch: int, capacity: int) -> KVCache:
        """A cache for `batch` rows. Shared buffers of the last request are handed out again when batch and
        capacity match and nobody holds them: their CUDA graph stays captured (onnxruntime keeps every
        captured graph, so a capture per request would also pile them up) and no device memory is
        allocated. Old contents need no clearing: the attention mask says which positions hold keys."""
        if self.graph.kv_layout != "shared_buffer":
            return new_cache(manifest, self.graph, batch, self.device, capacity)
        spare = self._spare
        if spare is None or spare.busy or len(spare.tokens) != batch or spare.capacity != capacity:
            spare = self._spare = new_cache(manifest, self.graph, batch, self.device, capacity)
        spare.tokens = [[] for _ in range(batch)]  # its row count stays `batch`
        spare.busy = True  # handed out: the decode loop that runs on it releases it when it ends
        return spare

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray | None,
             cache: KVCache) -> StepScores:
        """Run one call on each row's new tokens and advance `cache`; returns the last token's scores."""
        (batch, tokens), width = input_ids.shape, attention_mask.shape[1]
        if self._captured(batch, tokens, width, cache):
            if tokens not in cache.captured:
                cache.captured[tokens] = CapturedStep(self.session, cache, batch, tokens, width, self._vocab,
                                                      self.graph, self.device)
            logits, candidates = cache.captured[tokens].step(self.session, input_ids, attention_mask, self.stream)
            return self._scores(logits, candidates)
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(attention_mask, dtype=np.int64))
        if "position_ids" in self.graph.input_names:
            binding.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, dtype=np.int64))
        if TOTAL_LENGTH_INPUT in self.graph.input_names:
            binding.bind_cpu_input(TOTAL_LENGTH_INPUT, np.array(attention_mask.shape[1], np.int32))
        for name, value in zip(cache.past_names(), cache.values, strict=True):
            binding.bind_ortvalue_input(name, value)
        candidates = CANDIDATE_OUTPUTS if self.graph.token_candidates else ()
        binding.bind_output("logits", self.device if candidates else "cpu")
        for name in candidates:
            binding.bind_output(name, "cpu")
        shared = cache.layout == "shared_buffer"
        for name, value in zip(cache.present_names(), cache.values, strict=True):
            if shared:  # the op writes the new keys and values into the past buffer itself
                binding.bind_ortvalue_output(name, value)
            else:
                binding.bind_output(name, self.device, 0)
        self.session.run_with_iobinding(binding, no_capture() if self.cuda_graph else None)
        outputs = binding.get_outputs()
        if not shared:
            cache.values = outputs[1 + len(candidates):]
        return self._scores(outputs[0], [value.numpy() for value in outputs[1 : 1 + len(candidates)]])

    def decode_pipeline(self, cache: KVCache) -> DecodePipeline:
        """The two steps that feed each other for `cache`'s batch-1 greedy decode (made once per cache)."""
        if cache.pipeline is None:
            cache.pipeline = DecodePipeline(self.session, cache, cache.capacity, self._vocab, self.graph, self.stream, self.device)
        return cache.pipeline

    def _captured(self, batch: int, tokens: int, width: int, cache: KVCache) -> bool:
        """Replayed as a CUDA graph: decode steps (mask of the buffer's width) and, when prefill is
        captured, fresh batch-1 prompts (mask as wide as the prompt, a bucket length)."""
        decode = tokens == 1 and width == cache.capacity
        prompt = self.captures_prefill and batch == 1 and 1 < tokens == width <= LONGEST_CAPTURED_PROMPT
        return self.cuda_graph and (decode or prompt)

    def _scores(self, logits: ort.OrtValue, candidates: list[np.ndarray]) -> StepScores:
        top_logits, top_ids = candidates or (None, None)
        return StepScores(top_logits, top_ids, self.full_reader(logits))

    def full_reader(self, logits: ort.OrtValue) -> Callable[[], np.ndarray]:
        """A deferred copy of the last-token logits row to the host, counted in full_logits_reads."""
        def full() -> np.ndarray:
            self.full_logits_reads += 1
            return logits.numpy()[:, -1, :].astype(np.float32)

        return full


def prefill_captured(cuda_graph: bool, capture_prefill: bool | None) -> bool:
    """Whether fresh batch-1 prompts are captured too: by default whenever decode is. On the H100 a
    captured prompt bucket took 1.5-3x less time than the uncaptured prefill at 0.5B shapes and up to
    20% less for prompts of up to 512 tokens at 7B, about the same beyond (tools/gpu_notes.md)."""
    if capture_prefill and not cuda_graph:
        raise RuntimeInputError("capturing prefill needs CUDA-graph decoding too: pass --cuda-graph as well")
    return cuda_graph if capture_prefill is None else capture_prefill


def compute_stream(cuda_graph: bool, pipelined_decode: bool | None, make: Callable[[], Any] = DeviceStream) -> Any:
    """The stream pipelined decoding needs (cuda_stream.DeviceStream), or None without it. By default
    pipelining comes with `cuda_graph` where the CUDA driver library can be opened, and is simply off
    where it cannot; asked for explicitly, a failure is an error that says so."""
    if pipelined_decode and not cuda_graph:
        raise RuntimeInputError("pipelined decoding needs CUDA-graph decoding too: pass --cuda-graph as well")
    if not cuda_graph or pipelined_decode is False:
        return None
    try:
        return make()
    except (OSError, RuntimeError) as error:  # no libcuda.so.1 here, or the driver refused
        if pipelined_decode:
            raise RuntimeInputError(f"pipelined decoding needs the CUDA driver library (libcuda.so.1): {error}; "
                                    "pass --no-pipelined-decode (pipelined_decode=False)") from error
        return None


def session_settings(graph: GraphInfo, device: str, optimize: bool, cuda_graph: bool, cpu_fallback: bool,
                     attention_kernel: str | None = None, stream: int | None = None) -> tuple[ort.SessionOptions, list]:
    """Session options and providers. A graph optimized for CUDA must run every node on CUDA: the CPU
    fallback is switched off, so a node onnxruntime would place on the CPU is an error at load, not a
    silent host round trip in every step."""
    options = ort.SessionOptions()
    if not optimize:  # tests switch onnxruntime's own rewrites off so they cannot hide ours
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if device == "cpu":
        return options, [PROVIDERS["cpu"]]
    # weights get exact-size allocations and the arena grows by what is asked, not to the next power of
    # two: peak memory stays near weights + KV + activations
    options.add_session_config_entry("session.use_device_allocator_for_initializers", "1")
    cuda_options = {"arena_extend_strategy": "kSameAsRequested", **({"enable_cuda_graph": "1"} if cuda_graph else {}),
                    **({"sdpa_kernel": str(ATTENTION_KERNELS[attention_kernel])} if attention_kernel else {}),
                    **({"user_compute_stream": str(stream)} if stream else {})}
    cuda = (PROVIDERS["cuda"], cuda_options)
    if graph.target == "cuda" and not cpu_fallback:
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        return options, [cuda]
    return options, [cuda, PROVIDERS["cpu"]]
