"""The decode seam: one small interface for running a step, chosen once when the session loads.

    PlainSteps      (here)                 one IOBinding call per step; any graph, any device
    CapturedSteps   (runtime/cuda_graph.py) fixed buffers, each step shape captured once as a CUDA graph
    PipelinedSteps  (runtime/cuda_graph.py) as captured, and batch-1 greedy steps queued one ahead

The decode loop (runtime/generate.py) calls the same methods whatever the runner:

    prompt_bucket(length)            the length a fresh batch-1 prompt is padded to, or None
    step(inputs, cache, next_mask)   run one step, advance `cache`, return the last token's scores;
                                     next_mask, when given, is the mask of the decode step that will
                                     follow (a runner may queue that step before the host has chosen)
    launch(inputs, cache)            start a step; returns the call that waits for its scores (a runner
                                     with its own stream returns before the GPU is done: the batcher
                                     hands out the previous step's tokens meanwhile)
    settle(cache)                    wait for anything still queued on `cache`
    uncaptured_step(inputs, cache)   a step run as it is, never captured (runtime/batcher.py's prefills)

Token inputs are small host arrays; past_key_values.* are the cache's device OrtValues; present.* are
bound on the device and handed back to the cache, so on CUDA the cache never crosses to the host.
When the graph computes each row's top-K next-token candidates (contract.CANDIDATE_OUTPUTS), only those
come back to the host; the full logits row stays on the device unless token choice asks for it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import onnxruntime as ort

from artifact import contract

from .kv_cache import KVCache, bind_kv


@dataclass(frozen=True)
class StepInputs:
    input_ids: np.ndarray  # [B, S] int64
    attention_mask: np.ndarray  # [B, T] int64
    position_ids: np.ndarray | None  # [B, S] int64, for left-padded graphs
    # the attention mask's columns that may hold ones (every row is zero past them); None: not known.
    # A runner that keeps the mask on the device uploads only these (and what its last upload left)
    mask_columns: int | None = None


@dataclass
class StepScores:
    """One step's scores: the top-K candidates per row ([B, K] each, host) when the graph makes them,
    and the full last-token logits [B, V] (fp32), copied to the host only when `full()` is called."""

    top_logits: np.ndarray | None
    top_ids: np.ndarray | None
    full: Callable[[], np.ndarray]


class StepRunner(Protocol):
    full_logits_reads: int  # steps whose whole logits row was copied to the host

    def prompt_bucket(self, length: int, context_length: int) -> int | None: ...

    def prompt_buckets(self, longest: int, context_length: int) -> list[int]: ...

    def step(self, inputs: StepInputs, cache: KVCache, next_mask: np.ndarray | None = None) -> StepScores: ...

    def launch(self, inputs: StepInputs, cache: KVCache) -> Callable[[], StepScores]: ...

    def launch_next(self, inputs: StepInputs, cache: KVCache) -> Callable[[], StepScores] | None: ...

    def uncaptured_step(self, inputs: StepInputs, cache: KVCache) -> StepScores: ...

    def settle(self, cache: KVCache) -> None: ...


class PlainSteps:
    """One IOBinding call per step."""

    def __init__(self, session: ort.InferenceSession, graph: contract.GraphEntry, device: str):
        self.session, self.graph, self.device = session, graph, device
        self.candidates = contract.CANDIDATE_OUTPUTS if graph.token_candidates else ()
        self.full_logits_reads = 0

    def prompt_bucket(self, length: int, context_length: int) -> int | None:
        return None  # prompts run at their own length

    def prompt_buckets(self, longest: int, context_length: int) -> list[int]:
        return []

    def step(self, inputs: StepInputs, cache: KVCache, next_mask: np.ndarray | None = None) -> StepScores:
        binding = self.session.io_binding()
        binding.bind_cpu_input(contract.INPUT_IDS, np.ascontiguousarray(inputs.input_ids, dtype=np.int64))
        binding.bind_cpu_input(contract.ATTENTION_MASK, np.ascontiguousarray(inputs.attention_mask, dtype=np.int64))
        names = self.graph.input_names
        if contract.POSITION_IDS in names:
            binding.bind_cpu_input(contract.POSITION_IDS, np.ascontiguousarray(inputs.position_ids, dtype=np.int64))
        if contract.TOTAL_SEQUENCE_LENGTH in names:  # optimized graphs written by earlier versions
            binding.bind_cpu_input(contract.TOTAL_SEQUENCE_LENGTH, np.array(inputs.attention_mask.shape[1], np.int32))
        binding.bind_output(contract.LOGITS, self.device if self.candidates else "cpu")
        for name in self.candidates:
            binding.bind_output(name, "cpu")
        shared = cache.layout == contract.SHARED_BUFFER
        if shared:  # the op writes the new keys and values into the past buffer itself
            bind_kv(binding, cache, self.device)
        else:
            for past, present, value in zip(cache.past_names(), cache.present_names(), cache.values, strict=True):
                binding.bind_ortvalue_input(past, value)
                binding.bind_output(present, self.device, 0)
        self.session.run_with_iobinding(binding, self.run_options())
        outputs = binding.get_outputs()
        if not shared:
            cache.values = outputs[1 + len(self.candidates):]
        return self.scores(outputs[0], [value.numpy() for value in outputs[1 : 1 + len(self.candidates)]])

    def launch(self, inputs: StepInputs, cache: KVCache) -> Callable[[], StepScores]:
        scores = self.step(inputs, cache)  # run to the end here
        return lambda: scores

    def launch_next(self, inputs: StepInputs, cache: KVCache) -> Callable[[], StepScores] | None:
        """The step after the last one launched, fed by its best candidates on the device: only a runner
        with a stream of its own queues steps ahead (cuda_graph.PipelinedSteps)."""
        return None

    def settle(self, cache: KVCache) -> None:
        pass  # every step ran to the end

    def run_options(self) -> ort.RunOptions | None:
        return None

    def scores(self, logits: ort.OrtValue, candidates: list[np.ndarray]) -> StepScores:
        top_logits, top_ids = candidates or (None, None)

        @functools.cache
        def full() -> np.ndarray:  # a deferred copy of the last-token logits rows to the host, made once
            self.full_logits_reads += 1
            return logits.numpy()[:, -1, :].astype(np.float32)

        return StepScores(top_logits, top_ids, full)

    def uncaptured_step(self, inputs: StepInputs, cache: KVCache) -> StepScores:
        """A step no runner captures (the batcher's prefills: a capture per row and length would not pay)."""
        return PlainSteps.step(self, inputs, cache)
