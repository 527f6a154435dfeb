"""Reading a request body into JSON the endpoints can trust: size, syntax, depth, text.

Everything wrong here is the client's fault and a 400 in OpenAI's shape, found before
pydantic or the tokenizer see the data: a body over ``--max-body-bytes`` (cut off while
reading, so a huge upload costs no memory), JSON that is not JSON (NaN and Infinity
included), nesting deeper than ``--max-json-depth`` (the C parser would otherwise raise
RecursionError, and schemas and templates recurse too), and lone UTF-16 surrogates
(``"\\ud800"`` is valid JSON but no valid text: the tokenizer and every UTF-8 encoder
refuse it).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request

from router.errors import APIError, invalid


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The raw body, refused as soon as it is known to exceed ``max_bytes``.

    A 400, not HTTP's 413: every limit answers alike (OpenAI's clients raise
    BadRequestError), and the message names the limit."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(int(declared), max_bytes)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(size, max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int, max_bytes: int) -> APIError:
    return APIError(400, f"the request body has at least {size} bytes, over the limit of "
                    f"{max_bytes} (--max-body-bytes)", "invalid_request_error",
                    code="max_body_bytes")


def parse_json_object(body: bytes, max_depth: int) -> dict[str, Any]:
    """``body`` as a JSON object, or a 400 saying why not."""
    try:
        data = json.loads(body, parse_constant=_no_constants)
    except RecursionError:
        raise _too_deep(max_depth) from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise invalid(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise invalid("the request body must be a JSON object", code="invalid_json")
    check_tree(data, max_depth)
    return data


def _too_deep(max_depth: int) -> APIError:
    return invalid(f"the request body nests deeper than {max_depth} levels (--max-json-depth)",
                   code="max_json_depth")


def check_tree(data: Any, max_depth: int) -> None:
    """Refuse nesting deeper than ``max_depth`` and strings with lone surrogates.

    Iterative (an explicit stack), so the check itself cannot hit the recursion limit.
    """
    stack: list[tuple[Any, int, str]] = [(data, 1, "")]
    while stack:
        node, depth, where = stack.pop()
        if isinstance(node, str):
            _check_text(node, where)
            continue
        if not isinstance(node, (dict, list)):
            continue
        if depth > max_depth:
            raise _too_deep(max_depth)
        if isinstance(node, dict):
            for key, value in node.items():
                path = f"{where}.{key}" if where else str(key)
                _check_text(key, path)
                if isinstance(value, (str, dict, list)):
                    stack.append((value, depth + 1, path))
        else:
            for i, value in enumerate(node):
                if isinstance(value, (str, dict, list)):
                    stack.append((value, depth + 1, f"{where}.{i}" if where else str(i)))


def _check_text(text: str, where: str) -> None:
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            # Name the field, not the text: echoing a surrogate back would break the answer.
            raise invalid(f"{where or 'the request body'}: the text contains a lone UTF-16 "
                          "surrogate, which is not valid Unicode", where or None,
                          "invalid_unicode") from None
