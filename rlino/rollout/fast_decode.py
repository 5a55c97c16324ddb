"""A lean one-token decode step for Llama-family decoders (Llama, Qwen2, Mistral), for the sampler.

Why: the Hugging Face forward wraps each decode step in a dozen modules per layer, each with
Python dispatch, keyword plumbing, mask and cache bookkeeping, and runs q/k/v (and gate/up) as
separate matmuls. `LeanDecoder.step` is the same computation as one plain function over the model's
own weights. What that buys depends on how much of a step is arithmetic: measured on 2 CPU cores,
one thread, for a 3M-parameter Qwen2 the sampler's time fell by about 30% at batch 8 and 10% at
batch 64; at batch 64 the matmuls and the attention kernel are most of the step (for SmolLM2-135M
nearly all of it), and those cost the same here as in transformers.

- q/k/v and gate/up weights are concatenated once per generate call, so each layer runs three
  matmuls (qkv, o, gate-up) plus the down projection; everything else reads the HF parameters as-is;
  bf16 weights on CPU are also prepacked for oneDNN then (see `_Linear`);
- RoPE for all rows and heads is one table look-up per step, shared by every layer: the tables hold
  cos and a signed sin per (position, head) for the q, k *and* v heads (v gets cos 1, sin 0), so one
  `x * cos + roll(x) * sin` over the whole fused qkv rotates q and k, leaves v unchanged, and the
  new keys and values land in the cache with a single copy;
- the cache is the sampler's `SlabCache` (one preallocated (rows, 2, kv_heads, max_len, head_dim)
  slab per layer); attention is one `scaled_dot_product_attention` call per layer on a view of it,
  with the query heads of each key/value head packed as query rows (as transformers does for GQA)
  and a ready-made additive padding mask.

Every op is the one transformers runs, in the same order and on the same shapes, so fp32 logits
agree bit for bit with the model's forward on CPU (checked in tests/test_rollout.py); fused matmuls
give the same results as the separate ones there. Anything not covered (other architectures,
biased o/MLP projections, non-SiLU activations, sliding windows in reach, dynamic RoPE) returns
None from `lean_decoder`, and the sampler falls back to the model's forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

SUPPORTED = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
"""model classes whose decoder layers `LeanDecoder` reproduces exactly"""
LOGITS_CHUNK = 1024
"""vocabulary columns per lm_head matmul (see `lm_head_logits`)"""


def onednn_bf16(weight: torch.Tensor) -> bool:
    """Can `weight` be prepacked for oneDNN's bf16 matmul (a bf16 CPU tensor, bf16-capable oneDNN)?"""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    )


class _Linear:
    """`x @ weight.T (+ bias)`, with the weight prepacked once for oneDNN where that applies.

    Why: in bf16 on CPU, `torch.mm` hands each call to oneDNN, which first reorders the weight into
    its blocked layout; for decode-sized inputs (tens of rows) that reorder is a large part of the
    call. Reordering once per generate call made SmolLM2-135M's layer matmuls about 1.3x faster at
    batch 64 (measured on a 2-core AVX512-BF16 CPU) with the same results bit for bit. fp32 weights
    stay as they are: MKL's prepacked fp32 path measured no faster there.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rows: int) -> None:
        self.weight, self.bias = weight, bias  # (N, K), (N,) or None
        self.packed = (
            torch.ops.mkldnn._reorder_linear_weight(weight, rows) if onednn_bf16(weight) else None
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(b, K) -> (b, N)"""
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        if self.bias is None:
            return torch.mm(x, self.weight.t())
        return torch.addmm(self.bias, x, self.weight.t())


@dataclass(frozen=True)
class _Layer:
    """One decoder layer's weights, in the layout the lean step uses."""

    input_norm: torch.Tensor
    """(H,) RMSNorm weight before attention"""
    qkv: _Linear
    """H -> (Hq + 2 Hkv) D: q, k, v projections stacked (with their biases for Qwen2)"""
    o: _Linear
    """Hq D -> H output projection"""
    post_norm: torch.Tensor
    """(H,) RMSNorm weight before the MLP"""
    gate_up: _Linear
    """H -> 2 I: gate and up projections stacked"""
    down: _Linear
    """I -> H down projection"""


def unsupported_reason(model: torch.nn.Module, max_len: int) -> str | None:
    """Why `model` cannot use the lean step for sequences up to `max_len` tokens (None if it can)."""
    name = type(model).__name__
    if name not in SUPPORTED:
        return f"{name} is not one of {', '.join(SUPPORTED)}"
    if any(hasattr(module, "base_layer") for module in model.modules()):  # peft's adapter layers
        return "it carries LoRA adapters, which the fused base weights would leave out"
    config = model.config
    if getattr(config, "hidden_act", None) != "silu":
        return f"activation {config.hidden_act!r} is not silu"
    if set(getattr(config, "layer_types", None) or ["full_attention"]) != {"full_attention"}:
        return "some layers use sliding-window attention"
    window = getattr(config, "sliding_window", None) if name == "MistralForCausalLM" else None
    if window is not None and max_len > window:
        return f"sequences of {max_len} tokens exceed the sliding window of {window}"
    rope_type = getattr(model.model.rotary_emb, "rope_type", "default")
    if not isinstance(rope_type, str) or "dynamic" in rope_type or rope_type == "longrope":
        return f"rope type {rope_type!r} changes its frequencies with the sequence length"
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if attn.o_proj.bias is not None or any(
            p.bias is not None for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        ):
            return "biased output or MLP projections"
        if (attn.q_proj.bias is None) != (attn.k_proj.bias is None) or (
            attn.q_proj.bias is None
        ) != (attn.v_proj.bias is None):
            return "q/k/v projections disagree on having a bias"
    return None


class LeanDecoder:
    """The decode step of one model, with weights fused once (per generate call: they change in training).

    Build with `lean_decoder`, which returns None for models this does not reproduce exactly.
    """

    def __init__(self, model: torch.nn.Module, max_len: int, rows: int = 64) -> None:
        config = model.config
        body = model.model
        attn0 = body.layers[0].self_attn
        self.head_dim = attn0.head_dim
        self.q_heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.scaling = attn0.scaling
        self.eps = body.norm.variance_epsilon
        self.embed = body.embed_tokens.weight  # (V, H)
        self.final_norm = body.norm.weight  # (H,)
        self.lm_head = _Linear(model.lm_head.weight, None, rows)  # (V, H), tied: the embedding
        self.layers = [self._fuse(layer, rows) for layer in body.layers]
        self.cos, self.sin = self._rope_tables(body.rotary_emb, max_len, self.embed.dtype)

    @staticmethod
    def _fuse(layer: torch.nn.Module, rows: int) -> _Layer:
        attn, mlp = layer.self_attn, layer.mlp
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        bias = None
        if attn.q_proj.bias is not None:
            bias = torch.cat([p.bias for p in projections])  # ((Hq + 2 Hkv) D,)
        qkv = torch.cat([p.weight for p in projections])  # ((Hq + 2 Hkv) D, H)
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])  # (2 I, H)
        return _Layer(
            input_norm=layer.input_layernorm.weight,
            qkv=_Linear(qkv, bias, rows),
            o=_Linear(attn.o_proj.weight, None, rows),
            post_norm=layer.post_attention_layernorm.weight,
            gate_up=_Linear(gate_up, None, rows),
            down=_Linear(mlp.down_proj.weight, None, rows),
        )

    def _rope_tables(
        self, rotary: torch.nn.Module, max_len: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(max_len, Hq + 2 Hkv, D) cos and signed sin per position and head of the fused qkv.

        Computed with the same ops as the model's rotary embedding, so the values are identical.
        The sin table carries rotate_half's sign (-sin on the first half), so that
        `x * cos + x.roll(D / 2) * sin` equals `x * cos + rotate_half(x) * sin` exactly. v heads
        get cos 1 and sin 0, which leaves them unchanged.
        """
        inv_freq = rotary.inv_freq.float()  # (D/2,)
        positions = torch.arange(max_len, device=inv_freq.device).float()
        freqs = positions[:, None] * inv_freq  # (L, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (L, D)
        cos = (emb.cos() * rotary.attention_scaling).to(dtype)
        sin = (emb.sin() * rotary.attention_scaling).to(dtype)
        half = self.head_dim // 2
        sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)  # (L, D) rotate_half's sign
        rotated, kept = self.q_heads + self.kv_heads, self.kv_heads
        cos_table = torch.cat(
            [cos[:, None].expand(-1, rotated, -1), cos.new_ones((max_len, kept, self.head_dim))],
            dim=1,
        )  # (L, Hq + 2 Hkv, D)
        sin_table = torch.cat(
            [sin[:, None].expand(-1, rotated, -1), sin.new_zeros((max_len, kept, self.head_dim))],
            dim=1,
        )  # (L, Hq + 2 Hkv, D)
        return cos_table, sin_table

    def step(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        caches: list[torch.Tensor],
        column: int,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """Run one new token per row through the model; return the next-token logits (b, V).

        tokens, positions: (b,) long (positions count real tokens, as with left padding in HF);
        caches: per layer a (b, 2, Hkv, max_len, D) slab, written at `column`;
        mask: (b, 1, 1, column + 1) additive (0 = attend, -inf = padding).
        """
        batch, dim, kv_heads = tokens.shape[0], self.head_dim, self.kv_heads
        half, q_heads = dim // 2, self.q_heads
        cos = self.cos.index_select(0, positions)  # (b, Hq + 2 Hkv, D)
        sin = self.sin.index_select(0, positions)  # (b, Hq + 2 Hkv, D)
        h = F.embedding(tokens, self.embed)  # (b, H)
        width = h.shape[-1]
        for layer, cache in zip(self.layers, caches, strict=True):
            x = F.rms_norm(h, (width,), layer.input_norm, self.eps)
            qkv = layer.qkv(x).view(batch, -1, dim)  # (b, Hq + 2 Hkv, D)
            qkv = qkv * cos + qkv.roll(half, dims=-1) * sin  # RoPE on q and k; v unchanged
            cache[:, :, :, column].copy_(qkv[:, q_heads:].view(batch, 2, kv_heads, dim))
            query = qkv[:, :q_heads].view(batch, kv_heads, -1, dim)  # (b, Hkv, Hq/Hkv, D)
            keys = cache[:, 0, :, : column + 1]  # (b, Hkv, column + 1, D)
            values = cache[:, 1, :, : column + 1]  # (b, Hkv, column + 1, D)
            attn = F.scaled_dot_product_attention(
                query, keys, values, attn_mask=mask, scale=self.scaling
            )  # (b, Hkv, Hq/Hkv, D)
            h = h + layer.o(attn.reshape(batch, -1))  # (b, H)
            x = F.rms_norm(h, (width,), layer.post_norm, self.eps)
            gate, up = layer.gate_up(x).chunk(2, dim=-1)  # (b, I) each
            h = h + layer.down(F.silu(gate).mul_(up))  # (b, H)
        x = F.rms_norm(h, (width,), self.final_norm, self.eps)
        if self.lm_head.packed is not None:
            return self.lm_head(x)  # (b, V)
        return lm_head_logits(x, self.lm_head.weight)  # (b, V)


def lm_head_logits(x: torch.Tensor, lm_head: torch.Tensor) -> torch.Tensor:
    """(b, H) x (V, H) lm_head -> (b, V) logits, in column blocks of `LOGITS_CHUNK`.

    Why blocks: for a 49k vocabulary one MKL call ran at about two thirds of the speed of the same
    product cut into 1024-column pieces (each logit is the same dot product; on the CPU measured
    the values were identical bit for bit).
    """
    vocab = lm_head.shape[0]
    if vocab <= 2 * LOGITS_CHUNK:
        return torch.mm(x, lm_head.t())  # (b, V)
    out = x.new_empty((x.shape[0], vocab))  # (b, V)
    for start in range(0, vocab, LOGITS_CHUNK):
        block = lm_head[start : start + LOGITS_CHUNK]  # (C, H)
        torch.mm(x, block.t(), out=out[:, start : start + block.shape[0]])
    return out


def lean_decoder(model: torch.nn.Module, max_len: int, rows: int = 64) -> LeanDecoder | None:
    """A `LeanDecoder` for `model` over sequences up to `max_len` tokens, or None if unsupported.

    `rows` is the expected batch, a hint for how bf16 weights are packed (any batch works).
    """
    if unsupported_reason(model, max_len) is not None:
        return None
    return LeanDecoder(model, max_len, rows)
