"""Seeded random weights for an HF Llama-family config, written shard by shard.

Each tensor is drawn on its own (on the GPU when there is one) from a generator seeded by
(seed, tensor name), cast to the model dtype and added to the shard being filled; a full
shard is written and dropped. So an 8B model in bf16 never needs more host memory than one
shard, and the weights depend on the seed only -- not on the device, the sharding or the
order of drawing.

The scales keep greedy logits well separated: HF's default init (std 0.02) makes nearly
flat logits, so tiny numerical differences between two correct implementations flip greedy
choices; unit-variance activations through every projection give logits of order one. A
tied lm_head scores each token by its own embedding: at unit scale the input token's
embedding would dominate the residual stream (greedy repeats the last token), so a tied
embedding is drawn at the lm_head's scale, 1/sqrt(hidden), as in real tied models.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

DEFAULT_SHARD_BYTES = 4 << 30


@dataclass(frozen=True, slots=True)
class WeightSpec:
    name: str
    shape: tuple[int, ...]
    std: float
    mean: float = 0.0


def weight_specs(config: Any) -> list[WeightSpec]:
    """Every tensor of the checkpoint, in HF's names and order (a tied lm_head omitted, as
    save_pretrained omits it)."""
    h, inter = config.hidden_size, config.intermediate_size
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    hd = getattr(config, "head_dim", None) or h // heads
    vocab = config.vocab_size
    tied = bool(config.tie_word_embeddings)
    qkv_bias = config.model_type == "qwen2"

    def linear(name: str, out: int, inp: int) -> WeightSpec:
        return WeightSpec(f"{name}.weight", (out, inp), 1.0 / math.sqrt(inp))

    def norm(name: str) -> WeightSpec:
        return WeightSpec(f"{name}.weight", (h,), 0.1, 1.0)

    specs = [WeightSpec("model.embed_tokens.weight", (vocab, h),
                        1.0 / math.sqrt(h) if tied else 1.0)]
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        specs.append(norm(p + "input_layernorm"))
        for proj, out in (("q", heads * hd), ("k", kv * hd), ("v", kv * hd)):
            specs.append(linear(f"{p}self_attn.{proj}_proj", out, h))
            if qkv_bias:
                specs.append(WeightSpec(f"{p}self_attn.{proj}_proj.bias", (out,), 0.1))
        specs += [linear(p + "self_attn.o_proj", h, heads * hd),
                  norm(p + "post_attention_layernorm"),
                  linear(p + "mlp.gate_proj", inter, h), linear(p + "mlp.up_proj", inter, h),
                  linear(p + "mlp.down_proj", h, inter)]
    specs.append(norm("model.norm"))
    if not tied:
        specs.append(linear("lm_head", vocab, h))
    return specs


def _draw(spec: WeightSpec, seed: int, dtype: torch.dtype, device: torch.device
          ) -> torch.Tensor:
    digest = hashlib.blake2b(f"{seed}:{spec.name}".encode(), digest_size=8).digest()
    gen = torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little") >> 1)
    t = torch.randn(spec.shape, generator=gen, device=device, dtype=torch.float32)
    return t.mul_(spec.std).add_(spec.mean).to(dtype).cpu()


def write_weights(config: Any, out: Path, *, seed: int, dtype: torch.dtype,
                  max_shard_bytes: int | None = None, device: str | None = None) -> int:
    """Write model.safetensors (or shards and their index) into ``out``; returns the number
    of files. ``device``: where to draw (default: CUDA if present, else CPU)."""
    where = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    specs = weight_specs(config)
    itemsize = torch.tensor([], dtype=dtype).element_size()
    limit = max_shard_bytes or DEFAULT_SHARD_BYTES
    shards: list[list[WeightSpec]] = [[]]
    size = 0
    for spec in specs:
        nbytes = math.prod(spec.shape) * itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map: dict[str, str] = {}
    total = 0
    for file, shard in zip(names, shards, strict=True):
        tensors = {spec.name: _draw(spec, seed, dtype, where) for spec in shard}
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        for name, t in tensors.items():
            weight_map[name] = file
            total += t.numel() * t.element_size()
        del tensors  # one shard in host memory at a time
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return len(names)
