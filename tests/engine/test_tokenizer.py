"""engine.tokenizer: loading, chat templates, incremental detokenization with stop strings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.errors import InvalidRequestError, ModelLoadError
from engine.tokenizer import IncrementalDetokenizer, TokenBytes, apply_chat_template, load_tokenizer

TEXT = "héllo 你好 world. STOP here, ok?"


@pytest.fixture(scope="module")
def tok(tiny_model: Path):
    return load_tokenizer(tiny_model)


def stream(tok, text: str, chunk: int = 1, **kwargs
           ) -> tuple[list[str], str, IncrementalDetokenizer]:
    """Detokenize ``text``'s tokens ``chunk`` at a time; the pieces, the flush, the detok."""
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, tok.encode("Say: "), **kwargs)
    pieces = []
    for i in range(0, len(ids), chunk):
        delta = detok.add(ids[i:i + chunk])
        pieces.append(delta.text)
        if delta.stopped:
            break
    return pieces, detok.flush(), detok


def test_load_tokenizer_reports_missing_and_broken_directories(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="no tokenizer files"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({}))
    with pytest.raises(ModelLoadError, match="cannot load the tokenizer"):
        load_tokenizer(tmp_path)


def test_cjk_characters_split_over_tokens_exist_in_this_tokenizer(tok) -> None:
    # The UTF-8 tests below rely on a character spanning several byte-level tokens.
    ids = tok.encode("你")
    assert len(ids) > 1 and all("\ufffd" in tok.decode([i]) for i in ids)


@pytest.mark.parametrize("chunk", [1, 2, 3, 100])
def test_stream_reassembles_text_and_never_splits_a_character(tok, chunk: int) -> None:
    pieces, tail, _ = stream(tok, TEXT, chunk)
    assert "".join(pieces) + tail == TEXT
    assert all("\ufffd" not in p for p in pieces)
    assert "你" in pieces or chunk > 1  # emitted whole once its last byte arrived


def test_a_sequence_ending_inside_a_character_drops_its_bytes_not_shows_fffd(tok) -> None:
    ids = tok.encode("ab你")
    detok = IncrementalDetokenizer(tok, [], stop=[])
    text = detok.add(ids[:-1]).text
    assert text == "ab"  # the partial 你 is held back
    assert detok.flush() == ""  # ... and dropped at the end, as vLLM does (no U+FFFD)
    whole = IncrementalDetokenizer(tok, [], stop=[])
    assert whole.add(ids).text + whole.flush() == "ab你"  # a complete one is kept


def test_stop_string_cuts_text_before_it(tok) -> None:
    pieces, tail, detok = stream(tok, TEXT, stop=["STOP"])
    assert "".join(pieces) + tail == "héllo 你好 world. "
    assert detok.stopped and detok.stop_str == "STOP"
    assert all("S" not in p for p in pieces)  # the prefix "S" was held, never emitted


def test_stop_string_spanning_tokens_and_a_split_character(tok) -> None:
    # "好 w" begins inside a multi-token character and ends in a later token.
    pieces, tail, _ = stream(tok, TEXT, stop=["好 w"])
    assert "".join(pieces) + tail == "héllo 你"


def test_include_stop_str_in_output_keeps_the_stop_string(tok) -> None:
    pieces, tail, _ = stream(tok, TEXT, stop=["STOP"], include_stop_str_in_output=True)
    assert "".join(pieces) + tail == "héllo 你好 world. STOP"


def test_earliest_of_several_stop_strings_wins(tok) -> None:
    pieces, tail, detok = stream(tok, TEXT, chunk=100, stop=["here", "world"])
    assert "".join(pieces) + tail == "héllo 你好 "
    assert detok.stop_str == "world"


def test_num_tokens_counts_through_the_token_completing_the_stop(tok) -> None:
    ids = tok.encode(TEXT)
    detok = IncrementalDetokenizer(tok, [], stop=["STOP"])
    delta = detok.add(ids)
    n = delta.num_tokens
    assert delta.stopped and 0 < n < len(ids)
    assert "STOP" in tok.decode(ids[:n]) and "STOP" not in tok.decode(ids[:n - 1])
    assert detok.add(ids[:3]).text == "" and detok.flush() == ""  # nothing after a stop


def test_held_stop_prefix_that_does_not_become_a_stop_is_released(tok) -> None:
    pieces, tail, detok = stream(tok, "a STO b", stop=["STOP"])
    assert "".join(pieces) + tail == "a STO b" and not detok.stopped
    pieces, tail, detok = stream(tok, "ends with ST", stop=["STOP"])
    assert tail == "ST" and "".join(pieces) == "ends with "


def test_special_tokens_are_skipped_by_default(tok) -> None:
    eos = tok.eos_token_id
    ids = [*tok.encode("hi"), eos]
    detok = IncrementalDetokenizer(tok, [])
    assert detok.add(ids).text + detok.flush() == "hi"
    detok = IncrementalDetokenizer(tok, [], skip_special_tokens=False)
    assert detok.add(ids).text + detok.flush() == "hi" + tok.eos_token


def test_chat_template_accepts_strings_and_text_parts(tok) -> None:
    as_string = apply_chat_template(tok, [{"role": "user", "content": "hi there"}])
    as_parts = apply_chat_template(
        tok, [{"role": "user", "content": [{"type": "text", "text": "hi there"}]}])
    assert as_string == as_parts
    text = tok.decode(as_string)
    assert text.endswith("<|im_start|>assistant\n") and "hi there" in text
    no_prompt = apply_chat_template(tok, [{"role": "user", "content": "hi there"}],
                                    add_generation_prompt=False)
    assert as_string[:len(no_prompt)] == no_prompt and len(no_prompt) < len(as_string)


@pytest.mark.parametrize("messages, param", [
    ([], "messages"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     "messages.0.content.0"),
    ([{"role": "user", "content": 5}], "messages.0.content"),
    ([{"content": "no role"}], "messages.0.role"),
])
def test_chat_template_rejects_what_it_cannot_render(tok, messages, param) -> None:
    with pytest.raises(InvalidRequestError) as info:
        apply_chat_template(tok, messages)
    assert info.value.param == param and info.value.http_status == 400


def test_token_bytes_are_exact_for_partial_characters(tok) -> None:
    tb = TokenBytes(tok)
    ids = tok.encode("é你")
    assert b"".join(tb.get(i)[1] for i in ids) == "é你".encode()
    assert tb.get(tok.encode("hello")[0])[0] == tok.decode(tok.encode("hello")[:1])


def test_a_stop_token_id_ends_the_text_without_its_own_text(tok) -> None:
    ids = tok.encode(TEXT)
    stop_id = ids[3]
    plain = IncrementalDetokenizer(tok, [], stop_token_ids=[stop_id])
    delta = plain.add(ids)
    assert delta.stopped and delta.num_tokens == 4  # the stop token's id still counts
    assert delta.text == tok.decode(ids[:3])
    kept = IncrementalDetokenizer(tok, [], stop_token_ids=[stop_id],
                                  include_stop_str_in_output=True)
    assert kept.add(ids[:4]).text + kept.flush() == tok.decode(ids[:4])
