"""The session loop against transformers' generate, plus its contracts and errors."""

import dataclasses
import json
import subprocess
import sys

import onnxruntime
import pytest

from qwen2_onnx.cli import main as cli_main
from runtime import Model, RuntimeInputError

from conftest import VARIANTS
from helpers import PROMPTS, counting_steps, transformers_generate, with_stop_tokens

# error paths that only a machine without onnxruntime-gpu's CUDA provider can show
WITHOUT_CUDA = pytest.mark.skipif("CUDAExecutionProvider" in onnxruntime.get_available_providers(),
                                  reason="this machine has CUDA; the error path cannot be shown here")


@pytest.mark.parametrize("variant", VARIANTS)
def test_32_greedy_tokens_equal_transformers_generate(tiny_checkpoint, tiny_artifact, variant):
    """Batch 1 with the checkpoint's own defaults (repetition penalty 1.05 included, as generate applies it)."""
    model = Model.load(tiny_artifact(variant))
    ours = model.generate(PROMPTS[0], max_new_tokens=32, greedy=True)
    expected = transformers_generate(tiny_checkpoint(variant), PROMPTS[:1], 32, model.generation_config,
                                     model.manifest.tokenizer.vocab_size)
    assert ours.output_ids == expected[0] and len(expected[0]) > 1


@pytest.mark.parametrize("variant", VARIANTS)
def test_batch_of_three_prompts_of_different_lengths(tiny_checkpoint, tiny_artifact, variant):
    """Left-padded batch. No repetition penalty here: transformers counts the pad ids of a padded row
    as seen tokens, which we deliberately do not."""
    model = Model.load(tiny_artifact(variant))
    batch = model.generate_batch(PROMPTS, max_new_tokens=32, greedy=True, repetition_penalty=1.0)
    config = {**model.generation_config, "repetition_penalty": 1.0}
    expected = transformers_generate(tiny_checkpoint(variant), PROMPTS, 32, config, model.manifest.tokenizer.vocab_size)
    assert [g.output_ids for g in batch] == expected
    alone = [model.generate(p, max_new_tokens=32, greedy=True, repetition_penalty=1.0).output_ids for p in PROMPTS]
    assert [g.output_ids for g in batch] == alone


def test_runtime_never_imports_torch(tiny_artifact):
    artifact = tiny_artifact("moe_shared")
    script = (
        "import sys, json\n"
        "from runtime import Model\n"
        "from qwen2_onnx.cli import main\n"
        f"main(['generate', {str(artifact)!r}, '--prompt', 'Hi', '--max-new-tokens', '4', '--json'])\n"
        f"list(Model.load({str(artifact)!r}).stream([{{'role': 'user', 'content': 'Hi'}}], max_new_tokens=4))\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'qwen2_export', 'transformers'))))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
    cli = subprocess.run(
        [sys.executable, "-c", "import sys; from qwen2_onnx.cli import main; "
         f"main(['generate', {str(artifact)!r}, '--input-ids', '1,2,3', '--max-new-tokens', '2']); "
         "assert 'torch' not in sys.modules, 'torch imported'"],
        capture_output=True, text=True, timeout=120,
    )
    assert cli.returncode == 0, cli.stderr


def test_sampling_is_reproducible_with_a_seed_and_streams_the_same_text(tiny_artifact):
    model = Model.load(tiny_artifact("yarn"))
    options = dict(max_new_tokens=24, temperature=1.3, top_k=0, top_p=0.95, seed=11)
    first, second = model.generate(PROMPTS[0], **options), model.generate(PROMPTS[0], **options)
    assert first.output_ids == second.output_ids
    assert model.generate(PROMPTS[0], **{**options, "seed": 12}).output_ids != first.output_ids
    assert "".join(model.stream(PROMPTS[0], **options)) == first.text


def test_chat_turn_with_reused_cache_equals_a_fresh_run(tiny_artifact):
    model = Model.load(tiny_artifact("moe_shared"))
    session = model.chat(system="Be brief.")
    "".join(session.send("Hello", max_new_tokens=5, greedy=True))
    first_turn_ids = len(session.seen_ids)
    reply = "".join(session.send("More please", max_new_tokens=5, greedy=True))
    assert model.last_timings.reused_prompt_tokens == first_turn_ids - 1  # all but the last sampled token
    second_prompt = session.seen_ids[: len(session.seen_ids) - len(session.last_reply.output_ids)]
    fresh = model.generate(second_prompt, max_new_tokens=5, greedy=True)
    assert model.last_timings.reused_prompt_tokens == 0
    assert fresh.output_ids == session.last_reply.output_ids and fresh.text == reply == session.messages[-1]["content"]


def test_stop_token_and_stop_string(tiny_artifact):
    model = Model.load(tiny_artifact("dense_untied_sharded"))
    free = model.generate(PROMPTS[1], max_new_tokens=12, greedy=True)
    assert not set(free.output_ids) & set(model.manifest.tokenizer.stop_token_ids)
    assert free.finish_reason == "length" and len(free.output_ids) == 12
    third = free.output_ids[2]
    stop_text = model.tokenizer.decode(free.output_ids[3:5])
    original = model
    model = with_stop_tokens(model, (third,))
    stopped = model.generate(PROMPTS[1], max_new_tokens=12, greedy=True)
    assert stopped.finish_reason == "stop_token" and stopped.output_ids == free.output_ids[: free.output_ids.index(third) + 1]
    through = model.generate(PROMPTS[1], max_new_tokens=12, greedy=True, ignore_eos=True)
    assert through.finish_reason == "length" and through.output_ids == free.output_ids
    model = original
    by_string = model.generate(PROMPTS[1], max_new_tokens=12, greedy=True, stop_strings=(stop_text,))
    assert by_string.finish_reason == "stop_string" and stop_text in by_string.text


def test_prompt_past_the_context_is_refused_before_any_work(tiny_artifact):
    steps = []
    model = Model.load(tiny_artifact("dense_tied"), steps=counting_steps(steps))
    with pytest.raises(RuntimeInputError, match=r"prompt of 200 tokens \+ max_new_tokens 100 = 300 exceeds the model's context length 256"):
        model.generate([1] * 200, max_new_tokens=100)
    with pytest.raises(RuntimeInputError, match="max_new_tokens=0"):
        model.generate([1], max_new_tokens=0)
    with pytest.raises(RuntimeInputError, match="vocabulary"):
        model.generate([100000], max_new_tokens=1)
    with pytest.raises(RuntimeInputError, match="prefill_chunk=0"):
        model.generate([1, 2, 3], max_new_tokens=1, prefill_chunk=0)
    with pytest.raises(RuntimeInputError, match=r"unknown generation option\(s\) \['temprature'\]"):
        model.generate([1, 2, 3], max_new_tokens=1, temprature=0.5)
    assert steps == []  # not one step ran


def test_cli_generate_json_and_errors(tiny_artifact, capsys):
    artifact = str(tiny_artifact("dense_tied"))
    assert cli_main(["generate", artifact, "--prompt", "Hello", "--chat", "--system", "Be kind.", "--max-new-tokens", "5", "--greedy", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["output_ids"]) == 5 and result["timings"]["time_to_first_token_s"] > 0
    assert result["prompt_ids"][:1] == [457]  # <|im_start|>: the chat template was applied
    assert cli_main(["generate", artifact, "--prompt", "x", "--top-p", "1.5"]) == 2
    assert "top_p=1.5" in capsys.readouterr().err
    assert cli_main(["generate", artifact, "--input-ids", "1,x"]) == 2
    assert cli_main(["generate", "/nonexistent", "--prompt", "x"]) == 2
    assert "manifest.json not found" in capsys.readouterr().err


def test_cli_chat_session(tiny_artifact):
    script = "Hello\n/reset\nHi again\nAnd more\n/exit\n"
    result = subprocess.run([sys.executable, "-m", "runtime", "chat", str(tiny_artifact("moe_shared")), "--greedy", "--max-new-tokens", "4"],
                            input=script, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("assistant> ") == 3 and "(conversation reset)" in result.stdout


@WITHOUT_CUDA
def test_cuda_without_onnxruntime_gpu_is_a_clear_error(tiny_artifact):
    with pytest.raises(RuntimeInputError, match="onnxruntime-gpu"):
        Model.load(tiny_artifact("dense_tied"), device="cuda")


@WITHOUT_CUDA
def test_cuda_graph_decoding_needs_cuda_and_a_shared_buffer(tiny_artifact):
    with pytest.raises(RuntimeInputError, match="CUDA-graph decoding needs --device cuda"):
        Model.load(tiny_artifact("dense_tied"), device="cpu", cuda_graph=True)


@WITHOUT_CUDA
def test_cli_cuda_graph_flag_reaches_the_session(tiny_artifact, capsys):
    assert cli_main(["generate", str(tiny_artifact("dense_tied")), "--prompt", "x", "--cuda-graph"]) == 2
    assert "CUDA-graph decoding needs --device cuda" in capsys.readouterr().err


def test_cli_rejects_a_bad_prefill_chunk(tiny_artifact, capsys):
    assert cli_main(["generate", str(tiny_artifact("dense_tied")), "--prompt", "x", "--prefill-chunk", "0"]) == 2
    assert "prefill_chunk=0" in capsys.readouterr().err


def test_cuda_optimized_graphs_load_with_their_placement_checked_unless_cpu_fallback(tiny_artifact):
    """Settings only (no GPU here): a CUDA-optimized graph on CUDA records where onnxruntime puts each node
    (checked at load), unless cpu_fallback; a portable graph on CUDA and CPU sessions are not checked."""
    from artifact.contract import read_manifest
    from runtime.session import session_settings, strict_placement

    manifest = read_manifest(tiny_artifact("dense_tied"))
    cuda_graph_info = dataclasses.replace(manifest.graphs[0], target="cuda")

    def recorded(options):
        try:
            return options.get_session_config_entry("session.record_ep_graph_assignment_info") or "0"
        except Exception:  # onnxruntime raises for an entry that was never set
            return "0"

    assert strict_placement(cuda_graph_info, "cuda", cpu_fallback=False)
    options, providers = session_settings(cuda_graph_info, "cuda", True, True, cpu_fallback=False)
    assert recorded(options) == "1" and [p[0] if isinstance(p, tuple) else p for p in providers] == \
        ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert providers[0][1]["enable_cuda_graph"] == "1"
    assert not strict_placement(cuda_graph_info, "cuda", cpu_fallback=True)
    assert recorded(session_settings(cuda_graph_info, "cuda", True, False, cpu_fallback=True)[0]) == "0"
    assert not strict_placement(manifest.graphs[0], "cuda", cpu_fallback=False)
    assert not strict_placement(cuda_graph_info, "cpu", cpu_fallback=False)
    assert session_settings(cuda_graph_info, "cpu", True, False, cpu_fallback=False)[1] == ["CPUExecutionProvider"]
    assert session_settings(cuda_graph_info, "cuda", True, True, False, stream=1234)[1][0][1]["user_compute_stream"] == "1234"


@pytest.mark.parametrize("variant", ["dense_tied", "moe_shared"])
def test_the_placement_check_lets_only_the_graphs_shape_arithmetic_run_on_the_cpu(tiny_optimized, variant):
    """On the CPU every node is on the CPU EP: the check names all of them but the nodes that compute the
    total length from the mask's shape, which onnxruntime keeps (by name) through its own rewrites."""
    import onnxruntime as ort

    from artifact import contract
    from runtime.session import nodes_off_the_device

    options = ort.SessionOptions()
    options.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    session = ort.InferenceSession(str(tiny_optimized(variant) / contract.graph_file("cpu")), options,
                                   providers=["CPUExecutionProvider"])
    placed = [node.name for subgraph in session.get_provider_graph_assignment_info() for node in subgraph.get_nodes()]
    host = [name for name in placed if name.startswith(contract.HOST_SHAPE_NODES)]
    strays = nodes_off_the_device(session)
    assert len(host) == 3 and sorted(strays + host) == sorted(placed)
    assert any("GroupQueryAttention" in name for name in strays)


@pytest.mark.parametrize("variant, graph", [("moe_shared", "optimized-cpu"), ("dense_tied", "portable")])
def test_warm_up_runs_each_power_of_two_prompt_and_changes_nothing(tiny_optimized, variant, graph):
    lengths = []
    model = Model.load(tiny_optimized(variant), graph=graph, steps=counting_steps(lengths))
    before = model.generate([5, 6, 7, 8], max_new_tokens=6, greedy=True)
    timings = model.last_timings
    lengths.clear()
    assert model.warm_up(20) == [2, 4, 8, 16, 32]
    assert [n for n in lengths if n > 1] == [2, 4, 8, 16, 32] and lengths.count(1) == 1  # one decode step
    assert model.last_timings is timings
    assert model.generate([5, 6, 7, 8], max_new_tokens=6, greedy=True).output_ids == before.output_ids


def test_warm_up_stays_inside_the_context(tiny_artifact):
    model = Model.load(tiny_artifact("dense_tied"))
    context = model.manifest.model.context_length  # 256 for the tiny checkpoints
    assert model.warm_up()[-1] == context - 1  # 256 would not leave room for a new token
    with pytest.raises(RuntimeInputError, match="warm-up length 256 must be between 1 and the context length"):
        model.warm_up(context)
    with pytest.raises(RuntimeInputError, match="warm-up length 0"):
        model.warm_up(0)


def test_cli_chat_warms_up_before_the_first_turn(tiny_artifact):
    result = subprocess.run([sys.executable, "-m", "runtime", "chat", str(tiny_artifact("dense_tied")), "--greedy",
                             "--max-new-tokens", "3", "--warm-up", "8"], input="Hello\n/exit\n",
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "(warmed up: prompts of 2, 4, 8 tokens)" in result.stderr and result.stdout.count("assistant> ") == 1
