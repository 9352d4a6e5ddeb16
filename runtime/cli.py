"""`generate` and `chat` commands. Importing this never imports torch: a deployment can run
`python -m runtime generate ...` with onnxruntime, numpy, tokenizers and jinja2 only."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from .api import Model
from .errors import RuntimeInputError


def add_runtime_commands(commands: argparse._SubParsersAction) -> None:
    generate = commands.add_parser("generate", help="generate text from an exported artifact")
    _common(generate)
    source = generate.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text")
    source.add_argument("--input-ids", help="comma-separated prompt token ids, e.g. 1,2,3")
    generate.add_argument("--chat", action="store_true", help="wrap --prompt as a user turn with the chat template")
    generate.add_argument("--json", action="store_true", help="print ids, text and timings as JSON instead of streaming")
    generate.set_defaults(run=run_generate)

    chat = commands.add_parser("chat", help="interactive multi-turn chat (/reset, /exit)")
    _common(chat)
    chat.add_argument("--warm-up", type=int, metavar="N",
                      help="before the first turn, run prompts of each power-of-two length up to N tokens so "
                           "onnxruntime's first-use work (CUDA MoE tactic profiling) is not paid inside a turn")
    chat.set_defaults(run=run_chat)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifact", help="artifact folder written by `qwen2-onnx export`")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--cuda-graph", action="store_true", help="capture the decode step as a CUDA graph and replay it")
    parser.add_argument("--capture-prefill", action=argparse.BooleanOptionalAction, default=None,
                        help="capture a fresh batch-1 prompt too, padded to one of four bucket lengths per octave "
                             "(up to 4,096 tokens), one graph per bucket (default: on with --cuda-graph)")
    parser.add_argument("--pipelined-decode", action=argparse.BooleanOptionalAction, default=None,
                        help="queue each batch-1 greedy step before the host has read the previous one "
                             "(default: on with --cuda-graph)")
    parser.add_argument("--cpu-fallback", action="store_true",
                        help="let onnxruntime run nodes of a CUDA-optimized graph on the CPU (off: every node on CUDA)")
    parser.add_argument("--attention-kernel", choices=["flash", "cudnn"],
                        help="onnxruntime's attention kernels on CUDA (default: its own choice, cuDNN on Hopper)")
    parser.add_argument("--system", help="system prompt (chat)")
    parser.add_argument("--chat-template", metavar="FILE", help="Jinja chat template to use instead of the checkpoint's")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: generation_config.json or 128")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--greedy", action="store_true", help="argmax decoding (the repetition penalty still applies)")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--min-p", type=float)
    parser.add_argument("--repetition-penalty", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--prefill-chunk", type=int, metavar="N", help="prefill long prompts N tokens at a time (batch 1)")
    parser.add_argument("--ignore-eos", action="store_true", help="generate max_new_tokens even past stop tokens (measurements)")


def _options(model: Model, args: argparse.Namespace) -> dict[str, Any]:
    """Generation options: flags override generation_config.json, which overrides our defaults."""
    max_new_tokens = args.max_new_tokens or model.generation_config.get("max_new_tokens") or 128
    options = dict(max_new_tokens=max_new_tokens, stop_strings=tuple(args.stop), greedy=args.greedy,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                   repetition_penalty=args.repetition_penalty, seed=args.seed)
    model.sampling(args.greedy, **{k: v for k, v in options.items() if k not in ("max_new_tokens", "stop_strings", "greedy")})
    # sampling values are checked above; the decode loop checks prefill_chunk before its first step
    return {**options, "prefill_chunk": args.prefill_chunk, "ignore_eos": args.ignore_eos}


def _load(args: argparse.Namespace) -> Model:
    return Model.load(args.artifact, device=args.device, chat_template=args.chat_template, cuda_graph=args.cuda_graph,
                      cpu_fallback=args.cpu_fallback, attention_kernel=args.attention_kernel,
                      capture_prefill=args.capture_prefill, pipelined_decode=args.pipelined_decode)


def run_generate(args: argparse.Namespace) -> None:
    model = _load(args)
    if args.input_ids is not None:
        try:
            prompt: Any = [int(token) for token in args.input_ids.split(",")]
        except ValueError as error:
            raise RuntimeInputError(f"--input-ids must be comma-separated integers: {error}") from error
    elif args.chat:
        prompt = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": args.prompt}]
    else:
        prompt = args.prompt
    options = _options(model, args)
    if args.json:
        result = model.generate(prompt, **options)
        timings = model.last_timings
        print(json.dumps({
            "prompt_ids": result.prompt_ids, "output_ids": result.output_ids, "text": result.text,
            "finish_reason": result.finish_reason,
            "timings": {"time_to_first_token_s": timings.time_to_first_token_s,
                        "decode_tokens_per_s": timings.decode_tokens_per_s, "decode_tokens": timings.decode_tokens},
        }, ensure_ascii=False))
        return
    for piece in model.stream(prompt, **options):
        print(piece, end="", flush=True)
    print()


def run_chat(args: argparse.Namespace) -> None:
    model = _load(args)
    options = _options(model, args)
    if args.warm_up is not None:
        lengths = model.warm_up(args.warm_up)
        print(f"(warmed up: prompts of {', '.join(map(str, lengths))} tokens)", file=sys.stderr, flush=True)
    session = model.chat(system=args.system)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return
        if line.strip() == "/reset":
            session.reset()
            print("(conversation reset)", flush=True)
            continue
        if not line.strip():
            continue
        print("assistant> ", end="", flush=True)
        for piece in session.send(line.rstrip("\n"), **options):
            print(piece, end="", flush=True)
        print(flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime", description="Run exported Qwen2 artifacts.")
    add_runtime_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return run_command(args)


def run_command(args: argparse.Namespace) -> int:
    try:
        args.run(args)
    except RuntimeInputError as error:
        print(f"qwen2-onnx {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0
