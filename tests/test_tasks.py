"""Classification and embedding artifacts (issue 17): tiny seeded Qwen2 and Qwen2-MoE checkpoints with a
sequence or token classification head, or exported for feature extraction, against transformers' own
classes on the same weights: logits and hidden states of padded batches (right and left padding,
transformers' pad-token rule, last-token pooling), Model.classify's labels and scores, Model.embed, a
head without pad_token_id, and the commands."""

import json
import shutil
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
import transformers

from graphs.artifact import optimize_artifact
from graphs.fusions.int4_matmul import EXACT
from qwen2_export.export import export_checkpoint
from qwen2_export.synthetic import tiny_config, write_checkpoint
from runtime import Model, RuntimeInputError
from tools.int4_error import stored_weights

from helpers import BASES, HEADS, LABELS, PAD, classification_checkpoint, classification_reference as reference, padded


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    made = {}

    def get(base: str, head: str, **config):
        key = (base, head, tuple(sorted(config.items())))
        if key not in made:
            folder = tmp_path_factory.mktemp(f"{base}-{head}")
            checkpoint = classification_checkpoint(folder / "checkpoint", base, head, **config)
            made[key] = checkpoint, export_checkpoint(checkpoint, folder / "artifact")
        return made[key]

    return get


PROMPTS = [[5, 6, 7], [40, 41, 42, 43, 44, 45, 46], [300]]


@pytest.fixture(scope="module")
def optimized(tmp_path_factory):
    """A copy of an artifact with its CPU-optimized graph added, made once per artifact; (folder, graph entry)."""
    made = {}

    def get(artifact):
        if artifact not in made:
            copy = shutil.copytree(artifact, tmp_path_factory.mktemp("optimized") / artifact.name)
            made[artifact] = copy, optimize_artifact(copy, "cpu")
        return made[artifact]

    return get


def graph_file(artifact, graph: str, optimized) -> str:
    """The portable graph of `artifact`, or the graph of its CPU-optimized copy."""
    if graph == "portable":
        return str(artifact / "onnx/model.onnx")
    folder, entry = optimized(artifact)
    return str(folder / entry.file)


# the optimized graphs' attention (GroupQueryAttention) takes right-padded rows only
GRAPHS_AND_SIDES = [("portable", "right"), ("portable", "left"), ("optimized", "right")]


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("graph, side", GRAPHS_AND_SIDES)
def test_graph_logits_match_transformers_on_padded_batches(exported, optimized, base, head, graph, side):
    checkpoint, artifact = exported(BASES[base], head)
    ids, mask = padded(PROMPTS, side)
    session = ort.InferenceSession(graph_file(artifact, graph, optimized))
    (ours,) = session.run(None, {"input_ids": ids, "attention_mask": mask})
    with torch.no_grad():
        theirs = reference(checkpoint, head)(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    if head == "token":  # padding positions are noise in both
        ours, theirs = ours[mask == 1], theirs[mask == 1]
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("head", HEADS)
def test_classify_gives_each_text_transformers_scores_alone_or_batched(exported, head):
    checkpoint, artifact = exported(BASES["dense"], head)
    model, ref = Model.load(artifact), reference(checkpoint, head)
    results = model.classify(PROMPTS, top_k=None)
    for prompt, result in zip(PROMPTS, results):
        with torch.no_grad():
            logits = ref(input_ids=torch.tensor([prompt])).logits[0]
        probabilities = torch.softmax(logits, dim=-1).numpy()
        if head == "sequence":
            assert [item.label for item in result] == [LABELS[str(i)] for i in np.argsort(-probabilities, kind="stable")]
            np.testing.assert_allclose([item.score for item in result], np.sort(probabilities)[::-1], atol=1e-5)
        else:
            assert [item.token_id for item in result] == prompt
            assert [item.label for item in result] == [LABELS[str(i)] for i in probabilities.argmax(-1)]
            np.testing.assert_allclose([item.score for item in result], probabilities.max(-1), atol=1e-5)
    assert model.classify([PROMPTS[1]], top_k=None) == [results[1]]


def test_without_a_pad_id_one_text_works_and_a_batch_is_refused_as_transformers_refuses_it(exported):
    checkpoint, artifact = exported(BASES["dense"], "sequence", pad_token_id=None)
    model, ref = Model.load(artifact), reference(checkpoint, "sequence")
    with torch.no_grad():
        expected = torch.softmax(ref(input_ids=torch.tensor([PROMPTS[1]])).logits[0], -1).max().item()
        with pytest.raises(ValueError, match="Cannot handle batch sizes > 1 if no padding token is defined"):
            ref(input_ids=torch.tensor(padded(PROMPTS[:2], "right")[0]))
    assert abs(model.classify([PROMPTS[1]])[0][0].score - expected) < 1e-5
    with pytest.raises(RuntimeInputError, match="Cannot handle batch sizes > 1 if no padding token is defined"):
        model.classify(PROMPTS[:2])


def test_a_multi_label_head_scores_with_sigmoids(exported):
    _, artifact = exported(BASES["dense"], "sequence", problem_type="multi_label_classification")
    model = Model.load(artifact)
    logits = ort.InferenceSession(str(artifact / "onnx/model.onnx")).run(
        None, {"input_ids": np.array([PROMPTS[0]]), "attention_mask": np.ones((1, 3), np.int64)})[0][0]
    scores = sorted((item.score for item in model.classify([PROMPTS[0]], top_k=None)[0]), reverse=True)
    np.testing.assert_allclose(scores, np.sort(1 / (1 + np.exp(-logits)))[::-1], atol=1e-6)


def test_the_manifest_records_the_task_and_labels_and_generation_is_refused(exported):
    _, artifact = exported(BASES["dense"], "token")
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["task"] == "token-classification"
    assert manifest["head"] == {"labels": list(LABELS.values()), "problem_type": None, "pad_token_id": PAD}
    assert manifest["graphs"][0]["kv_cache"]["layout"] == "none" and not (artifact / "genai_config.json").exists()
    with pytest.raises(RuntimeInputError, match="it does not generate"):
        Model.load(artifact).generate("hi")


def test_the_classify_command(exported, tiny_artifact):
    _, artifact = exported(BASES["dense"], "sequence")
    command = [sys.executable, "-m", "runtime", "classify", str(artifact), "--text", "hello", "--text", "a longer text", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    labels = json.loads(done.stdout)
    assert [len(result) for result in labels] == [1, 1] and labels[0][0]["label"] in LABELS.values()
    refused = subprocess.run([sys.executable, "-m", "runtime", "classify", str(tiny_artifact("dense_tied")), "--text", "x"],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "error: this artifact's task is text-generation" in refused.stderr


@pytest.fixture(scope="module")
def embedding(tmp_path_factory):
    """(causal LM checkpoint, its feature-extraction artifact) per base, made once."""
    made = {}

    def get(base: str):
        if base not in made:
            folder = tmp_path_factory.mktemp(f"embed-{base}")
            checkpoint = write_checkpoint(folder / "checkpoint", tiny_config(BASES[base]), seed=5)
            made[base] = checkpoint, export_checkpoint(checkpoint, folder / "artifact", task="feature-extraction")
        return made[base]

    return get


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("graph, side", GRAPHS_AND_SIDES)
def test_feature_extraction_matches_transformers_model_and_last_token_pooling(embedding, optimized, base, graph, side):
    checkpoint, artifact = embedding(base)
    ids, mask = padded(PROMPTS, side)
    hidden, pooled = ort.InferenceSession(graph_file(artifact, graph, optimized)).run(
        None, {"input_ids": ids, "attention_mask": mask})
    reference_model = transformers.AutoModel.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = reference_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
    np.testing.assert_allclose(hidden[mask == 1], theirs.numpy()[mask == 1], atol=1e-4, rtol=0)
    last = [row.nonzero()[0][-1] for row in mask]  # gte-Qwen2's last_token_pool, either side
    expected = F.normalize(theirs[torch.arange(len(ids)), torch.tensor(last)], dim=-1).numpy()
    np.testing.assert_allclose(pooled, expected, atol=1e-5, rtol=0)


def test_embed_gives_each_text_its_vector_alone_and_a_bare_model_checkpoint_exports_the_same(embedding, tmp_path):
    checkpoint, artifact = embedding("dense")
    model = Model.load(artifact)
    vectors = model.embed(PROMPTS)
    assert vectors.dtype == np.float32 and vectors.shape == (3, model.manifest.model.hidden_size)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-6)
    np.testing.assert_allclose(model.embed([PROMPTS[1]])[0], vectors[1], atol=1e-6)
    bare = tmp_path / "bare"  # as transformers saves a Qwen2Model: no lm_head, no "model." prefix
    transformers.AutoModel.from_pretrained(checkpoint, dtype=torch.float32).save_pretrained(bare)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bare / name).write_bytes((checkpoint / name).read_bytes())
    assert json.loads((bare / "config.json").read_text())["architectures"] == ["Qwen2Model"]
    np.testing.assert_allclose(Model.load(export_checkpoint(bare, tmp_path / "artifact")).embed(PROMPTS), vectors, atol=1e-6)
    with pytest.raises(RuntimeInputError, match="classify needs"):
        model.classify(["hi"])


def test_the_embed_command_on_the_portable_and_the_optimized_graph_and_a_task_mismatch(embedding, exported, tmp_path):
    _, artifact = embedding("dense")
    optimized = shutil.copytree(artifact, tmp_path / "optimized")
    done = subprocess.run([sys.executable, "-m", "qwen2_onnx", "optimize", str(optimized), "--target", "cpu"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "GroupQueryAttention x" in done.stderr + done.stdout, done.stderr
    expected = Model.load(artifact).embed(["hello", "a longer text"])
    for folder in (artifact, optimized):
        command = [sys.executable, "-m", "runtime", "embed", str(folder), "--text", "hello", "--text", "a longer text", "--json"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        np.testing.assert_allclose(np.array(json.loads(done.stdout)), expected, atol=1e-5)
    _, classifier = exported(BASES["dense"], "sequence")
    refused = subprocess.run([sys.executable, "-m", "runtime", "embed", str(classifier), "--text", "x"],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "embed needs a feature-extraction artifact" in refused.stderr


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("task", ["sequence", "token", "embedding"])
def test_optimized_graphs_fuse_attention_norms_projections_and_experts_and_the_runtime_uses_them(
        exported, embedding, optimized, base, task):
    _, artifact = embedding(base) if task == "embedding" else exported(BASES[base], task)
    folder, entry = optimized(artifact)
    fired = {count.name: count.fired for count in entry.passes}
    ours, portable = Model.load(folder), Model.load(artifact)
    layers = ours.manifest.model.num_hidden_layers
    assert fired["GroupQueryAttention"] == fired["packed_qkv"] == layers and fired["SimplifiedLayerNormalization"] == 2 * layers + 1
    assert (fired["MoE"] > 0) == (base == "moe") and fired["last_token_logits"] == fired["token_candidates"] == 0
    assert (entry.kv_layout, entry.padding) == ("none", "right") and not any("past" in spec.name for spec in entry.inputs)
    assert ours.session.graph.name == "optimized-cpu" and portable.session.graph.name == "portable"
    if task == "embedding":
        np.testing.assert_allclose(ours.embed(PROMPTS), portable.embed(PROMPTS), atol=1e-5)
    else:
        for mine, theirs in zip(ours.classify(PROMPTS, top_k=None), portable.classify(PROMPTS, top_k=None)):
            assert [item.label for item in mine] == [item.label for item in theirs]
            np.testing.assert_allclose([item.score for item in mine], [item.score for item in theirs], atol=1e-5)


@pytest.mark.parametrize("base", BASES)
def test_int4_classification_graphs_match_transformers_on_their_dequantized_weights(base, tmp_path):
    checkpoint = classification_checkpoint(tmp_path / "checkpoint", BASES[base], "sequence")
    artifact = export_checkpoint(checkpoint, tmp_path / "artifact", quantize="int4", block_size=16)
    entry = optimize_artifact(artifact, "cpu", int4_accuracy=EXACT)
    assert {count.name: count.fired for count in entry.passes}["MatMulNBits"] > 0
    ref = reference(checkpoint, "sequence")
    assert not ref.load_state_dict(stored_weights(artifact), strict=False).unexpected_keys
    ids, mask = padded(PROMPTS, "right")
    with torch.no_grad():
        theirs = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    options = ort.SessionOptions()  # float activations in the MatMulNBits onnxruntime fuses, as the runtime asks
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    for graph in ("onnx/model.onnx", entry.file):
        (ours,) = ort.InferenceSession(str(artifact / graph), options).run(None, {"input_ids": ids, "attention_mask": mask})
        np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
