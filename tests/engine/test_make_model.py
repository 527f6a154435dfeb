"""make-model writes directories that transformers loads, tokenizes and generates with."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import torch
from hf_reference import hf_greedy, hf_logits
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.errors import InvalidRequestError
from pdserve.make_model import make_model

REPO_ROOT = Path(__file__).resolve().parents[2]
PDSERVE = REPO_ROOT / ".venv" / "bin" / "pdserve"
ARCHES = ["llama", "qwen2", "mistral"]
UTF8_SAMPLES = [
    "Hello, world!",
    "naïve café, Ångström, straße",
    "你好，世界。日本語のテキスト、한국어 텍스트",  # noqa: RUF001 -- CJK punctuation on purpose
    "emoji 🙂👍🏽 family 👨‍👩‍👧 flag 🇫🇷",
    "  leading and trailing spaces  \t tabs\r\nand\n\n\nnewlines ",
    "def f(x):\n    return x ** 2  # 12345678901234567890",
    "control \x00\x01\x7f and special-looking <|im_start|> text",
]


def _pdserve(*args: str) -> subprocess.CompletedProcess[str]:
    exe = [str(PDSERVE)] if PDSERVE.exists() else [sys.executable, "-m", "pdserve.cli"]
    return subprocess.run([*exe, "make-model", *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO_ROOT)


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(path))
    return out


@pytest.mark.parametrize("arch", ARCHES)
def test_each_arch_loads_in_transformers_and_generates(model_factory, arch):
    model_dir = model_factory(arch)
    config = json.loads((model_dir / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)

    assert config["model_type"] == arch
    assert config["vocab_size"] == len(tok) == 2048
    assert config["head_dim"] == 16 and config["num_key_value_heads"] == 2
    assert next(model.parameters()).dtype == torch.float32
    prompt = tok.encode("import os\nprint(")
    out = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)
    assert out.shape == (1, len(prompt) + 8)
    assert hf_greedy(model_dir, [prompt], 8) == [out[0, len(prompt):].tolist()]


def test_arch_specifics_follow_the_real_models(model_factory):
    llama, qwen2, mistral = (model_factory(a) for a in ARCHES)
    q = AutoModelForCausalLM.from_pretrained(qwen2)
    assert q.model.layers[0].self_attn.q_proj.bias is not None  # Qwen2's qkv bias
    assert q.lm_head.weight is q.model.embed_tokens.weight
    l_cfg = json.loads((llama / "config.json").read_text())
    q_cfg = json.loads((qwen2 / "config.json").read_text())
    m_cfg = json.loads((mistral / "config.json").read_text())
    assert not l_cfg["tie_word_embeddings"] and not m_cfg["tie_word_embeddings"]
    assert q_cfg["tie_word_embeddings"]
    assert "lm_head.weight" in _tensors(llama) and "lm_head.weight" not in _tensors(qwen2)
    assert l_cfg["rms_norm_eps"] == 1e-5 and q_cfg["rms_norm_eps"] == 1e-6
    assert l_cfg["rope_parameters"]["rope_theta"] == 10000.0
    assert q_cfg["rope_parameters"]["rope_theta"] == 1e6
    assert m_cfg.get("sliding_window") is None  # plain causal attention


def test_llama3_rope_scaling_is_written(model_factory):
    model_dir = model_factory("llama", rope_scaling="llama3", max_position_embeddings=4096)
    rope = json.loads((model_dir / "config.json").read_text())["rope_parameters"]
    assert rope == {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 1024}
    assert len(hf_greedy(model_dir, [[5, 6, 7]], 4)[0]) == 4


def test_same_seed_same_weights_other_seed_other_weights(model_factory, tmp_path):
    first = _tensors(model_factory("llama"))
    again = _tensors(make_model(tmp_path / "again"))
    other = _tensors(model_factory("llama", seed=1))
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["model.embed_tokens.weight"], other["model.embed_tokens.weight"])


def test_greedy_logits_are_well_separated(tiny_model):
    logits = hf_logits(tiny_model, list(range(3, 67)))
    assert logits.shape == (64, 2048) and logits.dtype == torch.float32
    top2 = logits.topk(2, dim=-1).values
    # HF's default init gives near-flat logits where float noise flips greedy choices.
    assert logits.std() > 0.5
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-4


def test_hf_greedy_runs_past_eos_without_suppressing_it(tiny_model, tmp_path):
    prompt = [10, 20, 30]
    expected = hf_greedy(tiny_model, [prompt], 6)[0]
    # Make the first greedy token the eos: generate must neither stop on it nor avoid it.
    patched = tmp_path / "eos"
    shutil.copytree(tiny_model, patched)
    for name in ("config.json", "generation_config.json"):
        data = json.loads((patched / name).read_text())
        data["eos_token_id"] = expected[0]
        (patched / name).write_text(json.dumps(data))
    assert hf_greedy(patched, [prompt], 6) == [expected]


def test_sharded_output_has_an_index_and_loads_the_same_model(model_factory):
    whole = model_factory("llama")
    sharded = model_factory("llama", max_shard_bytes=300_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert len(shards) > 1 and not (sharded / "model.safetensors").exists()
    assert sorted(set(index["weight_map"].values())) == shards
    assert set(index["weight_map"]) == set(_tensors(whole))
    x = torch.tensor([[5, 6, 7, 8]])
    a = AutoModelForCausalLM.from_pretrained(whole)(x).logits
    b = AutoModelForCausalLM.from_pretrained(sharded)(x).logits
    assert torch.equal(a, b)


def test_remaking_a_directory_without_shards_removes_the_old_shards(tmp_path):
    out = tmp_path / "m"
    make_model(out, max_shard_bytes=300_000)
    make_model(out)
    assert not list(out.glob("model-*")) and not (out / "model.safetensors.index.json").exists()
    assert not list(out.glob(".make-model-*"))  # no staging folder left behind
    assert AutoModelForCausalLM.from_pretrained(out) is not None


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_tokenizer_round_trips_any_utf8_text(model_factory, arch):
    tok = AutoTokenizer.from_pretrained(model_factory(arch))
    for text in [*UTF8_SAMPLES, unicodedata.normalize("NFD", "déjà vu")]:
        assert tok.decode(tok.encode(text)) == text


def test_qwen2_tokenizer_normalizes_to_nfc_like_the_real_model(model_factory):
    tok = AutoTokenizer.from_pretrained(model_factory("qwen2"))
    for text in UTF8_SAMPLES:
        assert tok.decode(tok.encode(text)) == text
    decomposed = unicodedata.normalize("NFD", "déjà vu")
    assert tok.decode(tok.encode(decomposed)) == "déjà vu"


@pytest.mark.parametrize("arch", ARCHES)
def test_autotokenizer_and_tokenizer_json_give_the_same_ids(model_factory, arch):
    # transformers 5 swaps in Qwen2Tokenizer for qwen2 configs; its pipeline must match ours.
    model_dir = model_factory(arch)
    tok = AutoTokenizer.from_pretrained(model_dir)
    raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    for text in UTF8_SAMPLES:
        assert tok.encode(text) == raw.encode(text).ids


def test_special_tokens_eos_pad_and_no_bos(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    config = json.loads((tiny_model / "config.json").read_text())
    gen = json.loads((tiny_model / "generation_config.json").read_text())
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>",
                                                        "<|im_end|>")}
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.bos_token is None
    assert config["eos_token_id"] == gen["eos_token_id"] == ids["<|im_end|>"]
    assert config["pad_token_id"] == gen["pad_token_id"] == ids["<|endoftext|>"]
    assert tok.encode("<|im_start|>user") == [ids["<|im_start|>"], *tok.encode("user")]
    plain = tok.encode("hello")
    assert all(i not in ids.values() for i in plain)  # nothing added in front or behind
    assert tok.decode([*plain, ids["<|im_end|>"]], skip_special_tokens=True) == "hello"


def test_chat_template_renders_chatml(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": [{"type": "text", "text": "a"},
                                             {"type": "text", "text": "b"}]}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                    "<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\nHello!<|im_end|>\n"
                    "<|im_start|>user\na\nb<|im_end|>\n"
                    "<|im_start|>assistant\n")
    bare = tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=False)
    assert bare.endswith("<|im_start|>user\nHi<|im_end|>\n")
    assert tok.encode(text)[0] == tok.convert_tokens_to_ids("<|im_start|>")


def test_default_model_dir_is_the_makefile_default(default_model_dir):
    config = json.loads((default_model_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert (config["num_hidden_layers"], config["hidden_size"]) == (2, 64)
    assert (default_model_dir / "tokenizer.json").is_file()


@pytest.mark.parametrize("kwargs, words", [
    ({"arch": "gpt2"}, "unknown architecture"),
    ({"hidden": 63}, "must divide hidden"),
    ({"kv_heads": 3}, "must divide heads"),
    ({"hidden": 12, "heads": 4}, "must be even"),
    ({"layers": 0}, "layers must be at least 1"),
    ({"vocab": 100}, "vocab must be between"),
    ({"rope_scaling": "yarn"}, "unknown rope scaling"),
    ({"max_shard_bytes": 0}, "shard_bytes must be at least 1"),
])
def test_bad_arguments_raise_invalid_request(tmp_path, kwargs, words):
    with pytest.raises(InvalidRequestError, match=words):
        make_model(tmp_path / "m", **kwargs)
    assert not (tmp_path / "m" / "config.json").exists()


def test_unwritable_output_raises_invalid_request(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(InvalidRequestError, match="cannot write model directory"):
        make_model(blocker / "m")
    with pytest.raises(InvalidRequestError, match="not a directory"):
        make_model(blocker)


def test_cli_writes_a_model_and_prints_a_summary(tmp_path):
    out = tmp_path / "cli-model"
    proc = _pdserve("--arch", "mistral", "--out", str(out), "--layers", "1", "--hidden", "32",
                    "--heads", "2", "--kv-heads", "1", "--vocab", "512", "--seed", "3",
                    "--shard-bytes", "40000")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == str(out) and len(lines) == 2 and "mistral" in lines[1]
    config = json.loads((out / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (
        1, 32, 512)
    assert (out / "model.safetensors.index.json").is_file()


@pytest.mark.parametrize("args, words", [
    (["--arch", "gpt2"], "unknown architecture 'gpt2'"),
    (["--hidden", "63"], "heads (4) must divide hidden (63)"),
    (["--kv-heads", "3"], "kv_heads (3) must divide heads (4)"),
    (["--vocab", "10"], "vocab must be between"),
])
def test_cli_bad_arguments_fail_with_a_clear_message(tmp_path, args, words):
    proc = _pdserve("--out", str(tmp_path / "m"), *args)
    assert proc.returncode != 0
    assert words in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "m" / "config.json").exists()


def test_cli_unwritable_output_fails_with_a_clear_message(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    proc = _pdserve("--out", str(blocker / "m"))
    assert proc.returncode != 0
    assert "cannot write model directory" in proc.stderr and "Traceback" not in proc.stderr
