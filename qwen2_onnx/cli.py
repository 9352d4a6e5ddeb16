"""`qwen2-onnx`: export, optimize, inspect, demo, generate and chat.

Each command imports its stage when it runs, so `generate` and `chat` need only the runtime's
dependencies and never import torch. Every user-facing failure is one `error:` line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

Say = Callable[[str], None]


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def quiet_torch_exporter() -> None:
    """The torch exporter logs notes (e.g. "torchvision is not installed") that are noise for a user."""
    import logging
    import warnings

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="torch")
    warnings.filterwarnings("ignore", module="copyreg")


# ---- export, optimize, inspect, demo ----------------------------------------------------------------
def run_export(args: argparse.Namespace) -> None:
    from qwen2_export.export import export_checkpoint

    quiet_torch_exporter()
    artifact = export_checkpoint(args.checkpoint, args.output, dtype=args.dtype, force=args.force, progress=say)
    for target in args.target:
        optimize_and_report(artifact, target, None, True)


def optimize_and_report(artifact: Path, target: str, dtype: str | None, pack_gate_up: bool) -> None:
    from graphs.artifact import optimize_artifact

    entry = optimize_artifact(artifact, target, dtype, pack_gate_up)
    say(f"optimized for {target}: {entry.file} (" + ", ".join(f"{p.name} x{p.fired}" for p in entry.passes) + ")")


def run_optimize(args: argparse.Namespace) -> None:
    optimize_and_report(args.artifact, args.target, args.dtype, not args.separate_gate_up)


def run_inspect(args: argparse.Namespace) -> None:
    from graphs.inspect import describe_artifact

    print(describe_artifact(args.artifact))


def run_demo(args: argparse.Namespace) -> None:
    import warnings

    from .demo import run_demo as demo

    quiet_torch_exporter()
    warnings.filterwarnings("ignore")
    if not demo(args.workdir):
        raise SystemExit(1)


# ---- generate, chat ---------------------------------------------------------------------------------
def load_model(args: argparse.Namespace) -> Any:
    from runtime import Model

    return Model.load(args.artifact, device=args.device, chat_template=args.chat_template, cuda_graph=args.cuda_graph,
                      cpu_fallback=args.cpu_fallback)


def generation_options(model: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Flags override generation_config.json, which overrides our defaults; sampling values are checked
    here, before any work (the decode loop checks prefill_chunk before its first step)."""
    max_new_tokens = args.max_new_tokens if args.max_new_tokens is not None else model.generation_config.get("max_new_tokens") or 128
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                    repetition_penalty=args.repetition_penalty, seed=args.seed)
    model.sampling(args.greedy, **sampling)
    return dict(max_new_tokens=max_new_tokens, stop_strings=tuple(args.stop), greedy=args.greedy,
                prefill_chunk=args.prefill_chunk, ignore_eos=args.ignore_eos, **sampling)


def run_generate(args: argparse.Namespace) -> None:
    from runtime import RuntimeInputError

    model = load_model(args)
    if args.input_ids is not None:
        try:
            prompt: Any = [int(token) for token in args.input_ids.split(",")]
        except ValueError as error:
            raise RuntimeInputError(f"--input-ids must be comma-separated integers: {error}") from error
    elif args.chat:
        prompt = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": args.prompt}]
    else:
        prompt = args.prompt
    options = generation_options(model, args)
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
    model = load_model(args)
    options = generation_options(model, args)
    if args.warm_up is not None:
        lengths = model.warm_up(args.warm_up)
        say(f"(warmed up: prompts of {', '.join(map(str, lengths))} tokens)")
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


# ---- the parser -------------------------------------------------------------------------------------
def add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifact", help="artifact folder written by `qwen2-onnx export`")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="capture steps as CUDA graphs and replay them: decode steps, fresh prompts padded to "
                             "one of four bucket lengths per octave (up to 4,096 tokens), and batch-1 greedy "
                             "decoding queued one step ahead")
    parser.add_argument("--cpu-fallback", action="store_true",
                        help="let onnxruntime run nodes of a CUDA-optimized graph on the CPU (off: every node on CUDA)")
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


def build_parser(prog: str = "qwen2-onnx", commands: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser for `commands` (default: all)."""
    parser = argparse.ArgumentParser(prog=prog, description="Export and run Qwen2-family models with ONNX.")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, run: Callable[[argparse.Namespace], None], help: str) -> argparse.ArgumentParser | None:
        if commands is not None and name not in commands:
            return None
        command = sub.add_parser(name, help=help)
        command.set_defaults(run=run)
        return command

    if export := add("export", run_export, "turn a Hugging Face checkpoint folder into an ONNX artifact folder"):
        export.add_argument("checkpoint", help="folder with config.json, *.safetensors, tokenizer.json, ...")
        export.add_argument("-o", "--output", required=True, help="artifact folder to create")
        export.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="weights and activations")
        export.add_argument("--force", action="store_true", help="replace an existing artifact folder")
        export.add_argument("--target", action="append", choices=["cpu", "cuda"], default=[],
                            help="also write the graph optimized for this device (repeatable)")
    if optimize := add("optimize", run_optimize, "add the graph optimized for a device to an artifact"):
        optimize.add_argument("artifact")
        optimize.add_argument("--target", choices=["cpu", "cuda"], required=True)
        optimize.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                              help="cpu: float32; cuda: float16 (default) or bfloat16")
        optimize.add_argument("--separate-gate-up", action="store_true",
                              help="gate and up as two GEMMs instead of one GEMM + Split: faster prefill of long "
                                   "prompts, slower decode (Qwen2-7B shapes on an H100: 4,096-token prefill -10%%, decode +4%%)")
    if inspect := add("inspect", run_inspect, "print each graph's op histogram, inputs and outputs"):
        inspect.add_argument("artifact")
    if demo := add("demo", run_demo, "build a tiny checkpoint, export it, generate, check parity (offline)"):
        demo.add_argument("--workdir", type=Path, help="keep the checkpoint and artifact here (default: a temporary folder)")
    if generate := add("generate", run_generate, "generate text from an exported artifact"):
        add_run_options(generate)
        source = generate.add_mutually_exclusive_group(required=True)
        source.add_argument("--prompt", help="prompt text")
        source.add_argument("--input-ids", help="comma-separated prompt token ids, e.g. 1,2,3")
        generate.add_argument("--chat", action="store_true", help="wrap --prompt as a user turn with the chat template")
        generate.add_argument("--json", action="store_true", help="print ids, text and timings as JSON instead of streaming")
    if chat := add("chat", run_chat, "interactive multi-turn chat (/reset, /exit)"):
        add_run_options(chat)
        chat.add_argument("--warm-up", type=int, metavar="N",
                          help="before the first turn, run prompts of each power-of-two length up to N tokens so "
                               "onnxruntime's first-use work (CUDA MoE tactic profiling) is not paid inside a turn")
    return parser


def user_errors() -> tuple[type[Exception], ...]:
    """Each stage's one base error type. These modules import nothing heavy: not torch, not onnx."""
    from artifact.contract import ArtifactError
    from graphs.errors import GraphError
    from qwen2_export.errors import ExportError
    from runtime.errors import RuntimeInputError

    return ArtifactError, ExportError, GraphError, RuntimeInputError, FileNotFoundError


def main(argv: Sequence[str] | None = None, prog: str = "qwen2-onnx", commands: Sequence[str] | None = None) -> int:
    args = build_parser(prog, commands).parse_args(argv)
    try:
        args.run(args)
    except user_errors() as error:
        print(f"{prog} {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
