"""Continuous batching: requests that arrive at different times share decode steps (runtime/server.py).

One shared KV buffer of `max_batch` rows by `capacity` positions. A request joins at a step boundary:
its prompt is prefilled alone into a free row (a view of the buffer: runtime/kv_cache.py), then the row
takes part in every decode step until the request finishes, and is free for the next one. Nobody waits
for another request to finish and nobody is prefilled twice. A decode step runs the first `bucket` rows,
the smallest power of two that covers the highest busy row; rows are taken lowest first so it stays
small. Each bucket's step is one shape, so a capturing runner (CUDA graphs) replays it; an idle row
inside the bucket feeds the pad token over a mask of one position.

Token choice is per row (its own sampling options, seed and repetition history), from the graph's
candidates when they decide it, as in runtime/generate.py.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from artifact import contract

from .errors import RuntimeInputError
from .generate import check_request, next_tokens, pad_token_id
from .kv_cache import KVCache, new_cache
from .padding import PADDINGS
from .sampling import SamplingConfig
from .session import GraphSession
from .steps import StepInputs, StepScores

# called from the batcher's thread with each new token, then once with the reason it finished
# ("stop_token", "length" or "cancelled") and token None
TokenSink = Callable[[int | None, str | None], None]


@dataclass
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
    """A busy row: its request, how many positions its KV holds, the token to feed next."""

    request: BatchRequest
    length: int
    next_token: int
    generated: int
    seen: np.ndarray
    rng: np.random.Generator


def bucket(rows: int) -> int:
    return 1 << (rows - 1).bit_length()


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
        self.row_views = [self.cache.view(row, 1) for row in range(max_batch)]
        self.decode_views: dict[int, KVCache] = {}  # per bucket, kept: the runner's captures are keyed by them
        self.rows: list[Row | None] = [None] * max_batch
        self.waiting: queue.Queue[BatchRequest | None] = queue.Queue()
        self.thread: threading.Thread | None = None
        self.steps_run = 0  # decode steps, for tests and metrics

    def submit(self, request: BatchRequest) -> None:
        """Queue a request; RuntimeInputError now if generate would refuse it or it cannot fit a row."""
        check_request(self.manifest, [request.prompt_ids], request.max_new_tokens)
        needed = len(request.prompt_ids) + request.max_new_tokens
        if needed > self.capacity:
            raise RuntimeInputError(f"the prompt ({len(request.prompt_ids)} tokens) and max_tokens "
                                    f"({request.max_new_tokens}) need {needed} positions; this server holds "
                                    f"{self.capacity} per request (--max-context)")
        self.waiting.put(request)

    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, name="batcher", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Cancel what runs and waits, and end the thread."""
        self.waiting.put(None)
        if self.thread is not None:
            self.thread.join()

    def run(self) -> None:
        while True:
            if not any(self.rows):  # idle: wait for a request
                request = self.waiting.get()
                if request is None:
                    break
                self.admit(request)
            if not self.admit_waiting():
                break
            self.decode()
        self.cancel_all()

    def admit_waiting(self) -> bool:
        """Prefill queued requests into free rows (all that fit, so a burst starts decoding together);
        False once `stop` was asked."""
        while None in self.rows:
            try:
                request = self.waiting.get_nowait()
            except queue.Empty:
                return True
            if request is None:
                return False
            self.admit(request)
        return True

    def admit(self, request: BatchRequest) -> None:
        """Prefill `request` alone in the lowest free row and choose its first token."""
        if request.cancelled.is_set():
            request.sink(None, "cancelled")
            return
        index = self.rows.index(None)
        prompt = request.prompt_ids
        inputs = PADDINGS[contract.RIGHT](self.pad).prefill([prompt], 0)
        scores = self.session.steps.uncaptured_step(inputs, self.row_views[index])
        row = Row(request, len(prompt), 0, 0, np.array(prompt, np.int64), np.random.default_rng(request.sampling.seed))
        self.rows[index] = row
        self.accept(index, self.choose(scores, 0, row))

    def decode(self) -> None:
        """One step for every busy row (the first `bucket` rows of the buffer)."""
        for index, row in enumerate(self.rows):
            if row is not None and row.request.cancelled.is_set():
                self.finish(index, "cancelled")
        busy = [index for index, row in enumerate(self.rows) if row is not None]
        if not busy:
            return
        size = bucket(busy[-1] + 1)
        if size not in self.decode_views:
            self.decode_views[size] = self.cache.view(0, size)
        view = self.decode_views[size]
        ids = np.full((size, 1), self.pad, np.int64)
        mask = np.zeros((size, self.capacity), np.int64)
        mask[:, 0] = 1  # idle rows: one position
        for index in busy:
            row = self.rows[index]
            ids[index, 0] = row.next_token
            mask[index, : row.length + 1] = 1
        scores = self.session.steps.step(StepInputs(ids, mask, None), view)
        self.steps_run += 1
        for index in busy:
            row = self.rows[index]
            row.length += 1
            self.accept(index, self.choose(scores, index, row))

    def choose(self, scores: StepScores, index: int, row: Row) -> int:
        """Row `index`'s next token, with its request's sampling, seed and history."""
        return int(next_tokens(scores, slice(index, index + 1), row.request.sampling, [row.seen], row.rng, self.vocab)[0])

    def accept(self, index: int, token: int) -> None:
        row = self.rows[index]
        request = row.request
        row.generated += 1
        row.seen = np.append(row.seen, token)
        row.next_token = token
        request.sink(token, None)
        if token in request.stop_token_ids:
            self.finish(index, "stop_token")
        elif row.generated >= request.max_new_tokens:
            self.finish(index, "length")

    def finish(self, index: int, reason: str) -> None:
        request = self.rows[index].request
        self.rows[index] = None
        request.sink(None, reason)

    def cancel_all(self) -> None:
        for index, row in enumerate(self.rows):
            if row is not None:
                self.finish(index, "cancelled")
        while True:
            try:
                request = self.waiting.get_nowait()
            except queue.Empty:
                return
            if request is not None:
                request.sink(None, "cancelled")
