"""The batcher in a process of its own, so the server's per-token work never holds the GIL its decode loop needs.

    front process (runtime/server.py)            engine process (engine_main)
      HTTP, templates, tokenizer, text             Model.load + Batcher (runtime/batcher.py)
      EngineProcess.submit / cancel / stop  --->   ("submit", id, ...)  ("cancel", id)  ("stop",)
      reader thread -> each request's sink  <---   ("step", [(id, token, reason), ...], stats, running, waiting)

One message each way per request event, and one back per batcher step carrying every token of that
step. With the batcher on a thread of the server's process, the event loop's per-token work (text,
JSON, socket writes) held the GIL when a decode step ended: at Qwen2-7B shapes on an H200 the
batcher's loop took 6.48 instead of 5.53 ms per step with 16 streams, and 10.5 instead of 6.9 with 64
(tools/bench_serve.py, tools/gpu_notes.md session 12). vLLM's server splits its engine off likewise.
"""

from __future__ import annotations

import itertools
import multiprocessing
import queue
import signal
import threading
from dataclasses import dataclass, field
from typing import Any, Protocol

from artifact import contract

from .batcher import FAILED, Batcher, BatcherStats, BatchRequest, check_fits
from .errors import RuntimeInputError


class Engine(Protocol):
    """What the server drives: a Batcher on a thread of the server's own process (tests, scripted
    steps), or EngineProcess (`qwen2-onnx serve`)."""

    capacity: int  # positions per request
    ended: str | None  # why it stopped serving, when it failed

    def submit(self, request: BatchRequest) -> None: ...

    def cancel(self, request: BatchRequest) -> None: ...

    def load(self) -> tuple[BatcherStats, int, int]: ...

    def stop(self) -> None: ...


@dataclass(frozen=True)
class EngineSpec:
    """What the engine process opens: Model.load's arguments, and the batcher's rows and positions per row."""

    artifact: str
    load_options: dict[str, Any] = field(default_factory=dict)
    max_batch: int = 16
    capacity: int = 8192


def engine_main(spec: EngineSpec, connection) -> None:
    """The engine process: load, answer ("ready", capacity) or ("failed", message), then serve the pipe
    until ("stop",) or the front process goes away."""
    from .api import Model

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the front process stops us
    try:
        model = Model.load(spec.artifact, **spec.load_options)
        batcher = Batcher(model.session, model.manifest, spec.max_batch, spec.capacity)
    except RuntimeInputError as error:
        connection.send(("failed", str(error)))
        return
    outbox: list[tuple[int, int | None, str | None]] = []
    finished: queue.SimpleQueue[int] = queue.SimpleQueue()  # ids the batcher is done with, forgotten below

    def sink(request_id: int):
        def put(token: int | None, reason: str | None) -> None:
            outbox.append((request_id, token, reason))
            if token is None:
                finished.put(request_id)
        return put

    def flush() -> None:  # on the batcher's thread, after each step
        if outbox:
            connection.send(("step", outbox[:], *batcher.load()))
            outbox.clear()

    batcher.on_step = flush
    batcher.start(warm_up=True)
    connection.send(("ready", spec.capacity))
    requests: dict[int, BatchRequest] = {}
    while not batcher.ended:  # a failed batcher ends the process: the front process then refuses requests
        try:
            if not connection.poll(1.0):
                continue
            message = connection.recv()
        except EOFError:  # the front process is gone
            message = ("stop",)
        if message[0] == "stop":
            break
        if message[0] == "submit":
            _, request_id, prompt, sampling, max_new_tokens, stop_ids = message
            requests[request_id] = BatchRequest(prompt, sampling, max_new_tokens, sink(request_id), stop_ids)
            try:
                batcher.submit(requests[request_id])  # checked by the front process already
            except RuntimeError:  # the batcher failed meanwhile
                break
        elif message[0] == "cancel" and message[1] in requests:
            requests[message[1]].cancel()
        while not finished.empty():
            requests.pop(finished.get(), None)
    batcher.stop()


class EngineProcess:
    """The front process's handle on the engine: the batcher's surface (submit, cancel, load, stop,
    capacity), each request's sink called from a reader thread with what the engine sends."""

    def __init__(self, spec: EngineSpec, manifest: contract.Manifest):
        context = multiprocessing.get_context("spawn")  # no fork of a process with threads and onnxruntime
        self.connection, theirs = context.Pipe()
        self.process = context.Process(target=engine_main, args=(spec, theirs), name="qwen2-onnx-engine", daemon=True)
        self.process.start()
        theirs.close()
        try:
            kind, detail = self.connection.recv()
        except EOFError:
            self.process.join()
            raise RuntimeInputError(f"the engine process ended while loading (exit status {self.process.exitcode})") from None
        if kind == "failed":
            self.process.join()
            raise RuntimeInputError(detail)
        self.manifest, self.capacity = manifest, detail
        self.ids = itertools.count()
        self.live: dict[int, BatchRequest] = {}
        self.id_of: dict[BatchRequest, int] = {}
        self.lock = threading.Lock()
        self.snapshot: tuple[BatcherStats, int, int] = (BatcherStats(), 0, 0)
        self.ended: str | None = None
        self.reader = threading.Thread(target=self.read, name="engine-reader", daemon=True)
        self.reader.start()

    def submit(self, request: BatchRequest) -> None:
        check_fits(self.manifest, self.capacity, request)
        with self.lock:
            if self.ended:
                raise RuntimeError(self.ended)
            request_id = next(self.ids)
            self.live[request_id], self.id_of[request] = request, request_id
            self.connection.send(("submit", request_id, request.prompt_ids, request.sampling, request.max_new_tokens,
                                  request.stop_token_ids))

    def cancel(self, request: BatchRequest) -> None:
        with self.lock:
            request_id = self.id_of.get(request)
            if request_id is not None and not self.ended:
                self.connection.send(("cancel", request_id))

    def load(self) -> tuple[BatcherStats, int, int]:
        return self.snapshot

    def stop(self) -> None:
        """Ask the engine to cancel what runs and end; wait for it (and for the last tokens to be handed on)."""
        with self.lock:
            if not self.ended:
                self.connection.send(("stop",))
        self.process.join(60)
        self.reader.join(10)

    def read(self) -> None:
        while True:
            try:
                kind, events, *snapshot = self.connection.recv()
            except (EOFError, OSError):
                break
            self.snapshot = tuple(snapshot)
            for request_id, token, reason in events:
                with self.lock:
                    request = self.live[request_id] if token is not None else self.live.pop(request_id)
                    if token is None:
                        del self.id_of[request]
                request.sink(token, reason)
        self.process.join(10)
        with self.lock:
            self.ended = f"the engine process ended (exit status {self.process.exitcode})"
            orphans = list(self.live.values())
            self.live.clear()
            self.id_of.clear()
        for request in orphans:
            request.sink(None, FAILED)
