"""graphs/: each fusion alone (structure and numbers) and the whole pipeline, on the tiny variants.

onnxruntime's own graph optimizations are off in every session here, so its fusions cannot hide ours.
"""

import collections
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from artifact import contract
from graphs.artifact import optimize_artifact, write_graph
from graphs.errors import GraphError
from graphs.fusions import packed_matmul
from graphs.fusions.moe import interleave_gate_up
from graphs.pipeline import PASSES, optimize
from runtime import Model
from runtime.cuda_graph import CapturedSteps, captured_prompt_buckets, captured_prompt_length
from runtime.padding import RightPadding

from conftest import VARIANTS
from helpers import PROMPTS, counting_steps, last_logits_per_step, open_session, pipelined, transformers_generate, with_stop_tokens

TOLERANCE = 1e-4  # fp32, fused graph vs portable graph


def histogram(path: Path) -> collections.Counter:
    return collections.Counter(node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node)


def partially_optimized(artifact: Path, only: tuple[str, ...], target: str = "cpu", dtype=None) -> Path:
    """The portable graph with just the fusions in `only`, saved beside the portable one."""
    manifest = contract.read_manifest(artifact)
    model = ir.load(artifact / "onnx/model.onnx")
    optimize(model, manifest, target, dtype, passes=tuple(p for p in PASSES if p.name in only))
    path = artifact / "onnx" / f"partial_{'_'.join(only)}.onnx".replace("/", "")
    write_graph(model, path, path.stem + ".onnx_data")
    return path


def session_for(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def assert_same_numbers(artifact: Path, fused: Path, tolerance: float = TOLERANCE) -> None:
    portable, manifest = open_session(artifact)
    ids = np.random.default_rng(3).integers(0, 456, size=(1, 14))
    expected = last_logits_per_step(portable, manifest, ids, prefill=10)
    for ours, reference in zip(last_logits_per_step(session_for(fused), manifest, ids, prefill=10), expected, strict=True):
        np.testing.assert_allclose(ours, reference, rtol=0, atol=tolerance)


FUSION_CASES = [
    # (fusions run, variant, op that must appear, ops that must be gone); every case but the logits one
    # must also shrink the graph (the packed ones: the number of MatMul/Gemm nodes)
    (("GroupQueryAttention",), "sliding_window", "GroupQueryAttention", {"Softmax", "Sin", "Cos"}),
    (("GroupQueryAttention",), "yarn", "GroupQueryAttention", {"Softmax", "Sin", "Cos"}),
    (("last_token_logits",), "dense_untied_sharded", "GatherND", set()),
    (("last_token_logits", "tied_lm_head"), "dense_tied", "Gemm", set()),
    (("MoE",), "moe_mlp_only_norm", "MoE", {"TopK", "ScatterElements"}),
    (("GroupQueryAttention", "packed_qkv"), "dense_tied", "GroupQueryAttention", set()),
    (("packed_gate_up",), "moe_shared", "Split", set()),
    (("SimplifiedLayerNormalization",), "dense_tied", "SimplifiedLayerNormalization", {"ReduceMean", "Pow"}),
    (("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"), "dense_untied_sharded",
     "SkipSimplifiedLayerNormalization", {"ReduceMean", "Pow"}),
]


@pytest.mark.parametrize("only, variant, present, gone", FUSION_CASES, ids=lambda c: "+".join(c) if isinstance(c, tuple) else None)
def test_each_fusion_alone(tiny_artifact, tmp_path, only, variant, present, gone):
    artifact = shutil.copytree(tiny_artifact(variant), tmp_path / "artifact")
    before, fused = histogram(artifact / "onnx/model.onnx"), partially_optimized(artifact, only)
    after = histogram(fused)
    assert after[present] > before[present]
    assert not gone & set(after), f"left over: {gone & set(after)}"
    if "packed_gate_up" in only:
        assert after["MatMul"] + after["Gemm"] < before["MatMul"] + before["Gemm"]
    elif "last_token_logits" not in only:  # that pass adds nodes (and removes S x V work)
        assert sum(after.values()) < sum(before.values())
    else:
        logits = session_for(fused).get_outputs()[0]
        assert logits.shape == ["batch_size", 1, 512]
    assert_same_numbers(artifact, fused)


def test_packed_qkv_uses_one_matmul_per_layer(tiny_artifact, tmp_path):
    artifact = shutil.copytree(tiny_artifact("dense_untied_sharded"), tmp_path / "a")
    attention_only = histogram(partially_optimized(artifact, ("GroupQueryAttention",)))
    packed = histogram(partially_optimized(artifact, ("GroupQueryAttention", "packed_qkv")))
    assert attention_only["MatMul"] - packed["MatMul"] == 2 * 3  # three layers, three projections -> one


def test_tied_lm_head_reads_the_embedding_without_a_transpose(tiny_optimized):
    graph = onnx.load(str(tiny_optimized("dense_tied") / "onnx/model_cpu.onnx"), load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}
    assert not [n for n in graph.node if n.op_type == "Transpose" and n.input[0] in initializers]
    (gemm,) = [n for n in graph.node if n.name == "lm_head/Gemm"]
    assert gemm.input[1] == next(n.input[0] for n in graph.node if n.op_type == "Gather" and n.input[0] in initializers)


def test_interleave_gate_up_pins_the_layout():
    gate = np.arange(6).reshape(1, 3, 2)  # E=1, I=3, D=2
    up = 100 + np.arange(6).reshape(1, 3, 2)
    out = interleave_gate_up(np.concatenate([gate, up], axis=1))
    assert out[0, :, 0].tolist() == [0, 100, 2, 102, 4, 104]


def test_candidates_put_the_lowest_of_the_best_ids_first():
    """TopK on CUDA leaves tied scores in any order; the candidates' first id must be the greedy token
    (the lowest id among the best scores), with every (id, score) pair kept. Run on TopK outputs whose
    ties are out of order, as CUDA's can be, on onnxruntime's CPU."""
    from graphs.fusions.token_candidates import lowest_best_id_first

    k = 5
    values_in = ir.Value(name="values", shape=ir.Shape([3, 1, k]), type=ir.TensorType(ir.DataType.FLOAT))
    ids_in = ir.Value(name="ids", shape=ir.Shape([3, 1, k]), type=ir.TensorType(ir.DataType.INT64))
    graph = ir.Graph([values_in, ids_in], [], nodes=[], opset_imports={"": contract.PORTABLE_OPSET})
    out = lowest_best_id_first(graph, values_in, ids_in, k)
    out.name = "reordered"
    graph.outputs.append(out)
    session = ort.InferenceSession(ir.to_proto(ir.Model(graph, ir_version=10)).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    values = np.array([[[2, 2, 2, 1, 0]], [[3, 1, 1, 0, 0]], [[5, 5, 4, 4, 4]]], np.float32)
    ids = np.array([[[9, 4, 7, 1, 0]], [[8, 2, 0, 5, 6]], [[151000, 151001, 3, 2, 1]]], np.int64)
    (got,) = session.run(None, {"values": values, "ids": ids})
    assert got[:, 0, 0].tolist() == [4, 8, 151000]
    for row in range(3):
        assert sorted(zip(got[row, 0], values[row, 0])) == sorted(zip(ids[row, 0], values[row, 0]))


@pytest.mark.parametrize("variant", VARIANTS)
def test_full_pipeline_structure(tiny_optimized, variant):
    artifact = tiny_optimized(variant)
    manifest = contract.read_manifest(artifact)
    graph = manifest.graph("optimized-cpu")
    layers, sparse = manifest.model.num_hidden_layers, len(manifest.model.moe.sparse_layers) if manifest.model.moe else 0
    ops = histogram(artifact / graph.file)
    assert ops["GroupQueryAttention"] == layers and ops["MoE"] == sparse
    assert ops["SkipSimplifiedLayerNormalization"] == 2 * layers - 1 and ops["SimplifiedLayerNormalization"] == 2
    assert not {"Softmax", "ReduceMean", "Cos", "Sin"} & set(ops)
    assert ops["Where"] == 3  # the candidates' (lowest_best_id_first); none of the mask's is left
    assert ops["TopK"] == 1 and graph.token_candidates == 64  # the next-token candidates; the router's is inside MoE
    # the total length comes from the mask's shape, so hosts that feed only the usual inputs can drive it
    assert not {"position_ids", "total_sequence_length"} & set(graph.input_names)
    entry = json.loads((artifact / "manifest.json").read_text())["graphs"][1]
    assert entry["name"] == "optimized-cpu" and entry["outputs"][0]["dims"] == ["batch_size", 1, 512]
    assert all(p["fired"] == p["expected"] for p in entry["passes"])
    assert (entry["kv_cache"]["layout"], entry["padding"], entry["logits"]) == ("shared_buffer", "right", "last_token")


@pytest.mark.parametrize("variant", VARIANTS)
def test_optimized_graph_matches_portable(tiny_optimized, variant):
    """Through the runtime's own session and KV buffers (shared buffer, right padding)."""
    artifact = tiny_optimized(variant)
    portable, manifest_raw = open_session(artifact)
    ids = np.random.default_rng(4).integers(0, 456, size=(1, 14))
    expected = last_logits_per_step(portable, manifest_raw, ids, prefill=10)
    session = Model.load(artifact, optimize=False).session
    cache = session.caches.take(1, 16)
    padding = RightPadding(0)
    padding.decode_width = 16
    rows = [session.steps.step(padding.prefill([ids[0, :10].tolist()], 0), cache)]
    for position in range(10, 14):
        rows.append(session.steps.step(padding.decode([int(ids[0, position])]), cache))
    for ours, reference in zip(rows, expected, strict=True):
        np.testing.assert_allclose(ours.full()[0], reference[0], rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("variant", ["dense_untied_sharded", "yarn", "sliding_window", "moe_shared"])
def test_32_greedy_tokens_through_the_optimized_graph_equal_transformers(tiny_checkpoint, tiny_optimized, variant):
    model = Model.load(tiny_optimized(variant), optimize=False)
    assert model.session.graph.name == "optimized-cpu"
    ours = model.generate(PROMPTS[0], max_new_tokens=32, greedy=True)
    expected = transformers_generate(tiny_checkpoint(variant), PROMPTS[:1], 32, model.generation_config,
                                     model.manifest.tokenizer.vocab_size)
    assert ours.output_ids == expected[0]
    batch = model.generate_batch(PROMPTS, max_new_tokens=32, greedy=True, repetition_penalty=1.0)  # right-padded
    config = {**model.generation_config, "repetition_penalty": 1.0}
    assert [g.output_ids for g in batch] == transformers_generate(tiny_checkpoint(variant), PROMPTS, 32, config,
                                                                  model.manifest.tokenizer.vocab_size)
    assert model.session.steps.full_logits_reads == 0  # every token was chosen from the graph's candidates


def test_the_captured_step_bookkeeping_gives_the_plain_steps_tokens(tiny_optimized):
    """CapturedSteps' fixed buffers (ids and mask in one upload, candidates in one download) run on the
    CPU too, where onnxruntime ignores the graph id: same tokens as the plain step, batched and sampled,
    and a request of another batch size gets buffers and captured steps of its own."""
    artifact = tiny_optimized("moe_shared")
    plain, fixed = Model.load(artifact, optimize=False), Model.load(artifact, optimize=False, steps=CapturedSteps)
    sampled = dict(do_sample=True, top_k=20, top_p=0.8, temperature=0.7, repetition_penalty=1.05, seed=5)
    for prompts, options in ((PROMPTS[:1], {"greedy": True}), (PROMPTS, {"greedy": True}), (PROMPTS[:1], sampled)):
        expected = [g.output_ids for g in plain.generate_batch(prompts, max_new_tokens=12, **options)]
        loop = fixed.decode_loop(prompts, max_new_tokens=12, **options)
        assert [tokens for tokens in loop] and [g.output_ids for g in loop.generations] == expected
        assert fixed.session.steps.captured[loop.cache][1].batch == len(prompts)
    assert fixed.session.steps.full_logits_reads == 0


@pytest.mark.parametrize("variant", ["dense_untied_sharded", "sliding_window", "moe_shared"])
def test_captured_prefill_pads_a_fresh_prompt_to_its_bucket(tiny_optimized, variant):
    """Captured prefill pads a fresh batch-1 prompt to a bucket length (one captured step per bucket;
    on the CPU the same bookkeeping, uncaptured): same tokens as the unpadded prefill, also with
    sliding-window layers (prompts longer than the window) and MoE, and a chat's continuation, which
    is not padded, still matches."""
    artifact = tiny_optimized(variant)
    plain, padded = Model.load(artifact, optimize=False), Model.load(artifact, optimize=False, steps=CapturedSteps)
    for length in (23, 16, 5):  # buckets 24, 16, 16
        prompt = (PROMPTS[0] * 6)[:length]
        expected = plain.generate(prompt, max_new_tokens=8, greedy=True).output_ids
        assert padded.generate(prompt, max_new_tokens=8, greedy=True).output_ids == expected
    (steps,) = padded.session.steps.captured.values()  # one KV buffer served all three
    assert sorted(steps) == [1, 16, 24]
    chats = [model.chat() for model in (plain, padded)]
    for _ in range(2):
        replies = ["".join(chat.send("More please", max_new_tokens=6, greedy=True)) for chat in chats]
        assert replies[0] == replies[1]
    assert padded.last_timings.reused_prompt_tokens > 0


@pytest.mark.parametrize("variant", ["dense_untied_sharded", "sliding_window", "moe_shared"])
def test_pipelined_greedy_decode_gives_the_step_by_step_tokens(tiny_optimized, variant):
    """Steps fed by each other's best candidate on the device give the host loop's greedy tokens; with
    a repetition penalty the host often picks another token and the queued step runs again."""
    artifact = tiny_optimized(variant)
    plain, fast = Model.load(artifact, optimize=False), Model.load(artifact, optimize=False, steps=pipelined)
    for penalty in (1.0, 1.8):
        for prompt in (PROMPTS[0], PROMPTS[1] * 3):
            expected = plain.generate(prompt, max_new_tokens=24, greedy=True, repetition_penalty=penalty).output_ids
            assert fast.generate(prompt, max_new_tokens=24, greedy=True, repetition_penalty=penalty).output_ids == expected
    (pipeline,) = fast.session.steps.pipelines.values()
    assert pipeline.reruns > 0
    assert all(1 not in steps for steps in fast.session.steps.captured.values())  # no single decode step ran


def test_pipelined_decode_stops_where_the_step_by_step_loop_stops(tiny_optimized):
    artifact = tiny_optimized("dense_untied_sharded")
    plain, fast = Model.load(artifact, optimize=False), Model.load(artifact, optimize=False, steps=pipelined)
    for new_tokens in (1, 2, 3):
        assert fast.generate(PROMPTS[0], max_new_tokens=new_tokens, greedy=True).output_ids == \
            plain.generate(PROMPTS[0], max_new_tokens=new_tokens, greedy=True).output_ids
    free = plain.generate(PROMPTS[0], max_new_tokens=12, greedy=True, ignore_eos=True).output_ids
    plain, fast = (with_stop_tokens(model, (free[4],)) for model in (plain, fast))
    stopped = fast.generate(PROMPTS[0], max_new_tokens=12, greedy=True)
    assert stopped.output_ids == free[: free.index(free[4]) + 1] and stopped.finish_reason == "stop_token"
    (pipeline,) = fast.session.steps.pipelines.values()
    assert all(event is None for event in pipeline.events) and pipeline.queued is None  # nothing left queued
    chats = [model.chat() for model in (plain, fast)]  # the cache holds what the pipelined loop accepted
    for _ in range(2):
        replies = ["".join(chat.send("More please", max_new_tokens=6, greedy=True)) for chat in chats]
        assert replies[0] == replies[1]
    assert fast.last_timings.reused_prompt_tokens > 0


def test_warm_up_also_runs_every_captured_bucket(tiny_optimized):
    model = Model.load(tiny_optimized("dense_untied_sharded"), optimize=False, steps=CapturedSteps)
    assert model.warm_up(20) == [2, 4, 8, 16, 20, 24, 28, 32]
    (steps,) = model.session.steps.captured.values()
    assert sorted(steps) == [1, 16, 20, 24, 28, 32]
    assert captured_prompt_buckets(40, 32768) == [16, 20, 24, 28, 32, 40]
    buckets = captured_prompt_buckets(5000, 32768)  # none past LONGEST_CAPTURED_PROMPT
    assert len(buckets) == 1 + 4 * 8 and buckets[-3:] == [3072, 3584, 4096]


def test_captured_prompt_lengths():
    assert [captured_prompt_length(n, 32768) for n in (1, 16, 17, 20, 21, 33, 512, 513, 600, 4096)] == \
        [16, 16, 20, 20, 24, 40, 512, 640, 640, 4096]
    assert captured_prompt_length(4097, 32768) is None and captured_prompt_length(100, 64) is None


def test_kv_buffers_are_reused_between_requests_but_never_shared(tiny_optimized):
    """A request of the same batch and capacity gets the last one's buffers (and, on CUDA, its captured
    graphs); stale contents change nothing; a chat's buffers are never handed to another request."""
    model = Model.load(tiny_optimized("sliding_window"), optimize=False)
    fresh = [Model.load(tiny_optimized("sliding_window"), optimize=False).generate(p, max_new_tokens=12, greedy=True).output_ids
             for p in PROMPTS[:2]]
    loops = [model.decode_loop([prompt], max_new_tokens=12, greedy=True) for prompt in PROMPTS[:2]]
    assert loops[0].cache is not loops[1].cache  # handed out counts as taken, before any step
    for loop in loops:
        list(loop)
    assert [loop.generations[0].output_ids for loop in loops] == fresh
    again = model.decode_loop([PROMPTS[0]], max_new_tokens=12, greedy=True)
    assert again.cache is loops[1].cache  # the last one returned
    list(again)
    chat = model.chat()
    "".join(chat.send("Hello", max_new_tokens=4, greedy=True))
    held = chat.cache
    other = model.decode_loop([PROMPTS[0]], max_new_tokens=4, greedy=True)
    assert held is not None and other.cache is not held
    list(other)
    chat.reset()
    assert model.decode_loop([PROMPTS[0]], max_new_tokens=4, greedy=True).cache is held  # returned by reset


def test_sampling_from_the_candidates_equals_sampling_from_the_full_row(tiny_optimized):
    """Qwen's sampling defaults (top_k 20, top_p 0.8, temperature 0.7, penalty 1.05), same seed: the
    optimized graph's device-side candidates give the tokens the portable graph's full rows give."""
    artifact = tiny_optimized("dense_untied_sharded")
    options = dict(max_new_tokens=32, do_sample=True, top_k=20, top_p=0.8, temperature=0.7, repetition_penalty=1.05, seed=3)
    optimized = Model.load(artifact, optimize=False)
    portable = Model.load(artifact, optimize=False, graph="portable")
    assert optimized.generate(PROMPTS[0], **options).output_ids == portable.generate(PROMPTS[0], **options).output_ids
    assert optimized.session.steps.full_logits_reads == 0 and portable.session.steps.full_logits_reads == 32


def test_chat_reuses_the_shared_buffer(tiny_optimized):
    model = Model.load(tiny_optimized("moe_shared"), optimize=False)
    session = model.chat()
    "".join(session.send("Hello", max_new_tokens=4, greedy=True))
    first_turn = len(session.seen_ids)
    "".join(session.send("More", max_new_tokens=4, greedy=True))
    assert model.last_timings.reused_prompt_tokens == first_turn - 1
    second_prompt = session.seen_ids[: len(session.seen_ids) - len(session.last_reply.output_ids)]
    fresh = model.generate(second_prompt, max_new_tokens=4, greedy=True)
    assert fresh.output_ids == session.last_reply.output_ids


def test_cuda_graph_in_fp16_runs_on_cpu_for_a_dense_model(tiny_artifact, tmp_path):
    """The fp16 graph made for CUDA, checked on onnxruntime CPU (which has fp16 GQA and norm kernels)."""
    artifact = shutil.copytree(tiny_artifact("dense_untied_sharded"), tmp_path / "a")
    entry = optimize_artifact(artifact, "cuda")
    assert entry.activation_dtype == "float16" and entry.outputs[0].dtype == "float32"
    assert_same_numbers(artifact, artifact / entry.file, tolerance=0.1)


def test_graph_exported_in_fp16_still_returns_fp32_logits(tiny_artifact):
    artifact = tiny_artifact("dense_tied", "fp16")
    manifest = contract.read_manifest(artifact)
    model = ir.load(artifact / "onnx/model.onnx")
    optimize(model, manifest, "cuda", "float16")
    logits = next(v for v in model.graph.outputs if v.name == "logits")
    assert logits.dtype == ir.DataType.FLOAT and logits.producer().op_type == "Cast"


def test_a_pass_that_cannot_fire_names_itself(tiny_artifact):
    manifest = contract.read_manifest(tiny_artifact("dense_tied"))
    three_layers = dataclasses.replace(manifest.model, num_hidden_layers=3, layer_types=manifest.model.layer_types * 2)
    manifest = dataclasses.replace(manifest, model=three_layers)  # the graph has two
    model = ir.load(tiny_artifact("dense_tied") / "onnx/model.onnx")
    with pytest.raises(GraphError, match="GroupQueryAttention fired 2 times, expected 3"):
        optimize(model, manifest, "cpu")
    with pytest.raises(GraphError, match="float16"):
        optimize(ir.load(tiny_artifact("dense_tied") / "onnx/model.onnx"), manifest, "cpu", "float16")


GOLDEN = json.loads((Path(__file__).parent / "data" / "golden_cpu_histograms.json").read_text())


@pytest.mark.parametrize("variant", sorted(GOLDEN))
def test_op_histogram_against_the_reviewed_golden_file(tiny_optimized, variant):
    """Counts may not grow; when one shrinks by more than a quarter, review and update the golden file."""
    from graphs.inspect import op_histogram

    ops, golden = op_histogram(tiny_optimized(variant) / "onnx/model_cpu.onnx"), GOLDEN[variant]
    grown = {op: (golden.get(op, 0), count) for op, count in ops.items() if count > golden.get(op, 0)}
    assert not grown, f"op counts grew (golden, now): {grown}"
    shrunk = {op: (count, ops.get(op, 0)) for op, count in golden.items() if ops.get(op, 0) < 0.75 * count}
    assert not shrunk, f"op counts shrank a lot (golden, now): {shrunk}; update tests/data/golden_cpu_histograms.json"


@pytest.mark.parametrize("variant", ["sliding_window", "moe_shared"])
@pytest.mark.parametrize("graph", ["portable", "optimized-cpu"])
def test_chunked_prefill_gives_the_same_tokens(tiny_optimized, variant, graph):
    sizes = []
    model = Model.load(tiny_optimized(variant), graph=graph, optimize=False, steps=counting_steps(sizes))
    prompt = PROMPTS[0] * 3  # 21 tokens, past the sliding window of 6
    whole = model.generate(prompt, max_new_tokens=12, greedy=True)
    for chunk in (4, 7, 20):
        sizes.clear()
        assert model.generate(prompt, max_new_tokens=12, greedy=True, prefill_chunk=chunk).output_ids == whole.output_ids
        prompt_calls = sizes[: -(12 - 1)]  # the 11 decode steps come last
        assert prompt_calls == [chunk] * (21 // chunk) + ([21 % chunk] if 21 % chunk else []), (chunk, sizes)



@pytest.mark.parametrize("variant", ["dense_untied_sharded", "moe_shared"])
def test_gate_and_up_are_one_gemm_on_cpu_and_two_on_cuda(tiny_artifact, tmp_path, variant):
    """CPU: one GEMM and a Split per layer's MLP (or shared expert). CUDA: two GEMMs and no Split
    (pipeline.packs_gate_up), with the portable graph's numbers (the fp16 graph run on the CPU here)."""
    from graphs.inspect import op_histogram

    artifact = shutil.copytree(tiny_artifact(variant), tmp_path / "a")
    layers = json.loads((artifact / "config.json").read_text())["num_hidden_layers"]
    cpu = optimize_artifact(artifact, "cpu")
    assert op_histogram(artifact / cpu.file)["Split"] == layers
    cuda = optimize_artifact(artifact, "cuda")
    assert packed_matmul.GATE_UP_NAME not in {p.name for p in cuda.passes}
    assert "Split" not in op_histogram(artifact / cuda.file)
    assert_same_numbers(artifact, artifact / cuda.file, tolerance=0.1)
