"""Property tests: any value of a sampling option, a config.json key or a manifest field ends in a valid
result or in the stage's own error type, never in another exception (hypothesis generates the values)."""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen2_export.config import parse_config
from qwen2_export.errors import ConfigError
from qwen2_export.synthetic import tiny_config
from runtime import Model
from runtime.errors import RuntimeInputError
from runtime.sampling import SAMPLING_OPTIONS, SamplingConfig, Seen, choose_tokens, sampling_from_generation_config
from runtime.tokenizer import TextTokenizer

ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5), st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
PLAUSIBLE = {  # near the valid ranges, where off-by-one checks live
    "temperature": st.floats(-1, 3), "top_k": st.integers(-2, 600), "top_p": st.floats(-0.5, 1.5),
    "min_p": st.floats(-0.5, 1.5), "repetition_penalty": st.floats(-1, 3), "seed": st.integers(-5, 2**64),
    "do_sample": st.booleans(),
}


@settings(max_examples=300, deadline=None)
@given(st.fixed_dictionaries({}, optional={name: st.one_of(ANY_VALUE, PLAUSIBLE[name]) for name in SAMPLING_OPTIONS}),
       st.fixed_dictionaries({}, optional={name: PLAUSIBLE[name] for name in SAMPLING_OPTIONS[:-1]}))
def test_sampling_options_end_in_our_error_or_a_valid_choice(overrides, generation_config):
    try:
        config = sampling_from_generation_config(generation_config, **overrides)
    except RuntimeInputError:
        return
    assert isinstance(config, SamplingConfig)
    assert math.isfinite(config.temperature) and config.temperature > 0 and 0 < config.top_p <= 1
    logits = np.random.default_rng(0).standard_normal((2, 40)).astype(np.float32)
    with np.errstate(over="ignore", divide="ignore"):  # extreme values overflow to inf on purpose
        tokens = choose_tokens(logits, config, Seen.of([[1, 2], [3]], 40), np.random.default_rng(config.seed))
    assert tokens.shape == (2,) and all(0 <= t < 40 for t in tokens)


def test_a_tiny_temperature_draws_the_best_token_not_token_0():
    """Scores overflow to inf; the draw must still follow them (it once returned token 0 every time)."""
    logits = np.random.default_rng(1).standard_normal((3, 50)).astype(np.float32)
    for temperature in (1e-30, 1e-300, 5e-324):
        config = SamplingConfig(do_sample=True, temperature=temperature)
        with np.errstate(over="ignore", divide="ignore"):
            tokens = choose_tokens(logits, config, Seen.of([[]] * 3, 50), np.random.default_rng(0))
        assert tokens.tolist() == logits.argmax(axis=-1).tolist()


CONFIG_KEYS = sorted({*tiny_config("moe_shared"), *tiny_config("yarn"), *tiny_config("sliding_window"), "head_dim",
                      "rope_parameters", "layer_types", "mlp_only_layers", "quantization_config"})


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(["dense_tied", "moe_shared", "yarn", "sliding_window"]),
       st.dictionaries(st.sampled_from(CONFIG_KEYS), ANY_VALUE, min_size=1, max_size=3))
def test_config_values_end_in_config_error_or_a_config(variant, changes):
    raw = {**tiny_config(variant), **changes}
    try:
        config = parse_config(raw)
    except ConfigError:
        return
    assert config.num_hidden_layers >= 1 and config.head_dim >= 1 and len(config.layer_types) == config.num_hidden_layers


def leaf_paths(value, prefix=()) -> list[tuple]:
    if isinstance(value, dict):
        return [path for key, item in value.items() for path in leaf_paths(item, (*prefix, key))]
    if isinstance(value, list) and value:
        return [path for index, item in enumerate(value[:2]) for path in leaf_paths(item, (*prefix, index))]
    return [prefix]


@pytest.fixture(scope="module")
def manifest_playground(tiny_artifact, tmp_path_factory):
    artifact = Path(shutil.copytree(tiny_artifact("dense_tied"), tmp_path_factory.mktemp("manifest") / "artifact"))
    return artifact, json.loads((artifact / "manifest.json").read_text())


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_manifest_values_end_in_our_error_or_a_run(manifest_playground, data):
    """Any one or two manifest fields replaced by any value: the runtime refuses the artifact with its error
    type at load, or loads it and generates."""
    artifact, original = manifest_playground
    raw = copy.deepcopy(original)
    for path in data.draw(st.lists(st.sampled_from(leaf_paths(original)), min_size=1, max_size=2)):
        *parents, last = path
        target = raw
        for key in parents:
            target = target[key]
        target[last] = data.draw(ANY_VALUE)
    (artifact / "manifest.json").write_text(json.dumps(raw))
    try:
        model = Model.load(artifact)
        model.generate([1, 2, 3], max_new_tokens=2, greedy=True, ignore_eos=True)
    except RuntimeInputError:
        pass


JAMO = st.text(st.sampled_from("\u1100\u1161\u11a8\u1112\u1175 e\u0301a\u0308<|im_end|>x"), max_size=200)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(max_size=300), JAMO))
def test_the_cheap_prompt_bound_never_exceeds_the_real_token_count(manifest_playground, text):
    """The size bound that refuses huge prompts before tokenization is a true lower bound, NFC
    composition (Hangul jamo, combining accents) and special-token text included."""
    tokenizer = TextTokenizer(manifest_playground[0] / "tokenizer.json")
    text = text.encode("utf-8", "replace").decode("utf-8")  # lone surrogates are refused earlier
    assert tokenizer.fewest_tokens(len(text.encode("utf-8"))) <= len(tokenizer.encode(text, add_special_tokens=False))
