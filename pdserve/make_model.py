"""``pdserve make-model``: an HF-format Llama-family model directory, made offline.

Owns the project's own test, demo and benchmark models: a byte-level BPE tokenizer trained
on the Python standard library's sources, a transformers config for the architecture, and
seeded random weights drawn so that greedy logits are well separated
(pdserve/random_weights.py), saved as safetensors (sharded when large) beside config.json,
generation_config.json and the tokenizer files. With no network there is no hub, so this is
how every CPU test and the one-machine default get a model that transformers itself can
load and run as the reference -- and how a GPU run gets a Llama-3-8B-shaped one (bf16, a
128256-row embedding, a smaller tokenizer, as many released models have).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

from engine.errors import InvalidRequestError
from pdserve.random_weights import write_weights

ARCHES = ("llama", "qwen2", "mistral")
ROPE_SCALINGS = ("llama3",)
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
# Qwen2's pre-tokenizer split (words, single digits, punctuation runs, newlines, spaces).
SPLIT_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
               r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # the byte alphabet plus the special tokens
MAX_TOKENIZER_VOCAB = 65536  # beyond this the stdlib's text no longer yields enough merges
BIG_VOCAB_TOKENIZER = 32768  # a larger embedding table gets a tokenizer of this size
MAX_VOCAB = 1 << 20
DTYPE_NAMES = ("float32", "bfloat16", "float16")

# ChatML, as Qwen2 renders it, minus Qwen's default system prompt. Content may be a string
# or a list of text parts ([{"type": "text", "text": ...}]), as OpenAI clients send; parts
# are joined with a newline, as vLLM (and engine.tokenizer) do. With tools, Qwen2.5's
# (Hermes') form: the tools as JSON in the system turn, calls as <tool_call> blocks, tool
# results as <tool_response> in a user turn. Without tools the text is plain ChatML.
CHAT_TEMPLATE = (
    "{%- if tools -%}"
    "{{- '<|im_start|>system\\n' -}}"
    "{%- if messages[0]['role'] == 'system' and messages[0]['content'] is string -%}"
    "{{- messages[0]['content'] + '\\n\\n' -}}"
    "{%- endif -%}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.'"
    " + '\\n\\nYou are provided with function signatures within <tools></tools> XML tags:'"
    " + '\\n<tools>' -}}"
    "{%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name'"
    " + ' and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n'"
    " + '{\"name\": <function-name>, \"arguments\": <args-json-object>}\\n</tool_call>'"
    " + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if not (tools and loop.first and message['role'] == 'system'"
    " and message['content'] is string) -%}"
    "{%- if message['content'] is string -%}"
    "{%- set content = message['content'] -%}"
    "{%- elif message['content'] -%}"
    "{%- set content = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('\\n') -%}"
    "{%- else -%}{%- set content = '' -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'tool' -%}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + content"
    " + '\\n</tool_response><|im_end|>\\n' -}}"
    "{%- else -%}"
    "{%- set calls = message['tool_calls'] if message['tool_calls'] is defined else none -%}"
    "{{- '<|im_start|>' + message['role'] -}}"
    "{%- if content or not calls -%}{{- '\\n' + content -}}{%- endif -%}"
    "{%- if calls -%}"
    "{%- for call in calls -%}"
    "{%- set fn = call['function'] if call['function'] is defined else call -%}"
    "{%- set args = fn['arguments'] if fn['arguments'] is string"
    " else fn['arguments'] | tojson -%}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + fn['name'] + '\", \"arguments\": '"
    " + args + '}\\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


@dataclass(slots=True)
class ArchDefaults:
    config_class: str
    rms_norm_eps: float
    rope_theta: float
    tie_embeddings: bool


ARCH_DEFAULTS = {
    "llama": ArchDefaults("LlamaConfig", 1e-5, 10000.0, False),
    "qwen2": ArchDefaults("Qwen2Config", 1e-6, 1000000.0, True),
    "mistral": ArchDefaults("MistralConfig", 1e-5, 10000.0, False),
}


def make_model(
    out_dir: Path,
    arch: str = "llama",
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 2048,
    intermediate: int | None = None,
    seed: int = 0,
    max_position_embeddings: int = 2048,
    rope_scaling: str | None = None,
    tie_embeddings: bool | None = None,
    max_shard_bytes: int | None = None,
    dtype: str = "float32",
    tokenizer_vocab: int | None = None,
    device: str | None = None,
) -> Path:
    """Write a model directory at ``out_dir`` and return its path.

    ``vocab`` is the embedding table's rows; the tokenizer has ``tokenizer_vocab`` tokens
    (default: ``vocab``, or BIG_VOCAB_TOKENIZER when the table is larger than a tokenizer
    can be trained here). ``device``: where weights are drawn (default: CUDA if present).
    Raises InvalidRequestError for an unknown architecture, inconsistent sizes or an
    output directory that cannot be written.
    """
    if tokenizer_vocab is None:
        tokenizer_vocab = vocab if vocab <= MAX_TOKENIZER_VOCAB else BIG_VOCAB_TOKENIZER
    _validate(arch, layers, hidden, heads, kv_heads, vocab, intermediate,
              max_position_embeddings, rope_scaling, max_shard_bytes)
    if dtype not in DTYPE_NAMES:
        raise InvalidRequestError(f"dtype must be one of {', '.join(DTYPE_NAMES)}", "dtype")
    if not MIN_VOCAB <= tokenizer_vocab <= min(vocab, MAX_TOKENIZER_VOCAB):
        raise InvalidRequestError(
            f"tokenizer_vocab must be between {MIN_VOCAB} and "
            f"{min(vocab, MAX_TOKENIZER_VOCAB)}, got {tokenizer_vocab}", "tokenizer_vocab")
    out = Path(out_dir)
    staging = _staging_dir(out)
    try:
        import torch

        tokenizer = _build_tokenizer(tokenizer_vocab, normalize_nfc=arch == "qwen2")
        _save_tokenizer(tokenizer, staging)
        config = _build_config(
            tokenizer, arch, layers, hidden, heads, kv_heads,
            intermediate if intermediate is not None else _round_up(2 * hidden, 8),
            max_position_embeddings, rope_scaling, tie_embeddings, vocab, dtype)
        config.save_pretrained(staging)
        _generation_config(config).save_pretrained(staging)
        write_weights(config, staging, seed=seed, dtype=getattr(torch, dtype),
                      max_shard_bytes=max_shard_bytes, device=device)
        _publish(staging, out)
    except OSError as exc:
        raise InvalidRequestError(f"cannot write model directory {str(out)!r}: {exc}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _validate(arch: str, layers: int, hidden: int, heads: int, kv_heads: int, vocab: int,
              intermediate: int | None, max_pos: int, rope_scaling: str | None,
              max_shard_bytes: int | None) -> None:
    if arch not in ARCHES:
        raise InvalidRequestError(
            f"unknown architecture {arch!r}; choose one of {', '.join(ARCHES)}", "arch")
    positive = {"layers": layers, "hidden": hidden, "heads": heads, "kv_heads": kv_heads,
                "max_position_embeddings": max_pos}
    if intermediate is not None:
        positive["intermediate"] = intermediate
    if max_shard_bytes is not None:
        positive["shard_bytes"] = max_shard_bytes
    for name, value in positive.items():
        if value < 1:
            raise InvalidRequestError(f"{name} must be at least 1, got {value}", name)
    if hidden % heads:
        raise InvalidRequestError(
            f"heads ({heads}) must divide hidden ({hidden}) evenly", "heads")
    if heads % kv_heads:
        raise InvalidRequestError(
            f"kv_heads ({kv_heads}) must divide heads ({heads}) evenly", "kv_heads")
    if (hidden // heads) % 2:
        # RoPE rotates pairs of dimensions, so each head needs an even size.
        raise InvalidRequestError(
            f"head_dim = hidden // heads = {hidden // heads} must be even (RoPE)", "heads")
    if not MIN_VOCAB <= vocab <= MAX_VOCAB:
        raise InvalidRequestError(
            f"vocab must be between {MIN_VOCAB} and {MAX_VOCAB}, got {vocab}", "vocab")
    if rope_scaling is not None and rope_scaling not in ROPE_SCALINGS:
        raise InvalidRequestError(
            f"unknown rope scaling {rope_scaling!r}; choose one of {', '.join(ROPE_SCALINGS)}",
            "rope_scaling")
    if rope_scaling == "llama3" and max_pos < 4:
        raise InvalidRequestError("llama3 rope scaling needs max_position_embeddings >= 4")


def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


def _staging_dir(out: Path) -> Path:
    # Everything is written into a hidden folder inside the target first and moved in at
    # the end, config.json last, so an interrupted run never leaves a config.json (the
    # Makefile's stamp) without weights.
    if out.exists() and not out.is_dir():
        raise InvalidRequestError(f"output path {str(out)!r} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=".make-model-", dir=out))
    except OSError as exc:
        raise InvalidRequestError(f"cannot write model directory {str(out)!r}: {exc}") from None


def _publish(staging: Path, out: Path) -> None:
    # Stale weights from an earlier run (say, sharded then not) would confuse loaders; the
    # old config.json goes first so the directory never looks complete while in between.
    (out / "config.json").unlink(missing_ok=True)
    for old in out.glob("model*.safetensors*"):
        old.unlink()
    names = sorted(p.name for p in staging.iterdir())
    for name in [n for n in names if n != "config.json"] + ["config.json"]:
        (staging / name).chmod(0o644)  # safetensors writes 0600; pods may run as other users
        os.replace(staging / name, out / name)


def _training_files() -> list[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in stdlib.rglob("*.py")
                  if not {"site-packages", "dist-packages"} & set(p.parts))


def _training_text(budget_chars: int) -> list[str]:
    # A sorted, size-bounded prefix of the standard library: deterministic for a given
    # Python, and enough text for the requested vocabulary (about 256 chars per token).
    texts: list[str] = []
    total = 0
    for path in _training_files():
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        texts.append(text)
        total += len(text)
        if total >= budget_chars:
            break
    return texts


def _build_tokenizer(vocab: int, normalize_nfc: bool):
    """Train the byte-level BPE and wrap it for transformers.

    The pipeline is the one transformers' Qwen2Tokenizer rebuilds for itself (transformers 5
    ignores tokenizer_class for qwen2 configs): Qwen2's split regex, then byte-level with no
    regex of its own, plus NFC for qwen2 only. So tokenizer.json read directly and
    AutoTokenizer give the same ids for every arch. Without NFC (llama, mistral) decoding
    round-trips any UTF-8 text; with it (qwen2, as the real model does) any NFC text.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if normalize_nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_text(max(2_000_000, 256 * vocab)), trainer)
    if tok.get_vocab_size() != vocab:
        raise InvalidRequestError(
            f"the local training text yields only {tok.get_vocab_size()} tokens; "
            f"ask for a smaller vocab than {vocab}", "vocab")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=None,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=None,
    )


def _save_tokenizer(tokenizer, out: Path) -> None:
    tokenizer.save_pretrained(out)
    # Name the generic fast class: transformers 5 otherwise writes its backend class, which
    # 4.x cannot load, and picks a model-specific class (Qwen2Tokenizer) for qwen2 configs
    # that may rebuild the pre-tokenizer instead of reading ours from tokenizer.json.
    path = out / "tokenizer_config.json"
    data = json.loads(path.read_text())
    data["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _build_config(tokenizer, arch: str, layers: int, hidden: int, heads: int, kv_heads: int,
                  intermediate: int, max_pos: int, rope_scaling: str | None,
                  tie_embeddings: bool | None, vocab: int, dtype: str):
    import transformers

    defaults = ARCH_DEFAULTS[arch]
    rope: dict = {"rope_type": "default", "rope_theta": defaults.rope_theta}
    if rope_scaling == "llama3":
        rope = {"rope_type": "llama3", "rope_theta": defaults.rope_theta, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": max_pos // 4}
    eos = tokenizer.convert_tokens_to_ids(IM_END)
    pad = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    kwargs = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        max_position_embeddings=max_pos,
        rms_norm_eps=defaults.rms_norm_eps,
        tie_word_embeddings=(defaults.tie_embeddings if tie_embeddings is None
                             else tie_embeddings),
        bos_token_id=pad,  # as Qwen2 does; the tokenizer never adds a BOS
        eos_token_id=eos,
        pad_token_id=pad,
    )
    if "rope_parameters" in inspect.signature(transformers.LlamaConfig.__init__).parameters:
        kwargs["rope_parameters"] = rope
    else:  # transformers 4.x
        kwargs["rope_theta"] = rope.pop("rope_theta")
        kwargs["rope_scaling"] = rope if rope_scaling else None
    if arch == "mistral":
        kwargs["sliding_window"] = None  # plain causal attention over the whole context
    if arch == "qwen2":
        kwargs["use_sliding_window"] = False
    config = getattr(transformers, defaults.config_class)(**kwargs)
    config.architectures = [defaults.config_class.removesuffix("Config") + "ForCausalLM"]
    config.dtype = dtype
    return config


def _generation_config(config):
    from transformers import GenerationConfig

    return GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                            pad_token_id=config.pad_token_id)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", default="llama", help=f"one of {', '.join(ARCHES)}")
    parser.add_argument("--out", required=True, type=Path, help="directory to write")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=None,
                        help="MLP size (default: 2 x hidden)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-position-embeddings", type=int, default=2048)
    parser.add_argument("--rope-scaling", default=None, help="llama3")
    parser.add_argument("--tie-embeddings", default=None, action=argparse.BooleanOptionalAction,
                        help="tie lm_head to the embedding (default: qwen2 yes, others no)")
    parser.add_argument("--shard-bytes", type=int, default=None,
                        help="split weights into safetensors shards of at most this size "
                             "(default: 4 GiB)")
    parser.add_argument("--dtype", default="float32", choices=DTYPE_NAMES)
    parser.add_argument("--tokenizer-vocab", type=int, default=None,
                        help="tokens of the tokenizer (default: --vocab, or "
                             f"{BIG_VOCAB_TOKENIZER} for a larger embedding table)")
    parser.add_argument("--device", default=None,
                        help="where to draw the weights (default: cuda if present, else cpu)")


def run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the CLI's output is the two lines below
    out = make_model(
        args.out, arch=args.arch, layers=args.layers, hidden=args.hidden, heads=args.heads,
        kv_heads=args.kv_heads, vocab=args.vocab, intermediate=args.intermediate,
        seed=args.seed, max_position_embeddings=args.max_position_embeddings,
        rope_scaling=args.rope_scaling, tie_embeddings=args.tie_embeddings,
        max_shard_bytes=args.shard_bytes, dtype=args.dtype,
        tokenizer_vocab=args.tokenizer_vocab, device=args.device)
    files = sorted(p.name for p in out.glob("*.safetensors"))
    print(out)
    print(f"{args.arch}: {args.layers} layers, hidden {args.hidden}, heads {args.heads}/"
          f"{args.kv_heads}, vocab {args.vocab}, seed {args.seed}, {args.dtype}, "
          f"{len(files)} safetensors file(s)")
    return 0
