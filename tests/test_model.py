import pytest
import torch

from qwen2_export.checkpoint import load_model
from qwen2_export.config import load_config

from conftest import VARIANTS
from helpers import empty_past, load_reference, prefill_and_decode, reference_logits

TOLERANCE = 1e-4  # fp32, ours vs transformers


@pytest.mark.parametrize("variant", VARIANTS)
def test_prefill_and_three_decode_steps_match_transformers(tiny_checkpoint, variant):
    folder = tiny_checkpoint(variant)
    config = load_config(folder)
    ours, reference = load_model(folder, config), load_reference(folder)
    ids = torch.randint(0, 456, (2, 12), generator=torch.Generator().manual_seed(1))
    steps = prefill_and_decode(ours, config, ids, prefill=9)
    expected = reference_logits(reference, ids)
    torch.testing.assert_close(steps[0], expected[:, :9], rtol=0, atol=TOLERANCE)
    for k, logits in enumerate(steps[1:]):
        torch.testing.assert_close(logits[:, 0], expected[:, 9 + k], rtol=0, atol=TOLERANCE)


def test_sliding_window_changes_the_result(tiny_checkpoint):
    """The window must really mask: the same weights with full attention give other logits."""
    folder = tiny_checkpoint("sliding_window")
    config = load_config(folder)
    ids = torch.randint(0, 456, (1, 12), generator=torch.Generator().manual_seed(2))
    windowed = prefill_and_decode(load_model(folder, config), config, ids, prefill=12)[0]
    full_config = config.__class__(**{**config.__dict__, "layer_types": ("full_attention",) * 2, "sliding_window": None})
    full = prefill_and_decode(load_model(folder, full_config), full_config, ids, prefill=12)[0]
    assert torch.allclose(windowed[:, :6], full[:, :6], atol=1e-5)  # inside the window: identical
    assert (windowed[:, 6:] - full[:, 6:]).abs().max() > 1e-2


def test_left_padded_batch_matches_unpadded_rows(tiny_checkpoint):
    folder = tiny_checkpoint("dense_untied_sharded")
    config = load_config(folder)
    model = load_model(folder, config)
    long = torch.randint(0, 456, (1, 8), generator=torch.Generator().manual_seed(3))
    short = long[:, 3:]
    batch = torch.cat([long, torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1)])
    mask = torch.tensor([[1] * 8, [0] * 3 + [1] * 5])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        padded = model(batch, mask, positions, *empty_past(config, 2))[0]
        alone = model(short, torch.ones(1, 5, dtype=torch.long), torch.arange(5)[None], *empty_past(config, 1))[0]
    torch.testing.assert_close(padded[1, 3:], alone[0], rtol=0, atol=1e-5)
    assert torch.isfinite(padded).all()  # padding queries see nothing but must not produce NaN


# One per model family. inductor generates and compiles the dense model in ~25 s here; for the MoE graph
# it takes ~60 s, so the MoE test stops after dynamo's fullgraph capture and AOTAutograd's decomposition
# (aot_eager), which is what the model definition decides: no graph break, no data-dependent shape.
@pytest.mark.parametrize("variant, backend", [("sliding_window", "inductor"), ("moe_shared", "aot_eager")])
def test_runs_under_torch_compile_fullgraph(tiny_checkpoint, variant, backend):
    torch._dynamo.reset()
    folder = tiny_checkpoint(variant)
    config = load_config(folder)
    model = load_model(folder, config)
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=backend)  # raises on any graph break
    ids = torch.randint(0, 456, (2, 9), generator=torch.Generator().manual_seed(4))
    eager = prefill_and_decode(model, config, ids, prefill=7)
    for a, b in zip(eager, prefill_and_decode(compiled, config, ids, prefill=7), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
