"""Run by .ci/run in a virtual environment holding only the wheel (installed with --no-deps), onnxruntime,
numpy, tokenizers and jinja2: generate, chat and verify through both entry points, and nothing else imported.
Not collected by pytest (its name does not start with test_)."""

import json
import subprocess
import sys

artifact = sys.argv[1]
for command in ([sys.prefix + "/bin/qwen2-onnx"], [sys.executable, "-m", "runtime"]):
    out = subprocess.run([*command, "generate", artifact, "--input-ids", "1,2,3", "--max-new-tokens", "4", "--greedy", "--json"],
                         capture_output=True, text=True, check=True).stdout
    assert len(json.loads(out)["output_ids"]) == 4, out
    chat = subprocess.run([*command, "chat", artifact, "--greedy", "--max-new-tokens", "3"], input="Hello\n/exit\n",
                          capture_output=True, text=True, check=True).stdout
    assert chat.count("assistant> ") == 1, chat
    bad = subprocess.run([*command, "generate", artifact + "-missing", "--prompt", "x"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "error:" in bad.stderr, bad.stderr
    verified = subprocess.run([*command, "verify", artifact], capture_output=True, text=True, check=True).stdout
    assert "sha256 match" in verified, verified

from runtime import Model  # noqa: E402  (after the commands: the library itself, in this process)

model = Model.load(artifact)
assert len(model.generate([{"role": "user", "content": "Hi"}], max_new_tokens=4, greedy=True).output_ids) == 4
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "onnx", "onnx_ir", "onnxscript", "qwen2_export", "transformers"))
assert not heavy, heavy
print("runtime-only install: generate, chat and the Python API work without torch or onnx")
