"""Clear errors, never tracebacks: a bad model directory or a bad request is reported as a
PdserveError with a message that names the problem, and by ``pdserve generate`` as one
line on stderr with exit status 2.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from engine import LLM, SamplingParams
from engine.errors import InvalidRequestError, ModelLoadError, PdserveError
from engine.llm_engine import EngineArgs, LLMEngine

REPO_ROOT = Path(__file__).resolve().parents[2]
PDSERVE = REPO_ROOT / ".venv" / "bin" / "pdserve"
SMALL_CONTEXT = 32
LONG_TEXT = "import os\nprint(os.path.join('a', 'b'))\n" * 6


def _edit_config(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _yarn(cfg: dict) -> None:
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}


def _unsupported(cfg: dict) -> None:
    cfg["architectures"] = ["GPT2LMHeadModel"]
    cfg["model_type"] = "gpt2"


@pytest.fixture(scope="module")
def bad_dirs(tiny_model, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad-models")
    dirs = {"missing": root / "does-not-exist", "empty": root / "empty"}
    dirs["empty"].mkdir()
    dirs["no_config"] = root / "no-config"
    shutil.copytree(tiny_model, dirs["no_config"])
    (dirs["no_config"] / "config.json").unlink()
    dirs["bad_json"] = root / "bad-json"
    shutil.copytree(tiny_model, dirs["bad_json"])
    (dirs["bad_json"] / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],')
    dirs["missing_field"] = _edit_config(tiny_model, root / "missing-field",
                                         lambda c: c.pop("hidden_size"))
    dirs["unsupported"] = _edit_config(tiny_model, root / "unsupported", _unsupported)
    dirs["unsupported_rope"] = _edit_config(tiny_model, root / "unsupported-rope", _yarn)
    dirs["no_weights"] = root / "no-weights"
    shutil.copytree(tiny_model, dirs["no_weights"])
    for weights in dirs["no_weights"].glob("*.safetensors"):
        weights.unlink()
    return dirs


# -- the Python API ---------------------------------------------------------------------

# (bad directory, words the message must contain)
LOAD_ERRORS = [
    ("missing", ["does-not-exist", "does not exist"]),
    ("empty", ["empty"]),
    ("no_config", ["no-config", "config.json"]),
    ("bad_json", ["config.json", "JSON"]),
    ("missing_field", ["hidden_size"]),
    ("unsupported", ["GPT2LMHeadModel", "LlamaForCausalLM"]),
    ("unsupported_rope", ["rope_type", "yarn"]),
    ("no_weights", ["safetensors"]),
]


@pytest.mark.parametrize("name,words", LOAD_ERRORS, ids=[n for n, _ in LOAD_ERRORS])
def test_a_bad_model_directory_raises_model_load_error_naming_the_problem(
        bad_dirs, name, words):
    with pytest.raises(ModelLoadError) as caught:
        LLM(bad_dirs[name])
    for word in words:
        assert word in caught.value.message
    assert "Traceback" not in caught.value.message


@pytest.mark.parametrize("name", ["missing", "empty", "no_config", "bad_json", "unsupported"])
def test_the_engine_alone_reports_bad_directories_as_model_load_errors(bad_dirs, name):
    # the services build LLMEngine directly, without the facade's tokenizer check first
    with pytest.raises(ModelLoadError):
        LLMEngine(bad_dirs[name], EngineArgs())


@pytest.fixture(scope="module")
def small(tiny_model) -> LLM:
    return LLM(tiny_model, max_model_len=64, num_kv_blocks=16)


@pytest.mark.parametrize("length", [64, 100])
def test_a_prompt_at_or_over_max_model_len_is_refused(small, length):
    with pytest.raises(InvalidRequestError) as caught:
        small.generate([list(range(length))], SamplingParams(max_tokens=4))
    err = caught.value
    assert f"{length} tokens" in err.message and "64" in err.message
    assert err.param == "prompt" and err.http_status == 400


def test_a_refused_prompt_leaves_the_engine_clean_for_the_next_call(tiny_model, assert_idle):
    llm = LLM(tiny_model, max_model_len=64, num_kv_blocks=16)  # its own: it may be left dirty
    with pytest.raises(InvalidRequestError):
        llm.generate([[1, 2, 3], list(range(100))], SamplingParams(max_tokens=4))
    assert_idle(llm.engine)  # the valid first prompt must not stay queued
    out = llm.generate([[4, 5, 6]], SamplingParams(temperature=0.0, max_tokens=4))
    assert len(out) == 1 and len(out[0].outputs[0].token_ids) == 4


def test_a_text_prompt_over_max_model_len_is_refused(small):
    assert len(small.encode(LONG_TEXT)) >= 64
    with pytest.raises(InvalidRequestError, match="context is 64 tokens"):
        small.generate(LONG_TEXT, SamplingParams(max_tokens=4))


@pytest.mark.parametrize("field,value,words", [
    ("max_tokens", 0, "max_tokens must be at least 1"),
    ("max_tokens", -3, "max_tokens must be at least 1"),
    ("temperature", -0.5, "temperature must be non-negative"),
])
def test_bad_sampling_params_raise_invalid_request_error(small, field, value, words):
    with pytest.raises(InvalidRequestError, match=words) as caught:
        SamplingParams(**{field: value})
    assert caught.value.param == field and caught.value.http_status == 400
    params = SamplingParams()  # changed after construction: the engine checks again
    setattr(params, field, value)
    with pytest.raises(InvalidRequestError, match=words):
        small.generate([[1, 2, 3]], params)


@pytest.mark.parametrize("prompt,words", [
    ([], "empty"),
    ([5, 2048], "token ids must be in"),
    ([-1], "token ids must be in"),
])
def test_malformed_token_prompts_are_refused(small, prompt, words):
    with pytest.raises(InvalidRequestError, match=words):
        small.generate([prompt], SamplingParams(max_tokens=4))


def test_a_max_model_len_beyond_the_model_is_refused(tiny_model):
    with pytest.raises(InvalidRequestError, match="exceeds the model's 2048"):
        LLM(tiny_model, max_model_len=4096)


def test_an_unknown_engine_argument_is_refused(tiny_model):
    with pytest.raises(InvalidRequestError, match="block_sise"):
        LLM(tiny_model, block_sise=16)


@pytest.mark.parametrize("args", [
    dict(max_num_batched_tokens=0),  # unchecked, generate() loops forever on empty steps
    dict(max_num_seqs=0),  # likewise: nothing is ever admitted
    dict(block_size=0),
    dict(num_kv_blocks=-1),
    dict(num_kv_blocks=0),  # silently taken as "size it from memory"
    dict(dtype="int8"),
], ids=lambda a: "-".join(f"{k}={v}" for k, v in a.items()))
def test_nonsensical_engine_arguments_are_refused_at_construction(tiny_model, args):
    with pytest.raises(InvalidRequestError, match=next(iter(args))):
        LLM(tiny_model, **args)


@pytest.mark.parametrize("stop_id", [2048, -1])
def test_a_stop_token_id_outside_the_vocabulary_is_refused(small, assert_idle, stop_id):
    # with min_tokens, an unchecked id indexes past the logits mid-step (IndexError for
    # every request in the batch), or silently bans the last token of the vocabulary.
    # A negative id is refused by SamplingParams itself, one past the vocabulary by the engine.
    with pytest.raises(InvalidRequestError, match="stop_token_ids"):
        params = SamplingParams(temperature=0.0, max_tokens=4, min_tokens=2,
                                stop_token_ids=[stop_id])
        small.generate([[1, 2, 3]], params)
    assert_idle(small.engine)


@pytest.mark.parametrize("seed", [2**63 - 1, -(2**63), 0])
def test_any_int64_seed_samples_reproducibly(small, seed):
    params = SamplingParams(temperature=1.0, seed=seed, max_tokens=4)
    first = small.generate([[1, 2, 3]], params)[0].outputs[0].token_ids
    assert small.generate([[1, 2, 3]], params)[0].outputs[0].token_ids == first


@pytest.mark.parametrize("seed", [2**63, 2**64, -(2**63) - 1])
def test_a_seed_outside_int64_is_refused_before_it_reaches_the_sampler(seed):
    # the wire format (pdserve.proto) carries int64; unchecked, such a seed raised
    # struct.error inside step(), failing every request in the batch
    with pytest.raises(InvalidRequestError, match="seed"):
        SamplingParams(seed=seed)


def test_every_error_type_is_a_pdserve_error_with_an_http_status():
    for cls in (InvalidRequestError, ModelLoadError):
        assert issubclass(cls, PdserveError)
    assert InvalidRequestError("x").http_status == 400


# -- the CLI ----------------------------------------------------------------------------

def _pdserve(args: list[str]) -> subprocess.CompletedProcess[str]:
    exe = [str(PDSERVE)] if PDSERVE.exists() else [sys.executable, "-m", "pdserve.cli"]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([*exe, "generate", *args], capture_output=True, text=True,
                          timeout=180, cwd=REPO_ROOT, env=env)


@pytest.fixture(scope="module")
def cli_runs(bad_dirs, tiny_model, model_factory) -> dict[str, subprocess.CompletedProcess]:
    """Every failing CLI case, run concurrently (each is a fresh interpreter)."""
    short = model_factory("llama", max_position_embeddings=SMALL_CONTEXT)
    cases = {name: ["--model", str(bad_dirs[name]), "hello"]
             for name in ("missing", "no_config", "bad_json", "unsupported")}
    cases["too_long"] = ["--model", str(short), LONG_TEXT]
    cases["max_tokens"] = ["--model", str(tiny_model), "--max-tokens", "0", "hello"]
    cases["temperature"] = ["--model", str(tiny_model), "--temperature", "-1", "hello"]
    with ThreadPoolExecutor(max_workers=4) as pool:
        done = {name: pool.submit(_pdserve, args) for name, args in cases.items()}
        return {name: future.result() for name, future in done.items()}


@pytest.mark.parametrize("case,words", [
    ("missing", "does not exist"),
    ("no_config", "config.json"),
    ("bad_json", "config.json"),
    ("unsupported", "unsupported architecture"),
    ("too_long", f"context is {SMALL_CONTEXT} tokens"),
    ("max_tokens", "max_tokens must be at least 1"),
    ("temperature", "temperature must be non-negative"),
])
def test_the_cli_reports_one_clear_line_and_exits_2(cli_runs, case, words):
    run = cli_runs[case]
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr and run.stdout == ""
    # besides the "loading DIR ..." banner, stderr holds exactly the error line
    lines = [ln for ln in run.stderr.splitlines() if ln.strip() and not ln.startswith("loading ")]
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("pdserve generate: error: ") and words in lines[0]
