"""Through 1 prefill + 1 decode pod, the official openai client gets transformers' tokens.

Greedy completions (text and token-id prompts) and chats (string content and text parts),
streamed and not, give exactly ``hf_greedy``'s tokens for the same model; streamed text is
the non-streamed text; usage counts are exact.
"""

from __future__ import annotations

from typing import Any

import pytest
from e2e_helpers import Choice, Stack, chat_choices, collect_stream, completion_choices, extra
from hf_reference import hf_greedy

from engine.tokenizer import apply_chat_template

pytestmark = pytest.mark.timeout(180)

MAX_TOKENS = 32
GREEDY = {"max_tokens": MAX_TOKENS, "temperature": 0,
          "extra_body": {"ignore_eos": True, "return_token_ids": True}}

TEXT_PROMPTS = {
    "short": "def fibonacci(n):\n    ",
    # more than one KV block (16 tokens), so the transfer moves several
    "long": ("import os\nimport sys\n\n\nclass Reader:\n    def __init__(self, path):\n"
             "        self.path = path\n\n    def read(self):\n        with open(self.path) as f:"
             "\n            return"),
}
# token ids that are no text the tokenizer would make, 20 long (two blocks)
ID_PROMPT = [11, 503, 1999, 42, 42, 42, 777, 1024, 15, 300, 301, 302, 1500, 64, 900, 12, 13,
             1800, 256, 99]
CHATS = {
    "string": [{"role": "user", "content": "Write a function that adds two numbers."}],
    "parts": [{"role": "system", "content": "You answer in Python."},
              {"role": "user", "content": [{"type": "text", "text": "Sort a list"},
                                           {"type": "text", "text": "in place, please."}]}],
}


def _expect(stack: Stack, prompt_ids: list[int], got: Choice) -> None:
    want = hf_greedy(stack.model_dir, [prompt_ids], MAX_TOKENS)[0]
    assert got.token_ids == want, "greedy tokens differ from transformers'"
    assert got.finish_reason == "length"


def _check_usage(usage: Any, prompt_ids: list[int], completion_tokens: int) -> None:
    assert usage.prompt_tokens == len(prompt_ids)
    assert usage.completion_tokens == completion_tokens
    assert usage.total_tokens == len(prompt_ids) + completion_tokens


def _completion_both_ways(stack: Stack, prompt: str | list[int], prompt_ids: list[int]
                          ) -> None:
    client = stack.client()
    whole = client.completions.create(model=stack.model, prompt=prompt, **GREEDY)
    [got] = completion_choices(whole)
    _expect(stack, prompt_ids, got)
    assert extra(whole.choices[0], "prompt_token_ids") == prompt_ids
    _check_usage(whole.usage, prompt_ids, len(got.token_ids))

    stream = client.completions.create(model=stack.model, prompt=prompt, stream=True,
                                       stream_options={"include_usage": True}, **GREEDY)
    [streamed], chunks = collect_stream(stream, chat=False)
    assert streamed == got, "the streamed choice differs from the non-streamed one"
    # include_usage: a final chunk with no choices carries the usage; no other chunk does
    assert chunks[-1].choices == []
    _check_usage(chunks[-1].usage, prompt_ids, MAX_TOKENS)
    assert all(c.usage is None for c in chunks[:-1])


@pytest.mark.parametrize("name", sorted(TEXT_PROMPTS))
def test_text_completion_gives_hf_greedy_tokens(stack: Stack, tokenizer: Any, name: str
                                                ) -> None:
    prompt = TEXT_PROMPTS[name]
    _completion_both_ways(stack, prompt, list(tokenizer.encode(prompt)))


def test_token_id_completion_gives_hf_greedy_tokens(stack: Stack) -> None:
    _completion_both_ways(stack, ID_PROMPT, ID_PROMPT)


@pytest.mark.parametrize("name", sorted(CHATS))
def test_chat_gives_hf_greedy_tokens(stack: Stack, tokenizer: Any, name: str) -> None:
    messages = CHATS[name]
    prompt_ids = apply_chat_template(tokenizer, messages)
    client = stack.client()
    whole = client.chat.completions.create(model=stack.model, messages=messages, **GREEDY)
    [got] = chat_choices(whole)
    _expect(stack, prompt_ids, got)
    assert whole.choices[0].message.role == "assistant"
    assert got.text == tokenizer.decode(got.token_ids, skip_special_tokens=True)
    _check_usage(whole.usage, prompt_ids, MAX_TOKENS)

    stream = client.chat.completions.create(model=stack.model, messages=messages, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY)
    [streamed], chunks = collect_stream(stream, chat=True)
    assert streamed == got, "the streamed choice differs from the non-streamed one"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == []
    _check_usage(chunks[-1].usage, prompt_ids, MAX_TOKENS)


def test_max_completion_tokens_limits_a_chat(stack: Stack, tokenizer: Any) -> None:
    messages = CHATS["string"]
    reply = stack.client().chat.completions.create(
        model=stack.model, messages=messages, max_completion_tokens=5, temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True})
    [got] = chat_choices(reply)
    want = hf_greedy(stack.model_dir, [apply_chat_template(tokenizer, messages)], 5)[0]
    assert got.token_ids == want and got.finish_reason == "length"
    assert reply.usage.completion_tokens == 5


def test_a_batch_of_prompts_gives_one_choice_each_in_order(stack: Stack, tokenizer: Any
                                                           ) -> None:
    prompts = [TEXT_PROMPTS["short"], TEXT_PROMPTS["long"]]
    ids = [list(tokenizer.encode(p)) for p in prompts]
    want = hf_greedy(stack.model_dir, ids, MAX_TOKENS)
    client = stack.client()
    whole = client.completions.create(model=stack.model, prompt=prompts, **GREEDY)
    got = completion_choices(whole)
    assert [c.token_ids for c in got] == want
    assert [extra(c, "prompt_token_ids") for c in whole.choices] == ids
    _check_usage(whole.usage, ids[0] + ids[1], 2 * MAX_TOKENS)
    streamed, _ = collect_stream(client.completions.create(
        model=stack.model, prompt=prompts, stream=True, **GREEDY), chat=False)
    assert streamed == got


def test_a_repeated_prompt_reports_the_prefill_pods_cached_tokens(stack: Stack) -> None:
    prompt = list(range(100, 150))  # 50 tokens: three full blocks can be reused
    client = stack.client()
    first = client.completions.create(model=stack.model, prompt=prompt, max_tokens=2,
                                      temperature=0)
    second = client.completions.create(model=stack.model, prompt=prompt, max_tokens=2,
                                       temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens == 48
    assert second.choices[0].text == first.choices[0].text
