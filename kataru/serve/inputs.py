"""A request's body made into what the engine takes: its JSON, the prompt's token ids (the checkpoint's own prompt
format for a conversation), and its sampling over the checkpoint's defaults. Every refusal is a 400 naming
the field."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request

from kataru.errors import KataruError
from kataru.llm import LLM
from kataru.sampling import SamplingParams
from kataru.serve.protocol import APIError, CompletionRequest, Sampling


async def read_json(request: Request) -> Any:
    data = await request.body()
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise APIError(400, "the request body is not UTF-8") from None
    except json.JSONDecodeError as err:
        raise APIError(400, f"the request body is not valid JSON ({err.msg} at line {err.lineno})") from None


def encode(llm: LLM, text: str, add_special_tokens: bool) -> list[int]:
    try:
        return llm.tokenizer.encode(text, add_special_tokens=add_special_tokens)
    except KataruError as err:
        raise APIError(400, str(err)) from None


def check_ids(llm: LLM, ids: list[int], param: str) -> None:
    vocab = llm.config.vocab_size
    bad = next((i for i in ids if not 0 <= i < vocab), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is outside the vocabulary (0..{vocab - 1})", param=param)


def chat_prompt(llm: LLM, messages: list[Any], add_special_tokens: bool | None) -> list[int]:
    """The checkpoint's own prompt for a conversation (the one `kataru generate` builds), as token ids."""
    conversation = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
    style = llm.prompt_style
    if style.name == "raw" and [m["role"] for m in conversation] != ["user"]:
        raise APIError(400, "this is a base model with no chat template: send one user message (its text is "
                            "continued as it is), or use /v1/completions", param="messages")
    try:
        text = style.render(style.messages(conversation), llm.tokenizer)
    except KataruError as err:
        raise APIError(400, str(err), param="messages") from None
    special = style.add_special_tokens if add_special_tokens is None else add_special_tokens
    return encode(llm, text, special)


def completion_prompts(llm: LLM, body: CompletionRequest) -> list[list[int]]:
    prompt = body.prompt
    if isinstance(prompt, str):
        prompts = [encode(llm, prompt, body.add_special_tokens)]
    elif prompt and all(isinstance(p, str) for p in prompt):
        prompts = [encode(llm, p, body.add_special_tokens) for p in prompt]  # type: ignore[arg-type]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]  # type: ignore[arg-type]
    else:
        prompts = [list(p) for p in prompt]  # type: ignore[union-attr]
    if not prompts or not all(prompts):
        raise APIError(400, "the prompt is empty", param="prompt")
    for ids in prompts:
        check_ids(llm, ids, "prompt")
    return prompts


def sampling(llm: LLM, body: Sampling, prompt: list[int], max_tokens: int | None,
             logprobs: int | None) -> SamplingParams:
    """The request's sampling over the checkpoint's defaults; a prompt that leaves no room is a 400."""
    context = llm.config.max_seq_len
    if len(prompt) >= context:
        raise APIError(400, f"This model's maximum context length is {context} tokens. However, your prompt is "
                            f"{len(prompt)} tokens; shorten it.", param="messages", code="context_length_exceeded")
    if max_tokens is not None and len(prompt) + max_tokens > context:
        raise APIError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                            f"{len(prompt) + max_tokens} tokens ({len(prompt)} in the prompt, {max_tokens} for the "
                            "completion). Lower max_tokens or shorten the prompt.", param="max_tokens",
                       code="context_length_exceeded")
    if body.min_p:
        raise APIError(400, "min_p is not supported", param="min_p")
    if body.logit_bias:
        raise APIError(400, "logit_bias is not supported", param="logit_bias")
    overrides: dict[str, Any] = {
        "max_new_tokens": max_tokens if max_tokens is not None else min(llm.defaults.max_new_tokens,
                                                                          context - len(prompt)),
        "top_p": body.top_p, "repetition_penalty": body.repetition_penalty, "seed": body.seed,
        "frequency_penalty": body.frequency_penalty, "presence_penalty": body.presence_penalty,
        "ignore_eos": body.ignore_eos or None, "logprobs": logprobs,
        "stop": [body.stop] if isinstance(body.stop, str) else body.stop,
        "stop_token_ids": body.stop_token_ids,
        "top_k": None if body.top_k is None else max(body.top_k, 0),
        "speculate": "off" if body.speculate is False else None,
    }
    if body.temperature is not None:  # OpenAI: a temperature above 0 samples, 0 is greedy
        overrides.update(temperature=body.temperature, do_sample=body.temperature > 0)
    if body.response_format is not None:
        overrides["grammar"] = grammar_of(body.response_format)
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options")
    try:
        return llm.sampling(**overrides)
    except KataruError as err:
        raise APIError(400, str(err)) from None


def grammar_of(response_format: dict[str, Any]) -> str | None:
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind not in ("json_object", "json_schema"):
        raise APIError(400, f"response_format type {kind!r} is not supported; use text, json_object or "
                            "json_schema", param="response_format")
    from kataru.grammar import json_grammar, schema_of

    try:
        return json_grammar(schema_of(response_format))
    except KataruError as err:
        raise APIError(400, str(err), param="response_format") from None
