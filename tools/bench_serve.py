"""`qwen2-onnx serve` under N concurrent streaming clients: aggregate output tokens/s, time to first token
and inter-token latency (p50, p99 over every gap between a stream's events: the server sends one per
token), beside `generate`'s decode ms/token on the same artifact, in one run.

The server runs as users run it (`python -m runtime serve`, its own process); the clients are asyncio
streams of /v1/completions (token-id prompts of --prompt-tokens, --new-tokens each, greedy, stop tokens
ignored so every stream has the same length) in this process.

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
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import numpy as np


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def one_stream(port: int, prompt: list[int], new_tokens: int) -> dict:
    """One streamed completion over a plain HTTP/1.1 connection (standard library only: nothing to carry to
    the device); the arrival time of each event that carries text."""
    body = json.dumps({"model": "bench", "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}, "ignore_eos": True, "repetition_penalty": 1.0}).encode()
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
    return {"ttft": stamps[0] - started, "gaps": np.diff(stamps).tolist(), "tokens": tokens, "end": stamps[-1]}


async def concurrent(port: int, clients: int, prompt_tokens: int, new_tokens: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, 400, size=prompt_tokens).tolist() for _ in range(clients)]
    started = time.perf_counter()
    results = await asyncio.gather(*(one_stream(port, p, new_tokens) for p in prompts))
    wall = max(r["end"] for r in results) - started
    itl, ttft = [gap * 1e3 for r in results for gap in r["gaps"]], [r["ttft"] * 1e3 for r in results]
    return {"clients": clients, "output_tokens_per_s": sum(r["tokens"] for r in results) / wall, "wall_s": wall,
            "ttft_ms_p50": percentile(ttft, 50), "ttft_ms_p99": percentile(ttft, 99),
            "itl_ms_p50": percentile(itl, 50), "itl_ms_p99": percentile(itl, 99)}


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


def generate_decode_ms(artifact: Path, device: str, prompt_tokens: int, new_tokens: int) -> float:
    """`generate`'s batch-1 decode ms/token on the same artifact (CUDA graphs on CUDA), after a warm-up."""
    from runtime import Model

    model = Model.load(artifact, device=device, cuda_graph=device == "cuda")
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
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    counts = [int(n) for n in args.clients.split(",")]
    report = {"artifact": str(args.artifact), "device": args.device, "prompt_tokens": args.prompt_tokens,
              "new_tokens": args.new_tokens}
    report["generate_decode_ms_per_token"] = generate_decode_ms(args.artifact, args.device, args.prompt_tokens, args.new_tokens)
    print(json.dumps(report), flush=True)
    context = args.prompt_tokens + args.new_tokens + 64
    with serve_process(args.artifact, "--device", args.device, "--served-model-name", "bench",
                       "--max-batch", str(max(counts)), "--max-context", str(context)) as (_, port):
        for clients in counts:  # each batch size's first decode step is captured here, not in a timed run
            asyncio.run(concurrent(port, clients, args.prompt_tokens, 8, seed=99))
        report["runs"] = []
        for clients in counts:
            run = asyncio.run(concurrent(port, clients, args.prompt_tokens, args.new_tokens, seed=clients))
            run["single_stream_itl_over_generate"] = run["itl_ms_p50"] / report["generate_decode_ms_per_token"]
            report["runs"].append(run)
            print(json.dumps(run), flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_serve.json").write_text(json.dumps(report, indent=2))
    print("| clients | output tokens/s | TTFT p50 / p99 ms | ITL p50 / p99 ms |")
    print("|---|---|---|---|")
    for run in report["runs"]:
        print(f"| {run['clients']} | {run['output_tokens_per_s']:.0f} | {run['ttft_ms_p50']:.0f} / {run['ttft_ms_p99']:.0f} | "
              f"{run['itl_ms_p50']:.2f} / {run['itl_ms_p99']:.2f} |")


if __name__ == "__main__":
    main()
