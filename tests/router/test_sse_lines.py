"""A streamed chunk stays one line for readers that split lines as Python does.

httpx's ``aiter_lines()`` (what many SSE clients, guidellm among them, read streams with)
splits on every line boundary ``str.splitlines()`` knows, U+0085, U+2028 and U+2029
included, which JSON leaves unescaped; a random model's text holds them now and then, and
a load test through guidellm failed on one (JSONDecodeError: unterminated string)."""

from __future__ import annotations

import json

import pytest
from httpx._decoders import LineDecoder

from router.responses import sse_data


@pytest.mark.parametrize("text", ["a\u2028b", "x\x85y", "\u2029",
                                  "mixed \u2028\n\x85\r\u2029 é 😀"])
def test_a_chunk_with_unicode_line_breaks_reads_back_as_one_event(text):
    event = sse_data({"choices": [{"text": text}]})
    lines = [line for line in LineDecoder().decode(event) + LineDecoder().flush() if line]
    assert len(lines) == 1 and lines[0].startswith("data: ")
    assert json.loads(lines[0][len("data: "):]) == {"choices": [{"text": text}]}
    assert event.endswith("\n\n") and "é" in sse_data({"t": "é"})  # still UTF-8, not \u00e9
