"""vLLM's utility endpoints and model cards, shaped as vLLM 0.32 answers them.

``POST /tokenize`` (a prompt, or chat messages through the template), ``POST /detokenize``,
``GET /version`` and the ``/v1/models`` cards (with ``created``, ``root``, ``parent`` and a
``permission`` list). Clients written against vLLM's server script against these shapes
(../shared/reference/vllm-responses.txt).
"""

from __future__ import annotations

import importlib.metadata
import uuid

from engine.tokenizer import apply_chat_template
from router import __version__
from router.errors import invalid
from router.preprocess import ModelInfo, check_model
from router.protocol import DetokenizeRequest, TokenizeRequest
from router.tools import template_messages


def version() -> dict:
    try:
        return {"version": importlib.metadata.version("pdserve")}
    except importlib.metadata.PackageNotFoundError:
        return {"version": __version__}


def model_card(info: ModelInfo, created: int) -> dict:
    return {
        "id": info.name, "object": "model", "created": created, "owned_by": "pdserve",
        "root": info.root or info.name, "parent": None, "max_model_len": info.max_model_len,
        "permission": [{
            "id": f"modelperm-{uuid.uuid4().hex[:16]}", "object": "model_permission",
            "created": created, "allow_create_engine": False, "allow_sampling": True,
            "allow_logprobs": True, "allow_search_indices": False, "allow_view": True,
            "allow_fine_tuning": False, "organization": "*", "group": None,
            "is_blocking": False}],
    }


def tokenize(req: TokenizeRequest, info: ModelInfo) -> dict:
    check_model(req.model, info)
    tok = info.tokenizer
    if (req.prompt is None) == (req.messages is None):
        raise invalid("give either prompt or messages", "prompt")
    if req.messages is not None:
        messages = template_messages([m.model_dump(exclude_none=False) for m in req.messages])
        ids = apply_chat_template(tok, messages, req.add_generation_prompt, req.tools)
        if req.add_special_tokens:  # the template writes its own; add more only if asked
            ids = list(tok.build_inputs_with_special_tokens(ids))
    else:
        assert req.prompt is not None
        add = True if req.add_special_tokens is None else req.add_special_tokens
        ids = list(tok.encode(req.prompt, add_special_tokens=add))
    return {"count": len(ids), "max_model_len": info.max_model_len, "tokens": ids,
            "token_strs": tok.convert_ids_to_tokens(ids) if req.return_token_strs else None}


def detokenize(req: DetokenizeRequest, info: ModelInfo) -> dict:
    check_model(req.model, info)
    bad = next((t for t in req.tokens if not 0 <= t < info.vocab_size), None)
    if bad is not None:
        raise invalid(f"token id {bad} is outside the vocabulary [0, {info.vocab_size})",
                      "tokens")
    return {"prompt": info.tokenizer.decode(req.tokens)}
