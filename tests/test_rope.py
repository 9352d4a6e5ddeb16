"""Rope tables against transformers' own functions."""

import math
import pytest
import torch
from transformers import Qwen2Config as HFQwen2Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

from qwen2_export.config import ConfigError, RopeConfig, parse_config
from qwen2_export.rope import rope_parameters
from qwen2_export.synthetic import QWEN2_7B


def reference(config_json: dict) -> tuple[torch.Tensor, float]:
    hf = HFQwen2Config(**config_json)
    rope_type = hf.rope_parameters["rope_type"]
    if rope_type == "default":
        return Qwen2RotaryEmbedding.compute_default_rope_parameters(hf)
    return ROPE_INIT_FUNCTIONS[rope_type](hf, "cpu")


@pytest.mark.parametrize(
    "rope_scaling",
    [
        None,
        {"type": "linear", "factor": 2.0},
        {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},  # the Qwen model cards' block
        {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32768, "beta_fast": 16, "beta_slow": 2},
        {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, "attention_factor": 1.5},
        {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, "mscale": 0.8, "mscale_all_dim": 0.6},
        {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, "truncate": False},
    ],
)
def test_inv_freq_and_attention_factor_match_transformers(rope_scaling):
    config_json = {**QWEN2_7B, "rope_scaling": rope_scaling}
    if rope_scaling and rope_scaling["type"] == "yarn":
        config_json["max_position_embeddings"] = int(32768 * rope_scaling["factor"])
    ours = rope_parameters(parse_config(config_json).rope, 128)
    expected = reference(config_json)
    torch.testing.assert_close(ours[0], expected[0], rtol=0, atol=0)
    assert ours[1] == pytest.approx(expected[1], rel=1e-12)


def test_qwen25_7b_yarn_worked_example():
    """Qwen2.5-7B with the model card's block: correction range 23..40, attention factor 0.1 ln 4 + 1."""
    rope = RopeConfig("yarn", 1e6, factor=4.0, original_max_position_embeddings=32768)
    inv_freq, attention_factor = rope_parameters(rope, 128)
    base = 1.0 / (1e6 ** (torch.arange(0, 128, 2).float() / 128))
    assert attention_factor == pytest.approx(0.1 * math.log(4) + 1)
    torch.testing.assert_close(inv_freq[:23], base[:23])  # extrapolated: unchanged
    torch.testing.assert_close(inv_freq[40:], base[40:] / 4)  # interpolated: divided by factor


def test_unknown_rope_type_raises():
    with pytest.raises(ConfigError, match="supported"):
        rope_parameters(RopeConfig("dynamic", 1e4), 64)
