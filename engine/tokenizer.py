"""The engine's text side: loading a model's tokenizer, chat templates, and incremental
detokenization with stop strings.

Owns everything that turns text into token ids and back for a stream: the router and the
offline ``LLM`` facade both use ``IncrementalDetokenizer`` so that streamed and
non-streamed text are the same by construction. No torch here (transformers imports it
lazily only where a model is built).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import InvalidRequestError, ModelLoadError

# Tokens of prompt context decoded in front of the first generated token, so that tokenizers
# whose decoding depends on the left neighbour (SentencePiece's leading space) render the
# first generated token as it reads inside the full text. vLLM uses the same window.
_PROMPT_CONTEXT = 5
_REPLACEMENT = "\ufffd"


def load_tokenizer(model_dir: str | Path) -> Any:
    """Load the tokenizer saved in ``model_dir`` (local files only, never the hub)."""
    path = Path(model_dir)
    if not path.is_dir():
        raise ModelLoadError(f"model directory {str(path)!r} does not exist")
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model",
                                                     "vocab.json", "tokenizer_config.json")):
        raise ModelLoadError(f"no tokenizer files (tokenizer.json, tokenizer_config.json) "
                             f"in {str(path)!r}")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # transformers raises many types for a broken directory
        raise ModelLoadError(
            f"cannot load the tokenizer from {str(path)!r}: {type(exc).__name__}: {exc}"
        ) from None


def _message_text(message: dict, index: int) -> dict:
    """A copy of ``message`` whose content is a plain string (text parts joined)."""
    if not isinstance(message, dict):
        raise InvalidRequestError(f"messages[{index}] must be an object", f"messages.{index}")
    role = message.get("role")
    if not isinstance(role, str) or not role:
        raise InvalidRequestError(f"messages[{index}].role must be a non-empty string",
                                  f"messages.{index}.role")
    content = message.get("content")
    if content is None or isinstance(content, str):
        return {**message, "content": content or ""}
    if not isinstance(content, list):
        raise InvalidRequestError(
            f"messages[{index}].content must be a string or a list of text parts",
            f"messages.{index}.content")
    texts: list[str] = []
    for j, part in enumerate(content):
        param = f"messages.{index}.content.{j}"
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise InvalidRequestError(
                f"messages[{index}].content[{j}]: only text parts are supported, got {kind!r}",
                param)
        text = part.get("text")
        if not isinstance(text, str):
            raise InvalidRequestError(f"messages[{index}].content[{j}].text must be a string",
                                      param)
        texts.append(text)
    # vLLM joins text parts with a newline; clients that split one text into parts expect it.
    return {**message, "content": "\n".join(texts)}


def apply_chat_template(tokenizer: Any, messages: list[dict],
                        add_generation_prompt: bool = True,
                        tools: list[dict] | None = None) -> list[int]:
    """Render ``messages`` (and ``tools``, for templates that show them) with the model's
    chat template and return the token ids."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages must be a non-empty list", "messages")
    plain = [_message_text(m, i) for i, m in enumerate(messages)]
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError("this model's tokenizer has no chat template; "
                                  "use /v1/completions", "messages")
    try:
        extra = {"tools": tools} if tools else {}
        text = tokenizer.apply_chat_template(plain, add_generation_prompt=add_generation_prompt,
                                             tokenize=False, **extra)
    except Exception as exc:  # a template may raise (jinja's raise_exception) on bad input
        raise InvalidRequestError(f"cannot apply the chat template: {exc}", "messages") from None
    # The template writes any BOS itself; adding special tokens again would double it.
    return list(tokenizer.encode(text, add_special_tokens=False))


@dataclass(slots=True)
class DetokDelta:
    """What one ``IncrementalDetokenizer.add`` call produced."""

    text: str  # new text to emit (never a partial character, never a possible stop prefix)
    stopped: bool = False  # a stop string was hit; the sequence is over
    # How many of the added token ids belong to the output: all of them unless a stop string
    # ended the sequence part-way through the batch (then through the token that completed it).
    num_tokens: int = 0


class IncrementalDetokenizer:
    """Turns a growing list of generated token ids into text, chunk by chunk.

    Decodes a small sliding window (vLLM's offset scheme): ``prefix`` is text already
    accounted for, the new text is what decoding the window adds beyond it. Text ending in
    U+FFFD (an incomplete UTF-8 sequence split across tokens) is held until it completes
    (and dropped if the sequence ends first).
    Stop strings: the text is cut before the first stop string (or after it with
    ``include_stop_str_in_output``); a suffix that could still become a stop string is held
    back until decided. A token of ``stop_token_ids`` ends the text too, without its own
    text unless ``include_stop_str_in_output`` (as vLLM does); its id still counts.
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], stop: list[str] | None = None,
                 include_stop_str_in_output: bool = False,
                 skip_special_tokens: bool = True,
                 stop_token_ids: list[int] | None = None) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._stop = [s for s in (stop or []) if s]  # an empty stop string would match anywhere
        self._include_stop = include_stop_str_in_output
        self._stop_ids = frozenset(stop_token_ids or ())
        self._max_hold = max((len(s) for s in self._stop), default=1) - 1
        self._ids: list[int] = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._pending = ""  # decoded text not yet emitted (a possible stop-string prefix)
        self.stopped = False
        self.stop_str: str | None = None  # the stop string that ended the sequence

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def _step(self, token_id: int) -> str:
        """Append one token; return the text it completes ('' while a character is partial)."""
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full = self._decode(self._ids[self._prefix_offset:])
        if len(full) <= len(prefix) or full.endswith(_REPLACEMENT):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        if self._prefix_offset > 64:  # keep the window list short on long generations
            del self._ids[:self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
        return full[len(prefix):]

    def _find_stop(self, text: str) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        for s in self._stop:
            pos = text.find(s)
            if pos >= 0 and (best is None or pos < best[0]):
                best = (pos, s)
        return best

    def _hold_length(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        for n in range(min(self._max_hold, len(text)), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self._stop):
                return n
        return 0

    def _cut_at_stop(self, text: str) -> str | None:
        """If ``text`` contains a stop string: mark stopped, return the text to emit."""
        found = self._find_stop(text)
        if found is None:
            return None
        pos, s = found
        self.stopped, self.stop_str = True, s
        self._pending = ""
        return text[:pos + len(s)] if self._include_stop else text[:pos]

    def add(self, token_ids: list[int]) -> DetokDelta:
        if self.stopped:
            return DetokDelta("", True, 0)
        out: list[str] = []
        for i, token_id in enumerate(token_ids):
            if token_id in self._stop_ids and not self._include_stop:
                out.append(self.flush())  # what was held back is final now
                self.stopped = True
                return DetokDelta("".join(out), True, i + 1)
            new = self._step(int(token_id))
            if not new:
                continue
            text = self._pending + new
            if self._stop:
                cut = self._cut_at_stop(text)
                if cut is not None:
                    out.append(cut)
                    return DetokDelta("".join(out), True, i + 1)
                hold = self._hold_length(text)
                self._pending = text[len(text) - hold:] if hold else ""
                text = text[:len(text) - hold]
            out.append(text)
        return DetokDelta("".join(out), False, len(token_ids))

    def flush(self) -> str:
        """The held-back remainder once the sequence has ended (no more tokens will come)."""
        if self.stopped:
            return ""
        tail = ""
        if self._read_offset < len(self._ids):  # an incomplete character at the very end
            prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
            tail = self._decode(self._ids[self._prefix_offset:])[len(prefix):]
            # the bytes of a character the sequence ended inside of are dropped, as vLLM
            # does, rather than shown as U+FFFD
            tail = tail.rstrip(_REPLACEMENT)
            self._prefix_offset = self._read_offset = len(self._ids)
        text = self._pending + tail
        self._pending = ""
        cut = self._cut_at_stop(text) if self._stop else None
        return text if cut is None else cut


class TokenBytes:
    """The exact bytes and display text of single tokens (for logprobs), cached per id."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self._cache: dict[int, tuple[str, bytes]] = {}
        self._byte_level = _is_byte_level(tokenizer)
        # GPT-2's byte-to-unicode table, inverted: byte-level tokens spell raw bytes with it.
        self._unicode_to_byte = {c: b for b, c in _bytes_to_unicode().items()}

    def get(self, token_id: int) -> tuple[str, bytes]:
        hit = self._cache.get(token_id)
        if hit is None:
            raw = self._raw_bytes(token_id)
            hit = (raw.decode("utf-8", errors="replace"), raw)
            self._cache[token_id] = hit
        return hit

    def _raw_bytes(self, token_id: int) -> bytes:
        piece = self._tok.convert_ids_to_tokens(token_id)
        if isinstance(piece, str) and token_id not in self._tok.all_special_ids:
            if self._byte_level and all(c in self._unicode_to_byte for c in piece):
                return bytes(self._unicode_to_byte[c] for c in piece)
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                try:  # SentencePiece byte-fallback tokens spell one byte as <0xAB>
                    return bytes([int(piece[3:5], 16)])
                except ValueError:
                    pass
        return self._tok.decode([token_id], skip_special_tokens=False).encode("utf-8")


def _is_byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    try:
        decoder = json.loads(backend.to_str()).get("decoder") or {}
    except (ValueError, AttributeError):
        return False
    kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders") or []]
    return "ByteLevel" in kinds


def _bytes_to_unicode() -> dict[int, str]:
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table
