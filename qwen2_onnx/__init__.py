"""qwen2-onnx: the command line and the demo that tie the stages together.

    checkpoint --qwen2_export--> portable graph --graphs--> optimized graphs --runtime--> tokens
                           (all three read and write artifact.contract)

Nothing here is imported by the stages; each command imports its stage lazily, so `generate` and `chat`
never import torch.
"""
