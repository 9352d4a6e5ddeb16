"""Continuous batching: requests that arrive at different times share decode steps (runtime/server.py).

One shared KV buffer of `max_batch` rows by `capacity` positions. Requests join at a step boundary:
those waiting there are prefilled together into free rows (views of the buffer's contiguous free rows:
runtime/kv_cache.py), and those that arrived during that prefill next, before the decode step (up to
PREFILL_TOKENS); then each row takes part in every decode step until its request finishes, and is
free for the next one. Nobody waits for another request to finish and nobody is prefilled twice. On
CUDA a prefill step is padded to one of the shapes prefill_shape gives, each run once at warm-up. A
decode step runs the first `bucket` rows, the smallest power of two that covers the highest busy row
(or all `max_batch`); rows are taken lowest first so it stays small. Each bucket's step is one shape,
so a capturing runner (CUDA graphs) replays it; an idle row inside the bucket feeds the pad token over
a mask of one position.

Token choice is per row (its own sampling options, seed and repetition history), from the graph's
candidates when they decide it, as in runtime/generate.py; rows alike but for their seed are chosen in
one call. A step's tokens reach their requests while the next decode step runs: the runner launches it
first (on CUDA the launch returns before the GPU is done) and is waited for after the hand-out. While
every row takes the best candidate (greedy, no penalty), the step after is queued before this one is
read, fed by its best candidates on the device (launch_ahead), and run again where the host chose
another token (check_ahead).
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from artifact import contract

from .errors import RuntimeInputError
from .generate import check_request, next_tokens, pad_token_id
from .kv_cache import KVCache, new_cache
from .padding import PADDINGS
from .sampling import SamplingConfig, Seen
from .session import GraphSession, one_line
from .steps import StepInputs, StepScores

log = logging.getLogger("qwen2_onnx.serve")

# called from the batcher's thread with each new token, then once with the reason it finished
# ("stop_token", "length", "cancelled" or FAILED) and token None
TokenSink = Callable[[int | None, str | None], None]
FAILED = "failed"  # a step raised: the batcher ended, and its requests with it


@dataclass(eq=False)  # one per request, told apart by identity
class BatchRequest:
    prompt_ids: list[int]
    sampling: SamplingConfig
    max_new_tokens: int
    sink: TokenSink
    stop_token_ids: tuple[int, ...] = ()
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Stop at the next step boundary (its row is freed there); the sink hears "cancelled"."""
        self.cancelled.set()


@dataclass
class Row:
    """A busy row: its request, how many positions its KV holds, its own random stream (the request's
    seed) and its sampling settings but the seed (rows alike are chosen together)."""

    request: BatchRequest
    length: int
    generated: int = 0
    rng: np.random.Generator = field(init=False)
    settings: SamplingConfig = field(init=False)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.request.sampling.seed)
        self.settings = replace(self.request.sampling, seed=None)


@dataclass(frozen=True)
class RowDraws:
    """The draw's uniform numbers for rows chosen together: one from each row's own stream, as each
    would draw alone (sampling.Draws)."""

    rows: list[Row]

    def random(self, n: int) -> np.ndarray:
        assert n == len(self.rows)
        return np.array([row.rng.random() for row in self.rows])


@dataclass(frozen=True)
class Ahead:
    """A decode step launched and not yet read: how to wait for it, its batch size, and the rows it serves
    with their requests (a row may finish, or be taken by another request, before it is read)."""

    queued: Callable[[], StepScores]
    size: int
    served: list[tuple[int, BatchRequest]]


@dataclass
class BatcherStats:
    """Running totals (server metrics, benchmarks): what the batcher's thread did and the time it took."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_steps: int = 0
    prefill_seconds: float = 0.0  # in the step runner
    decode_steps: int = 0
    decode_rows: int = 0  # busy rows over all decode steps
    decode_seconds: float = 0.0  # in the step runner
    decode_steps_fed_on_device: int = 0  # queued before the host read the step before (Batcher.launch_ahead)
    decode_steps_refed: int = 0  # of those, run again: the host chose another token (check_ahead)
    busy_seconds: float = 0.0  # the thread's time while any row was busy: steps, token choice, hand-over


# padded prompt tokens one prefill step may take; a longer prompt gets a step of its own. Also what
# requests joining one after another may prefill between two decode steps (Batcher.serve)
PREFILL_TOKENS = 8192
# a padded prefill step of at least this many tokens keeps its row count, up to EXACT_ROWS rows: there the
# GPU's time grows with every row (a 16 x 512 step of Qwen2-7B on an H200 takes 11.6 ms a row, 1 x 512 13.6
# ms), so a padding row costs what a prompt does; below, a step mostly reads the weights and a row
# more costs little. Past EXACT_ROWS rows counts are padded to a power of two even so: each row count is
# one more shape to warm up at every length
COMPUTE_BOUND_TOKENS = 2048
EXACT_ROWS = 16


def check_fits(manifest: contract.Manifest, capacity: int, request: BatchRequest) -> None:
    """RuntimeInputError when generate would refuse the request or it needs more than a row's `capacity`."""
    check_request(manifest, [request.prompt_ids], request.max_new_tokens)
    needed = len(request.prompt_ids) + request.max_new_tokens
    if needed > capacity:
        raise RuntimeInputError(f"the prompt ({len(request.prompt_ids)} tokens) and max_tokens ({request.max_new_tokens}) "
                                f"need {needed} positions; this server holds {capacity} per request (--max-context)")


def bucket(rows: int) -> int:
    return 1 << (rows - 1).bit_length()


def prefill_groups(rows: list[int], lengths: list[int], budget: int = PREFILL_TOKENS,
                   size: Callable[[int, int], int] = lambda count, longest: count * longest) -> list[tuple[int, int]]:
    """Split joining requests, given their rows (ascending) and prompt lengths, into prefill steps of
    consecutive rows (one buffer view each) whose padded size (`size` of their count and longest prompt)
    fits `budget`; as (start, stop) ranges of the lists."""
    groups, start, longest = [], 0, 0
    for i, (row, length) in enumerate(zip(rows, lengths)):
        longest = max(longest, length)
        if i > start and (row != rows[i - 1] + 1 or size(i + 1 - start, longest) > budget):
            groups.append((start, i))
            start, longest = i, length
    if rows:
        groups.append((start, len(rows)))
    return groups


class Batcher:
    """Runs on its own thread (`start`); `submit` from any thread."""

    def __init__(self, session: GraphSession, manifest: contract.Manifest, max_batch: int, capacity: int):
        if session.graph.kv_layout != contract.SHARED_BUFFER:
            raise RuntimeInputError(f"continuous batching needs an optimized graph (shared KV buffer), and graph "
                                    f"{session.graph.name!r} has none; add one: qwen2-onnx optimize ARTIFACT --target "
                                    f"{session.device}")
        if max_batch < 1 or not 1 < capacity <= manifest.model.context_length:
            raise RuntimeInputError(f"max_batch={max_batch} must be at least 1 and capacity={capacity} between 2 and "
                                    f"the context length {manifest.model.context_length}")
        self.session, self.manifest, self.capacity = session, manifest, capacity
        self.vocab = manifest.tokenizer.vocab_size
        self.pad = pad_token_id(manifest)
        self.cache = new_cache(manifest, session.graph, max_batch, session.device, capacity)
        self.decode_views: dict[int, KVCache] = {}  # per bucket, kept: the runner's captures are keyed by them
        self.rows: list[Row | None] = [None] * max_batch
        self.seen = np.zeros((max_batch, self.vocab), bool)  # ids each row's request has seen: sampling.Seen
        # the decode step's inputs, kept up to date row by row (not rebuilt each step): each busy row's
        # next token over the positions it holds, an idle row's pad token over one position
        self.step_ids = np.full((max_batch, 1), self.pad, np.int64)
        self.step_mask = np.zeros((max_batch, capacity), np.int64)
        self.step_mask[:, 0] = 1
        self.waiting: queue.Queue[BatchRequest | None] = queue.Queue()
        self.thread: threading.Thread | None = None
        self.stats = BatcherStats()
        self.on_step: Callable[[], None] = lambda: None  # after each step's tokens went to their sinks
        # (sink, token, reason) chosen but not yet handed out: deliver() sends them while the next step runs
        self.events: list[tuple[TokenSink, int | None, str | None]] = []
        self.ahead: Ahead | None = None  # the decode step queued before the host read the one before it
        self.ended: str | None = None  # why the thread ended on a failure

    def submit(self, request: BatchRequest) -> None:
        """Queue a request; RuntimeInputError now if it cannot run (check_fits), RuntimeError once ended."""
        check_fits(self.manifest, self.capacity, request)
        if self.ended:
            raise RuntimeError(self.ended)
        self.waiting.put(request)

    def cancel(self, request: BatchRequest) -> None:
        request.cancel()

    def load(self) -> tuple[BatcherStats, int, int]:
        """The running totals, and how many requests run and wait now."""
        return self.stats, sum(row is not None for row in self.rows), self.waiting.qsize()

    def start(self, warm_up: bool = False) -> list[tuple[int, int]]:
        """Start the thread that runs every step. With `warm_up`, that thread first runs warm_up, and this
        returns its shapes once it is done (or raises what it raised): the work a new shape costs once is
        kept per thread (cuDNN's attention plans, see prefill_shape), so a warm-up on another thread
        would leave the batcher's own cold."""
        warmed: list[tuple[int, int]] = []
        failure: list[BaseException] = []
        ready = threading.Event()

        def warm_then_serve() -> None:
            try:
                warmed.extend(self.warm_up() if warm_up else [])
            except BaseException as error:  # handed to the caller of start; nothing served
                failure.append(error)
            ready.set()
            if not failure:
                self.run()

        self.thread = threading.Thread(target=warm_then_serve, name="batcher", daemon=True)
        self.thread.start()
        ready.wait()
        if failure:
            raise failure[0]
        return warmed

    def warm_up(self) -> list[tuple[int, int]]:
        """Before serving, on the batcher's thread (start(warm_up=True)): run the largest prefill step the
        batcher can take (one long prompt, or rows of PREFILL_TOKENS together), so onnxruntime's memory
        arena grows to its peak once, then every prefill shape prefill_shape can give (a new shape's
        first run costs more), and a decode step of every batch size, so each is captured (on CUDA)
        before a request waits on it. Returns the prefill
        shapes run, as (rows, length). The rows' old contents need no clearing: the masks of later steps
        say which positions hold keys."""
        length = min(self.capacity - 1, PREFILL_TOKENS)
        shapes = [(max(1, min(len(self.rows), PREFILL_TOKENS // length)), length), *self.prefill_shapes()]
        for rows, length in shapes:
            self.session.steps.uncaptured_step(PADDINGS[contract.RIGHT](self.pad).prefill([[self.pad] * length] * rows, 0),
                                               self.cache.view(0, rows))
        for size in self.batch_sizes():
            self.session.steps.step(self.decode_inputs(size), self.decode_view(size))
            for _ in range(2):  # where the runner queues steps ahead, the pair's other step too
                launched = self.session.steps.launch(self.decode_inputs(size), self.decode_view(size))
                ahead = self.session.steps.launch_next(self.decode_inputs(size), self.decode_view(size))
                launched()
                if ahead is None:
                    break
                ahead()
        return shapes

    def prefill_shape(self, count: int, longest: int) -> tuple[int, int]:
        """The rows and length a prefill step of `count` prompts, the longest of `longest` tokens, runs at:
        as they are, or, where the step runner pads prompts to a few lengths (on CUDA: a new shape's first
        run costs 40-120 ms more: onnxruntime builds a cuDNN attention plan for each (rows, length) and keeps
        it per thread, tools/gpu_notes.md sessions 13-14), at that length, with `count` rows where the step
        is compute-bound (COMPUTE_BOUND_TOKENS, EXACT_ROWS) and a power of two of rows elsewhere, so that
        the shapes warm_up runs serve every step."""
        length = self.session.steps.prompt_bucket(longest, self.capacity + 1)
        if length is None:
            return count, longest
        exact = count <= EXACT_ROWS and count * length >= COMPUTE_BOUND_TOKENS
        return count if exact else self.bucket(count), length

    def prefill_shapes(self) -> list[tuple[int, int]]:
        """Every padded shape prefill_shape gives for a step within PREFILL_TOKENS (a longer prompt runs
        alone, at its own length)."""
        lengths = self.session.steps.prompt_buckets(self.capacity, self.capacity + 1)
        shapes = {self.prefill_shape(count, length) for length in lengths for count in range(1, len(self.rows) + 1)}
        return sorted(((rows, length) for rows, length in shapes if rows == 1 or rows * length <= PREFILL_TOKENS),
                      key=lambda shape: shape[::-1])

    def stop(self) -> None:
        """Cancel what runs and waits, and end the thread."""
        self.waiting.put(None)
        if self.thread is not None:
            self.thread.join()

    def run(self) -> None:
        try:
            self.serve()
        except Exception as error:  # a step failed: every request hears it, later ones are refused
            log.exception("the batcher failed")
            self.ended = f"the batcher failed: {one_line(error)}"
            self.cancel_all(FAILED)

    def serve(self) -> None:
        prefilled = 0  # padded prompt tokens prefilled since the last decode step
        while True:
            taken: list[BatchRequest | None] = []
            if not any(self.rows):  # idle: hand out the last step's tokens, then wait for a request
                self.deliver()
                taken.append(self.waiting.get())
            started = time.perf_counter()
            joining, stopping = self.take_waiting(taken)
            if stopping:
                for request in joining:
                    request.sink(None, "cancelled")
                break
            prefilled += self.admit(joining)
            if joining and prefilled < PREFILL_TOKENS and not self.waiting.empty() and None in self.rows:
                # those who came during that prefill join before the next decode step, as a burst's
                # stragglers do: the running rows wait for at most PREFILL_TOKENS of prefills
                self.deliver()
            else:
                self.decode()
                prefilled = 0
            self.stats.busy_seconds += time.perf_counter() - started
        self.cancel_all()

    def deliver(self) -> None:
        """Hand the tokens and endings chosen since the last call to their requests' sinks, in order,
        then on_step."""
        events, self.events = self.events, []
        for sink, token, reason in events:
            sink(token, reason)
        self.on_step()

    def take_waiting(self, taken: list[BatchRequest | None]) -> tuple[list[BatchRequest], bool]:
        """`taken` and the queued requests, as many as there are free rows (so a burst starts decoding
        together), cancelled ones told so and dropped; and whether `stop` was asked (a None)."""
        stopping = any(request is None for request in taken)
        while not stopping and len(taken) < self.rows.count(None):
            try:
                request = self.waiting.get_nowait()
            except queue.Empty:
                break
            stopping = request is None
            taken.append(request)
        joining = []
        for request in taken:
            if request is not None and request.cancelled.is_set():
                request.sink(None, "cancelled")
            elif request is not None:
                joining.append(request)
        return joining, stopping

    def admit(self, joining: list[BatchRequest]) -> int:
        """Give the joining requests the lowest free rows, shortest prompts first (so a step's rows pad
        little), then prefill them in as few steps as prefill_groups allows and choose their first tokens.
        Returns the tokens its steps ran, padding included."""
        joining = sorted(joining, key=lambda request: len(request.prompt_ids))
        rows = [index for index, row in enumerate(self.rows) if row is None][: len(joining)]
        for index, request in zip(rows, joining):  # in their rows before any step: a failure finds them there
            self.rows[index] = Row(request, len(request.prompt_ids) - 1)  # its last prompt token counts as fed
            self.seen[index] = False
            self.seen[index, request.prompt_ids] = True
            self.step_mask[index] = 0
            self.step_mask[index, : len(request.prompt_ids)] = 1  # accept adds the position its first token takes
            self.stats.prompt_tokens += len(request.prompt_ids)
        lengths, tokens = [len(request.prompt_ids) for request in joining], 0
        for start, stop in prefill_groups(rows, lengths, size=lambda count, longest: math.prod(self.prefill_shape(count, longest))):
            prompts = [request.prompt_ids for request in joining[start:stop]]
            count, length = self.prefill_shape(len(prompts), max(lengths[start:stop]))
            padding_rows = range(rows[start] + len(prompts), rows[start] + count)
            if padding_rows.stop > len(self.rows) or any(self.rows[row] is not None for row in padding_rows):
                count = len(prompts)  # no free rows to pad with: a shape of its own
            # rows padded on feed the pad token over one position into free rows, as idle decode rows do
            inputs = PADDINGS[contract.RIGHT](self.pad).prefill(prompts + [[self.pad]] * (count - len(prompts)), 0, length)
            began = time.perf_counter()
            scores = self.session.steps.uncaptured_step(inputs, self.cache.view(rows[start], count))
            self.stats.prefill_seconds += time.perf_counter() - began
            self.stats.prefill_steps += 1
            tokens += count * length
            self.accept(rows[start:stop], scores, offsets=range(stop - start))
        return tokens

    def decode(self) -> None:
        """One step for every busy row (the first `bucket` rows of the buffer): the one the last call queued
        ahead, if any, else one launched now; and where launch_ahead may, the step after it is queued
        before this one is read, so the GPU does not wait for the host between them."""
        for index, row in enumerate(self.rows):
            if row is not None and row.request.cancelled.is_set():
                self.finish(index, "cancelled")
        began = time.perf_counter()
        if self.ahead is not None:
            step, self.ahead = self.ahead, None
        else:
            busy = [index for index, row in enumerate(self.rows) if row is not None]
            if not busy:
                return
            size = self.bucket(busy[-1] + 1)
            step = Ahead(self.session.steps.launch(self.decode_inputs(size), self.decode_view(size)), size,
                         [(index, self.rows[index].request) for index in busy])
        self.ahead = self.launch_ahead(step)
        self.deliver()  # the previous steps' tokens go out while this one runs (where the runner queues it)
        scores = step.queued()
        self.stats.decode_seconds += time.perf_counter() - began
        rows = self.still_running(step.served)
        self.stats.decode_steps += 1
        self.stats.decode_rows += len(rows)
        self.accept(rows, scores, offsets=rows)
        if self.ahead is not None:
            self.check_ahead(scores)

    def still_running(self, served: list[tuple[int, BatchRequest]]) -> list[int]:
        """The rows of `served` that still run the request they ran then."""
        return [index for index, request in served if self.rows[index] is not None and self.rows[index].request is request]

    def launch_ahead(self, step: Ahead) -> Ahead | None:
        """Queue the decode step after `step` (just launched, not yet read), fed by its best candidates on
        the device, where that is what the host will choose: `step` serves every busy row, each takes the
        best candidate (greedy without a penalty; where the host chooses another, check_ahead refeeds it)
        and nobody waits to join, and the rows going on keep the batch size. Its mask is what accept will
        make it: each row one position longer, a row that ends by length with this step idle. None where
        the runner cannot queue ahead."""
        busy = [index for index, row in enumerate(self.rows) if row is not None]
        if (not self.waiting.empty() or busy != [index for index, _ in step.served] or len(self.still_running(step.served)) != len(busy)
                or not all(self.rows[index].settings.takes_best_candidate for index in busy)):
            return None
        ending = [index for index in busy if self.rows[index].generated + 1 >= self.rows[index].request.max_new_tokens]
        going_on = [index for index in busy if index not in ending]
        if not going_on or self.bucket(going_on[-1] + 1) != step.size:
            return None  # the host launches the next step, at its own batch size
        for index in ending:
            self.idle_mask(index)  # as finish leaves it
        for index in going_on:
            self.step_mask[index, self.rows[index].length + 1] = 1  # as accept will set it
        columns = max(self.rows[index].length + 2 for index in going_on)
        inputs = StepInputs(self.step_ids[: step.size], self.step_mask[: step.size], None, columns)
        queued = self.session.steps.launch_next(inputs, self.decode_view(step.size))
        if queued is None:
            return None
        self.stats.decode_steps_fed_on_device += 1
        return Ahead(queued, step.size, [(index, self.rows[index].request) for index in going_on])

    def check_ahead(self, scores: StepScores) -> None:
        """After accept: the step queued ahead was fed each row's first candidate; where the host chose
        another, run it again with the host's tokens. The host takes the lowest id at a tie, which graphs
        list first (token_candidates) unless more than K ids tie or the graph was optimized before they
        did; TopK on CUDA orders ties its own way. With no row left to serve, wait for it and drop it."""
        rows = self.still_running(self.ahead.served)
        if not rows:
            self.ahead.queued()
            self.ahead = None
        elif (self.step_ids[rows, 0] != scores.top_ids[rows, 0]).any():
            self.stats.decode_steps_refed += 1
            self.ahead.queued.refeed(self.step_ids[: self.ahead.size])

    def decode_inputs(self, size: int) -> StepInputs:
        """A decode step of the first `size` rows (views of step_ids and step_mask: a runner copies them
        before they change, which is after the step), with the mask's used columns: a busy row's
        positions and its new token's, an idle row's one."""
        columns = max((row.length + 1 for row in self.rows[:size] if row is not None), default=1)
        return StepInputs(self.step_ids[:size], self.step_mask[:size], None, columns)

    def batch_sizes(self) -> list[int]:
        """Every row count `bucket` gives: the decode steps' batch sizes, and the padded prefills' rows."""
        return sorted({self.bucket(n) for n in range(1, len(self.rows) + 1)})

    def bucket(self, rows: int) -> int:
        """The rows a decode step runs to serve the first `rows`: a power of two, or every row of the buffer."""
        return min(bucket(rows), len(self.rows))

    def decode_view(self, size: int) -> KVCache:
        if size not in self.decode_views:
            self.decode_views[size] = self.cache.view(0, size)
        return self.decode_views[size]

    def accept(self, indices: list[int], scores: StepScores, offsets) -> None:
        """Choose the next token of the busy rows `indices` (rows `offsets` of the step's scores), hand
        each to its request, and free the rows that finished."""
        rows = [self.rows[index] for index in indices]
        self.stats.generated_tokens += len(rows)  # counted before a sink hears of them
        tokens = self.choose(scores, indices, list(offsets))
        self.seen[indices, tokens] = True
        self.step_ids[indices, 0] = tokens
        for index, row, token in zip(indices, rows, tokens):
            request = row.request
            row.length += 1
            self.step_mask[index, row.length] = 1
            row.generated += 1
            self.events.append((request.sink, token, None))
            if token in request.stop_token_ids:
                self.finish(index, "stop_token")
            elif row.generated >= request.max_new_tokens:
                self.finish(index, "length")

    def choose(self, scores: StepScores, indices: list[int], offsets: list[int]) -> list[int]:
        """The next token of rows `indices` from their rows `offsets` of the scores, each with its request's
        sampling, seed and seen ids, as it would get alone: rows whose settings are the same but for the
        seed are chosen in one call, each sampled row drawing from its own stream (RowDraws)."""
        groups: dict[SamplingConfig, list[int]] = {}
        for position, index in enumerate(indices):
            groups.setdefault(self.rows[index].settings, []).append(position)
        tokens = [0] * len(indices)
        for sampling, positions in groups.items():
            rows = np.array([indices[p] for p in positions])
            picked = next_tokens(scores, np.array([offsets[p] for p in positions]), sampling, Seen(self.seen, rows),
                                 RowDraws([self.rows[index] for index in rows]), self.vocab)
            for position, token in zip(positions, picked.tolist()):
                tokens[position] = token
        return tokens

    def finish(self, index: int, reason: str) -> None:
        """Free the row now; its request hears `reason` with the step's tokens (deliver)."""
        self.events.append((self.rows[index].request.sink, None, reason))
        self.rows[index] = None
        self.step_ids[index] = self.pad
        self.idle_mask(index)

    def idle_mask(self, index: int) -> None:
        """An idle row's mask: one position, where the pad token it feeds is written."""
        self.step_mask[index] = 0
        self.step_mask[index, 0] = 1

    def cancel_all(self, reason: str = "cancelled") -> None:
        """End every running and waiting request with `reason`, after the tokens already chosen."""
        if self.ahead is not None:  # nothing is read from it, but it runs to its end before the rows go
            ahead, self.ahead = self.ahead, None
            ahead.queued()
        for index, row in enumerate(self.rows):
            if row is not None:
                self.finish(index, reason)
        while True:
            try:
                request = self.waiting.get_nowait()
            except queue.Empty:
                break
            if request is not None:
                self.events.append((request.sink, None, reason))
        self.deliver()
