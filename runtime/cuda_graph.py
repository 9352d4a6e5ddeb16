"""Steps captured once as a CUDA graph and replayed (onnxruntime's `enable_cuda_graph`).

A replay reuses the captured kernels and every buffer address, so a step must keep its shapes and
bindings: the KV cache is the shared buffer (fixed capacity), the attention mask has the buffer's
width (runtime/padding.py), and input_ids, attention_mask, logits and the token candidates live in
device buffers that are bound once and overwritten in place each step. One graph is captured per
cache and number of new tokens a step feeds: 1 for decode (mask of the buffer's width) and each bucket
length a fresh batch-1 prompt is padded to (mask of that length). Other prefills (chat continuations,
batches, chunks) run with gpu_graph_id -1, never captured.

CapturedSteps does this; PipelinedSteps also queues batch-1 greedy decode steps one ahead (DecodePipeline).
On the CPU, onnxruntime ignores the graph ids: the same bookkeeping runs there uncaptured (tests).
Measured on the H100 (tools/gpu_notes.md): captured prompt buckets took 1.5-3x less time than uncaptured
prefill at 0.5B shapes and up to 20% less up to 512 tokens at 7B; pipelining took 0.5B decode from 1.59
to 1.35 ms/token; both are therefore always on with `cuda_graph`.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any, Callable

import numpy as np
import onnxruntime as ort

from artifact import contract

from .kv_cache import KVCache, bind_kv
from .steps import PlainSteps, StepInputs, StepScores

_graph_ids = itertools.count(1)  # one captured graph per step shape and KV buffer set
LONGEST_CAPTURED_PROMPT = 4096  # longer prompts are GPU-bound: a capture's memory would not pay


def captured_prompt_length(length: int, context_length: int) -> int | None:
    """The bucket a prompt of `length` tokens is padded to for a captured prefill: four lengths per
    octave (at most 25% padding, 16 at least), so few graphs serve every length; None past
    LONGEST_CAPTURED_PROMPT or the context, where the GPU work outweighs the host's and a capture's
    memory would not pay."""
    if length <= 16:
        bucket = 16
    else:
        step = (1 << (length - 1).bit_length()) // 8  # a quarter of the octave [top / 2, top]
        bucket = -(-length // step) * step
    return bucket if bucket <= min(LONGEST_CAPTURED_PROMPT, context_length - 1) else None


def captured_prompt_buckets(longest: int, context_length: int) -> list[int]:
    """Every bucket length a prompt of at most `longest` tokens can be padded to."""
    buckets = {captured_prompt_length(n, context_length) for n in range(1, longest + 1)}
    return sorted(bucket for bucket in buckets if bucket is not None)


class CapturedSteps(PlainSteps):
    """Decode steps and fresh batch-1 prompt buckets replayed from captured graphs; other steps plain."""

    def __init__(self, session: ort.InferenceSession, graph: contract.GraphEntry, device: str):
        super().__init__(session, graph, device)
        self.vocab = session.get_outputs()[0].shape[-1]
        self.captured: weakref.WeakKeyDictionary[KVCache, dict[int, CapturedStep]] = weakref.WeakKeyDictionary()
        self.uncaptured = ort.RunOptions()  # a step on this session that is not captured
        self.uncaptured.add_run_config_entry("gpu_graph_id", "-1")

    def prompt_bucket(self, length: int, context_length: int) -> int | None:
        return captured_prompt_length(length, context_length)

    def prompt_buckets(self, longest: int, context_length: int) -> list[int]:
        return captured_prompt_buckets(longest, context_length)

    def step(self, inputs: StepInputs, cache: KVCache, next_mask: np.ndarray | None = None) -> StepScores:
        (batch, tokens), width = inputs.input_ids.shape, inputs.attention_mask.shape[1]
        decode = tokens == 1 and width == cache.capacity
        prompt = batch == 1 and 1 < tokens == width <= LONGEST_CAPTURED_PROMPT
        if not (decode or prompt):
            return super().step(inputs, cache)
        logits, candidates = self.captured_step(cache, batch, tokens, width).step(
            self.session, inputs.input_ids, inputs.attention_mask, self.write)
        return self.scores(logits, candidates)

    def captured_step(self, cache: KVCache, batch: int, tokens: int, width: int) -> CapturedStep:
        """The captured step of `cache` that feeds `tokens` per row, made on first use."""
        steps = self.captured.setdefault(cache, {})
        if tokens not in steps:
            steps[tokens] = CapturedStep(self.session, cache, batch, tokens, width, self.vocab, self.graph, self.device)
        return steps[tokens]

    def run_options(self) -> ort.RunOptions:
        return self.uncaptured

    def write(self, target: ort.OrtValue, data: np.ndarray) -> None:
        """Write a step's inputs into its bound device buffer."""
        target.update_inplace(np.ascontiguousarray(data))


class PipelinedSteps(CapturedSteps):
    """As CapturedSteps, and a batch-1 decode step given the next step's mask queues that next step,
    fed by this step's best candidate on the device, before the host has read this one (DecodePipeline).
    `stream` is the CUDA stream onnxruntime computes on (cuda_stream.DeviceStream): writes are ordered
    on it and each step is waited for through an event."""

    def __init__(self, session: ort.InferenceSession, graph: contract.GraphEntry, device: str, stream: Any):
        super().__init__(session, graph, device)
        self.stream = stream
        self.pipelines: weakref.WeakKeyDictionary[KVCache, DecodePipeline] = weakref.WeakKeyDictionary()
        # launch_next: each cache's second decode step (the pair alternates) and the step launched last
        self.twins: weakref.WeakKeyDictionary[KVCache, CapturedStep] = weakref.WeakKeyDictionary()
        self.last: weakref.WeakKeyDictionary[KVCache, CapturedStep] = weakref.WeakKeyDictionary()

    def step(self, inputs: StepInputs, cache: KVCache, next_mask: np.ndarray | None = None) -> StepScores:
        pipeline = self.pipelines.get(cache)
        queued = pipeline is not None and pipeline.queued is not None
        (batch, tokens), width = inputs.input_ids.shape, inputs.attention_mask.shape[1]
        decode = batch == 1 and tokens == 1 and width == cache.capacity and bool(self.graph.token_candidates)
        if not queued and not (decode and next_mask is not None):
            return super().step(inputs, cache)
        if pipeline is None:
            pipeline = self.pipelines[cache] = DecodePipeline(self.session, cache, width, self.vocab, self.graph,
                                                              self.stream, self.device)
        logits, candidates = pipeline.step(int(inputs.input_ids[0, 0]), inputs.attention_mask, next_mask)
        return self.scores(logits, candidates)

    def launch(self, inputs: StepInputs, cache: KVCache) -> Callable[[], StepScores]:
        """A decode step queued on the stream (its replay returns once launched); the returned call waits
        for this step alone and reads its candidates. Other steps run at once."""
        (batch, tokens), width = inputs.input_ids.shape, inputs.attention_mask.shape[1]
        if not (tokens == 1 and width == cache.capacity):
            return super().launch(inputs, cache)
        captured = self.captured_step(cache, batch, tokens, width)
        if inputs.mask_columns is None:
            captured.write_inputs(inputs.input_ids, inputs.attention_mask, self.write)
        else:
            captured.write_used_columns(inputs.input_ids, inputs.attention_mask, inputs.mask_columns, self.stream)
        self.last[cache] = captured
        return QueuedStep(self, captured)

    def launch_next(self, inputs: StepInputs, cache: KVCache) -> QueuedStep | None:
        """Queue the decode step after the one last launched on `cache`, before the host has read that
        one: its input ids are that step's best candidates, copied on the device, its mask is `inputs`'
        (whose ids are not read). The two steps are a pair of captured steps used in turn, so the host
        reads one's candidates while the other runs. None where the graph makes no candidates."""
        previous = self.last.get(cache)
        if previous is None or not previous.k:
            return None
        if cache not in self.twins:
            self.twins[cache] = CapturedStep(self.session, cache, previous.batch, 1, previous.width, self.vocab,
                                             self.graph, self.device)
        step = self.twins[cache] if previous is not self.twins[cache] else self.captured_step(cache, previous.batch, 1, previous.width)
        self.stream.copy_rows(step.inputs, 8, previous.candidates, 8 * previous.k, 8, previous.batch)
        step.write_used_columns(None, inputs.attention_mask, inputs.mask_columns, self.stream)
        self.last[cache] = step
        return QueuedStep(self, step)

    def settle(self, cache: KVCache) -> None:
        pipeline = self.pipelines.get(cache)
        if pipeline is not None:
            pipeline.drain()

    def write(self, target: ort.OrtValue, data: np.ndarray) -> None:
        self.stream.write(target, data)  # ordered behind the work already queued


def captured_steps_factory() -> tuple[Any, int | None]:
    """The runner `cuda_graph` gets, and the stream onnxruntime must compute on (None: its own). Pipelined
    where the CUDA driver library opens (the stream is reached through it), captured step by step where
    it does not."""
    from .cuda_stream import DeviceStream

    try:
        stream = DeviceStream()
    except (OSError, RuntimeError):  # no libcuda.so.1 here, or the driver refused
        return CapturedSteps, None
    return (lambda session, graph, device: PipelinedSteps(session, graph, device, stream)), stream.handle


class CapturedStep:
    """Fixed buffers and a binding for the steps of one KV cache that feed `tokens` new tokens per row
    with a mask `width` wide.

    A step moves two small transfers, not four: input_ids and the attention mask are two views of one
    int64 buffer (one upload; the batcher's steps upload the ids and the mask's used columns apart,
    write_used_columns), and the candidates' ids and logits two views of another (one download);
    each transfer costs a synchronous copy's latency whatever its size. `device` is "cuda" for capture;
    the same bookkeeping runs on "cpu" (tests), where onnxruntime ignores the graph id."""

    def __init__(self, session: ort.InferenceSession, cache: KVCache, batch: int, tokens: int, width: int,
                 vocab: int, graph: contract.GraphEntry, device: str = "cuda", candidates: ort.OrtValue | None = None,
                 ids_from: ort.OrtValue | None = None):
        """`candidates` and `ids_from` (DecodePipeline): the candidates buffer to write, and another
        step's candidates buffer whose first id is this step's input token (the mask then is the
        only input the host writes)."""
        assert cache.capacity is not None, "graph capture needs the shared KV buffer"

        def bind_view(bind, name: str, base: ort.OrtValue, offset_bytes: int, dtype: type, shape: list[int]) -> None:
            bind(name, device, 0, dtype, shape, base.data_ptr() + offset_bytes)

        self.batch, self.width, self.k = batch, width, graph.token_candidates
        self.ids_words = 0 if ids_from is not None else batch * tokens  # input_ids' words at the start of `inputs`
        self.runs = 0  # replays before capture: the first two runs are onnxruntime's warm-up and capture
        self.mask_columns = width  # the mask's columns the device buffer may hold ones in
        self.binding = session.io_binding()
        if ids_from is None:
            self.inputs = device_buffer([batch * (tokens + self.width)], np.int64, device)  # [input_ids | attention_mask]
            bind_view(self.binding.bind_input, contract.INPUT_IDS, self.inputs, 0, np.int64, [batch, tokens])
        else:
            self.inputs = device_buffer([batch * self.width], np.int64, device)  # [attention_mask]
            bind_view(self.binding.bind_input, contract.INPUT_IDS, ids_from, 0, np.int64, [batch, tokens])
        mask_offset = 8 * self.ids_words
        bind_view(self.binding.bind_input, contract.ATTENTION_MASK, self.inputs, mask_offset, np.int64, [batch, self.width])
        if contract.TOTAL_SEQUENCE_LENGTH in graph.input_names:  # optimized graphs written by earlier versions
            self._total_length = ort.OrtValue.ortvalue_from_numpy(np.array(self.width, np.int32))  # kept alive here
            self.binding.bind_ortvalue_input(contract.TOTAL_SEQUENCE_LENGTH, self._total_length)
        self.logits = device_buffer([batch, 1, vocab], np.float32, device)
        self.binding.bind_ortvalue_output(contract.LOGITS, self.logits)
        self.candidates = candidates
        if self.k:  # [top_ids | top_logits], the fp32 half padded to whole int64 words
            cells = batch * self.k
            self.candidates = candidates if candidates is not None else candidates_buffer(batch, self.k, device)
            logits_name, ids_name = contract.CANDIDATE_OUTPUTS
            bind_view(self.binding.bind_output, ids_name, self.candidates, 0, np.int64, [batch, self.k])
            bind_view(self.binding.bind_output, logits_name, self.candidates, 8 * cells, np.float32, [batch, self.k])
        bind_kv(self.binding, cache, device)
        self.run_options = ort.RunOptions()
        self.run_options.add_run_config_entry("gpu_graph_id", str(next(_graph_ids)))
        # the same replay, returning once it is queued (DecodePipeline waits on an event instead)
        self.queue_options = ort.RunOptions()
        self.queue_options.add_run_config_entry("gpu_graph_id", self.run_options.get_run_config_entry("gpu_graph_id"))
        self.queue_options.add_run_config_entry("disable_synchronize_execution_providers", "1")

    def step(self, session: ort.InferenceSession, input_ids: np.ndarray, attention_mask: np.ndarray,
             write) -> tuple[ort.OrtValue, list[np.ndarray]]:
        """Write this step's inputs into the bound buffer with `write` (through onnxruntime's compute
        stream when it is ours, so the write is ordered before the run), run (capture or replay);
        returns the device logits and the candidates [top_logits, top_ids] on the host (empty when none)."""
        self.write_inputs(input_ids, attention_mask, write)
        session.run_with_iobinding(self.binding, self.run_options)
        self.runs += 1
        return self.results()

    def enqueue(self, session: ort.InferenceSession, stream) -> Any:
        """Run with the inputs as they are in the bound buffers, returning once queued on `stream`; an
        event that completes with the step. The first two runs are synchronous: onnxruntime runs the
        graph once before capturing it on the second."""
        warming = self.runs < 2
        session.run_with_iobinding(self.binding, self.run_options if warming else self.queue_options)
        self.runs += 1
        return stream.record()

    def results(self) -> tuple[ort.OrtValue, list[np.ndarray]]:
        """The device logits and, when the graph makes them, the candidates on the host (after the step ran)."""
        return self.logits, self.read_candidates() if self.candidates is not None else []

    def write_inputs(self, input_ids: np.ndarray, attention_mask: np.ndarray, write) -> None:
        write(self.inputs, np.concatenate([np.ravel(input_ids), np.ravel(attention_mask)]).astype(np.int64, copy=False))
        self.mask_columns = self.width

    def write_used_columns(self, input_ids: np.ndarray | None, attention_mask: np.ndarray, columns: int | None,
                           stream) -> None:
        """As write_inputs, through `stream`, for a mask whose rows are zero past `columns`: the ids (unless
        None: written on the device), then only the mask's first columns, as many as this step or the
        last upload used. A decode step of a wide KV buffer (serve's 8,192 positions) then moves
        kilobytes instead of megabytes, and the host builds no copy of the mask."""
        columns = self.width if columns is None else columns
        uploaded = max(columns, self.mask_columns)
        if input_ids is not None:
            self.write_ids(input_ids, stream)
        stream.write_rows(self.inputs, 8 * self.ids_words, attention_mask[:, :uploaded], 8 * self.width)
        self.mask_columns = columns

    def write_ids(self, input_ids: np.ndarray, stream) -> None:
        """The input ids, through `stream`: the first words of `inputs` (a step whose ids come from another
        step's candidates has none there)."""
        assert self.ids_words == input_ids.size
        stream.write(self.inputs, np.ravel(input_ids).astype(np.int64, copy=False))

    def read_candidates(self) -> list[np.ndarray]:
        """[top_logits, top_ids], each [batch, K], copied to the host (after the step has run)."""
        cells = self.batch * self.k
        words = self.candidates.numpy()
        top_ids = words[:cells].reshape(self.batch, self.k)
        top_logits = words[cells:].view(np.float32)[:cells].reshape(self.batch, self.k)
        return [top_logits, top_ids]


class QueuedStep:
    """A decode step queued on the stream (PipelinedSteps.launch, launch_next): calling it waits for this
    step alone and reads its scores. `refeed` runs it again with other input ids."""

    def __init__(self, steps: PipelinedSteps, captured: CapturedStep):
        self.steps, self.captured = steps, captured
        self.event = captured.enqueue(steps.session, steps.stream)

    def refeed(self, input_ids: np.ndarray) -> None:
        """Run the step again with `input_ids` and the mask it has (fed a token the host did not choose:
        its KV slots and outputs are rewritten), once its first run is done."""
        self.steps.stream.wait(self.event)
        self.captured.write_ids(input_ids, self.steps.stream)
        self.event = self.captured.enqueue(self.steps.session, self.steps.stream)

    def __call__(self) -> StepScores:
        self.steps.stream.wait(self.event)
        return self.steps.scores(*self.captured.results())


class DecodePipeline:
    """Two captured decode steps that feed each other for batch-1 greedy decoding: each step's input
    token is the other step's best candidate, read on the device, so step n+1 is queued before the
    host has seen step n's token and the GPU never waits for the host between steps.

    The host still decides every token from the candidates (repetition penalty, ties); when its
    choice differs from the best candidate, the step queued with the wrong token is queued again
    after the right token has been written (`rerun`): its KV slot and outputs are simply rewritten.
    Each step has its own mask, logits and candidates buffers; a step's mask is written only after
    that step has been waited for, and through the stream, so it is ordered behind the work queued."""

    def __init__(self, session: ort.InferenceSession, cache: KVCache, width: int, vocab: int, graph: contract.GraphEntry,
                 stream, device: str = "cuda"):
        assert graph.token_candidates, "the pipeline feeds steps from the graph's token candidates"
        candidates = [candidates_buffer(1, graph.token_candidates, device) for _ in range(2)]
        self.steps = [CapturedStep(session, cache, 1, 1, width, vocab, graph, device, candidates[i], candidates[1 - i])
                      for i in range(2)]
        self.session, self.stream = session, stream
        self.events: list = [None, None]
        self.reruns = 0  # steps queued again because the host chose another token than the best candidate
        self.queued: int | None = None  # the step queued ahead, fed by the current step's best candidate
        self.fed_with = -1  # that candidate's id

    def step(self, token: int, mask: np.ndarray, next_mask: np.ndarray | None) -> tuple[ort.OrtValue, list[np.ndarray]]:
        """Run the decode step that feeds `token` with `mask`; with `next_mask`, queue the step after it
        first, fed by this step's best candidate. The step may already be queued by the previous call:
        then `token` is the host's choice, and the step runs again when it differs from the candidate
        that fed it. Returns this step's logits (device) and candidates [top_logits, top_ids] (host)."""
        current = self.queued
        if current is None:  # nothing queued: start the pair with the host's token
            current = 0
            self.feed(current, token)
            self.launch(current, mask)
        elif token != self.fed_with:
            self.rerun(current, token)
        self.queued = None
        if next_mask is not None:
            self.launch(1 - current, next_mask)
            self.queued = 1 - current
        logits, (top_logits, top_ids) = self.wait(current)
        self.fed_with = int(top_ids[0, 0])  # the token the queued step reads
        return logits, [top_logits, top_ids]

    def feed(self, step: int, token: int) -> None:
        """Make `token` the input of `step`: the first id of the other step's candidates buffer."""
        source = self.steps[1 - step].candidates
        words = np.zeros(source.shape(), np.int64)
        words[0] = token
        self.stream.write(source, words)

    def launch(self, step: int, attention_mask: np.ndarray | None) -> None:
        """Queue `step` with this mask (None: the mask it last ran with)."""
        captured = self.steps[step]
        if attention_mask is not None:
            self.stream.write(captured.inputs, np.ravel(attention_mask).astype(np.int64, copy=False))
        self.events[step] = captured.enqueue(self.session, self.stream)

    def rerun(self, step: int, token: int) -> None:
        self.reruns += 1
        self.feed(step, token)
        self.launch(step, None)

    def wait(self, step: int) -> tuple[ort.OrtValue, list[np.ndarray]]:
        """Wait for `step`; its logits (device) and candidates [top_logits, top_ids] (host)."""
        self.stream.wait(self.events[step])
        self.events[step] = None
        captured = self.steps[step]
        return captured.logits, captured.read_candidates()

    def drain(self) -> None:
        """Wait for whatever is still queued (a step launched for a token that never came)."""
        for step, event in enumerate(self.events):
            if event is not None:
                self.wait(step)
        self.queued = None


def device_buffer(shape: list[int], dtype: type, device: str) -> ort.OrtValue:
    return ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, device, 0)


def candidates_buffer(batch: int, k: int, device: str) -> ort.OrtValue:
    """[top_ids | top_logits] of `batch` rows as int64 words; the fp32 half padded to whole words."""
    cells = batch * k
    return device_buffer([cells + -(-cells // 2)], np.int64, device)
