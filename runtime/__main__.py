"""`python -m runtime generate|chat|classify|embed|serve|verify ...`: the same commands as `qwen2-onnx`, for a runtime-only
install (onnxruntime, numpy, tokenizers, jinja2; serve: starlette, uvicorn) where the console script is not
on PATH."""

import sys

from qwen2_onnx.cli import main

sys.exit(main(prog="python -m runtime", commands=("generate", "chat", "classify", "embed", "serve", "verify")))
