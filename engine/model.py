"""The Llama-family forward (Llama 2/3, Qwen2, Mistral) over the paged KV cache.

Plain PyTorch you can read top to bottom; every fused op goes through kernels.ops, which
runs Triton on CUDA and the CPU serving kernels on CPU (those take a plan made once per
forward: what every layer shares). The forward takes a flat batch of
tokens (any mix of prefill chunks and decode tokens) described by AttentionMetadata.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig, RopeConfig
from engine.errors import ModelLoadError
from engine.weights import load_state, take
from kernels import ops
from kernels.cpu_step import CpuStepPlan


@dataclass(slots=True)
class AttentionMetadata:
    """Where each token of a step reads and writes KV.

    slot_mapping: [T] cache slot of each new token (block * block_size + offset; -1 pad).
    block_tables: [B, max_blocks] int32; context_lens: [B] int32 tokens after this step;
    cu_seqlens_q: [B+1] int32 offsets of each sequence's new tokens in the flat batch.
    is_decode: every sequence has exactly one new token (the decode kernel serves it).
    max_q_len: the most new tokens of one sequence, known on the host (else the prefill
    kernel reads it from the device: a wait for the device in every layer).
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor
    is_decode: bool
    max_q_len: int | None = None


LayerHook = Callable[[int], None]


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (rope.theta ** exponents)
    if rope.rope_type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.rope_type == "llama3":
        old_len = rope.original_max_position_embeddings
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin_cache(rope: RopeConfig, head_dim: int, max_positions: int) -> torch.Tensor:
    """[max_positions, head_dim]: cos(pos * inv_freq) then sin(pos * inv_freq), float32."""
    inv_freq = rope_inv_freq(rope, head_dim)
    freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.eps = cfg.rms_norm_eps
        self.scale = cfg.head_dim ** -0.5
        h, inter = cfg.hidden_size, cfg.intermediate_size
        self.input_norm = nn.Parameter(torch.empty(h))
        self.post_attn_norm = nn.Parameter(torch.empty(h))
        self.qkv_weight = nn.Parameter(torch.empty(self.q_size + 2 * self.kv_size, h))
        self.qkv_bias = nn.Parameter(torch.empty(self.q_size + 2 * self.kv_size)) \
            if cfg.attention_bias else None
        self.o_weight = nn.Parameter(torch.empty(h, self.q_size))
        self.gate_up_weight = nn.Parameter(torch.empty(2 * inter, h))
        self.down_weight = nn.Parameter(torch.empty(h, inter))
        # CPU: projection weights packed once (LlamaModel.pack_linear_weights), by name
        self.packed: dict[str, torch.Tensor] = {}

    def attention(self, x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
                  kv_cache: torch.Tensor, attn: AttentionMetadata,
                  after_kv_write: Callable[[], None] | None,
                  plan: CpuStepPlan | None = None) -> torch.Tensor:
        qkv = ops.linear(x, self.qkv_weight, self.qkv_bias, self.packed.get("qkv_weight"))
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        # Views into qkv, no copies: every kernel takes a strided token/head layout, and at
        # batch 1 three copy launches per layer are a measurable share of a decode step.
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        ops.rotary_embedding_and_write_kv(q, k, v, positions, cos_sin, kv_cache,
                                          attn.slot_mapping, plan)
        if after_kv_write is not None:
            after_kv_write()  # this layer's KV is final: a connector may start sending it
        if plan is not None:
            o = ops.paged_attention_cpu(q, k, v, kv_cache, plan, self.scale)
        elif attn.is_decode:
            o = ops.paged_decode_attention(q, kv_cache, attn.block_tables, attn.context_lens,
                                           self.scale)
        else:
            o = ops.paged_prefill_attention(q, kv_cache, attn.block_tables, attn.cu_seqlens_q,
                                            attn.context_lens, self.scale, attn.max_q_len)
        return ops.linear(o.reshape(-1, self.q_size), self.o_weight, None,
                          self.packed.get("o_weight"))

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = ops.linear(x, self.gate_up_weight, None, self.packed.get("gate_up_weight"))
        return ops.linear(ops.silu_and_mul(gate_up), self.down_weight, None,
                          self.packed.get("down_weight"))

    def pack_linear_weights(self) -> None:
        for name in ("qkv_weight", "o_weight", "gate_up_weight", "down_weight"):
            _pack_into(self, name, self.packed)


def _pack_into(module: nn.Module, name: str, packed: dict[str, torch.Tensor]) -> None:
    weight = getattr(module, name)
    p = ops.pack_linear_weight(weight)
    if p is not None:
        packed[name] = p
        if not ops.keeps_row_major(weight):  # (kept: read by the 1-2 row GEMV)
            weight.data = weight.data.new_empty(0)  # only the packed copy is read from now on


class LlamaModel(nn.Module):
    """Embedding, decoder layers, final norm and LM head; no KV cache of its own."""

    cos_sin: torch.Tensor  # a buffer: [max_positions, head_dim] RoPE table, float32

    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.Parameter(torch.empty(cfg.hidden_size))
        self.lm_head = None if cfg.tie_word_embeddings else \
            nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.register_buffer(
            "cos_sin", rope_cos_sin_cache(cfg.rope, cfg.head_dim, max_positions),
            persistent=False)
        self.packed: dict[str, torch.Tensor] = {}  # the untied LM head, packed (CPU)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata,
                kv_caches: list[torch.Tensor], layer_hook: LayerHook | None = None
                ) -> torch.Tensor:
        """Returns the final hidden states [T, hidden] (normed)."""
        hidden = F.embedding(input_ids, self.embed)
        plan = ops.plan_cpu_step(positions, self.cos_sin, attn.slot_mapping, attn.block_tables,
                                 attn.context_lens, attn.cu_seqlens_q, kv_caches[0])
        residual = hidden
        for i, layer in enumerate(self.decoder_layers):
            if i == 0:
                x = ops.rms_norm(hidden, layer.input_norm, layer.eps)
            else:
                x, residual = ops.fused_add_rms_norm(hidden, residual, layer.input_norm,
                                                     layer.eps)
            hook = (lambda i=i: layer_hook(i)) if layer_hook is not None else None
            hidden = layer.attention(x, positions, self.cos_sin, kv_caches[i], attn, hook, plan)
            x, residual = ops.fused_add_rms_norm(hidden, residual, layer.post_attn_norm,
                                                 layer.eps)
            hidden = layer.mlp(x)
        out, _ = ops.fused_add_rms_norm(hidden, residual, self.norm, self.cfg.rms_norm_eps)
        return out

    @property
    def decoder_layers(self) -> list[DecoderLayer]:
        return cast(list[DecoderLayer], list(self.layers))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.embed if self.lm_head is None else self.lm_head
        return ops.linear(hidden, weight, None, self.packed.get("lm_head")).float()

    def pack_linear_weights(self) -> None:
        """Pack every projection weight once for the CPU kernels (bf16), freeing the plain
        copies; a tied LM head stays plain, the embedding lookup reads it."""
        for layer in self.decoder_layers:
            layer.pack_linear_weights()
        if self.lm_head is not None:
            _pack_into(self, "lm_head", self.packed)

    def load_weights(self, model_dir: Path, show_progress: bool = False) -> None:
        state = load_state(model_dir, show_progress)
        pre = "model."
        with torch.no_grad():
            self.embed.copy_(take(state, pre + "embed_tokens.weight"))
            self.norm.copy_(take(state, pre + "norm.weight"))
            if self.lm_head is not None:
                self.lm_head.copy_(take(state, "lm_head.weight"))
            else:
                state.pop("lm_head.weight", None)
            for i, layer in enumerate(self.decoder_layers):
                p = f"{pre}layers.{i}."
                layer.input_norm.copy_(take(state, p + "input_layernorm.weight"))
                layer.post_attn_norm.copy_(take(state, p + "post_attention_layernorm.weight"))
                att = p + "self_attn."
                layer.qkv_weight.copy_(torch.cat(
                    [take(state, f"{att}{n}_proj.weight") for n in "qkv"]))
                if layer.qkv_bias is not None:
                    layer.qkv_bias.copy_(torch.cat(
                        [take(state, f"{att}{n}_proj.bias") for n in "qkv"]))
                layer.o_weight.copy_(take(state, att + "o_proj.weight"))
                mlp = p + "mlp."
                layer.gate_up_weight.copy_(torch.cat(
                    [take(state, mlp + "gate_proj.weight"), take(state, mlp + "up_proj.weight")]))
                layer.down_weight.copy_(take(state, mlp + "down_proj.weight"))
        leftovers = [k for k in state if not k.endswith("rotary_emb.inv_freq")]
        if leftovers:
            raise ModelLoadError(f"checkpoint has tensors this architecture does not use: "
                                 f"{leftovers[:5]}")
