"""`qwen2-onnx`: export, optimize, inspect, demo, generate, chat and serve.

Each command imports its stage when it runs, so `generate`, `chat` and `serve` need only the runtime's
dependencies (serve also its extra) and never import torch. Every user-facing failure is one `error:`
line and exit status 2.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from artifact.contract import TASKS  # the standard library only: no stage is imported with it

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
    artifact = export_checkpoint(args.checkpoint, args.output, dtype=args.dtype, force=args.force, progress=say,
                                 quantize=args.quantize, block_size=args.block_size, symmetric=args.symmetric,
                                 task=args.task)
    if args.dtype == "bf16" and "cpu" not in args.target:
        say("note: onnxruntime has no bf16 kernels for the CPU, so this artifact runs on CUDA only; for a CPU add "
            f"its CPU graph: qwen2-onnx optimize {artifact} --target cpu")
    for target in args.target:
        optimize_and_report(artifact, target, None, args.int4_accuracy_level)


def optimize_and_report(artifact: Path, target: str, dtype: str | None, int4_accuracy: int | None) -> None:
    from graphs.artifact import optimize_artifact

    entry = optimize_artifact(artifact, target, dtype, int4_accuracy)
    say(f"optimized for {target}: {entry.file} (" + ", ".join(f"{p.name} x{p.fired}" for p in entry.passes if p.fired) + ")")


def run_optimize(args: argparse.Namespace) -> None:
    optimize_and_report(args.artifact, args.target, args.dtype, args.int4_accuracy_level)


def run_verify(args: argparse.Namespace) -> None:
    import time

    from artifact import contract, files

    started = time.monotonic()
    manifest = contract.read_manifest(args.artifact)
    checked = files.verify(args.artifact, manifest)
    count = len(files.all_records(manifest))
    print(f"{args.artifact}: {count} files, {checked / 1e9:.2f} GB, sizes and sha256 match the manifest "
          f"({time.monotonic() - started:.1f} s)")


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
def template_limits(args: argparse.Namespace) -> Any:
    from runtime import RuntimeInputError, TemplateLimits

    given = {"seconds": args.template_seconds, "max_chars": args.template_max_chars}
    try:
        return TemplateLimits(**{name: value for name, value in given.items() if value is not None})
    except ValueError as error:
        raise RuntimeInputError(f"--template-seconds and --template-max-chars must be positive: {error}") from error


def load_model(args: argparse.Namespace) -> Any:
    from runtime import Model

    return Model.load(args.artifact, device=args.device, chat_template=args.chat_template, cuda_graph=args.cuda_graph,
                      cpu_fallback=args.cpu_fallback, verify=args.verify, template_limits=template_limits(args))


def read_prompt_file(model: Any, name: str) -> str:
    """The prompt in file `name` (`-`: standard input) as UTF-8 text; a file too large for the context is
    refused from its size before it is read."""
    from runtime import RuntimeInputError

    if name == "-":
        data = sys.stdin.buffer.read()
    else:
        path = Path(name)
        if not path.is_file():
            raise RuntimeInputError(f"--prompt-file {path} is not a file")
        model.check_prompt_size(path.stat().st_size)
        data = path.read_bytes()
    model.check_prompt_size(len(data))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RuntimeInputError(f"--prompt-file {name} is not UTF-8 text (byte {error.start}); save it as UTF-8") from error


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
    else:
        text = args.prompt if args.prompt is not None else read_prompt_file(model, args.prompt_file)
        prompt = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": text}] \
            if args.chat else text
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


def texts_model(args: argparse.Namespace) -> Any:
    """classify and embed: the loaded model, once there is a --text to give it."""
    from runtime import RuntimeInputError

    if not args.text:
        raise RuntimeInputError("give at least one --text")
    return load_model(args)


def run_classify(args: argparse.Namespace) -> None:
    results = texts_model(args).classify(args.text, top_k=None if args.top_k == 0 else args.top_k)
    if args.json:
        print(json.dumps([[vars(item) for item in result] for result in results], ensure_ascii=False))
        return
    for text, result in zip(args.text, results):
        shown = ", ".join(f"{item.token!r}: {item.label} {item.score:.3f}" if hasattr(item, "token")
                          else f"{item.label} {item.score:.3f}" for item in result)
        print(f"{text}\t{shown}")


def run_embed(args: argparse.Namespace) -> None:
    vectors = texts_model(args).embed(args.text)
    if args.json:
        print(json.dumps(vectors.tolist()))
        return
    for text, vector in zip(args.text, vectors):
        print(f"{text}\t[{', '.join(f'{v:.4f}' for v in vector[:4])}, ...] ({len(vector)} values, L2-normalised)")


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
        raw = sys.stdin.buffer.readline()
        line = raw.decode("utf-8", errors="surrogateescape")  # a bad line is refused as that turn's error
        if not raw or line.strip() == "/exit":
            return
        if line.strip() == "/reset":
            session.reset()
            print("(conversation reset)", flush=True)
            continue
        if not line.strip():
            continue
        chat_turn(session, line.rstrip("\n"), options, args.prog)


def chat_turn(session: Any, text: str, options: dict[str, Any], prog: str) -> None:
    """One turn; a refused turn is reported and the conversation goes on without it."""
    from runtime import RuntimeInputError

    print("assistant> ", end="", flush=True)
    try:
        for piece in session.send(text, **options):
            print(piece, end="", flush=True)
    except RuntimeInputError as error:
        print(flush=True)
        print(f"{prog} chat: error: {error}", file=sys.stderr, flush=True)
        return
    print(flush=True)


def run_serve(args: argparse.Namespace) -> None:
    from runtime import RuntimeInputError

    try:
        from runtime.server import EngineSpec, ServeConfig, serve
    except ImportError as error:
        raise RuntimeInputError(f"serve needs Starlette and uvicorn ({error.name} is missing): "
                                "pip install 'qwen2-onnx[serve]'") from error
    from runtime.api import ModelText

    model = ModelText.open(args.artifact, args.chat_template, template_limits(args))
    context = model.manifest.model.context_length
    max_context = args.max_context or min(context, SERVE_CONTEXT)
    if not 1 < max_context <= context or args.max_batch < 1:
        raise RuntimeInputError(f"--max-context {max_context} must lie in [2, {context}] and --max-batch at least 1")
    # decode steps of each batch size replayed as CUDA graphs
    options = {"device": args.device, "cuda_graph": args.device == "cuda", "cpu_fallback": args.cpu_fallback,
               "verify": args.verify}
    name = args.served_model_name or Path(args.artifact).resolve().name
    serve(model, EngineSpec(args.artifact, options, args.max_batch, max_context), args.host, args.port,
          ServeConfig(name, args.api_key))


SERVE_CONTEXT = 8192  # serve's default positions per request: max_batch rows of this many stay on the device


# ---- the parser -------------------------------------------------------------------------------------
def add_load_options(parser: argparse.ArgumentParser) -> None:
    """How the artifact is opened: generate, chat and serve."""
    parser.add_argument("artifact", help="artifact folder written by `qwen2-onnx export`")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--cpu-fallback", action="store_true",
                        help="let onnxruntime run nodes of a CUDA-optimized graph on the CPU (off: every node on CUDA)")
    parser.add_argument("--chat-template", metavar="FILE", help="Jinja chat template to use instead of the checkpoint's")
    parser.add_argument("--verify", action="store_true",
                        help="check the sha256 of every file the run reads before loading (reads all weights once)")
    parser.add_argument("--template-seconds", type=float, metavar="S",
                        help="stop a chat template that renders for longer (default 2)")
    parser.add_argument("--template-max-chars", type=int, metavar="N",
                        help="stop a chat template whose output or values grow larger (default 4,000,000)")


def add_run_options(parser: argparse.ArgumentParser) -> None:
    add_load_options(parser)
    parser.add_argument("--cuda-graph", action="store_true",
                        help="capture steps as CUDA graphs and replay them: decode steps, fresh prompts padded to "
                             "one of four bucket lengths per octave (up to 4,096 tokens), and batch-1 greedy "
                             "decoding queued one step ahead")
    parser.add_argument("--system", help="system prompt (chat)")
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


def add_texts_options(parser: argparse.ArgumentParser, verb: str, printed: str) -> None:
    """classify and embed: how the artifact is opened, the texts (one batch), --json."""
    add_load_options(parser)
    parser.set_defaults(cuda_graph=False)
    parser.add_argument("--text", action="append", default=[], help=f"a text to {verb} (repeatable: one batch)")
    parser.add_argument("--json", action="store_true", help=f"print {printed} as JSON")


def add_serve_options(parser: argparse.ArgumentParser) -> None:
    add_load_options(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", metavar="NAME", help="the model name clients send (default: the folder's name)")
    parser.add_argument("--api-key", metavar="KEY", default=os.environ.get("QWEN2_ONNX_API_KEY"),
                        help="require `Authorization: Bearer KEY` (default: $QWEN2_ONNX_API_KEY, else none)")
    parser.add_argument("--max-batch", type=int, default=16, metavar="N", help="requests decoded together (default 16)")
    parser.add_argument("--max-context", type=int, metavar="N",
                        help="positions each request may hold, prompt and reply (default: the model's context, at most 8,192)")


def build_parser(prog: str = "qwen2-onnx", commands: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser for `commands` (default: all)."""
    def add_int4_accuracy(command: argparse.ArgumentParser) -> None:
        command.add_argument("--int4-accuracy-level", type=int, choices=[1, 4], metavar="{1,4}",
                             help="int4 artifacts: 4 lets the CPU graph quantize activations to int8 per block "
                                  "(its default: several times faster, ~1e-2 relative error); 1 keeps them float (exact). "
                                  "CUDA computes in float either way")

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
        export.add_argument("--task", choices=TASKS,
                            help="what the graph computes (default: from config.json's architectures; feature-extraction "
                                 "of a causal LM gives its embeddings, as gte-Qwen2 uses them)")
        export.add_argument("--target", action="append", choices=["cpu", "cuda"], default=[],
                            help="also write the graph optimized for this device (repeatable)")
        export.add_argument("--quantize", choices=["int4"],
                            help="round every attention and MLP projection to int4 per block of inputs while streaming "
                                 "(embeddings, norms and lm_head keep --dtype); AWQ and GPTQ checkpoints are int4 without it")
        export.add_argument("--block-size", type=int, default=32, choices=[16, 32, 64, 128, 256],
                            help="--quantize: inputs per scale (default 32)")
        export.add_argument("--symmetric", action="store_true", help="--quantize: no zero points (codes -8..7)")
        add_int4_accuracy(export)
    if optimize := add("optimize", run_optimize, "add the graph optimized for a device to an artifact"):
        optimize.add_argument("artifact")
        optimize.add_argument("--target", choices=["cpu", "cuda"], required=True)
        optimize.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                              help="cpu: float32; cuda: float16 (default) or bfloat16")
        add_int4_accuracy(optimize)
    if verify := add("verify", run_verify, "check every file of an artifact against the manifest's sizes and sha256"):
        verify.add_argument("artifact")
    if inspect := add("inspect", run_inspect, "print each graph's op histogram, inputs and outputs"):
        inspect.add_argument("artifact")
    if demo := add("demo", run_demo, "build a tiny checkpoint, export it, generate, check parity (offline)"):
        demo.add_argument("--workdir", type=Path, help="keep the checkpoint and artifact here (default: a temporary folder)")
    if generate := add("generate", run_generate, "generate text from an exported artifact"):
        add_run_options(generate)
        source = generate.add_mutually_exclusive_group(required=True)
        source.add_argument("--prompt", help="prompt text")
        source.add_argument("--prompt-file", metavar="PATH", help="read the prompt text from a UTF-8 file (- : standard input)")
        source.add_argument("--input-ids", help="comma-separated prompt token ids, e.g. 1,2,3")
        generate.add_argument("--chat", action="store_true", help="wrap --prompt as a user turn with the chat template")
        generate.add_argument("--json", action="store_true", help="print ids, text and timings as JSON instead of streaming")
    if classify := add("classify", run_classify, "label texts (or their tokens) with a classification artifact"):
        add_texts_options(classify, "classify", "the labels and scores")
        classify.add_argument("--top-k", type=int, default=1, metavar="K", help="labels shown per text (0: all)")
    if embed := add("embed", run_embed, "embed texts with a feature-extraction artifact (last token, L2-normalised)"):
        add_texts_options(embed, "embed", "the vectors")
    if serve := add("serve", run_serve, "serve OpenAI's API (chat and completions), requests batched continuously"):
        add_serve_options(serve)
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

    return ArtifactError, ExportError, GraphError, RuntimeInputError


def main(argv: Sequence[str] | None = None, prog: str = "qwen2-onnx", commands: Sequence[str] | None = None) -> int:
    args = build_parser(prog, commands).parse_args(argv)
    args.prog = prog
    signal.signal(signal.SIGTERM, interrupt)  # clean up as for Ctrl-C: no half-written output stays behind
    try:
        args.run(args)
    except user_errors() as error:
        return fail(prog, args.command, str(error))
    except BrokenPipeError:  # the reader stopped reading (`| head`): not a failure of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so exit does not flush into the pipe
        return 0
    except OSError as error:
        return fail(prog, args.command, describe_os_error(error))
    except Exception as error:
        if not type(error).__module__.startswith("onnxruntime"):
            raise  # our own defect: keep the traceback
        # a graph that passed the load checks but fails inside onnxruntime (device memory, a kernel)
        return fail(prog, args.command, f"onnxruntime failed: {' '.join(str(error).split())[:500]}")
    except KeyboardInterrupt:
        print(f"{prog} {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


def fail(prog: str, command: str, message: str) -> int:
    print(f"{prog} {command}: error: {message}", file=sys.stderr)
    return 2


def interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


# errno -> what the user can do about it
OS_FIXES = {
    errno.ENOSPC: "free some space or write somewhere else",
    errno.EDQUOT: "free some space or write somewhere else",
    errno.EACCES: "check the permissions or choose another location",
    errno.EPERM: "check the permissions or choose another location",
    errno.EROFS: "the file system is read-only; choose another location",
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose another path",
    errno.EISDIR: "the path is a folder; name a file",
    errno.ENOENT: "check the path",
    errno.ENAMETOOLONG: "choose a shorter path",
}


def describe_os_error(error: OSError) -> str:
    """An operating-system failure as one line: what failed, where, and what to do."""
    where = f" ({error.filename})" if error.filename else ""
    fix = OS_FIXES.get(error.errno, "check the path and try again")
    return f"{error.strerror or error}{where}; {fix}"


if __name__ == "__main__":
    sys.exit(main())
