"""On a CUDA GPU (`pytest -m cuda` on the lent device; skipped elsewhere): tiny dense and MoE checkpoints
exported and optimized for CUDA in fp16 and bf16, against transformers on the same GPU and weights.

Greedy tokens must equal transformers' up to the first difference, and where they differ each side's
token must be in the other's top 3 there (bf16 flips near-ties: the tiny dense model's first step has
an fp32 margin of 0.12, below bf16's resolution at that scale).
"""

import json

import numpy as np
import onnx
import pytest
import torch
import transformers

from artifact.contract import HOST_SHAPE_NODES
from graphs.artifact import optimize_artifact
from qwen2_export.export import export_checkpoint
from qwen2_export.synthetic import tiny_config, write_checkpoint
from runtime import Model
from runtime.cuda_graph import CapturedSteps, PipelinedSteps
from runtime.padding import PADDINGS
from tools.bench_gpu.peers import top3_agreement
from tools.bench_gpu.prepare import placement

from helpers import BASES, classification_checkpoint, classification_reference, load_reference_model, ours, padded, run_example

pytestmark = pytest.mark.cuda

PROMPT = [456, 40, 300, 17, 250, 99, 3]
GREEDY = dict(max_new_tokens=32, greedy=True, repetition_penalty=1.0)
CASES = [(variant, dtype) for variant in ("dense_untied_sharded", "moe_shared") for dtype in ("fp16", "bf16")]
TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
LOGIT_TOLERANCE = {"fp16": 0.05, "bf16": 0.25}  # seen: 0.016 and 0.11 at logit scale ~15 (H200)


@pytest.fixture(scope="module")
def cuda_artifact(shared_build, tiny_checkpoint):
    def build(variant: str, dtype: str):
        def export_and_optimize(folder):
            export_checkpoint(tiny_checkpoint(variant), folder, dtype=dtype)
            optimize_artifact(folder, "cuda", {"fp16": "float16", "bf16": "bfloat16"}[dtype])

        return shared_build(f"cuda-{variant}-{dtype}", export_and_optimize)

    return build


def transformers_on_gpu(checkpoint, dtype: torch.dtype):
    return transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype).cuda().eval()


def assert_on_cuda(graph) -> None:
    """Every node on CUDA but those that compute the total length from the mask's shape (Shape itself may
    run on either); the runtime makes the same check at load."""
    placed = placement(graph)
    cpu = set(placed.get("CPUExecutionProvider", []))
    assert cpu <= {f"{HOST_SHAPE_NODES}{name}" for name in ("mask_shape", "mask_width", "total_length")}
    assert f"{HOST_SHAPE_NODES}total_length" in cpu  # the check sees the placement at all
    assert any("GroupQueryAttention" in name for name in placed["CUDAExecutionProvider"])


@pytest.mark.parametrize("variant, dtype", CASES)
def test_every_node_of_the_cuda_graph_runs_on_cuda(cuda_artifact, variant, dtype):
    assert_on_cuda(cuda_artifact(variant, dtype) / "onnx/model_cuda.onnx")


@pytest.mark.parametrize("variant, dtype", CASES)
def test_greedy_tokens_match_transformers_on_the_gpu(cuda_artifact, tiny_checkpoint, variant, dtype):
    model = Model.load(cuda_artifact(variant, dtype), device="cuda")
    ours = model.generate(PROMPT, **GREEDY).output_ids
    vocab = model.manifest.tokenizer.vocab_size
    reference = transformers_on_gpu(tiny_checkpoint(variant), TORCH_DTYPES[dtype])
    reference.generation_config = transformers.GenerationConfig(
        do_sample=False, eos_token_id=None, pad_token_id=0, suppress_tokens=list(range(vocab, reference.config.vocab_size)))
    with torch.no_grad():
        theirs = reference.generate(torch.tensor([PROMPT], device="cuda"), max_new_tokens=32)[0, len(PROMPT):].tolist()
    assert ours == theirs or top3_agreement(reference, PROMPT, ours, theirs[: len(ours)], vocab)
    assert model.session.steps.full_logits_reads == 0  # chosen from the graph's candidates


@pytest.mark.parametrize("variant, dtype", CASES)
def test_captured_pipelined_and_chunked_steps_give_the_plain_tokens(cuda_artifact, tiny_checkpoint, variant, dtype):
    """The same tokens from every way of stepping. MoE graphs are compared up to near ties: onnxruntime's
    MoE kernel picks its GEMM tactics by timing them in each session, so two sessions may round apart
    (bf16, seen only with other tests loading the GPU: a token flipped where transformers' top 3 holds both)."""
    artifact = cuda_artifact(variant, dtype)
    plain = Model.load(artifact, device="cuda").generate(PROMPT * 3, **GREEDY).output_ids
    pipelined = Model.load(artifact, device="cuda", cuda_graph=True)
    assert isinstance(pipelined.session.steps, PipelinedSteps)  # libcuda opens on a GPU machine
    captured = Model.load(artifact, device="cuda", cuda_graph=True, steps=CapturedSteps)
    vocab = pipelined.manifest.tokenizer.vocab_size

    def plain_tokens(tokens: list[int]) -> bool:
        if tokens == plain or not variant.startswith("moe"):
            return tokens == plain
        reference = transformers_on_gpu(tiny_checkpoint(variant), TORCH_DTYPES[dtype])
        return top3_agreement(reference, PROMPT * 3, tokens, plain, vocab)

    for model in (pipelined, captured):
        assert plain_tokens(model.generate(PROMPT * 3, **GREEDY).output_ids)
        assert plain_tokens(model.generate(PROMPT * 3, **GREEDY, prefill_chunk=5).output_ids)
    penalized = dict(GREEDY, repetition_penalty=1.8)  # the host often overrules the device's candidate
    assert pipelined.generate(PROMPT, **penalized).output_ids == captured.generate(PROMPT, **penalized).output_ids
    assert sum(p.reruns for p in pipelined.session.steps.pipelines.values()) > 0


@pytest.mark.parametrize("variant, dtype", CASES)
def test_last_token_logits_of_each_graph_match_transformers_fp32(cuda_artifact, tiny_checkpoint, variant, dtype):
    """Portable and optimized graphs on CUDA: an export problem shows in both, a fusion problem in one."""
    artifact = cuda_artifact(variant, dtype)
    prompt = PROMPT + [12, 7]
    reference = transformers_on_gpu(tiny_checkpoint(variant), torch.float32)
    with torch.no_grad():
        expected = reference(torch.tensor([prompt], device="cuda")).logits[0, -1].float().cpu().numpy()
    for graph in ("portable", "optimized-cuda"):
        session = Model.load(artifact, device="cuda", graph=graph).session
        inputs = PADDINGS[session.graph.padding](0).prefill([prompt], 0)
        row = session.steps.step(inputs, session.caches.take(1, 64)).full()[0][: expected.shape[0]]
        assert np.isfinite(row).all()
        assert np.abs(row - expected).max() < LOGIT_TOLERANCE[dtype], graph
        assert row.argmax() == expected.argmax(), graph


@pytest.mark.parametrize("variant", ["dense_untied_sharded", "moe_shared"])
def test_genai_drives_our_cuda_graph_with_its_cuda_graph_to_our_tokens(cuda_artifact, variant):
    """onnxruntime-genai-cuda through examples/genai and the artifact's genai/optimized-cuda.json overlay
    (enable_cuda_graph): the tokens of our runtime's captured steps on the same graph."""
    artifact = cuda_artifact(variant, "fp16")
    theirs = run_example("genai", artifact, "--graph", "optimized-cuda", new_tokens=32)
    assert theirs == ours(artifact, new_tokens=32, device="cuda", cuda_graph=True)


def test_awq_int4_portable_graph_on_cuda_equals_the_dequantized_model(tmp_path_factory):
    """An AWQ export in fp16 on the CUDA EP (DequantizeLinear + MatMul, fused by onnxruntime) against the
    fp32 float model holding the dequantized weights (CPU)."""
    from qwen2_export.synthetic_int4 import write_int4_checkpoint

    folder = tmp_path_factory.mktemp("awq-cuda")
    weights = write_int4_checkpoint(folder / "checkpoint", "awq", variant="sliding_window", group_size=32)
    artifact = export_checkpoint(folder / "checkpoint", folder / "artifact", dtype="fp16")
    config = json.loads((folder / "checkpoint" / "config.json").read_text())
    config.pop("quantization_config")
    reference = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**config)).float().eval()
    reference.load_state_dict(weights)
    model = Model.load(artifact, device="cuda")
    ids = np.array([PROMPT])
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(ids.shape[1])[None]}
    feeds.update({name: np.zeros((1, 2, 0, 16), np.float16) for name in model.session.graph.input_names
                  if name.startswith("past_key_values")})
    ours = model.session.session.run(["logits"], feeds)[0][0, -1]
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids)).logits[0, -1].numpy()
    assert np.abs(ours - expected).max() <= LOGIT_TOLERANCE["fp16"] * max(1.0, np.abs(expected).max() / 15)
    assert int(ours.argmax()) == int(expected.argmax())


def assert_follows_stored_weights(artifact, checkpoint) -> None:
    """Against transformers fp32 (CPU) holding the weights the int4 graph stores, dequantized: the first 8
    greedy tokens equal, all 32 in its top 3; captured steps give the same tokens."""
    from tools.int4_error import stored_weights

    reference = load_reference_model(checkpoint, stored_weights(artifact))
    model = Model.load(artifact, device="cuda")
    ours = model.generate(PROMPT, **GREEDY, ignore_eos=True).output_ids
    vocab = model.manifest.tokenizer.vocab_size
    with torch.no_grad():
        rows = reference(torch.tensor([PROMPT + ours])).logits[0, len(PROMPT) - 1 : -1, :vocab]
    assert ours[:8] == rows[:8].argmax(-1).tolist()
    assert all(token in top for token, top in zip(ours, rows.topk(3).indices.tolist(), strict=True))
    captured = Model.load(artifact, device="cuda", cuda_graph=True)
    assert captured.generate(PROMPT, **GREEDY, ignore_eos=True).output_ids == ours


@pytest.mark.parametrize("method", ["awq", "gptq", "rtn"])
def test_int4_cuda_graph_runs_on_cuda_and_equals_its_dequantized_weights(tmp_path_factory, method):
    """AWQ, GPTQ and --quantize int4 exports in fp16 with their CUDA graph (MatMulNBits, packed q/k/v and
    gate/up): every node on CUDA, and it follows the weights it stores (assert_follows_stored_weights)."""
    from qwen2_export.synthetic import tiny_config, write_checkpoint
    from qwen2_export.synthetic_int4 import write_int4_checkpoint

    folder = tmp_path_factory.mktemp(f"{method}-cuda")
    checkpoint = folder / "checkpoint"
    if method == "rtn":
        write_checkpoint(checkpoint, tiny_config("sliding_window"), seed=0, dtype=torch.float16)
        artifact = export_checkpoint(checkpoint, folder / "artifact", dtype="fp16", quantize="int4", block_size=16)
    else:
        write_int4_checkpoint(checkpoint, method, variant="sliding_window", group_size=32)
        artifact = export_checkpoint(checkpoint, folder / "artifact", dtype="fp16")
    optimize_artifact(artifact, "cuda", "float16")
    assert_on_cuda(artifact / "onnx/model_cuda.onnx")
    assert_follows_stored_weights(artifact, checkpoint)


# CUDA QMoE's weight tiles span 64 inputs (graphs/fusions/moe.py): the tiny MoE variants with wider experts
CUDA_MOE_WIDTHS = {"moe_intermediate_size": 64, "shared_expert_intermediate_size": 128}


@pytest.mark.parametrize("method, variant, block, symmetric", [
    ("rtn", "moe_shared", 32, False), ("rtn", "moe_mlp_only_norm", 64, True), ("gptq", "moe_shared", 32, False),
], ids=["rtn-block32", "rtn-norm-block64-symmetric", "gptq-block32"])
def test_int4_moe_cuda_graph_runs_qmoe_on_cuda_and_equals_its_dequantized_weights(tmp_path_factory, method, variant,
                                                                                  block, symmetric):
    """Int4 Qwen2-MoE exports (--quantize int4, and a GPTQ checkpoint) in fp16 with their CUDA graph (QMoE
    experts, MatMulNBits elsewhere), both routing modes: every node on CUDA, and it follows the weights it
    stores (assert_follows_stored_weights)."""
    from qwen2_export.synthetic import tiny_config, write_checkpoint
    from qwen2_export.synthetic_int4 import write_int4_checkpoint

    folder = tmp_path_factory.mktemp(f"{method}-moe-cuda")
    checkpoint = folder / "checkpoint"
    if method == "rtn":
        write_checkpoint(checkpoint, {**tiny_config(variant), **CUDA_MOE_WIDTHS}, seed=0, dtype=torch.float16)
        artifact = export_checkpoint(checkpoint, folder / "artifact", dtype="fp16", quantize="int4", block_size=block,
                                     symmetric=symmetric)
    else:
        write_int4_checkpoint(checkpoint, method, variant=variant, group_size=block, overrides=CUDA_MOE_WIDTHS)
        artifact = export_checkpoint(checkpoint, folder / "artifact", dtype="fp16")
    optimize_artifact(artifact, "cuda", "float16")
    ops = [node.op_type for node in onnx.load(str(artifact / "onnx/model_cuda.onnx"), load_external_data=False).graph.node]
    assert "QMoE" in ops and "DequantizeLinear" not in ops
    assert_on_cuda(artifact / "onnx/model_cuda.onnx")
    assert_follows_stored_weights(artifact, checkpoint)


@pytest.mark.parametrize("variant", ["dense_untied_sharded", "moe_shared"])
def test_continuous_batching_on_cuda_gives_each_request_its_tokens_alone(cuda_artifact, tiny_checkpoint, variant):
    """runtime/batcher.py with captured decode steps per batch size (rows of the shared buffer bound by
    address) and prefills padded to warmed shapes: requests joining at different steps each get the greedy
    tokens they get alone, up to fp16's near ties: where a request's tokens part from its tokens alone,
    both are in transformers' top 3 there (a step of other rows and length rounds differently)."""
    import threading
    import time

    from runtime.batcher import Batcher, BatchRequest

    model = Model.load(cuda_artifact(variant, "fp16"), device="cuda", cuda_graph=True)
    prompts = [[(11 * i + j) % 400 for j in range(2 + 7 * i)] for i in range(6)]
    alone = [model.generate(p, max_new_tokens=20, greedy=True, repetition_penalty=1.0, ignore_eos=True).output_ids
             for p in prompts]
    batcher = Batcher(model.session, model.manifest, max_batch=8, capacity=256)
    batcher.start(warm_up=True)
    got, done = [[] for _ in prompts], [threading.Event() for _ in prompts]

    def sink(i):
        return lambda token, reason: got[i].append(token) if token is not None else done[i].set()

    def submit(i):
        batcher.submit(BatchRequest(prompts[i], model.sampling(greedy=True, repetition_penalty=1.0), 20, sink(i)))

    submit(0), submit(1)
    while len(got[0]) < 3:  # the others join a running batch
        time.sleep(0.001)
    for i in range(2, len(prompts)):
        submit(i)
    assert all(event.wait(60) for event in done)
    batcher.stop()
    reference, vocab = transformers_on_gpu(tiny_checkpoint(variant), torch.float16), model.manifest.tokenizer.vocab_size
    assert all(len(tokens) == 20 for tokens in got)
    assert all(tokens == expected or top3_agreement(reference, prompt, tokens, expected, vocab)
               for prompt, tokens, expected in zip(prompts, got, alone))
    assert len(batcher.decode_views) > 1  # several batch sizes ran


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("task", ["sequence", "token", "embedding"])
def test_classification_and_embedding_graphs_for_cuda_run_on_cuda_and_match_transformers(tmp_path_factory, base, task):
    """Issue 17's tasks, exported in fp16 and optimized for CUDA (attention, norms, packed projections and
    experts fused; the head after the final norm in fp32), against transformers' fp32 classes."""
    folder = tmp_path_factory.mktemp(f"cuda-{base}-{task}")
    if task == "embedding":
        checkpoint = write_checkpoint(folder / "checkpoint", tiny_config(BASES[base]), seed=5)
        artifact = export_checkpoint(checkpoint, folder / "artifact", dtype="fp16", task="feature-extraction")
    else:
        checkpoint = classification_checkpoint(folder / "checkpoint", BASES[base], task)
        artifact = export_checkpoint(checkpoint, folder / "artifact", dtype="fp16")
    entry = optimize_artifact(artifact, "cuda", "float16")
    assert_on_cuda(artifact / entry.file)
    model = Model.load(artifact, device="cuda")
    assert model.session.graph.name == entry.name
    prompts = [[5, 6, 7], [40, 41, 42, 43, 44, 45, 46], [300]]
    ids, mask = padded(prompts, "right")
    if task == "embedding":
        with torch.no_grad():
            hidden = transformers.AutoModel.from_pretrained(checkpoint, dtype=torch.float32).eval()(
                input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
        expected = torch.nn.functional.normalize(hidden[torch.arange(3), torch.tensor(mask.sum(1) - 1)], dim=-1).numpy()
        np.testing.assert_allclose(model.embed(prompts), expected, atol=0.01)
        return
    (ours,) = model.session.session.run(None, {"input_ids": ids, "attention_mask": mask})
    with torch.no_grad():
        theirs = classification_reference(checkpoint, task)(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    if task == "token":
        ours, theirs = ours[mask == 1], theirs[mask == 1]
    np.testing.assert_allclose(ours, theirs, atol=LOGIT_TOLERANCE["fp16"], rtol=0)
    assert len(model.classify(prompts)) == 3
