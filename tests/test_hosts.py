"""Other hosts driving an artifact unchanged (docs: hosts.md), through the repo's examples, against our
runtime's greedy tokens: onnxruntime-genai (PyPI, CPU; examples/genai) through the genai_config.json export
and optimize write (the CUDA graph: tests/test_cuda.py), plain onnxruntime-node over the manifest (examples/node) and transformers.js in Node and in headless
Chromium (examples/transformers-js). Every example applies our runtime's rule, never an id past the
tokenizer, so the tokens are equal throughout.
The npm packages come from examples/package-lock.json (the README's set-up command installs them)."""

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest

from artifact import contract
from artifact.hosts import TRANSFORMERS_JS_KEY, genai_config, genai_graph_settings
from qwen2_export.synthetic import TINY_VARIANTS

from helpers import CHROMIUM, EXAMPLES, HOST_NEW_TOKENS, PROMPTS, ours, run_example

@pytest.mark.parametrize("variant", sorted(TINY_VARIANTS))
def test_genai_drives_the_portable_graph_to_our_greedy_tokens(tiny_artifact, variant):
    """Every tiny variant (dense, MoE, sliding window, YaRN)."""
    artifact = tiny_artifact(variant)
    assert run_example("genai", artifact) == ours(artifact)


@pytest.mark.parametrize("variant", sorted(TINY_VARIANTS))
def test_genai_drives_the_cpu_graph_by_default_and_the_portable_one_through_its_overlay(tiny_optimized, variant):
    """The CPU graph takes genai's inputs as they come (the total length is computed from the mask) and its
    shared KV buffer."""
    artifact = tiny_optimized(variant, "cpu")
    assert run_example("genai", artifact) == ours(artifact)
    assert run_example("genai", artifact, "--graph", contract.PORTABLE_GRAPH) == ours(artifact, graph=contract.PORTABLE_GRAPH)


def test_without_the_examples_rule_a_host_picks_ids_past_the_tokenizer(tiny_artifact):
    """Why every example applies our runtime's rule (never an id past the tokenizer): the tiny checkpoints,
    like published Qwen2 ones, have embedding rows past the tokenizer's ids, and genai left alone picks one
    on moe_shared (its 7th token), after which its tokens and ours differ."""
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is a test dependency: pip install -e '.[test]'")
    spec = importlib.util.spec_from_file_location("genai_example", EXAMPLES / "genai" / "generate.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    artifact = tiny_artifact("moe_shared")
    manifest = contract.read_manifest(artifact)
    # the example's generate with the rule's bound at the last embedding row: nothing is masked
    theirs = list(example.generate(og.Model(str(artifact)), PROMPTS[0], HOST_NEW_TOKENS, True, manifest.model.vocab_size))
    assert max(theirs) >= manifest.tokenizer.vocab_size and theirs != ours(artifact)


@pytest.mark.parametrize("variant", sorted(TINY_VARIANTS))
def test_transformers_js_loads_the_folder_and_gives_our_greedy_tokens(tiny_artifact, variant):
    artifact = tiny_artifact(variant)
    assert run_example("transformers-js", artifact) == ours(artifact)


@pytest.mark.parametrize("variant", ["moe_shared", "sliding_window"])
def test_transformers_js_in_node_also_drives_the_cpu_graph(tiny_optimized, variant):
    """It feeds a growing cache; GroupQueryAttention copies the past into a longer present when the two are
    different buffers, so the shared-buffer graph serves that cache too."""
    artifact = tiny_optimized(variant, "cpu")
    assert run_example("transformers-js", artifact, "--graph", contract.optimized_graph_name("cpu")) == ours(artifact)


@pytest.mark.parametrize("variant, dtype", [("dense_tied", "fp32"), ("moe_shared", "fp32"), ("moe_shared", "fp16")])
def test_transformers_js_in_a_browser_loads_the_folder_over_http(tiny_artifact, variant, dtype):
    """Headless Chromium (WASM) fetching the artifact from a local server: the config.json block names the
    graph and its external-data file (without it the browser build asks for onnx/model_quantized.onnx)."""
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium-headless-shell")
    artifact = tiny_artifact(variant, dtype)
    assert run_example("transformers-js", artifact, script="browser") == ours(artifact)


@pytest.mark.parametrize("variant", ["dense_untied_sharded", "moe_shared", "sliding_window", "yarn"])
def test_onnxruntime_node_drives_both_graphs_from_the_manifest(tiny_optimized, variant):
    """The portable graph (growing cache) and the CPU graph (one buffer bound as past and present)."""
    artifact = tiny_optimized(variant, "cpu")
    assert run_example("node", artifact) == ours(artifact, graph=contract.PORTABLE_GRAPH)
    assert run_example("node", artifact, "--graph", contract.optimized_graph_name("cpu")) == ours(artifact)


def test_host_configs_say_what_the_manifest_and_generation_config_say(tiny_artifact, tiny_checkpoint):
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
    config = json.loads((artifact / contract.CONFIG_FILE).read_text())
    checkpoint_config = json.loads((tiny_checkpoint("moe_shared") / contract.CONFIG_FILE).read_text())
    assert config == {**checkpoint_config, TRANSFORMERS_JS_KEY: {"dtype": "fp32", "use_external_data_format": {"model.onnx": 1}}}
    assert contract.CONFIG_FILE in manifest.files
    overlay = json.loads((artifact / contract.genai_overlay_file(contract.PORTABLE_GRAPH)).read_text())
    assert overlay["model"]["decoder"]["filename"] == contract.graph_file()


def test_optimize_points_genai_at_the_cpu_graph_and_writes_an_overlay_per_graph(tiny_optimized):
    artifact = tiny_optimized("moe_shared", "cpu")
    manifest = contract.read_manifest(artifact)
    written = json.loads((artifact / contract.GENAI_CONFIG_FILE).read_text())
    assert written["model"]["decoder"]["filename"] == contract.graph_file("cpu")
    assert written["search"]["past_present_share_buffer"] is True
    for graph in manifest.graphs:
        name = contract.genai_overlay_file(graph.name)
        overlay = json.loads((artifact / name).read_text())
        assert overlay["model"]["decoder"]["filename"] == graph.file and name in manifest.files
        assert overlay["search"]["past_present_share_buffer"] is (graph.kv_layout == contract.SHARED_BUFFER)
    # no provider anywhere: in genai 0.18 an overlay's provider list changed nothing (the device is its API's)
    assert "session_options" not in genai_graph_settings(dataclasses.replace(manifest.graphs[-1], target="cuda"))["model"]["decoder"]
    assert written["model"]["decoder"]["session_options"]["provider_options"] == []
