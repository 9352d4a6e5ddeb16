"""`qwen2-onnx` command line. Each subcommand imports its stage lazily, so a command that does not
export never pays for importing torch."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence


def _export(args: argparse.Namespace) -> None:
    import logging
    import warnings

    from .export import export_checkpoint

    # The torch exporter logs notes (e.g. "torchvision is not installed") that are noise for a user.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="torch")
    warnings.filterwarnings("ignore", module="copyreg")
    say = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    artifact = export_checkpoint(args.checkpoint, args.output, dtype=args.dtype, force=args.force, progress=say)
    for target in args.target:
        _optimize_artifact(artifact, target, None, say)


def _optimize_artifact(artifact, target: str, dtype: str | None, say, pack_gate_up: bool = True) -> None:
    from graphs.artifact import optimize_artifact

    entry = optimize_artifact(artifact, target, dtype, pack_gate_up)
    say(f"optimized for {target}: {entry['file']} (" + ", ".join(f"{p['pass']} x{p['fired']}" for p in entry["passes"]) + ")")


def _optimize(args: argparse.Namespace) -> None:
    _optimize_artifact(args.artifact, args.target, args.dtype, lambda message: print(message, file=sys.stderr),
                       not args.separate_gate_up)


def _inspect(args: argparse.Namespace) -> None:
    from graphs.inspect import describe_artifact

    print(describe_artifact(args.artifact))


def _demo(args: argparse.Namespace) -> None:
    import logging
    import warnings

    from .demo import run_demo

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    if not run_demo(args.workdir):
        raise SystemExit(1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen2-onnx", description="Export and run Qwen2-family models with ONNX.")
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="turn a Hugging Face checkpoint folder into an ONNX artifact folder")
    export.add_argument("checkpoint", help="folder with config.json, *.safetensors, tokenizer.json, ...")
    export.add_argument("-o", "--output", required=True, help="artifact folder to create")
    export.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="weights and activations")
    export.add_argument("--force", action="store_true", help="replace an existing artifact folder")
    export.add_argument("--target", action="append", choices=["cpu", "cuda"], default=[],
                        help="also write the graph optimized for this device (repeatable)")
    export.set_defaults(run=_export)
    optimize = commands.add_parser("optimize", help="add the graph optimized for a device to an artifact")
    optimize.add_argument("artifact")
    optimize.add_argument("--target", choices=["cpu", "cuda"], required=True)
    optimize.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                          help="cpu: float32; cuda: float16 (default) or bfloat16")
    optimize.add_argument("--separate-gate-up", action="store_true",
                          help="gate and up as two GEMMs instead of one GEMM + Split: faster prefill of long prompts, "
                               "slower decode (Qwen2-7B shapes on an H100: 4,096-token prefill -10%%, decode +4%%)")
    optimize.set_defaults(run=_optimize)
    inspect = commands.add_parser("inspect", help="print each graph's op histogram, inputs and outputs")
    inspect.add_argument("artifact")
    inspect.set_defaults(run=_inspect)
    demo = commands.add_parser("demo", help="build a tiny checkpoint, export it, generate, check parity (offline)")
    demo.add_argument("--workdir", type=Path, help="keep the checkpoint and artifact here (default: a temporary folder)")
    demo.set_defaults(run=_demo)
    # generate and chat live in runtime/, which never imports torch or this package
    from runtime.cli import add_runtime_commands

    add_runtime_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("generate", "chat"):
        from runtime.cli import run_command

        return run_command(args)  # without importing the export stage (and torch)
    from graphs.pipeline import PipelineError

    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .export import ExportError

    try:
        args.run(args)
    except (ConfigError, CheckpointError, ExportError, PipelineError, FileNotFoundError) as error:
        print(f"qwen2-onnx {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
