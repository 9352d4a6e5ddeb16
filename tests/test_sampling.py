"""Sampling filters on hand-made logits, against transformers' logits processors."""

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from runtime import RuntimeInputError, SamplingConfig
from runtime.sampling import (
    Seen,
    apply_repetition_penalty,
    choose_from_candidates,
    choose_tokens,
    filtered_logits,
    min_p_filter,
    sampling_from_generation_config,
    top_k_filter,
    top_p_filter,
)

LOGITS = np.array([[2.0, 1.0, 0.5, -1.0, -3.0, 0.0], [0.1, 0.2, 0.3, 0.4, 5.0, -0.5]], dtype=np.float32)
RANDOM = np.random.default_rng(0).normal(size=(4, 50)).astype(np.float32) * 3


def reference(processor, logits, ids=None):
    input_ids = torch.tensor(ids) if ids is not None else torch.zeros((len(logits), 1), dtype=torch.long)
    return processor(input_ids, torch.from_numpy(logits.copy())).numpy()


def test_top_k_keeps_the_k_best():
    kept = np.isfinite(top_k_filter(LOGITS, 2))
    assert kept.tolist() == [[True, True, False, False, False, False], [False, False, False, True, True, False]]
    np.testing.assert_array_equal(top_k_filter(RANDOM, 7), reference(TopKLogitsWarper(7), RANDOM))


@pytest.mark.parametrize("p", [0.05, 0.5, 0.8, 0.95])
def test_top_p_matches_transformers(p):
    np.testing.assert_array_equal(top_p_filter(RANDOM, p), reference(TopPLogitsWarper(p), RANDOM))
    assert np.isfinite(top_p_filter(RANDOM, p)).sum(axis=-1).min() >= 1


def test_top_p_by_hand():
    # probabilities of row 0 ~ [.52, .19, .12, .03, .00, .07]: 0.7 needs the two best
    assert np.isfinite(top_p_filter(LOGITS[:1], 0.7)).tolist() == [[True, True, False, False, False, False]]


@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.5, 1.0])
def test_min_p_matches_transformers(min_p):
    np.testing.assert_array_equal(min_p_filter(RANDOM, min_p), reference(MinPLogitsWarper(min_p), RANDOM))


def test_repetition_penalty_matches_transformers():
    seen = [[0, 3, 3], [4, 5, 1]]
    ours = apply_repetition_penalty(LOGITS, Seen.of(seen, LOGITS.shape[1]), 1.3)
    np.testing.assert_allclose(ours, reference(RepetitionPenaltyLogitsProcessor(1.3), LOGITS, seen), rtol=1e-6)
    assert ours[0, 0] == pytest.approx(2.0 / 1.3) and ours[0, 3] == pytest.approx(-1.3)


def test_full_chain_in_transformers_order():
    config = SamplingConfig(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, min_p=0.05, repetition_penalty=1.05)
    seen = [[1, 2, 3]] * 4
    chain = LogitsProcessorList([
        RepetitionPenaltyLogitsProcessor(1.05), TemperatureLogitsWarper(0.7), TopKLogitsWarper(20),
        TopPLogitsWarper(0.8), MinPLogitsWarper(0.05),
    ])
    ours = filtered_logits(RANDOM, config, Seen.of(seen, RANDOM.shape[1]))
    np.testing.assert_allclose(ours, reference(chain, RANDOM, seen), rtol=1e-5)


def test_greedy_takes_argmax_after_the_penalty():
    config = SamplingConfig(do_sample=False, repetition_penalty=10.0)
    logits = np.array([[3.0, 2.9, 0.0]], dtype=np.float32)
    assert choose_tokens(logits, config, Seen.of([[0]], 3), np.random.default_rng()).tolist() == [1]


def test_draws_follow_the_filtered_distribution_and_a_seed_repeats():
    config = SamplingConfig(do_sample=True, top_k=2)
    logits = np.array([[np.log(0.7), np.log(0.3), 5.0 - 100]], dtype=np.float32).repeat(4000, axis=0)
    draws = choose_tokens(logits, config, Seen.of([[]] * 4000, 3), np.random.default_rng(7))
    assert set(draws.tolist()) == {0, 1} and abs((draws == 0).mean() - 0.7) < 0.03
    again = choose_tokens(logits, config, Seen.of([[]] * 4000, 3), np.random.default_rng(7))
    np.testing.assert_array_equal(draws, again)


@pytest.mark.parametrize("bad", [
    {"temperature": 0.0}, {"temperature": -1.0}, {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5},
    {"min_p": -0.1}, {"min_p": 2.0}, {"repetition_penalty": 0.0},
])
def test_out_of_range_values_are_errors(bad):
    name = next(iter(bad))
    with pytest.raises(RuntimeInputError, match=name):
        SamplingConfig(do_sample=True, **bad)


def test_generation_config_defaults_and_overrides():
    qwen2_7b_instruct = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
    config = sampling_from_generation_config(qwen2_7b_instruct, top_k=None, temperature=0.2)
    assert (config.do_sample, config.temperature, config.top_p, config.top_k, config.repetition_penalty) == (True, 0.2, 0.8, 20, 1.05)
    assert sampling_from_generation_config({}) == SamplingConfig()


def candidates_of(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """What the graph's token_candidates output holds: the k best per row, best first."""
    ids = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
    return np.take_along_axis(logits, ids, axis=-1), ids


CANDIDATE_CONFIGS = [
    SamplingConfig(),
    SamplingConfig(repetition_penalty=1.3),
    SamplingConfig(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05),  # Qwen's defaults
    SamplingConfig(do_sample=True, top_k=8, min_p=0.1),
    SamplingConfig(do_sample=True, top_k=16, top_p=0.5, temperature=1.5),
]


@pytest.mark.parametrize("config", CANDIDATE_CONFIGS)
def test_candidates_choose_what_the_full_row_chooses(config):
    """Random rows, some with ties at the candidates' edge and heavily penalized leaders: whenever the
    K candidates decide, the token equals the full row's under the same seed; they decide most rows."""
    rng = np.random.default_rng(5)
    decided = 0
    for trial in range(200):
        logits = (rng.normal(size=(3, 300)) * 2).astype(np.float32)
        if trial % 4 == 0:
            logits = np.round(logits)  # many ties
        seen = Seen.of([rng.integers(0, 300, size=rng.integers(1, 60)) for _ in range(3)], 300)
        values, ids = candidates_of(logits, 16 if trial % 2 else 64)
        chosen = choose_from_candidates(values, ids, config, seen, np.random.default_rng(trial))
        if chosen is None:
            continue
        decided += 1
        np.testing.assert_array_equal(chosen, choose_tokens(logits, config, seen, np.random.default_rng(trial)))
    assert decided >= 100


def test_candidates_refuse_what_needs_the_full_row():
    logits = RANDOM[:, :40]
    values, ids = candidates_of(logits, 8)
    seen = Seen.of([[0]] * len(logits), 40)
    rng = np.random.default_rng(0)
    assert choose_from_candidates(values, ids, SamplingConfig(do_sample=True), seen, rng) is None  # no top_k
    assert choose_from_candidates(values, ids, SamplingConfig(do_sample=True, top_k=9), seen, rng) is None  # k > K
    assert choose_from_candidates(values, ids, SamplingConfig(repetition_penalty=0.9), seen, rng) is None
    # every candidate penalized so hard that an id outside them could win
    flat = np.zeros((1, 40), np.float32)
    flat[0, :8] = 1.0
    values, ids = candidates_of(flat, 8)
    assert choose_from_candidates(values, ids, SamplingConfig(repetition_penalty=2.0), Seen.of([range(8)], 40), rng) is None
    assert rng.random() == np.random.default_rng(0).random()  # nothing was drawn
