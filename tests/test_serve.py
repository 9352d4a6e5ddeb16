"""`qwen2-onnx serve` through the official openai client, against servers this module starts on 127.0.0.1
(uvicorn on a thread) over the tiny MoE artifact's CPU graph: greedy text equal to our runtime's, usage,
streaming, tool calls, every error case, 16 concurrent streams, a stream cancelled mid-way."""

import contextlib
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("starlette", reason="the serve extra: pip install -e '.[serve,test]'")
uvicorn = pytest.importorskip("uvicorn", reason="the serve extra: pip install -e '.[serve,test]'")
openai = pytest.importorskip("openai", reason="a test dependency: pip install -e '.[test]'")

from runtime import Model  # noqa: E402
from runtime import batcher as batcher_module  # noqa: E402
from runtime.batcher import FAILED, PREFILL_TOKENS, Batcher, BatchRequest, prefill_groups  # noqa: E402
from runtime.cuda_graph import CapturedSteps  # noqa: E402
from runtime.engine import EngineProcess, EngineSpec  # noqa: E402
from runtime.errors import RuntimeInputError  # noqa: E402
from runtime.server import ServeConfig, build_app  # noqa: E402
from runtime.steps import PlainSteps, StepScores  # noqa: E402

from helpers import SyncStream, pipelined  # noqa: E402

NAME = "tiny"
GREEDY = {"temperature": 0, "extra_body": {"repetition_penalty": 1.0}}
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Tell me a story"}]


@contextlib.contextmanager
def running(model: Model, max_batch: int = 16, max_context: int = 256, **config):
    """A server for `model` on a free port of 127.0.0.1; yields (base URL, batcher); stopped at the end."""
    batcher = Batcher(model.session, model.manifest, max_batch, max_context)
    batcher.start()
    server = uvicorn.Server(uvicorn.Config(build_app(model, batcher, ServeConfig(NAME, **config)), log_level="warning"))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", batcher
    finally:
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive()


@pytest.fixture(scope="module")
def model(tiny_optimized):
    return Model.load(tiny_optimized("moe_shared"))


@pytest.fixture(scope="module")
def server(model):
    with running(model) as (url, batcher):
        yield url, batcher


def client(url: str, key: str = "none") -> "openai.OpenAI":
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def ours(model: Model, prompt, max_tokens: int = 12):
    return model.generate(prompt, max_new_tokens=max_tokens, greedy=True, repetition_penalty=1.0)


def test_chat_gives_our_runtime_text_and_usage_streamed_or_not(server, model):
    url, _ = server
    expected = ours(model, MESSAGES)
    reply = client(url).chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=12, **GREEDY)
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == ("length" if expected.finish_reason == "length" else "stop")
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(model.encode(MESSAGES)), len(expected.output_ids))
    chunks = list(client(url).chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=12, stream=True,
                                                      stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert chunks[-1].usage.total_tokens == reply.usage.total_tokens and not chunks[-1].choices


def test_completions_from_text_or_ids_give_our_runtime_text(server, model):
    url, _ = server
    for prompt in ("Hello, world", [456, 40, 300, 17]):
        expected = ours(model, prompt, 10)
        reply = client(url).completions.create(model=NAME, prompt=prompt, max_tokens=10, **GREEDY)
        assert reply.choices[0].text == expected.text and reply.usage.completion_tokens == len(expected.output_ids)
        stream = client(url).completions.create(model=NAME, prompt=prompt, max_tokens=10, stream=True, **GREEDY)
        assert "".join(chunk.choices[0].text for chunk in stream) == expected.text


def test_stop_strings_cut_the_text(server, model):
    url, _ = server
    expected = ours(model, "Hello", 16).text
    stop = expected[3:5]
    reply = client(url).completions.create(model=NAME, prompt="Hello", max_tokens=16, stop=[stop], **GREEDY)
    assert reply.choices[0].text == expected[: expected.index(stop)] and reply.choices[0].finish_reason == "stop"


def test_sixteen_concurrent_streams_each_get_the_text_they_get_alone(server, model):
    url, batcher = server
    prompts = [[(7 * i + j) % 400 for j in range(3 + 5 * i)] for i in range(16)]
    expected = [ours(model, prompt, 12).text for prompt in prompts]
    texts = [None] * 16

    def run(i):
        stream = client(url).completions.create(model=NAME, prompt=prompts[i], max_tokens=12, stream=True, **GREEDY)
        texts[i] = "".join(chunk.choices[0].text for chunk in stream)

    steps = batcher.stats.decode_steps
    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert texts == expected
    assert batcher.stats.decode_steps - steps < 16 * 11  # decode steps were shared


def test_a_client_that_leaves_mid_stream_frees_its_row(server, model):
    url, batcher = server
    stream = client(url).completions.create(model=NAME, prompt=[456, 40], max_tokens=200, stream=True,
                                            extra_body={"ignore_eos": True, **GREEDY["extra_body"]}, temperature=0)
    next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 10
    while any(batcher.rows) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(batcher.rows)
    assert client(url).completions.create(model=NAME, prompt="Hi", max_tokens=2, **GREEDY).usage.completion_tokens >= 1


def test_requests_that_join_together_are_prefilled_in_one_step_and_get_their_tokens_alone(model, monkeypatch):
    """Five requests queued before the batcher starts, in a buffer of five rows that a warm-up has used: one
    prefill step, then each gets what generate gives it alone, greedy (two share their settings), with a
    repetition penalty, or sampled with its seed; decode steps never bind rows past the buffer."""
    prompts = [[(5 * i + j) % 400 for j in range(length)] for i, length in enumerate([9, 2, 17, 4, 30])]
    options = [{"greedy": True, "repetition_penalty": 1.0}, {"temperature": 0.9, "top_k": 0, "seed": 3},
               {"greedy": True, "repetition_penalty": 1.0}, {"greedy": True, "repetition_penalty": 1.3},
               {"temperature": 0.7, "top_k": 5, "seed": 8}]
    expected = [model.generate(prompt, max_new_tokens=6, **option).output_ids for prompt, option in zip(prompts, options)]
    batcher = Batcher(model.session, model.manifest, max_batch=5, capacity=64)
    threads, run = set(), model.session.steps.uncaptured_step
    monkeypatch.setattr(model.session.steps, "uncaptured_step",
                        lambda *step: threads.add(threading.current_thread().name) or run(*step))
    got, _, done, sink = collect(len(prompts))
    for i, (prompt, option) in enumerate(zip(prompts, options)):  # queued before the thread starts
        batcher.submit(BatchRequest(prompt, model.sampling(**option), 6, sink(i), model.manifest.tokenizer.stop_token_ids))
    assert batcher.start(warm_up=True) == [(5, 63)]  # the largest prefill, before any of them; no padded shapes here
    assert sorted(batcher.decode_views) == [1, 2, 4, 5]
    assert all(event.wait(60) for event in done)
    batcher.stop()
    assert got == expected
    assert batcher.stats.prefill_steps == 1 and batcher.stats.prompt_tokens == 62
    assert threads == {"batcher"}  # warm-up and prefills on one thread: onnxruntime keeps per-thread plans


def test_sampled_rows_alike_but_for_their_seed_are_chosen_together_and_each_gets_its_tokens_alone(model):
    """Rows with the same settings share one token choice per step, each drawing from its own seeded stream
    (from the candidates with top_k, from the full row without), and with a repetition penalty over the
    ids each has seen: every request still gets what generate gives it alone."""
    settings = [{"temperature": 0.8, "top_k": 5, "repetition_penalty": 1.3}, {"temperature": 1.2, "top_k": 0}]
    options = [{**settings[i % 2], "seed": seed} for i, seed in enumerate([3, 3, 8, 5, 11])]
    prompts = [[(7 * i + j) % 400 for j in range(3 + 4 * i)] for i in range(len(options))]
    expected = [model.generate(p, max_new_tokens=8, **o).output_ids for p, o in zip(prompts, options)]
    batcher = Batcher(model.session, model.manifest, max_batch=8, capacity=64)
    got, _, done, sink = collect(len(prompts))
    for i, (prompt, option) in enumerate(zip(prompts, options)):
        batcher.submit(BatchRequest(prompt, model.sampling(**option), 8, sink(i)))
    batcher.start()
    assert all(event.wait(60) for event in done)
    batcher.stop()
    assert got == expected
    assert len({tuple(tokens) for tokens in got}) == len(got)  # the seeds made a difference


def test_a_decode_steps_tokens_go_out_while_the_next_step_runs(model, monkeypatch):
    """The batcher launches step n+1 before it hands out step n's tokens and waits for n+1 after (on CUDA
    the launch returns before the GPU is done: the hand-out overlaps the step); each request still ends
    after its last token."""
    order, launch = [], model.session.steps.launch

    def traced(inputs, cache):
        order.append("launch")
        pending = launch(inputs, cache)
        return lambda: order.append("wait") or pending()

    monkeypatch.setattr(model.session.steps, "launch", traced)
    batcher = Batcher(model.session, model.manifest, max_batch=2, capacity=64)
    greedy = model.sampling(greedy=True, repetition_penalty=1.0)
    batcher.submit(BatchRequest([5, 6, 7], greedy, 3, lambda token, reason: order.append(reason or "token")))
    batcher.start()
    while "length" not in order:
        time.sleep(0.01)
    batcher.stop()
    # the prefill's token, then each decode step's while the next one runs; the last after the loop
    assert order == ["launch", "token", "wait", "launch", "token", "wait", "token", "length"]


def test_a_temperature_above_0_samples_whatever_generation_config_says_and_0_is_greedy():
    from runtime.openai_api import Sampling

    assert Sampling(temperature=0.7, top_p=0.8).options() == {"temperature": 0.7, "do_sample": True, "top_p": 0.8}
    assert Sampling(temperature=0).options() == {"do_sample": False}
    assert Sampling(top_k=-1).options() == {"top_k": 0}  # no temperature: generation_config.json decides


def test_a_warm_up_that_fails_is_raised_by_start_and_nothing_is_served(model, monkeypatch):
    def broken(*step):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(model.session.steps, "uncaptured_step", broken)
    batcher = Batcher(model.session, model.manifest, max_batch=2, capacity=64)
    with pytest.raises(RuntimeError, match="out of memory"):
        batcher.start(warm_up=True)
    batcher.thread.join(10)
    assert not batcher.thread.is_alive() and batcher.stats.decode_steps == 0


def test_where_the_runner_pads_prompts_prefills_run_only_shapes_the_warm_up_ran(tiny_optimized, model):
    """With a step runner that pads prompts to a few lengths (CapturedSteps, as on CUDA, where a new
    prefill shape's first run costs 40-90 ms), joining requests are prefilled at a bucket length and a
    power of two of rows, which the warm-up ran, and each still gets its tokens alone."""
    padded = Model.load(tiny_optimized("moe_shared"), steps=CapturedSteps)
    batcher = Batcher(padded.session, padded.manifest, max_batch=8, capacity=64)
    warmed = batcher.warm_up()
    assert (8, 32) in warmed and (1, 64) in warmed and all(rows * length <= PREFILL_TOKENS for rows, length in warmed)
    shapes, run = [], batcher.session.steps.uncaptured_step
    batcher.session.steps.uncaptured_step = lambda inputs, cache: shapes.append(inputs.input_ids.shape) or run(inputs, cache)
    got, _, done, sink = collect(8)
    greedy = padded.sampling(greedy=True, repetition_penalty=1.0)
    bursts = [[[(3 * i + j) % 400 for j in range(length)] for i, length in enumerate(lengths)]
              for lengths in ([3, 9, 17, 30, 5], [2, 21, 6])]
    for burst, first in zip(bursts, (0, 5)):  # queued before the thread starts, then joining a running batch
        for i, prompt in enumerate(burst, first):
            batcher.submit(BatchRequest(prompt, greedy, 6 + 20 * (first == 0), sink(i)))
        if first == 0:
            batcher.start()
            while batcher.stats.decode_steps < 2:
                time.sleep(0.001)
    assert all(event.wait(60) for event in done)
    batcher.stop()
    prompts = bursts[0] + bursts[1]
    assert got == [model.generate(prompt, max_new_tokens=len(tokens), greedy=True, repetition_penalty=1.0).output_ids
                   for prompt, tokens in zip(prompts, got)]
    # five rows padded to eight with the longest prompt's bucket, then three joining rows 5-7 (no free row past them)
    assert shapes == [(8, 32), (3, 24)] and (4, 24) in warmed


def test_compute_bound_prefills_keep_their_row_count_and_the_warm_up_ran_that_shape(tiny_optimized, model, monkeypatch):
    """Where a padded step reaches COMPUTE_BOUND_TOKENS (lowered here to the tiny model's scale) its rows
    are not padded to a power of two, up to EXACT_ROWS: a padding row would cost what a prompt does.
    Smaller steps still pad; the warm-up ran both kinds of shape, and each request gets its tokens alone."""
    monkeypatch.setattr(batcher_module, "COMPUTE_BOUND_TOKENS", 96)
    monkeypatch.setattr(batcher_module, "EXACT_ROWS", 6)
    padded = Model.load(tiny_optimized("moe_shared"), steps=CapturedSteps)
    batcher = Batcher(padded.session, padded.manifest, max_batch=8, capacity=64)
    assert [batcher.prefill_shape(count, 30) for count in (2, 3, 5, 6, 7)] == [(2, 32), (3, 32), (5, 32), (6, 32), (8, 32)]
    assert batcher.prefill_shape(5, 9) == (8, 16)  # 5 x 16 tokens: under the bound
    warmed = batcher.warm_up()
    assert {(3, 32), (5, 32), (6, 32), (8, 32), (8, 16)} <= set(warmed) and (5, 16) not in warmed
    shapes, run = [], batcher.session.steps.uncaptured_step
    batcher.session.steps.uncaptured_step = lambda inputs, cache: shapes.append(inputs.input_ids.shape) or run(inputs, cache)
    greedy = padded.sampling(greedy=True, repetition_penalty=1.0)
    prompts = [[(3 * i + j) % 400 for j in range(length)] for i, length in enumerate([3, 9, 17, 30, 5])]
    got, _, done, sink = collect(len(prompts))
    for i, prompt in enumerate(prompts):
        batcher.submit(BatchRequest(prompt, greedy, 6, sink(i)))
    batcher.start()
    assert all(event.wait(60) for event in done)
    batcher.stop()
    assert shapes == [(5, 32)] and set(shapes) <= set(warmed)
    assert got == [model.generate(prompt, max_new_tokens=6, greedy=True, repetition_penalty=1.0).output_ids
                   for prompt in prompts]


def test_requests_that_arrive_during_a_prefill_join_before_the_next_decode_step_within_the_budget(model, monkeypatch):
    """A burst's first request is often prefilled alone, the others arriving meanwhile: they are prefilled
    next, before any decode step, while the prefills since the last decode step stay under PREFILL_TOKENS
    (lowered here); past it the running rows get their decode step first. Each request still gets its
    tokens alone."""
    monkeypatch.setattr(batcher_module, "PREFILL_TOKENS", 39)
    prompts = [[(5 * i + j) % 400 for j in range(length)] for i, length in enumerate([12, 7, 20, 9])]
    greedy = model.sampling(greedy=True, repetition_penalty=1.0)
    batcher = Batcher(model.session, model.manifest, max_batch=4, capacity=64)
    got, _, done, sink = collect(len(prompts))
    order, prefill, launch = [], model.session.steps.uncaptured_step, model.session.steps.launch

    def submit(i: int) -> None:
        batcher.submit(BatchRequest(prompts[i], greedy, 5, sink(i)))

    def prefill_while_the_next_arrives(inputs, cache):
        order.append(f"prefill {inputs.input_ids.shape[1]}")
        prefills = sum(step.startswith("prefill") for step in order)
        if prefills < len(prompts):
            submit(prefills)
        return prefill(inputs, cache)

    monkeypatch.setattr(model.session.steps, "uncaptured_step", prefill_while_the_next_arrives)
    monkeypatch.setattr(model.session.steps, "launch", lambda *step: order.append("decode") or launch(*step))
    submit(0)
    batcher.start()
    assert all(event.wait(60) for event in done)
    batcher.stop()
    # 12 + 7 + 20 = 39 tokens prefilled: the budget is spent, so the fourth waits for a decode step
    assert order[:6] == ["prefill 12", "prefill 7", "prefill 20", "decode", "prefill 9", "decode"]
    assert got == [model.generate(prompt, max_new_tokens=5, greedy=True, repetition_penalty=1.0).output_ids
                   for prompt in prompts]


def test_decode_steps_upload_only_the_mask_columns_in_use_and_clear_what_a_longer_row_left(tiny_optimized, model):
    """Through a stream (as on CUDA) a decode step uploads the mask's first columns only: those of its
    longest row, or more where the last upload reached further, so a row freed by a long request and
    taken by a short one holds no stale ones (else its tokens would differ). Every request still gets
    its tokens alone."""
    class Recording(SyncStream):
        def write_rows(self, target, offset, rows, pitch):
            widths.append((target.data_ptr(), rows.shape[1]))
            super().write_rows(target, offset, rows, pitch)

    widths = []
    streamed = Model.load(tiny_optimized("moe_shared"), steps=lambda *args: pipelined(*args, stream=Recording()))
    batcher = Batcher(streamed.session, streamed.manifest, max_batch=2, capacity=64)
    greedy = streamed.sampling(greedy=True, repetition_penalty=1.0)
    prompts = [[(5 * i + j) % 400 for j in range(length)] for i, length in enumerate([50, 3, 4])]
    new_tokens = [3, 30, 6]  # the second still runs when the third joins
    got, _, done, sink = collect(3)
    third = BatchRequest(prompts[2], greedy, new_tokens[2], sink(2))

    def long_then_third(token, reason):  # once the long request is done, its row is free: the third takes it
        sink(0)(token, reason)
        if token is None:
            batcher.submit(third)  # on the batcher's thread, before its next step: no race with the second's end

    batcher.submit(BatchRequest(prompts[0], greedy, new_tokens[0], long_then_third))
    batcher.submit(BatchRequest(prompts[1], greedy, new_tokens[1], sink(1)))
    batcher.start()
    assert all(event.wait(60) for event in done)
    batcher.stop()
    assert got == [ours(model, prompt, n).output_ids for prompt, n in zip(prompts, new_tokens)]
    per_buffer: dict[int, list[int]] = {}  # columns uploaded, per captured step's buffer
    for address, columns in widths:
        per_buffer.setdefault(address, []).append(columns)
    assert all(uploads[0] == 64 for uploads in per_buffer.values())  # a buffer's first upload fills it
    later = [columns for uploads in per_buffer.values() for columns in uploads[1:]]
    assert max(later) < 64 and max(later) >= 51 and min(later) < 12  # the long row's columns, the short ones'


@pytest.mark.parametrize("refeed", [False, True])
def test_greedy_decode_steps_are_queued_ahead_fed_on_the_device_and_refed_where_the_host_chose_otherwise(
        tiny_optimized, model, monkeypatch, refeed):
    """Through a stream (as on CUDA), while every row is greedy without a penalty, the batcher queues the
    next decode step fed by this one's best candidates before reading this one: requests joining and
    leaving at different steps still get their tokens alone, and a sampled request stops it. Where the
    host chooses another token than the best candidate (here: a repetition penalty let through, as a
    tie would be), the queued step runs again with the host's tokens."""
    from runtime.sampling import SamplingConfig

    if refeed:
        monkeypatch.setattr(SamplingConfig, "takes_best_candidate", property(lambda config: not config.do_sample))
    streamed = Model.load(tiny_optimized("moe_shared"), steps=pipelined)
    batcher = Batcher(streamed.session, streamed.manifest, max_batch=4, capacity=64)
    greedy = dict(greedy=True, repetition_penalty=1.8 if refeed else 1.0)
    prompts = [[(3 * i + j) % 400 for j in range(length)] for i, length in enumerate([5, 12, 3, 7])]
    new_tokens = [20, 6, 14, 9]
    got, _, done, sink = collect(4)
    for i in (0, 1):
        batcher.submit(BatchRequest(prompts[i], streamed.sampling(**greedy), new_tokens[i], sink(i)))
    batcher.start(warm_up=True)
    while batcher.stats.decode_steps < 3:  # the others join a running batch
        time.sleep(0.001)
    for i in (2, 3):
        batcher.submit(BatchRequest(prompts[i], streamed.sampling(**greedy), new_tokens[i], sink(i)))
    assert all(event.wait(60) for event in done)
    assert got == [model.generate(prompt, max_new_tokens=n, **greedy).output_ids for prompt, n in zip(prompts, new_tokens)]
    assert batcher.stats.decode_steps_fed_on_device > 5
    assert (batcher.stats.decode_steps_refed > 0) == refeed
    fed = batcher.stats.decode_steps_fed_on_device
    sampled = streamed.sampling(temperature=0.8, top_k=5, seed=1)
    got, _, done, sink = collect(2)
    for i, prompt in enumerate(prompts[:2]):
        batcher.submit(BatchRequest(prompt, sampled if i else streamed.sampling(**greedy), 8, sink(i)))
    assert all(event.wait(60) for event in done)
    batcher.stop()
    assert batcher.stats.decode_steps_fed_on_device == fed  # a sampled row: the host feeds every step
    assert got[1] == model.generate(prompts[1], max_new_tokens=8, temperature=0.8, top_k=5, seed=1).output_ids


def test_prefill_groups_keep_to_consecutive_rows_and_the_token_budget():
    assert prefill_groups([0, 1, 2, 5, 6], [3, 3, 4, 4, 9], budget=100) == [(0, 3), (3, 5)]
    assert prefill_groups([0, 1, 2, 3], [10, 20, 30, 40], budget=60) == [(0, 2), (2, 3), (3, 4)]
    assert prefill_groups([4], [500], budget=100) == [(0, 1)]  # a long prompt alone, past the budget
    assert prefill_groups([], []) == []


def test_metrics_count_what_the_batcher_did(server):
    url, batcher = server

    def counters() -> dict[str, float]:
        text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
        return dict((name, float(value)) for name, value in (line.split() for line in text.splitlines() if line[0] != "#"))

    before = counters()
    client(url).completions.create(model=NAME, prompt=[5, 6, 7], max_tokens=4, temperature=0,
                                   extra_body={"ignore_eos": True, "repetition_penalty": 1.0})
    after = counters()
    assert after["qwen2_onnx_prompt_tokens_total"] - before["qwen2_onnx_prompt_tokens_total"] == 3
    assert after["qwen2_onnx_generated_tokens_total"] - before["qwen2_onnx_generated_tokens_total"] == 4
    assert after["qwen2_onnx_decode_steps_total"] - before["qwen2_onnx_decode_steps_total"] == 3
    assert after["qwen2_onnx_requests_running"] == 0 and "qwen2_onnx_busy_seconds_total" in after


def post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, body, {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.parametrize("body, param", [
    (b'{"model": "tiny", "messages": [', None),
    (b'[1, 2]', None),
    (json.dumps({"model": "tiny", "messages": "hi"}).encode(), "messages"),
    (json.dumps({"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}).encode(), "messages"),
    (json.dumps({"model": "tiny", "messages": MESSAGES, "temperature": "hot"}).encode(), "temperature"),
    (json.dumps({"model": "tiny", "messages": MESSAGES, "top_p": 2}).encode(), "top_p"),
    (json.dumps({"model": "tiny", "messages": MESSAGES, "max_tokens": 0}).encode(), "max_tokens"),
    (json.dumps({"model": "tiny", "messages": MESSAGES, "max_tokens": 100000}).encode(), "max_tokens"),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "word " * 400}]}).encode(), "messages"),
    (json.dumps({"model": "tiny", "messages": MESSAGES, "n": 2}).encode(), "n"),
    (json.dumps({"model": "tiny", "messages": MESSAGES, "stream": "yes"}).encode(), "stream"),
    (json.dumps({"model": "tiny", "messages": MESSAGES, "tool_choice": {"type": "function", "function": {"name": "f"}}}).encode(), "tool_choice"),
], ids=["truncated-json", "not-an-object", "messages-type", "role", "temperature-type", "top-p-range", "max-tokens-zero",
        "max-tokens-past-context", "prompt-past-context", "n", "stream-type", "tool-choice-unknown"])
def test_bad_requests_get_400_and_openais_error_object(server, body, param):
    url, _ = server
    status, answer = post(f"{url}/v1/chat/completions", body)
    assert status == 400 and set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["param"] == param and answer["error"]["message"]


def test_unknown_model_404_body_cap_413_and_the_openai_client_sees_the_types(server):
    url, _ = server
    with pytest.raises(openai.NotFoundError):
        client(url).chat.completions.create(model="gpt-4", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client(url).chat.completions.create(model=NAME, messages=MESSAGES, top_p=1.5)
    status, answer = post(f"{url}/v1/completions", json.dumps({"model": NAME, "prompt": "x" * (5 << 20)}).encode())
    assert status == 413 and answer["error"]["code"] == 413
    assert urllib.request.urlopen(f"{url}/health", timeout=10).status == 200
    assert [m.id for m in client(url).models.list()] == [NAME]


def test_the_api_key_is_required_when_set(model):
    with running(model, max_batch=2, api_key="secret") as (url, _):
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong").completions.create(model=NAME, prompt="Hi", max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong").models.list()
        assert client(url, "secret").completions.create(model=NAME, prompt="Hi", max_tokens=2).choices


# ---- tool calls: a model whose steps spell a scripted reply ----
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>'
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def scripted(reply: str, prefix: str = ""):
    """A step-runner factory whose every row's next token is the next of `reply`'s tokens (after `prefix`,
    which the server put in the prompt), then the stop token: the graph is not run."""
    class ScriptedSteps(PlainSteps):  # prompts at their own length, as PlainSteps runs them
        def __init__(self, session, graph, device):
            self.k = graph.token_candidates
            self.prompt_lengths: dict[int, int] = {}

        def attach(self, model: Model) -> None:
            self.script = model.tokenizer.encode(reply, add_special_tokens=False) + [model.manifest.tokenizer.stop_token_ids[0]]

        def scores(self, tokens: list[int]) -> StepScores:
            ids = np.array([[token, *[(token + j) % 400 for j in range(1, self.k)]] for token in tokens])
            # decisive whatever the sampling defaults: the scripted token 100 above the others
            logits = np.tile(np.array([100, *range(0, 1 - self.k, -1)], np.float32), (len(tokens), 1))
            return StepScores(logits, ids, lambda: None)

        def uncaptured_step(self, inputs, cache):
            self.prompt_lengths[cache.rows[0]] = inputs.input_ids.shape[1]
            return self.scores([self.script[0]])

        def step(self, inputs, cache, next_mask=None):
            tokens = []
            for row, mask in enumerate(inputs.attention_mask):
                index = int(mask.sum()) - self.prompt_lengths.get(row, 0)
                tokens.append(self.script[min(index, len(self.script) - 1)])
            return self.scores(tokens)

        def settle(self, cache):
            pass

    return ScriptedSteps


# Qwen2.5's way of asking for calls, short enough for the tiny model's 256 positions (its own system text
# with tools takes ~500 of the tiny tokenizer's tokens)
TOOLS_TEMPLATE = """{%- if tools %}<|im_start|>system
Tools: {% for tool in tools %}{{ tool.function.name }} {% endfor %}. Call one as <tool_call>
{"name": <name>, "arguments": <args>}
</tool_call><|im_end|>
{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


def tool_model(artifact, reply: str, folder: Path) -> Model:
    template = folder / "tools.jinja"
    template.write_text(TOOLS_TEMPLATE)
    model = Model.load(artifact, steps=scripted(reply), chat_template=template)
    model.session.steps.attach(model)
    return model


@pytest.mark.parametrize("stream", [False, True])
def test_tool_calls_are_parsed_from_the_reply_the_template_asks_for(tiny_optimized, tmp_path, stream):
    model = tool_model(tiny_optimized("moe_shared"), "Let me check. " + CALL, tmp_path)
    question = [{"role": "user", "content": "Weather in Zürich?"}]
    assert "get_weather" in model.tokenizer.decode(model.encode(question, tools=[WEATHER]))  # the template lists it
    with running(model, max_batch=2) as (url, _):
        made = client(url).chat.completions.create(model=NAME, messages=question, tools=[WEATHER], stream=stream,
                                                   max_tokens=100)
        if stream:
            chunks = list(made)
            content = "".join(c.choices[0].delta.content or "" for c in chunks)
            calls = [call for c in chunks for call in c.choices[0].delta.tool_calls or []]
            finish = chunks[-1].choices[0].finish_reason
        else:
            content, calls, finish = made.choices[0].message.content, made.choices[0].message.tool_calls, made.choices[0].finish_reason
        assert content == "Let me check. " and finish == "tool_calls"
        assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [("get_weather", {"city": "Zürich"})]
        plain = client(url).chat.completions.create(model=NAME, messages=question, tools=[WEATHER], tool_choice="none",
                                                    max_tokens=100)
        assert plain.choices[0].message.tool_calls is None and "<tool_call>" in plain.choices[0].message.content


def test_the_command_serves_and_sigterm_lets_a_running_request_finish(tiny_optimized):
    """`python -m runtime serve` (the runtime-only entry point): on SIGTERM uvicorn stops taking requests,
    the one in flight streams to its end, and the process exits 0."""
    import signal

    from tools.bench_serve import serve_process

    options = ("--served-model-name", NAME, "--max-batch", "2", "--max-context", "256")
    with serve_process(tiny_optimized("moe_shared"), *options, timeout=60) as (process, port):
        stream = client(f"http://127.0.0.1:{port}").completions.create(
            model=NAME, prompt="Hi", max_tokens=150, stream=True, temperature=0, extra_body={"ignore_eos": True})
        chunks = iter(stream)
        next(chunks)
        process.send_signal(signal.SIGTERM)
        rest = list(chunks)
        assert rest[-1].choices[0].finish_reason == "length"
        assert process.wait(60) == 0


def collect(count: int):
    """Sinks for `count` requests: the tokens each got, its finish reason, and an event set when it ended."""
    tokens, reasons, done = [[] for _ in range(count)], [None] * count, [threading.Event() for _ in range(count)]

    def sink(i: int):
        def put(token, reason):
            if token is not None:
                tokens[i].append(token)
            else:
                reasons[i] = reason
                done[i].set()
        return put

    return tokens, reasons, done, sink


def test_the_engine_process_gives_each_request_its_tokens_alone_and_reports_its_load(model, tiny_optimized):
    prompts = [[(3 * i + j) % 400 for j in range(4 + 6 * i)] for i in range(3)]
    expected = [ours(model, prompt, 8).output_ids for prompt in prompts]
    engine = EngineProcess(EngineSpec(str(tiny_optimized("moe_shared")), {}, max_batch=4, capacity=64), model.manifest)
    tokens, reasons, done, sink = collect(3)
    for i, prompt in enumerate(prompts):
        engine.submit(BatchRequest(prompt, model.sampling(greedy=True, repetition_penalty=1.0), 8, sink(i),
                                   model.manifest.tokenizer.stop_token_ids))
    assert all(event.wait(60) for event in done)
    stats, running, waiting = engine.load()
    engine.stop()
    assert tokens == expected and engine.process.exitcode == 0
    assert stats.prompt_tokens == sum(map(len, prompts)) and stats.generated_tokens == sum(map(len, expected))
    assert (running, waiting) == (0, 0)
    with pytest.raises(RuntimeInputError, match="needs? .* positions|context"):
        engine.submit(BatchRequest([1] * 60, model.sampling(), 10, sink(0)))


def test_an_engine_that_cannot_load_says_why_and_one_that_dies_fails_its_requests(model, tiny_optimized):
    artifact = str(tiny_optimized("moe_shared"))
    with pytest.raises(RuntimeInputError, match="no graph 'nope'"):
        EngineProcess(EngineSpec(artifact, {"graph": "nope"}, 2, 64), model.manifest)
    engine = EngineProcess(EngineSpec(artifact, {}, 2, 256), model.manifest)
    tokens, reasons, done, sink = collect(1)
    engine.submit(BatchRequest([5, 6], model.sampling(greedy=True), 200, sink(0)))
    while not tokens[0]:
        time.sleep(0.01)
    engine.process.kill()
    assert done[0].wait(30) and reasons[0] == FAILED
    with pytest.raises(RuntimeError, match="engine process ended"):
        engine.submit(BatchRequest([5, 6], model.sampling(greedy=True), 2, sink(0)))



def test_an_engine_whose_server_process_is_killed_ends_too(tiny_optimized):
    import subprocess
    import sys

    script = ("import os, sys; from runtime.api import ModelText; from runtime.engine import EngineProcess, EngineSpec; "
              "engine = EngineProcess(EngineSpec(sys.argv[1], {}, 2, 64), ModelText.open(sys.argv[1]).manifest); "
              "print(engine.process.pid, flush=True); os.kill(os.getpid(), 9)")
    server = subprocess.run([sys.executable, "-c", script, str(tiny_optimized("moe_shared"))], capture_output=True,
                            text=True, timeout=120)
    pid = int(server.stdout.split()[0])

    def running() -> bool:  # gone, or a zombie waiting for whoever adopted it
        try:
            with open(f"/proc/{pid}/stat") as stat:
                return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 30
    while running() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not running()


def test_a_failing_step_ends_its_requests_with_500_and_health_says_503(tiny_optimized):
    class FailingSteps(PlainSteps):
        full_logits_reads = 0

        def __init__(self, session, graph, device):
            pass

        def uncaptured_step(self, inputs, cache):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    broken = Model.load(tiny_optimized("moe_shared"), steps=FailingSteps)
    with running(broken, max_batch=2) as (url, batcher):
        with pytest.raises(openai.InternalServerError):
            client(url).completions.create(model=NAME, prompt="Hi", max_tokens=2)
        assert "illegal memory access" in batcher.ended
        with pytest.raises(urllib.error.HTTPError, match="503"):
            urllib.request.urlopen(f"{url}/health", timeout=10)
        with pytest.raises(openai.InternalServerError):
            client(url).completions.create(model=NAME, prompt="Hi", max_tokens=2)


def test_memory_stays_flat_over_many_requests(server):
    """700 short requests through one client: the server's process (this one) grows by less than 16 MiB
    after the first 100 have warmed it up."""
    url, _ = server
    session = client(url)

    def rss_mib() -> float:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * 4096 / 2**20

    for _ in range(100):
        session.completions.create(model=NAME, prompt=[5, 6, 7], max_tokens=2, **GREEDY)
    before = rss_mib()
    for i in range(600):
        session.completions.create(model=NAME, prompt=[5, 6, 7 + i % 50], max_tokens=2, **GREEDY)
    assert rss_mib() - before < 16
