import json

import pytest

from qwen2_export.config import ConfigError, load_config, parse_config
from qwen2_export.synthetic import QWEN2_7B, QWEN2_57B_A14B, tiny_config


def test_published_7b_config_reads_as_full_attention_with_inert_window():
    config = parse_config(QWEN2_7B)
    assert (config.head_dim, config.num_key_value_heads, config.vocab_size) == (128, 4, 152064)
    assert config.sliding_window is None  # sliding_window 131072 is set but use_sliding_window is false
    assert set(config.layer_types) == {"full_attention"}
    assert config.rope.rope_type == "default" and config.rope.theta == 1e6
    assert not config.is_moe and config.qkv_bias


def test_moe_fields_and_sparse_layers():
    config = parse_config({**QWEN2_57B_A14B, "num_hidden_layers": 4, "mlp_only_layers": [2], "decoder_sparse_step": 1})
    assert config.moe.num_experts == 64 and config.moe.num_experts_per_tok == 8
    assert [config.is_sparse_layer(i) for i in range(4)] == [True, True, False, True]
    stepped = parse_config({**QWEN2_57B_A14B, "num_hidden_layers": 4, "decoder_sparse_step": 2})
    assert [stepped.is_sparse_layer(i) for i in range(4)] == [False, True, False, True]


def test_sliding_layers_follow_max_window_layers():
    config = parse_config({**tiny_config("sliding_window"), "num_hidden_layers": 4, "max_window_layers": 2})
    assert config.layer_types == ("full_attention",) * 2 + ("sliding_attention",) * 2
    assert [config.window_of_layer(i) for i in range(4)] == [None, None, 6, 6]


def test_transformers_5_layout_reads_the_same_as_4_layout():
    v4 = {**tiny_config("yarn"), "rope_theta": 5e5}
    v5 = {key: value for key, value in v4.items() if key not in ("rope_scaling", "rope_theta", "torch_dtype")}
    v5["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0, "original_max_position_embeddings": 64}
    v5["layer_types"] = ["full_attention"] * v4["num_hidden_layers"]
    v5["dtype"] = "float32"
    assert parse_config(v4) == parse_config(v5)


def test_model_card_yarn_block_without_beta_fast_uses_defaults():
    config = parse_config(
        {**QWEN2_7B, "rope_scaling": {"factor": 4.0, "original_max_position_embeddings": 32768, "type": "yarn"}}
    )
    assert (config.rope.rope_type, config.rope.factor, config.rope.beta_fast, config.rope.beta_slow) == ("yarn", 4.0, 32.0, 1.0)
    assert (config.max_position_embeddings, config.context_length) == (32768, 131072)
    assert parse_config(QWEN2_7B).context_length == 32768


@pytest.mark.parametrize(
    "change, message",
    [
        ({"architectures": ["LlamaForCausalLM"]}, "architectures"),
        ({"model_type": "llama"}, "model_type"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_type='dynamic'"),
        ({"rope_scaling": {"type": "longrope", "factor": 2.0}}, "supported: ['default', 'linear', 'yarn']"),
        ({"rope_scaling": {"type": "yarn", "factor": 0.5}}, "factor"),
        ({"num_key_value_heads": 3}, "num_key_value_heads=3"),
        ({"hidden_size": 65}, "hidden_size=65"),
        ({"num_hidden_layers": 0}, "num_hidden_layers"),
        ({"vocab_size": "big"}, "vocab_size"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"use_sliding_window": True, "sliding_window": None}, "sliding_window"),
        ({"layer_types": ["sliding_attention", "full_attention"]}, "use_sliding_window is false"),
        ({"layer_types": ["full_attention"]}, "layer_types must list 2"),
        ({"tie_word_embeddings": "yes"}, "tie_word_embeddings"),
        ({"quantization_config": {"quant_method": "awq", "bits": 4}}, "group_size=None"),
        ({"quantization_config": {"quant_method": "awq", "bits": 8, "group_size": 32}}, "bits=8"),
        ({"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 48}}, "group_size=48"),
        ({"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemv"}}, "gemm"),
        ({"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True}}, "desc_act"),
        ({"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 32, "checkpoint_format": "gptq_v2"}},
         "checkpoint_format"),
        ({"quantization_config": {"quant_method": "bitsandbytes"}}, "quant_method='bitsandbytes'"),
    ],
)
def test_bad_config_names_the_key(change, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        parse_config({**tiny_config("dense_tied"), **change})


def test_bad_moe_config_names_the_key():
    with pytest.raises(ConfigError, match="num_experts_per_tok=9 exceeds num_experts=8"):
        parse_config({**tiny_config("moe_shared"), "num_experts_per_tok": 9})
    with pytest.raises(ConfigError, match="mlp_only_layers"):
        parse_config({**tiny_config("moe_shared"), "mlp_only_layers": [7]})
    with pytest.raises(ConfigError, match="moe_intermediate_size"):
        parse_config({key: v for key, v in tiny_config("moe_shared").items() if key != "moe_intermediate_size"})


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(ConfigError, match="config.json not found"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{ not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ConfigError, match="JSON object"):
        load_config(tmp_path)
