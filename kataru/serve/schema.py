"""The server's OpenAPI description, whole: every route with its request body (the protocol's own models, which
parse the bodies), every answer it gives and the error object every other status carries. Clients generate
from it, readers read it at /docs, and the fuzzer (schemathesis, `tests/test_fuzz.py`) checks the server
against it: a request the schema allows gets one of the statuses listed, in the shape listed.

The answer models here describe; the routes build their answers as dicts (`app.Job.answer`).
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from kataru.serve.protocol import ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error object: what every status but 200 carries."""

    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok", "loading", "error"]
    message: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int
    meta: dict[str, Any]


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: dict[str, Any] | None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict[str, Any] | None
    finish_reason: Literal["stop", "length"]


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class Tokenized(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class Detokenized(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    tokenizer_class: str | None
    eos_token: str | None
    bos_token: str | None
    pad_token: str | None
    unk_token: str | None
    chat_template: str | None
    add_bos_token: bool
    add_eos_token: bool
    model_max_length: int
    vocab_size: int
    prompt_style: str


MODELS = (ErrorResponse, Health, ModelList, ChatCompletion, Completion, Tokenized, Detokenized, TokenizerInfo,
          ChatRequest, CompletionRequest, TokenizeRequest, DetokenizeRequest)
ERRORS = {  # status: when
    "400": "the body is not JSON, a field has the wrong type or range, the prompt does not fit the context, or a "
           "feature is not supported (the error names the field)",
    "401": "the API key is missing or wrong",
    "404": "no such model (or route)",
    "405": "the route does not take this method",
    "413": "the body is larger than the server's limit",
    "429": "the queue is full: retry after the Retry-After header's seconds",
    "500": "the engine failed on this request (the server goes on)",
    "503": "the model is still loading, or failed to load",
}
# route: (method, request model, answer model, media types of a 200, the errors it may give)
ROUTES: dict[str, tuple[str, type[BaseModel] | None, type[BaseModel] | None, tuple[str, ...], tuple[str, ...]]] = {
    "/health": ("get", None, Health, ("application/json",), ("503",)),
    "/v1/models": ("get", None, ModelList, ("application/json",), ("401", "503")),
    "/metrics": ("get", None, None, ("text/plain",), ("401",)),
    "/tokenizer_info": ("get", None, TokenizerInfo, ("application/json",), ("401", "503")),
    "/tokenize": ("post", TokenizeRequest, Tokenized, ("application/json",), ("400", "401", "404", "413", "503")),
    "/detokenize": ("post", DetokenizeRequest, Detokenized, ("application/json",),
                    ("400", "401", "404", "413", "503")),
    "/v1/chat/completions": ("post", ChatRequest, ChatCompletion, ("application/json", "text/event-stream"),
                             ("400", "401", "404", "413", "429", "500", "503")),
    "/v1/completions": ("post", CompletionRequest, Completion, ("application/json", "text/event-stream"),
                        ("400", "401", "404", "413", "429", "500", "503")),
}


# One server-sent event: `data` is a JSON chunk (OpenAI's, or an error object after the headers) or [DONE].
SSE_EVENT = {"type": "object", "properties": {"data": {"type": "string"}, "event": {"type": "string"},
                                              "id": {"type": "string"}}, "required": ["data"]}


def ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def openapi(app: FastAPI, served_model_name: str | None = None) -> dict[str, Any]:
    """The app's OpenAPI document with the bodies, answers and errors of every route (made once, then kept); a
    body's `model` is the one name this server serves (or left out)."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title="kataru", version="1", description="The OpenAI API (and vLLM's tokenizer routes) "
                         "over one kataru engine. A field this schema does not list is ignored.", routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in MODELS:
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        if served_model_name is not None and "model" in body.get("properties", {}):
            body["properties"]["model"] = {"anyOf": [{"enum": [served_model_name]}, {"type": "null"}],
                                           "default": None, "title": "Model"}
        components[model.__name__] = body
    for path, (method, request, answer, media, errors) in ROUTES.items():
        operation = schema["paths"].setdefault(path, {}).setdefault(method, {})
        if request is not None:
            operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref(request)}}}
        ok = {"schema": ref(answer)} if answer is not None else {"schema": {"type": "string"}}
        content = {m: ok if m == "application/json" else {"schema": {"type": "string"}} if m == "text/plain"
                   else {"schema": SSE_EVENT} for m in media}
        operation["responses"] = {
            "200": {"description": "the answer" + (" (text/event-stream when the body asks to stream: OpenAI's "
                                                   "chunks, then [DONE])" if "text/event-stream" in media else ""),
                    "content": content},
            **{status: {"description": ERRORS[status], "content": {"application/json": {"schema": ref(ErrorResponse)}}}
               for status in (*errors, "405")},
        }
        if "401" in errors:
            operation["security"] = [{"bearer": []}]
    components_root = schema["components"]
    components_root["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    app.openapi_schema = schema
    return schema
