"""vLLM's tokenizer endpoints: POST /tokenize (a prompt or chat messages -> token ids), POST
/detokenize (token ids -> text) and GET /tokenizer_info (special tokens, the chat template).
lm-evaluation-harness's `local-completions` uses them as its "remote" tokenizer, so scoring
against this server needs no tokenizer download."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict
from starlette.requests import Request
from starlette.responses import Response

from qwen35.server.protocol import APIError, ChatCompletionRequest, ChatMessage, Tool
from qwen35.server.serving_chat import build_chat_prompt
from qwen35.server.serving_common import JSONResponse, ServerState


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None  # either a prompt ...
    messages: list[ChatMessage] | None = None  # ... or chat messages (rendered as for a chat)
    tools: list[Tool] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    chat_template: str | None = None
    add_generation_prompt: bool = True  # (chat messages: as in a chat request)
    continue_final_message: bool = False
    add_special_tokens: bool = True  # (Qwen's tokenizer adds none either way)
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[int]


def _tokenize(state: ServerState, req: TokenizeRequest) -> list[int]:
    if (req.prompt is None) == (req.messages is None):
        raise APIError("send either prompt or messages", param="prompt")
    text = req.prompt
    if req.messages is not None:
        chat = ChatCompletionRequest(
            messages=req.messages, tools=req.tools, chat_template_kwargs=req.chat_template_kwargs,
            chat_template=req.chat_template,
            add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message,
        )  # fmt: skip
        text = build_chat_prompt(state.engine, chat,
                                 state.config.trust_request_chat_template).text  # fmt: skip
    try:
        return state.engine.tokenizer.encode(text)
    except UnicodeError:
        raise APIError("prompt is not valid Unicode", param="prompt") from None


async def tokenize(state: ServerState, request: Request) -> Response:
    req: TokenizeRequest = await state.read_request(request, TokenizeRequest)
    state.check_model(req.model)
    ids = await state.offload(_tokenize, state, req)
    body: dict[str, Any] = {
        "count": len(ids),
        "max_model_len": getattr(state.engine, "max_model_len", None),
        "tokens": ids,
        "token_strs": [state.token_text(t)[0] for t in ids] if req.return_token_strs else None,
    }
    return JSONResponse(body)


def _detokenize(state: ServerState, ids: list[int]) -> str:
    engine = state.engine  # (the model's vocabulary: the tokenizer's, padded)
    vocab = getattr(getattr(engine, "config", None), "vocab_size", engine.tokenizer.vocab_size)
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(f"token id {bad} is outside the vocabulary [0, {vocab})", param="tokens")
    return state.engine.tokenizer.decode(ids)


async def detokenize(state: ServerState, request: Request) -> Response:
    req: DetokenizeRequest = await state.read_request(request, DetokenizeRequest)
    state.check_model(req.model)
    return JSONResponse({"prompt": await state.offload(_detokenize, state, req.tokens)})


def tokenizer_info(state: ServerState) -> dict[str, Any]:
    engine = state.engine
    template = engine.chat_template
    specials = dict(template.special_tokens)
    eos = engine.tokenizer.eos_token_ids
    if "eos_token" not in specials and eos:
        specials["eos_token"] = engine.tokenizer.decode([eos[0]])
    return {
        "eos_token": specials.get("eos_token"),
        "bos_token": specials.get("bos_token"),
        "pad_token": specials.get("pad_token"),
        "chat_template": template.source,  # None: the built-in Qwen 3.5 renderer
        "model_max_length": getattr(engine, "max_model_len", None),
        "vocab_size": engine.tokenizer.vocab_size,
    }
