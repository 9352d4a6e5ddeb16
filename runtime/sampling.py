"""Token choice: pure functions over a logits batch [B, V] (numpy), in transformers' order.

repetition penalty -> (sampling only) temperature -> top-k -> top-p -> min-p -> draw; greedy takes the
argmax after the repetition penalty, as transformers' generate does. Filters set removed entries to
-inf and always keep at least one token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Protocol, Sequence

import numpy as np

from .errors import RuntimeInputError


@dataclass(frozen=True)
class SamplingConfig:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    seed: int | None = None

    @property
    def takes_best_candidate(self) -> bool:
        """Whether the choice is the graph's first candidate (greedy, no repetition penalty; the graph lists
        the lowest of the best ids first), so the device may feed it to the next step before the host
        has chosen."""
        return not self.do_sample and self.repetition_penalty == 1.0

    def __post_init__(self) -> None:
        checks = [
            (isinstance(self.do_sample, bool), f"do_sample={self.do_sample!r} must be true or false"),
            (finite(self.temperature) and self.temperature > 0,
             f"temperature={self.temperature!r} must be a finite number > 0 (use greedy decoding for 0)"),
            (integer(self.top_k) and self.top_k >= 0, f"top_k={self.top_k!r} must be an integer >= 0 (0 turns it off)"),
            (finite(self.top_p) and 0 < self.top_p <= 1, f"top_p={self.top_p!r} must be in (0, 1]"),
            (finite(self.min_p) and 0 <= self.min_p <= 1, f"min_p={self.min_p!r} must be in [0, 1]"),
            (finite(self.repetition_penalty) and self.repetition_penalty > 0,
             f"repetition_penalty={self.repetition_penalty!r} must be a finite number > 0 (1 turns it off)"),
            (self.seed is None or (integer(self.seed) and 0 <= self.seed < 2**63),
             f"seed={self.seed!r} must be an integer in [0, 2**63)"),
        ]
        for ok, message in checks:
            if not ok:
                raise RuntimeInputError(message)


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


SAMPLING_OPTIONS = ("do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")


def sampling_from_generation_config(generation_config: dict[str, Any], **overrides: Any) -> SamplingConfig:
    """Defaults from generation_config.json, then every override that is not None."""
    keys = SAMPLING_OPTIONS[:-1]  # a seed in generation_config.json is not a default
    defaults = {key: generation_config[key] for key in keys if generation_config.get(key) is not None}
    config = SamplingConfig(**defaults)
    return replace(config, **{key: value for key, value in overrides.items() if value is not None})


class Draws(Protocol):
    """Where the draw's uniform numbers come from: `random(n)` gives one in [0, 1) per row. A
    numpy Generator (generate's one stream for its batch), or each row's own (runtime/batcher.py)."""

    def random(self, n: int) -> np.ndarray: ...


@dataclass(frozen=True)
class Seen:
    """The ids each row has seen (its prompt and output so far), for the repetition penalty: rows `rows`
    of a bool table [R, W] that the caller keeps (W past every id a row can hold). A table, not id lists:
    a lookup of every row's candidates is one indexing, where np.isin per row took ~0.26 ms at a
    152k vocabulary."""

    table: np.ndarray
    rows: np.ndarray  # indices into the table, one per row of the logits

    @classmethod
    def of(cls, ids_per_row: Sequence[Sequence[int]], width: int) -> Seen:
        table = np.zeros((len(ids_per_row), width), bool)
        for row, ids in enumerate(ids_per_row):
            table[row, np.asarray(ids, dtype=np.int64)] = True
        return cls(table, np.arange(len(ids_per_row)))

    def among(self, ids: np.ndarray) -> np.ndarray:
        """[n, K] bool: whether row i has seen ids[i, j] (an id past the table never was)."""
        inside = ids < self.table.shape[1]
        return self.table[self.rows[:, None], np.where(inside, ids, 0)] & inside

    def mask(self, width: int) -> np.ndarray:
        """[n, width] bool over rows of logits `width` wide."""
        mask = np.zeros((len(self.rows), width), bool)
        columns = min(width, self.table.shape[1])
        mask[:, :columns] = self.table[self.rows, :columns]
        return mask


def penalized(values: np.ndarray, penalty: float) -> np.ndarray:
    """transformers' repetition penalty of seen ids' logits: positive ones divided, negative multiplied."""
    return np.where(values < 0, values * penalty, values / penalty)


def apply_repetition_penalty(logits: np.ndarray, seen: Seen, penalty: float) -> np.ndarray:
    """Each id seen in a row (prompt and output) gets the penalty."""
    if penalty == 1.0:
        return logits
    return np.where(seen.mask(logits.shape[-1]), penalized(logits, penalty), logits)


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    threshold = np.partition(logits, -k, axis=-1)[:, -k, None]
    return np.where(logits < threshold, -np.inf, logits)


def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    """Keep the smallest set of top tokens whose probability reaches `p` (transformers' TopPLogitsWarper)."""
    if p >= 1.0:
        return logits
    order = np.argsort(logits, axis=-1, kind="stable")  # ascending
    cumulative = np.cumsum(softmax(np.take_along_axis(logits, order, axis=-1)), axis=-1)
    remove_sorted = cumulative <= 1 - p
    remove_sorted[:, -1] = False
    remove = np.zeros_like(remove_sorted)
    np.put_along_axis(remove, order, remove_sorted, axis=-1)
    return np.where(remove, -np.inf, logits)


def min_p_filter(logits: np.ndarray, min_p: float) -> np.ndarray:
    """Drop tokens less likely than min_p times the top token's probability."""
    if min_p <= 0:
        return logits
    probs = softmax(logits)
    remove = probs < min_p * probs.max(axis=-1, keepdims=True)
    remove[np.arange(len(logits)), probs.argmax(axis=-1)] = False
    return np.where(remove, -np.inf, logits)


def softmax(logits: np.ndarray) -> np.ndarray:
    # a tiny temperature or penalty overflows scores to +inf; inf - inf would be NaN (and a draw of token
    # 0), so +inf counts as the largest finite value: the probability goes to the top scores
    logits = np.minimum(logits, np.finfo(logits.dtype).max)
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def apply_temperature(scores: np.ndarray, temperature: float) -> np.ndarray:
    """scores / temperature. A temperature so small that a row overflows (or underflows to 0 in fp32) is
    applied in fp64 to the row shifted by its maximum (softmax and every filter ignore a constant per
    row), so the best score stays finite and the others go to -inf: the greedy limit, not NaN."""
    with np.errstate(all="ignore"):
        scaled = scores / temperature
        broken = (~np.isfinite(scaled) & np.isfinite(scores)).any(axis=-1)
        if broken.any():
            rows = scores[broken].astype(np.float64)
            scaled[broken] = (rows - rows.max(axis=-1, keepdims=True)) / temperature
    return scaled


def sampling_filters(scores: np.ndarray, config: SamplingConfig) -> np.ndarray:
    """Temperature, top-k, top-p, min-p (sampling only), each returning a new array."""
    scores = apply_temperature(scores, config.temperature)
    scores = top_k_filter(scores, config.top_k)
    scores = top_p_filter(scores, config.top_p)
    return min_p_filter(scores, config.min_p)


def filtered_logits(logits: np.ndarray, config: SamplingConfig, seen: Seen) -> np.ndarray:
    """The logits that the draw (or argmax) sees, after every processor in transformers' order."""
    # no copy when the logits are already fp32 (the session hands over an array of its own); every step
    # below returns a new array, so the caller's logits are never modified
    logits = apply_repetition_penalty(np.asarray(logits, dtype=np.float32), seen, config.repetition_penalty)
    return sampling_filters(logits, config) if config.do_sample else logits


def draw(scores: np.ndarray, rng: Draws) -> np.ndarray:
    """Column per row, drawn from softmax(scores)."""
    probs = softmax(scores)
    # inverse-CDF draw: one uniform number per row keeps a seeded run reproducible
    cumulative = np.cumsum(probs, axis=-1)
    draws = rng.random(len(probs))[:, None] * cumulative[:, -1:]
    return np.minimum((cumulative < draws).sum(axis=-1), probs.shape[-1] - 1)


def choose_tokens(logits: np.ndarray, config: SamplingConfig, seen: Seen, rng: Draws) -> np.ndarray:
    """Next token per row [B] from logits [B, V]."""
    scores = filtered_logits(logits, config, seen)
    return draw(scores, rng) if config.do_sample else scores.argmax(axis=-1)


def choose_from_candidates(top_logits: np.ndarray, top_ids: np.ndarray, config: SamplingConfig,
                           seen: Seen, rng: Draws) -> np.ndarray | None:
    """Next token per row from each row's K best logits (best first) and their ids, as the graph's
    token_candidates output gives them; the same tokens choose_tokens picks from the full row, or None
    (before drawing anything) when the candidates cannot decide that exactly.

    Exact when every token the filters keep is a candidate: no other id scores above the K-th
    candidate, and a penalty >= 1 only lowers scores, so it suffices that the best (greedy) or the
    top_k-th (sampling) penalized candidate beats the K-th raw one. Sampling without top_k, top_k > K,
    or a penalty < 1 need the full row. Candidates are put in id order, the order of the full row,
    so ties, the filters and the seeded draw see what they would see there.
    """
    k = top_logits.shape[1]
    if config.repetition_penalty < 1 or (config.do_sample and not 0 < config.top_k <= k):
        return None
    plain_greedy = not config.do_sample and config.repetition_penalty == 1.0
    if plain_greedy and k > 1 and (top_logits[:, 0] > top_logits[:, 1]).all():
        return top_ids[:, 0]  # every row has one clear best, the full row's argmax (the per-token fast path)
    order = np.argsort(top_ids, axis=-1, kind="stable")
    ids = np.take_along_axis(top_ids, order, axis=-1)
    scores = np.take_along_axis(np.asarray(top_logits, dtype=np.float32), order, axis=-1)
    if config.repetition_penalty != 1.0:
        scores = np.where(seen.among(ids), penalized(scores, config.repetition_penalty), scores)
    needed = config.top_k if config.do_sample else 1
    if not (np.sort(scores, axis=-1)[:, -needed] > top_logits[:, -1]).all():
        return None
    rows = np.arange(len(ids))
    if not config.do_sample:
        return ids[rows, scores.argmax(axis=-1)]
    return ids[rows, draw(sampling_filters(scores, config), rng)]
