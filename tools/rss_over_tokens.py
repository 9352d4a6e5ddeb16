"""Resident memory of a long generation, for the portable and the CPU-optimized graph side by side.

Builds a tiny random checkpoint (the tests' dense shapes, context 16,384), exports it with its CPU
graph, then for each graph generates N tokens in one request (greedy, stop tokens ignored) in a
fresh process and prints the process's RSS when the first token is out and every --every tokens, then
what a second request of the same length adds (a leak would add as much again). The tiny model's KV
cache is 512 bytes per token position (5 MB at 10,000 tokens); growth past that is the runtime's.

    python tools/rss_over_tokens.py --workdir /tmp/rss --tokens 10000 --every 2500
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CONTEXT = 16_384


def rss_mib() -> float:
    """This process's resident set (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def build(workdir: Path) -> Path:
    from graphs.artifact import optimize_artifact
    from qwen2_export.export import export_checkpoint
    from qwen2_export.synthetic import tiny_config, write_checkpoint

    artifact = workdir / "artifact"
    if not (artifact / "manifest.json").is_file():
        config = {**tiny_config("dense_tied"), "max_position_embeddings": CONTEXT}
        checkpoint = write_checkpoint(workdir / "checkpoint", config)
        export_checkpoint(checkpoint, artifact, force=True)
        optimize_artifact(artifact, "cpu")
    return artifact


def measure(artifact: Path, graph: str, tokens: int, every: int) -> list[list[tuple[int, float]]]:
    """Run in this process, two requests one after the other: [(tokens generated, RSS MiB)] of each."""
    from runtime import Model

    model = Model.load(artifact, graph=graph)
    runs = []
    for _ in range(2):
        points = []
        loop = model.decode_loop([[1, 2, 3, 4]], max_new_tokens=tokens, greedy=True, ignore_eos=True)
        for count, _ in enumerate(loop, start=1):
            if count == 1 or count % every == 0:
                points.append((count, rss_mib()))
        runs.append(points)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--tokens", type=int, default=10_000)
    parser.add_argument("--every", type=int, default=2_500)
    parser.add_argument("--graph", help=argparse.SUPPRESS)  # the child process's own run
    args = parser.parse_args()
    if args.graph:
        print(json.dumps(measure(args.workdir / "artifact", args.graph, args.tokens, args.every)))
        return
    build(args.workdir)
    print(f"RSS (MiB) over one {args.tokens:,}-token generation, tiny dense model, onnxruntime CPU, fresh process each")
    for graph in ("portable", "optimized-cpu"):
        child = subprocess.run([sys.executable, __file__, "--workdir", str(args.workdir), "--tokens", str(args.tokens),
                                "--every", str(args.every), "--graph", graph], capture_output=True, text=True, check=True)
        first, second = json.loads(child.stdout.splitlines()[-1])
        print(f"{graph:>14}: " + "  ".join(f"{count:>6,}: {rss:6.1f}" for count, rss in first)
              + f"   growth {first[-1][1] - first[0][1]:+.1f}; a second request in the same process "
              f"{second[-1][1] - first[-1][1]:+.1f}")


if __name__ == "__main__":
    main()
