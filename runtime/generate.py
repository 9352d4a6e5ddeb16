"""The generation loop: prefill, then decode token by token, sample, stop.

Prompts of different lengths are padded as the graph's manifest entry says (padding.py); finished rows
keep stepping with the pad token until every row is done.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from .cuda_graph import LONGEST_CAPTURED_PROMPT
from .errors import RuntimeInputError
from .kv_cache import KVCache
from .manifest import Manifest
from .padding import PADDINGS
from .sampling import SamplingConfig, choose_from_candidates, choose_tokens
from .session import GraphSession, StepScores
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
    Afterwards `generations`, `timings` and `cache` hold the results."""

    def __init__(
        self,
        session: GraphSession,
        manifest: Manifest,
        tokenizer: TextTokenizer,
        prompts: list[list[int]],
        sampling: SamplingConfig,
        max_new_tokens: int,
        stop_strings: tuple[str, ...] = (),
        cache: KVCache | None = None,
        prefill_chunk: int | None = None,
        ignore_eos: bool = False,
    ):
        check_request(manifest, prompts, max_new_tokens)
        self.session, self.manifest, self.tokenizer = session, manifest, tokenizer
        self.prompts, self.sampling, self.max_new_tokens = prompts, sampling, max_new_tokens
        self.stop_strings = tuple(stop_strings)
        self.stop_token_ids = () if ignore_eos else manifest.stop_token_ids  # ignore_eos: benchmarks want full lengths
        if prefill_chunk is not None and prefill_chunk < 1:
            raise RuntimeInputError(f"prefill_chunk={prefill_chunk} must be a positive number of tokens")
        self.prefill_chunk = prefill_chunk
        self.generations = [Generation(list(prompt)) for prompt in prompts]
        self.timings = Timings()
        needed = max(len(prompt) for prompt in prompts) + max_new_tokens
        reuse = cache.reusable_prefix(prompts[0], needed) if cache is not None and len(prompts) == 1 else 0
        # a fresh batch-1 prompt on a session that captures prefill is padded to a bucket length, whose
        # captured graph is replayed; the padded positions' keys are overwritten by the decode steps
        self.prompt_bucket = None
        if session.captures_prefill and len(prompts) == 1 and not reuse:
            self.prompt_bucket = captured_prompt_length(len(prompts[0]), manifest.context_length)
        needed = max(needed, self.prompt_bucket or 0)
        # shared buffers get headroom, so a chat's next turns usually fit and reuse them
        capacity = min(manifest.context_length, -(-needed // CAPACITY_STEP) * CAPACITY_STEP)
        self.cache = cache if reuse else session.empty_cache(manifest, len(prompts), capacity)
        self.timings.reused_prompt_tokens = reuse
        self.padding = PADDINGS[session.graph.padding](manifest.pad_token_id)
        if self.cache.capacity is not None:  # shared buffer: decode steps use a mask of the buffer's width
            self.padding.decode_width = self.cache.capacity

    def __iter__(self) -> Iterator[list[int | None]]:
        # the session marked the buffers busy when it handed them out; they return to it when the loop ends
        try:
            yield from self._steps()
        finally:
            self.cache.busy = False

    def _steps(self) -> Iterator[list[int | None]]:
        rng = np.random.default_rng(self.sampling.seed)
        started = time.perf_counter()
        if self.prompt_bucket:
            ids, mask, positions = self.padding.prefill(self.prompts, 0, self.prompt_bucket)
        else:
            ids, mask, positions = self.padding.prefill(self.prompts, self._prefill_leading_chunks())
        seen = [np.array(prompt, dtype=np.int64) for prompt in self.prompts]
        done = [False] * len(self.prompts)
        new = self._accept(self._choose(self.session.step(ids, mask, positions, self.cache), seen, rng), seen, done)
        self.timings.time_to_first_token_s = time.perf_counter() - started
        yield new
        decode = self._pipelined_decode if self._pipelines() else self._decode
        for new in decode(new, seen, done, rng):
            self.timings.decode_tokens += sum(token is not None for token in new)
            yield new
        for generation in self.generations:
            generation.finish_reason = generation.finish_reason or "length"
            generation.text = self.tokenizer.decode(generation.output_ids)
        self.timings.decode_s = time.perf_counter() - started - self.timings.time_to_first_token_s
        # the last sampled token was never fed, so the cache holds everything before it
        self.cache.tokens = [g.prompt_ids + g.output_ids[:-1] for g in self.generations]

    def _decode(self, new: list[int | None], seen: list[np.ndarray], done: list[bool],
                rng: np.random.Generator) -> Iterator[list[int | None]]:
        """One step at a time: feed the last tokens, choose the next ones."""
        while not all(done):
            ids, mask, positions = self.padding.decode([self.manifest.pad_token_id if t is None else t for t in new])
            new = self._accept(self._choose(self.session.step(ids, mask, positions, self.cache), seen, rng), seen, done)
            yield new

    def _pipelines(self) -> bool:
        """Batch-1 greedy decoding on a session that queues steps ahead (runtime/cuda_graph.py)."""
        return (self.session.pipelines_decode and len(self.prompts) == 1 and not self.sampling.do_sample
                and self.cache.capacity is not None and bool(self.session.graph.token_candidates))

    def _pipelined_decode(self, new: list[int | None], seen: list[np.ndarray], done: list[bool],
                          rng: np.random.Generator) -> Iterator[list[int | None]]:
        """As _decode for one greedy row, but step n+1 is queued, reading step n's best candidate on the
        device, before the host reads step n; a host choice other than that candidate queues step n+1
        again with the right token (DecodePipeline.rerun)."""
        if all(done):
            return
        pipeline, generation = self.session.decode_pipeline(self.cache), self.generations[0]
        current = 0
        pipeline.feed(current, new[0])
        pipeline.launch(current, self.padding.decode(new)[1])
        try:
            while not all(done):
                ahead = len(generation.output_ids) + 1 < self.max_new_tokens  # a step after this one is due
                if ahead:
                    next_mask = self.padding.decode([self.manifest.pad_token_id])[1]  # the token comes from the device
                    pipeline.launch(1 - current, next_mask)
                logits, (top_logits, top_ids) = pipeline.wait(current)
                tokens = self._choose(StepScores(top_logits, top_ids, self.session.full_reader(logits)), seen, rng)
                if ahead and tokens[0] != top_ids[0, 0]:
                    pipeline.rerun(1 - current, int(tokens[0]))
                new = self._accept(tokens, seen, done)
                yield new
                current = 1 - current
        finally:
            pipeline.drain()  # a step queued before a stop token still writes into the cache's buffers

    def _accept(self, tokens: np.ndarray, seen: list[np.ndarray], done: list[bool]) -> list[int | None]:
        """Record each unfinished row's token; None for rows already done."""
        new: list[int | None] = []
        for row, token in enumerate(tokens.tolist()):
            if done[row]:
                new.append(None)
                continue
            new.append(token)
            seen[row] = np.append(seen[row], token)
            done[row] = self._record(self.generations[row], token)
        return new

    def _choose(self, scores: StepScores, seen: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
        """From the device's candidates when they decide it, else from the full row (copied to the host)."""
        if scores.top_logits is not None:
            tokens = choose_from_candidates(scores.top_logits, scores.top_ids, self.sampling, seen, rng)
            if tokens is not None:
                return tokens
        logits = scores.full()
        logits[:, self.manifest.tokenizer_vocab_size :] = -np.inf  # padding rows of the embedding
        return choose_tokens(logits, self.sampling, seen, rng)

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
            self.session.step(*self.padding.prefill([prompt[:end]], start), self.cache)
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


def check_request(manifest: Manifest, prompts: list[list[int]], max_new_tokens: int) -> None:
    """Refuse impossible requests before any work, with the numbers."""
    if not prompts or any(not prompt for prompt in prompts):
        raise RuntimeInputError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise RuntimeInputError(f"max_new_tokens={max_new_tokens} must be at least 1")
    longest = max(len(prompt) for prompt in prompts)
    if longest + max_new_tokens > manifest.context_length:
        raise RuntimeInputError(
            f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} = {longest + max_new_tokens} exceeds the "
            f"model's context length {manifest.context_length}; shorten the prompt or lower --max-new-tokens"
        )
    vocab = manifest.tokenizer_vocab_size
    if any(not 0 <= token < vocab for prompt in prompts for token in prompt):
        raise RuntimeInputError(f"prompt ids must lie in [0, {vocab}) (the tokenizer's vocabulary)")
