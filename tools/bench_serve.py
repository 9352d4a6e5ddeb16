"""`qwen2-onnx serve` under N concurrent streaming clients: aggregate output tokens/s, time to first token
and inter-token latency (p50, p99 over every gap between a stream's events: the server sends one per
token), beside `generate`'s decode ms/token on the same artifact, in one run. Where the time went comes
from the server's /metrics, read before and after each run: ms per decode step in the step runner and
in the batcher's whole loop (the rest is token choice, hand-over to the event loop, waiting for the GIL),
rows per decode step, prefill steps and their ms.

The server runs as users run it (`python -m runtime serve`, its own process); the clients are asyncio
streams of /v1/completions (token-id prompts of --prompt-tokens, --new-tokens each, greedy or with
`--sampling qwen` Qwen2.5-Instruct's sampling defaults, stop tokens ignored so every stream has the same
length) in this process. The same requests are also given to a
batcher in this process, without HTTP ("engine"), loaded beside the server and run in turn with it for
each client count: the difference is what the server's side costs.

    PYTHONPATH=. python tools/bench_serve.py ARTIFACT --device cuda --clients 1,4,16,64 --out OUT
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict
import urllib.request
from pathlib import Path
from typing import Iterator

import numpy as np

from runtime import Model
from runtime.batcher import Batcher, BatchRequest


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


# token choice of every request: greedy (the measurement), or Qwen2.5-Instruct's sampling defaults
# (generation_config.json), which puts the host's per-row work (filters, seeded draws, penalty) in the loop
SAMPLINGS = {"greedy": {"temperature": 0, "repetition_penalty": 1.0},
             "qwen": {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}}


async def one_stream(port: int, prompt: list[int], new_tokens: int, sampling: dict) -> dict:
    """One streamed completion over a plain HTTP/1.1 connection (standard library only: nothing to carry to
    the device); the arrival time of each event that carries text."""
    body = json.dumps({"model": "bench", "prompt": prompt, "max_tokens": new_tokens, "stream": True,
                       "stream_options": {"include_usage": True}, "ignore_eos": True, **sampling}).encode()
    started, stamps, tokens = time.perf_counter(), [], 0
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
    await writer.drain()
    status = await reader.readline()
    if b" 200 " not in status:
        raise RuntimeError(f"the server answered {status!r}")
    while (await reader.readline()).strip():  # headers
        pass
    while True:  # chunked transfer coding: a hex size line, then that many bytes
        size = int((await reader.readline()).strip(), 16)
        if size == 0:
            break
        data = await reader.readexactly(size + 2)
        for line in data.decode().splitlines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event["choices"] and event["choices"][0]["finish_reason"] is None:  # a token's event
                stamps.append(time.perf_counter())
            elif event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    writer.close()
    if tokens != len(stamps):
        raise RuntimeError(f"{len(stamps)} token events for {tokens} tokens")
    return stream_times(started, stamps)


def stream_times(started: float, stamps: list[float]) -> dict:
    """One stream's time to first token, gaps between its tokens, token count and end, from their arrival times."""
    return {"ttft": stamps[0] - started, "gaps": np.diff(stamps).tolist(), "tokens": len(stamps), "end": stamps[-1]}


def bench_prompts(clients: int, prompt_tokens: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 400, size=prompt_tokens).tolist() for _ in range(clients)]


async def concurrent(port: int, clients: int, prompt_tokens: int, new_tokens: int, seed: int, sampling: dict) -> dict:
    started = time.perf_counter()
    results = await asyncio.gather(*(one_stream(port, p, new_tokens, sampling)
                                     for p in bench_prompts(clients, prompt_tokens, seed)))
    return summary(clients, started, results)


def engine(batcher, sampling, clients: int, prompt_tokens: int, new_tokens: int, seed: int) -> dict:
    """The same requests submitted at once to `batcher` in this process; token times taken in its thread."""
    stamps = [[] for _ in range(clients)]
    done = [threading.Event() for _ in range(clients)]

    def sink(i: int):
        return lambda token, reason: stamps[i].append(time.perf_counter()) if token is not None else done[i].set()

    started = time.perf_counter()
    for i, prompt in enumerate(bench_prompts(clients, prompt_tokens, seed)):
        batcher.submit(BatchRequest(prompt, sampling, new_tokens, sink(i)))
    for event in done:
        event.wait()
    return summary(clients, started, [stream_times(started, s) for s in stamps])


def summary(clients: int, started: float, results: list[dict]) -> dict:
    wall = max(r["end"] for r in results) - started
    itl, ttft = [gap * 1e3 for r in results for gap in r["gaps"]], [r["ttft"] * 1e3 for r in results]
    return {"clients": clients, "output_tokens_per_s": sum(r["tokens"] for r in results) / wall, "wall_s": wall,
            "ttft_ms_p50": percentile(ttft, 50), "ttft_ms_p99": percentile(ttft, 99),
            "itl_ms_p50": percentile(itl, 50), "itl_ms_p99": percentile(itl, 99)}


def scrape(port: int) -> dict[str, float]:
    """The server's counters (GET /metrics), named as runtime/batcher.BatcherStats' fields."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    pairs = (line.split() for line in text.splitlines() if line and not line.startswith("#"))
    return {name.removeprefix("qwen2_onnx_").removesuffix("_total"): float(value) for name, value in pairs}


def where_time_went(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """BatcherStats fields before and after a run: per decode step and prefill, what the batcher did."""
    delta = {name: after[name] - before[name] for name in before}
    steps, prefills = max(delta["decode_steps"], 1), max(delta["prefill_steps"], 1)
    return {"decode_step_ms": 1e3 * delta["decode_seconds"] / steps,
            "loop_ms_per_decode_step": 1e3 * (delta["busy_seconds"] - delta["prefill_seconds"]) / steps,
            "rows_per_decode_step": delta["decode_rows"] / steps,
            "decode_steps_fed_on_device": delta["decode_steps_fed_on_device"],
            "decode_steps_refed": delta["decode_steps_refed"],
            "prefill_steps": delta["prefill_steps"],
            "prefill_ms_per_step": 1e3 * delta["prefill_seconds"] / prefills,
            "prefill_ms_total": 1e3 * delta["prefill_seconds"]}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve_process(artifact: Path, *options: str, timeout: float = 600, **popen) -> Iterator[tuple[subprocess.Popen, int]]:
    """`python -m runtime serve ARTIFACT --port P OPTIONS` as users start it, once its /health answers;
    yields the process and its port, and terminates it at the end if it still runs."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "runtime", "serve", str(artifact), "--port", str(port), *options], **popen)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not start (exit status {process.poll()})") from None
                time.sleep(0.2)
        yield process, port
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(60)


def generate_decode_ms(model, prompt_tokens: int, new_tokens: int) -> float:
    """`generate`'s batch-1 decode ms/token (CUDA graphs on CUDA), after a warm-up."""
    prompt = np.random.default_rng(0).integers(0, 400, size=prompt_tokens).tolist()
    times = []
    for _ in range(3):
        model.generate(prompt, max_new_tokens=new_tokens, greedy=True, repetition_penalty=1.0, ignore_eos=True)
        timings = model.last_timings
        times.append(timings.decode_s * 1e3 / timings.decode_tokens)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--clients", default="1,4,16,64")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--sampling", choices=sorted(SAMPLINGS), default="greedy")
    parser.add_argument("--max-context", type=int, help="positions per row, server and engine alike (default: "
                        "prompt + new tokens + 64; `serve` itself defaults to 8,192, whose decode masks are that wide)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    counts = [int(n) for n in args.clients.split(",")]
    context = args.max_context or args.prompt_tokens + args.new_tokens + 64
    report = {"artifact": str(args.artifact), "device": args.device, "prompt_tokens": args.prompt_tokens,
              "new_tokens": args.new_tokens, "sampling": args.sampling, "max_context": context}
    model = Model.load(args.artifact, device=args.device, cuda_graph=args.device == "cuda")
    report["generate_decode_ms_per_token"] = generate_decode_ms(model, args.prompt_tokens, args.new_tokens)
    print(json.dumps(report), flush=True)
    batcher = Batcher(model.session, model.manifest, max(counts), context)
    began = time.perf_counter()
    report["warm_up_prefill_shapes"] = len(batcher.start(warm_up=True))  # as the server's engine process does
    report["warm_up_s"] = time.perf_counter() - began
    print(json.dumps({key: report[key] for key in ("warm_up_prefill_shapes", "warm_up_s")}), flush=True)
    options = SAMPLINGS[args.sampling]
    sampling = model.sampling(greedy=True, repetition_penalty=1.0) if args.sampling == "greedy" else model.sampling(do_sample=True, **options)
    report["engine"], report["runs"] = [], []
    # both loaded at once, each count run on one then the other, the first of the two alternating, so
    # neither side gets the machine's better minutes (clocks, heat)
    with serve_process(args.artifact, "--device", args.device, "--served-model-name", "bench",
                       "--max-batch", str(max(counts)), "--max-context", str(context)) as (_, port):
        for clients in counts:  # each batch size's first decode step is captured here, not in a timed run
            engine(batcher, sampling, clients, args.prompt_tokens, 8, seed=99)
            asyncio.run(concurrent(port, clients, args.prompt_tokens, 8, seed=99, sampling=options))
        for index, clients in enumerate(counts):
            for side in ("engine", "served")[:: 1 if index % 2 == 0 else -1]:
                if side == "engine":
                    before = asdict(batcher.stats)
                    run = engine(batcher, sampling, clients, args.prompt_tokens, args.new_tokens, seed=clients)
                    run.update(where_time_went(before, asdict(batcher.stats)))
                    report["engine"].append(run)
                    print(json.dumps({"engine": run}), flush=True)
                else:
                    before = scrape(port)
                    run = asyncio.run(concurrent(port, clients, args.prompt_tokens, args.new_tokens, seed=clients,
                                                 sampling=options))
                    run.update(where_time_went(before, scrape(port)))
                    run["single_stream_itl_over_generate"] = run["itl_ms_p50"] / report["generate_decode_ms_per_token"]
                    report["runs"].append(run)
                    print(json.dumps(run), flush=True)
    batcher.stop()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_serve.json").write_text(json.dumps(report, indent=2))
    print("| clients | output tokens/s: served (engine) | TTFT p50 / p99 ms | ITL p50 / p99 ms | decode step ms: runner / "
          "loop | prefill steps, ms total |")
    print("|---|---|---|---|---|---|")
    for run, alone in zip(report["runs"], report["engine"]):
        print(f"| {run['clients']} | {run['output_tokens_per_s']:.0f} ({alone['output_tokens_per_s']:.0f}) | "
              f"{run['ttft_ms_p50']:.0f} / {run['ttft_ms_p99']:.0f} | "
              f"{run['itl_ms_p50']:.2f} / {run['itl_ms_p99']:.2f} | {run['decode_step_ms']:.2f} / "
              f"{run['loop_ms_per_decode_step']:.2f} | {run['prefill_steps']:.0f}, {run['prefill_ms_total']:.0f} |")


if __name__ == "__main__":
    main()
