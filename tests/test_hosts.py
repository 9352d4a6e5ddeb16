"""Other hosts driving an artifact unchanged (docs: hosts.md), through the repo's examples, against our
runtime's greedy tokens: onnxruntime-genai (PyPI, CPU; examples/genai) through the genai_config.json export
writes, plain onnxruntime-node over the manifest (examples/node) and transformers.js in Node and in headless
Chromium (examples/transformers-js). Every example applies our runtime's rule, never an id past the
tokenizer, so the tokens are equal throughout.
The npm packages come from examples/package-lock.json (the README's set-up command installs them)."""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from artifact import contract
from artifact.hosts import TRANSFORMERS_JS_KEY, genai_config
from qwen2_export.synthetic import TINY_VARIANTS
from runtime import Model

PROMPT = [456, 40, 300, 17, 250, 99, 3]
NEW_TOKENS = 20
EXAMPLES = Path(__file__).parent.parent / "examples"


def ours(artifact, graph: str | None = None) -> list[int]:
    model = Model.load(artifact) if graph is None else Model.load(artifact, graph=graph)
    return model.generate(PROMPT, max_new_tokens=NEW_TOKENS, greedy=True, repetition_penalty=1.0, ignore_eos=True).output_ids


CHROMIUM = "/usr/bin/chromium-headless-shell"


def run_example(example: str, artifact, *options: str, script: str = "generate") -> list[int]:
    """Run examples/{example}/{script} (.py with this interpreter, .mjs with Node.js) on the prompt's ids;
    its output_ids."""
    folder = EXAMPLES / example
    if (folder / f"{script}.py").is_file():
        pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is a test dependency: pip install -e '.[test]'")
        program = [sys.executable, str(folder / f"{script}.py")]
    else:
        if shutil.which("node") is None or not (EXAMPLES / "node_modules").is_dir():
            pytest.skip("Node.js or the examples' packages are missing: npm ci --ignore-scripts --prefix examples")
        program = ["node", str(folder / f"{script}.mjs")]
    command = [*program, str(artifact), "--ids", ",".join(map(str, PROMPT)), "--new-tokens", str(NEW_TOKENS), *options]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["output_ids"]


@pytest.mark.parametrize("variant", sorted(TINY_VARIANTS))
def test_genai_drives_the_portable_graph_to_our_greedy_tokens(tiny_artifact, variant):
    """Every tiny variant (dense, MoE, sliding window, YaRN)."""
    artifact = tiny_artifact(variant)
    assert run_example("genai", artifact) == ours(artifact)


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
    theirs = list(example.generate(og.Model(str(artifact)), PROMPT, NEW_TOKENS, True, manifest.model.vocab_size))
    assert max(theirs) >= manifest.tokenizer.vocab_size and theirs != ours(artifact)


@pytest.mark.parametrize("variant", sorted(TINY_VARIANTS))
def test_transformers_js_loads_the_folder_and_gives_our_greedy_tokens(tiny_artifact, variant):
    artifact = tiny_artifact(variant)
    assert run_example("transformers-js", artifact) == ours(artifact)


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
