"""Qwen2 / Qwen2-MoE as a small traceable module: plain tensors in, plain tensors out.

Parameter names follow transformers (5.x for the fused expert tensors), so loading is a name table.
The same module exports to ONNX and runs under torch.compile(fullgraph=True): no cache objects, no
in-place buffer writes, no data-dependent control flow (MoE computes every expert and weights the
top-k, so shapes never depend on the routing).

Shape legend: B batch, S new tokens, P past, T = P + S, H heads, Hkv kv heads, Dh head dim,
D hidden, I intermediate, E experts, K top-k, N = B * S tokens, V vocab.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from artifact import contract

from .config import Qwen2Config
from .rope import rope_parameters


class RMSNorm(nn.Module):
    """transformers' Qwen2RMSNorm: statistics in fp32, cast back, then scale by the weight."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2  # slices, not chunk: chunk exports as SplitToSequence
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def repeat_kv(x_BHkvTDh: torch.Tensor, repeats: int) -> torch.Tensor:
    """Each kv head serves `repeats` consecutive query heads (query head h uses kv head h // repeats)."""
    if repeats == 1:
        return x_BHkvTDh
    b, hkv, t, dh = x_BHkvTDh.shape
    return x_BHkvTDh[:, :, None].expand(b, hkv, repeats, t, dh).reshape(b, hkv * repeats, t, dh)


class Attention(nn.Module):
    def __init__(self, config: Qwen2Config, dtype: torch.dtype):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        bias = config.qkv_bias
        self.q_proj = nn.Linear(config.hidden_size, q_size, bias=bias, dtype=dtype)
        self.k_proj = nn.Linear(config.hidden_size, kv_size, bias=bias, dtype=dtype)
        self.v_proj = nn.Linear(config.hidden_size, kv_size, bias=bias, dtype=dtype)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=False, dtype=dtype)

    def forward(
        self,
        x_BSD: torch.Tensor,
        cos_BSDh: torch.Tensor,
        sin_BSDh: torch.Tensor,
        bias_B1ST: torch.Tensor,
        past_key_BHkvPDh: torch.Tensor,
        past_value_BHkvPDh: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, s, _ = x_BSD.shape
        q = self.q_proj(x_BSD).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x_BSD).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x_BSD).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos_BSDh[:, None], sin_BSDh[:, None]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin

        key_BHkvTDh = torch.cat((past_key_BHkvPDh, k), dim=2)
        value_BHkvTDh = torch.cat((past_value_BHkvPDh, v), dim=2)
        repeats = self.num_heads // self.num_kv_heads
        scores_BHST = q @ repeat_kv(key_BHkvTDh, repeats).transpose(2, 3) * self.scale
        # softmax in fp32 as transformers' eager attention does, then back to the activation dtype
        probs_BHST = torch.softmax(scores_BHST.to(torch.float32) + bias_B1ST, dim=-1).to(q.dtype)
        out_BHSDh = probs_BHST @ repeat_kv(value_BHkvTDh, repeats)
        out_BSD = out_BHSDh.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim)
        return self.o_proj(out_BSD), key_BHkvTDh, value_BHkvTDh


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, hidden_size: int, intermediate_size: int, dtype: torch.dtype):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False, dtype=dtype)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False, dtype=dtype)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Softmax over all experts in fp32, top-k, optional renormalisation (Qwen2MoeTopKRouter)."""

    def __init__(self, config: Qwen2Config, dtype: torch.dtype):
        super().__init__()
        assert config.moe is not None
        self.top_k = config.moe.num_experts_per_tok
        self.normalize = config.moe.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(config.moe.num_experts, config.hidden_size, dtype=dtype))

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        """Dense routing weights [B, S, E]: the top-k probabilities in place, zero elsewhere."""
        probs_BSE = torch.softmax(F.linear(x_BSD, self.weight).to(torch.float32), dim=-1)
        top_BSK, index_BSK = torch.topk(probs_BSE, self.top_k, dim=-1)
        if self.normalize:
            top_BSK = top_BSK / top_BSK.sum(dim=-1, keepdim=True)
        dense_BSE = torch.zeros_like(probs_BSE).scatter(-1, index_BSK, top_BSK)
        return dense_BSE.to(x_BSD.dtype)


class Experts(nn.Module):
    """All E SwiGLU experts as two stacked tensors (transformers 5.x layout: gate rows, then up rows)."""

    def __init__(self, config: Qwen2Config, dtype: torch.dtype):
        super().__init__()
        assert config.moe is not None
        e, i, d = config.moe.num_experts, config.moe.moe_intermediate_size, config.hidden_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, d, dtype=dtype))
        self.down_proj = nn.Parameter(torch.empty(e, d, i, dtype=dtype))

    def forward(self, x_BSD: torch.Tensor, weights_BSE: torch.Tensor) -> torch.Tensor:
        # Every expert sees every token; unrouted ones get weight 0. Static shapes for export and
        # compile; the fused MoE op in graphs/ replaces this with real sparse dispatch.
        gate_up_EBS2I = x_BSD[None] @ self.gate_up_proj.transpose(1, 2)[:, None]
        half = gate_up_EBS2I.shape[-1] // 2
        gate_EBSI, up_EBSI = gate_up_EBS2I[..., :half], gate_up_EBS2I[..., half:]
        out_EBSD = (F.silu(gate_EBSI) * up_EBSI) @ self.down_proj.transpose(1, 2)[:, None]
        return (out_EBSD * weights_BSE.movedim(-1, 0)[..., None]).sum(dim=0)


class SparseMoeBlock(nn.Module):
    """Routed experts plus a shared expert scaled by sigmoid(shared_expert_gate(x))."""

    def __init__(self, config: Qwen2Config, dtype: torch.dtype):
        super().__init__()
        assert config.moe is not None
        self.gate = Router(config, dtype)
        self.experts = Experts(config, dtype)
        self.shared_expert = MLP(config.hidden_size, config.moe.shared_expert_intermediate_size, dtype)
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False, dtype=dtype)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        # kept [B, S, D] throughout: a flatten and its dynamic un-flatten would leave shape arithmetic
        # in the graph, which onnxruntime runs on the CPU even in a CUDA session
        routed_BSD = self.experts(x_BSD, self.gate(x_BSD))
        return routed_BSD + torch.sigmoid(self.shared_expert_gate(x_BSD)) * self.shared_expert(x_BSD)


class DecoderLayer(nn.Module):
    def __init__(self, config: Qwen2Config, layer: int, dtype: torch.dtype):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.self_attn = Attention(config, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        sparse = config.is_sparse_layer(layer)
        self.mlp = SparseMoeBlock(config, dtype) if sparse else MLP(config.hidden_size, config.intermediate_size, dtype)

    def forward(self, x, cos, sin, bias, past_key, past_value):
        attn, present_key, present_value = self.self_attn(self.input_layernorm(x), cos, sin, bias, past_key, past_value)
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, present_key, present_value


class RotaryEmbedding(nn.Module):
    """cos/sin [B, S, Dh] from position ids, scaled by the rope type's attention factor."""

    def __init__(self, config: Qwen2Config):
        super().__init__()
        inv_freq, self.attention_factor = rope_parameters(config.rope, config.head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids_BS: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs_BS = position_ids_BS[:, :, None].to(torch.float32) * self.inv_freq[None, None, :]
        angles = torch.cat((freqs_BS, freqs_BS), dim=-1)
        return (angles.cos() * self.attention_factor).to(dtype), (angles.sin() * self.attention_factor).to(dtype)


def attention_bias(attention_mask_BT: torch.Tensor, new_tokens: int, window: int | None) -> torch.Tensor:
    """Additive fp32 mask [B, 1, S, T]: 0 where query i (at cache index T - S + i) may see key j, else min.

    Keys are visible when they are not padding, not in the future, and (sliding layers) less than
    `window` positions back. A fully masked row (a padding query) gets a uniform softmax, not NaN.
    """
    total = attention_mask_BT.shape[1]
    query_index = torch.arange(new_tokens, device=attention_mask_BT.device)[:, None] + (total - new_tokens)
    key_index = torch.arange(total, device=attention_mask_BT.device)[None, :]
    visible_ST = key_index <= query_index
    if window is not None:
        visible_ST = visible_ST & (query_index - key_index < window)
    visible_BST = visible_ST[None] & attention_mask_BT[:, None, :].to(torch.bool)
    minimum = torch.finfo(torch.float32).min
    return torch.where(visible_BST, 0.0, minimum)[:, None].to(torch.float32)


class Qwen2Model(nn.Module):
    def __init__(self, config: Qwen2Config, dtype: torch.dtype):
        super().__init__()
        self.windows = [config.window_of_layer(i) for i in range(config.num_hidden_layers)]
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(config, i, dtype) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.rotary_emb = RotaryEmbedding(config)


class Qwen2ForCausalLM(nn.Module):
    """forward(input_ids, attention_mask, position_ids, *past) -> (logits, *present).

    input_ids, position_ids [B, S] int64; attention_mask [B, T] int64 (1 = token, 0 = padding);
    past: key_0, value_0, key_1, ... each [B, Hkv, P, Dh]; logits [B, S, V] fp32; present: [B, Hkv, T, Dh].
    """

    def __init__(self, config: Qwen2Config, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = config
        self.model = Qwen2Model(config, dtype)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *past_key_values: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        model = self.model
        x = model.embed_tokens(input_ids)
        cos, sin = model.rotary_emb(position_ids, x.dtype)
        new_tokens = input_ids.shape[1]
        biases = {w: attention_bias(attention_mask, new_tokens, w) for w in sorted(set(model.windows), key=str)}
        presents: list[torch.Tensor] = []
        for i, layer in enumerate(model.layers):
            past_key, past_value = past_key_values[2 * i], past_key_values[2 * i + 1]
            x, key, value = layer(x, cos, sin, biases[model.windows[i]], past_key, past_value)
            presents += [key, value]
        # fp32 logits whatever the weights: sampling wants full-precision scores, and bf16 has no numpy type
        logits = self.lm_head(model.norm(x)).to(torch.float32)
        return (logits, *presents)


class Qwen2ForTask(nn.Module):
    """forward(input_ids, attention_mask) -> outputs, for the classification and embedding tasks; no KV cache.

    Positions are 0..S-1 whatever the padding, as transformers numbers them when it is given none.
    text-classification: logits [B, labels] at each row's last token that is not the pad token
    (transformers' rule, which serves left and right padding; the last token when there is no pad id).
    token-classification: logits [B, S, labels].
    feature-extraction: the final norm's output [B, S, D] and, L2-normalised, its row at each row's last
    position with mask 1 (gte-Qwen2's last-token pooling, for either padding side), both fp32.
    """

    def __init__(self, config: Qwen2Config, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = config
        self.model = Qwen2Model(config, dtype)
        if config.head is not None:
            self.score = nn.Linear(config.hidden_size, config.head.num_labels, bias=config.head.bias, dtype=dtype)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        model, config = self.model, self.config
        x = model.embed_tokens(input_ids)
        indices = torch.arange(input_ids.shape[1], device=input_ids.device)
        cos, sin = model.rotary_emb(indices[None].expand_as(input_ids), x.dtype)
        biases = {w: attention_bias(attention_mask, input_ids.shape[1], w) for w in sorted(set(model.windows), key=str)}
        empty = x.new_zeros((input_ids.shape[0], config.num_key_value_heads, 0, config.head_dim))
        for i, layer in enumerate(model.layers):
            x, _, _ = layer(x, cos, sin, biases[model.windows[i]], empty, empty)
        hidden = model.norm(x)
        # the heads find positions from the data, not from shapes: shape arithmetic would run on the host
        positions = (input_ids * 0 + 1).cumsum(-1) - 1
        if config.task == contract.FEATURE_EXTRACTION:
            pooled = at_position(hidden, last_marked(positions, attention_mask == 1), positions).to(torch.float32)
            # F.normalize's arithmetic, broadcast rather than expanded to a shape (host arithmetic again)
            return hidden.to(torch.float32), pooled / torch.linalg.vector_norm(pooled, dim=-1, keepdim=True).clamp_min(1e-12)
        logits = self.score(hidden).to(torch.float32)
        if config.task == contract.TOKEN_CLASSIFICATION:
            return (logits,)
        pad = config.head.pad_token_id
        last = positions[:, -1] if pad is None else last_marked(positions, input_ids != pad)
        return (at_position(logits, last, positions),)


def last_marked(positions: torch.Tensor, marked: torch.Tensor) -> torch.Tensor:
    """Each row's last marked position of [B, S] (0 when none is). ArgMax over floats, exact below 2**24
    positions: onnxruntime's CUDA ArgMax takes no integers."""
    return (positions * marked).to(torch.float32).argmax(-1)


def at_position(values: torch.Tensor, position: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Row b of `values` [B, S, N] at `position[b]`, as [B, N]: a masked sum (where, so that a NaN elsewhere
    in the row stays out), which needs no row indices built from the batch size."""
    chosen = (positions == position[:, None])[..., None]
    return torch.where(chosen, values, 0.0).sum(1)


def build_model(config: Qwen2Config, dtype: torch.dtype = torch.float32, device: str = "cpu") -> nn.Module:
    """An uninitialised model: on `meta` for tracing without weights, else empty storage to be loaded."""
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config, dtype) if config.task == contract.TEXT_GENERATION else Qwen2ForTask(config, dtype)
    if device != "meta":
        model = model.to_empty(device=device)
        if config.tie_word_embeddings and config.task == contract.TEXT_GENERATION:  # to_empty unties; tie again
            model.lm_head.weight = model.model.embed_tokens.weight
        # to_empty leaves buffers uninitialised; the rope table is derived, not loaded
        model.model.rotary_emb.inv_freq = rope_parameters(config.rope, config.head_dim)[0].to(device)
    return model.eval()
