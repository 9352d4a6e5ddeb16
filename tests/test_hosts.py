"""Other hosts driving an artifact unchanged (docs: hosts.md). onnxruntime-genai (PyPI, CPU): `og.Model`
on the artifact folder, through the genai_config.json export writes, against our runtime's greedy tokens."""

import json

import pytest

from artifact import contract
from artifact.genai import genai_config
from qwen2_export.synthetic import TINY_VARIANTS
from runtime import Model

PROMPT = [456, 40, 300, 17, 250, 99, 3]
NEW_TOKENS = 20


def genai_greedy(artifact, prompt: list[int], new_tokens: int) -> list[int]:
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is a test dependency: pip install -e '.[test]'")
    model = og.Model(str(artifact))
    params = og.GeneratorParams(model)
    length = len(prompt) + new_tokens
    params.set_search_options(do_sample=False, max_length=length, min_length=length, repetition_penalty=1.0)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens


@pytest.mark.parametrize("variant", sorted(TINY_VARIANTS))
def test_genai_drives_the_portable_graph_to_our_greedy_tokens(tiny_artifact, variant):
    """Every tiny variant (dense, MoE, sliding window, YaRN): equal tokens, or equal until genai picks an id
    past the tokenizer (an embedding row of padding, which our runtime never emits and genai has no rule
    against: moe_shared does at its 7th token; issue 15 keeps that open), where only that id is checked."""
    artifact = tiny_artifact(variant)
    ours = Model.load(artifact).generate(PROMPT, max_new_tokens=NEW_TOKENS, greedy=True, repetition_penalty=1.0,
                                         ignore_eos=True).output_ids
    theirs = genai_greedy(artifact, PROMPT, NEW_TOKENS)
    vocab = contract.read_manifest(artifact).tokenizer.vocab_size
    agreed = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b), NEW_TOKENS)
    assert agreed == NEW_TOKENS or theirs[agreed] >= vocab, (ours, theirs)
    assert agreed >= 5, (ours, theirs)


def test_genai_config_says_what_the_manifest_and_generation_config_say(tiny_artifact):
    artifact = tiny_artifact("moe_shared")
    manifest = contract.read_manifest(artifact)
    written = json.loads((artifact / contract.GENAI_CONFIG_FILE).read_text())
    generation = json.loads((artifact / contract.GENERATION_CONFIG_FILE).read_text())
    assert written == genai_config(manifest, generation)
    assert contract.GENAI_CONFIG_FILE in manifest.files
    decoder = written["model"]["decoder"]
    assert decoder["filename"] == contract.graph_file() and written["model"]["type"] == "qwen2"
    assert (decoder["num_key_value_heads"], decoder["head_size"]) == (manifest.model.num_key_value_heads, manifest.model.head_dim)
    assert written["model"]["eos_token_id"] == generation["eos_token_id"]
    assert written["search"]["past_present_share_buffer"] is False
    assert (written["search"]["top_k"], written["search"]["temperature"]) == (generation["top_k"], generation["temperature"])
