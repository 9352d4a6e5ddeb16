"""Run exported Qwen2 artifacts with onnxruntime: no torch, no qwen2_export, only the artifact."""

from .api import ChatSession, Model
from .errors import RuntimeInputError
from .generate import Generation, Timings
from .sampling import SamplingConfig
from .template_limits import TemplateLimits

__all__ = ["ChatSession", "Generation", "Model", "RuntimeInputError", "SamplingConfig", "TemplateLimits", "Timings"]
