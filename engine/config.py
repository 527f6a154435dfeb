"""ModelConfig: what the engine needs from an HF model directory's config.json.

Reads both the transformers-4 form (``rope_theta``, ``rope_scaling``) and the
transformers-5 form (``rope_parameters``) of the RoPE settings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import ModelLoadError
from engine.kv_layout import model_id_from_config

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "mistral",
}


@dataclass(slots=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(slots=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    rope: RopeConfig
    eos_token_ids: list[int] = field(default_factory=list)
    sliding_window: int | None = None
    model_id: str = ""
    torch_dtype: str = "float32"

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir)
        if not path.is_dir():
            raise ModelLoadError(f"model directory {str(path)!r} does not exist")
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise ModelLoadError(f"{str(path)!r} has no config.json: not an HF model directory")
        try:
            raw = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelLoadError(f"{cfg_path} is not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise ModelLoadError(f"{cfg_path} must hold a JSON object")
        gen_path = path / "generation_config.json"
        gen = {}
        if gen_path.is_file():
            try:
                gen = json.loads(gen_path.read_text())
            except json.JSONDecodeError:
                gen = {}
        return cls.from_dict(raw, gen)

    @classmethod
    def from_dict(cls, raw: dict, generation: dict | None = None) -> ModelConfig:
        archs = raw.get("architectures") or []
        arch = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES),
                    None)
        if arch is None:
            supported = ", ".join(sorted(SUPPORTED_ARCHITECTURES))
            raise ModelLoadError(
                f"unsupported architecture {archs or raw.get('model_type')!r}; "
                f"pdserve supports {supported}")
        try:
            hidden = int(raw["hidden_size"])
            heads = int(raw["num_attention_heads"])
            cfg = cls(
                architecture=arch,
                vocab_size=int(raw["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(raw["intermediate_size"]),
                num_layers=int(raw["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(raw.get("num_key_value_heads") or heads),
                head_dim=int(raw.get("head_dim") or hidden // heads),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", arch == "qwen2")),
                # Qwen2 always has q/k/v bias; Llama has it only when attention_bias says so.
                attention_bias=arch == "qwen2" or bool(raw.get("attention_bias", False)),
                rope=_rope_from(raw),
                eos_token_ids=_eos_ids(raw, generation or {}),
                sliding_window=_sliding_window(raw, arch),
                model_id=model_id_from_config(raw),
                torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"malformed config.json: bad or missing field {exc}") from None
        if cfg.num_heads % cfg.num_kv_heads:
            raise ModelLoadError("num_attention_heads must be a multiple of num_key_value_heads")
        return cfg


def _rope_from(raw: dict) -> RopeConfig:
    # transformers 5 writes rope_parameters (with rope_theta inside); 4.x writes rope_theta
    # plus an optional rope_scaling dict. Real checkpoints use either.
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in ("default", "linear", "llama3"):
        raise ModelLoadError(f"unsupported rope_type {rope_type!r} (default, linear, llama3)")
    return RopeConfig(
        theta=float(theta),
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings", 8192)),
    )


def _eos_ids(raw: dict, generation: dict) -> list[int]:
    ids: list[int] = []
    for source in (generation.get("eos_token_id"), raw.get("eos_token_id")):
        if source is None:
            continue
        for tok in source if isinstance(source, list) else [source]:
            if int(tok) not in ids:
                ids.append(int(tok))
    return ids


def _sliding_window(raw: dict, arch: str) -> int | None:
    if arch == "qwen2" and not raw.get("use_sliding_window", False):
        return None
    window = raw.get("sliding_window")
    return int(window) if window else None
