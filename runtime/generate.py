"""The generation loop: prefill, then decode token by token, sample, stop.

Prompts of different lengths are padded as the graph's manifest entry says (padding.py); finished rows
keep stepping with the pad token until every row is done.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from artifact import contract

from .errors import RuntimeInputError
from .kv_cache import KVCache
from .padding import PADDINGS
from .sampling import Draws, SamplingConfig, Seen, choose_from_candidates, choose_tokens
from .session import GraphSession
from .steps import StepScores
from .tokenizer import TextTokenizer


CAPACITY_STEP = 512  # shared KV buffers are allocated in multiples of this many positions


@dataclass
class Generation:
    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)  # includes the stop token when one ended it
    text: str = ""
    finish_reason: str = ""  # "stop_token", "stop_string" or "length"


@dataclass
class Timings:
    time_to_first_token_s: float = 0.0
    decode_s: float = 0.0
    decode_tokens: int = 0  # tokens after the first, over all rows
    reused_prompt_tokens: int = 0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0


class DecodeLoop:
    """Iterate to run the steps: each item is the new token of every row (None once a row is done).
    Afterwards `generations`, `timings` and `cache` hold the results.

    `cache` continues a batch-1 conversation whose ids it holds (a chat); `keep_cache` leaves the cache
    with the caller at the end instead of returning it to the session's pool (a chat keeps it)."""

    def __init__(
        self,
        session: GraphSession,
        manifest: contract.Manifest,
        tokenizer: TextTokenizer,
        prompts: list[list[int]],
        sampling: SamplingConfig,
        max_new_tokens: int,
        stop_strings: tuple[str, ...] = (),
        cache: KVCache | None = None,
        prefill_chunk: int | None = None,
        ignore_eos: bool = False,
        keep_cache: bool = False,
    ):
        check_request(manifest, prompts, max_new_tokens)
        if isinstance(stop_strings, str) or not all(isinstance(stop, str) and stop for stop in stop_strings):
            raise RuntimeInputError(f"stop_strings={stop_strings!r} must be a list of non-empty strings")
        self.session, self.steps, self.manifest, self.tokenizer = session, session.steps, manifest, tokenizer
        self.prompts, self.sampling, self.max_new_tokens = prompts, sampling, max_new_tokens
        self.stop_strings = tuple(stop_strings)
        self.stop_token_ids = () if ignore_eos else manifest.tokenizer.stop_token_ids  # ignore_eos: benchmarks want full lengths
        if prefill_chunk is not None and (not isinstance(prefill_chunk, int) or prefill_chunk < 1):
            raise RuntimeInputError(f"prefill_chunk={prefill_chunk} must be a positive number of tokens")
        self.prefill_chunk, self.keep_cache = prefill_chunk, keep_cache
        self.generations = [Generation(list(prompt)) for prompt in prompts]
        self.timings = Timings()
        needed = max(len(prompt) for prompt in prompts) + max_new_tokens
        reuse = cache.reusable_prefix(prompts[0], needed) if cache is not None and len(prompts) == 1 else 0
        # a fresh batch-1 prompt may be padded to a bucket length the runner replays a captured graph for;
        # the padded positions' keys are overwritten by the decode steps
        self.prompt_bucket = None
        if len(prompts) == 1 and not reuse:
            self.prompt_bucket = self.steps.prompt_bucket(len(prompts[0]), manifest.model.context_length)
        needed = max(needed, self.prompt_bucket or 0)
        # shared buffers get headroom, so a chat's next turns usually fit and reuse them
        capacity = min(manifest.model.context_length, -(-needed // CAPACITY_STEP) * CAPACITY_STEP)
        self.cache = cache if reuse else session.caches.take(len(prompts), capacity)
        self.timings.reused_prompt_tokens = reuse
        self.pad_id = pad_token_id(manifest)  # fed for rows that are done
        self.padding = PADDINGS[session.graph.padding](self.pad_id)
        if self.cache.capacity is not None:  # shared buffer: decode steps use a mask of the buffer's width
            self.padding.decode_width = self.cache.capacity
        # one greedy row: its next token is usually the device's best candidate, so a runner may queue
        # the next step before the host has chosen (runtime/cuda_graph.py, PipelinedSteps)
        self.predictable = len(prompts) == 1 and not sampling.do_sample

    def __iter__(self) -> Iterator[list[int | None]]:
        try:
            yield from self._steps()
        finally:
            self.steps.settle(self.cache)  # a step queued before a stop token still writes into the buffers
            if not self.keep_cache:
                self.session.caches.give_back(self.cache)

    def _steps(self) -> Iterator[list[int | None]]:
        rng = np.random.default_rng(self.sampling.seed)
        started = time.perf_counter()
        if self.prompt_bucket:
            inputs = self.padding.prefill(self.prompts, 0, self.prompt_bucket)
        else:
            inputs = self.padding.prefill(self.prompts, self._prefill_leading_chunks())
        seen = Seen.of(self.prompts, self.manifest.tokenizer.vocab_size)
        done = [False] * len(self.prompts)
        new = self._accept(self._choose(self.steps.step(inputs, self.cache), seen, rng), seen, done)
        self.timings.time_to_first_token_s = time.perf_counter() - started
        yield new
        while not all(done):
            inputs = self.padding.decode([self.pad_id if t is None else t for t in new])
            more = self.predictable and len(self.generations[0].output_ids) + 1 < self.max_new_tokens
            scores = self.steps.step(inputs, self.cache, self.padding.next_decode_mask() if more else None)
            new = self._accept(self._choose(scores, seen, rng), seen, done)
            self.timings.decode_tokens += sum(token is not None for token in new)
            yield new
        for generation in self.generations:
            generation.finish_reason = generation.finish_reason or "length"
            generation.text = self.tokenizer.decode(generation.output_ids)
        self.timings.decode_s = time.perf_counter() - started - self.timings.time_to_first_token_s
        # the last sampled token was never fed, so the cache holds everything before it
        self.cache.tokens = [g.prompt_ids + g.output_ids[:-1] for g in self.generations]

    def _accept(self, tokens: np.ndarray, seen: Seen, done: list[bool]) -> list[int | None]:
        """Record each unfinished row's token; None for rows already done."""
        new: list[int | None] = []
        for row, token in enumerate(tokens.tolist()):
            if done[row]:
                new.append(None)
                continue
            new.append(token)
            seen.table[row, token] = True
            done[row] = self._record(self.generations[row], token)
        return new

    def _choose(self, scores: StepScores, seen: Seen, rng: np.random.Generator) -> np.ndarray:
        return next_tokens(scores, slice(None), self.sampling, seen, rng, self.manifest.tokenizer.vocab_size)

    def _prefill_leading_chunks(self) -> int:
        """Feed a long batch-1 prompt `prefill_chunk` tokens at a time, all but the last chunk, so the
        activations of one call stay bounded; returns where the final chunk starts. Each chunk after the
        first continues the cached prefix (the path chat reuse takes). Batches are prefilled at once:
        GroupQueryAttention continues a prompt only for batch 1."""
        start = self.timings.reused_prompt_tokens
        if self.prefill_chunk is None or len(self.prompts) != 1:
            return start
        prompt = self.prompts[0]
        while len(prompt) - start > self.prefill_chunk:
            end = start + self.prefill_chunk
            self.steps.step(self.padding.prefill([prompt[:end]], start), self.cache)
            start = end
        return start

    def _record(self, generation: Generation, token: int) -> bool:
        """Append `token`; True when the row is finished."""
        generation.output_ids.append(token)
        if token in self.stop_token_ids:
            generation.finish_reason = "stop_token"
            return True
        if self.stop_strings:
            text = self.tokenizer.decode(generation.output_ids)
            if any(stop in text for stop in self.stop_strings):
                generation.finish_reason = "stop_string"
                return True
        return len(generation.output_ids) >= self.max_new_tokens


def next_tokens(scores: StepScores, rows: slice | np.ndarray, sampling: SamplingConfig, seen: Seen, rng: Draws,
                vocab: int) -> np.ndarray:
    """The next token of each of `rows`: from the device's candidates when they decide it, else from the
    full logits (copied to the host), never an id at or past `vocab` (the embedding's padding rows)."""
    if scores.top_logits is not None:
        tokens = choose_from_candidates(scores.top_logits[rows], scores.top_ids[rows], sampling, seen, rng)
        if tokens is not None:
            return tokens
    logits = scores.full()[rows]
    logits[:, vocab:] = -np.inf
    return choose_tokens(logits, sampling, seen, rng)


def pad_token_id(manifest: contract.Manifest) -> int:
    """The id fed to padded positions and finished rows: the pad token, else the first stop token."""
    tokens = manifest.tokenizer
    return tokens.pad_token_id if tokens.pad_token_id is not None else (tokens.stop_token_ids or (0,))[0]


def check_request(manifest: contract.Manifest, prompts: list[list[int]], max_new_tokens: int) -> None:
    """Refuse impossible requests before any work, with the numbers."""
    if not prompts or any(not prompt for prompt in prompts):
        raise RuntimeInputError("every prompt needs at least one token")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise RuntimeInputError(f"max_new_tokens={max_new_tokens} must be at least 1")
    longest = max(len(prompt) for prompt in prompts)
    context = manifest.model.context_length
    if longest + max_new_tokens > context:
        raise RuntimeInputError(
            f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} = {longest + max_new_tokens} exceeds the "
            f"model's context length {context}; shorten the prompt or lower --max-new-tokens"
        )
    vocab = manifest.tokenizer.vocab_size
    if any(not 0 <= token < vocab for prompt in prompts for token in prompt):
        raise RuntimeInputError(f"prompt ids must lie in [0, {vocab}) (the tokenizer's vocabulary)")
