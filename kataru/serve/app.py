"""`kataru serve`: the OpenAI API over one engine, on FastAPI and uvicorn.

The model loads on a thread after the server starts (`/health` answers 503 until it is ready). Every
generation request becomes engine requests (one per choice); the engine steps on its own worker thread, so
the event loop only moves bytes. A client that goes away cancels its requests at once, which frees their
rows and budget. Every route but `/health` (and `/metrics` when public) needs the API key when one is set.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from kataru.engine import Request as EngineRequest
from kataru.errors import KataruError
from kataru.llm import LLM
from kataru.sampling import SamplingParams
from kataru.serve.metrics import Metrics
from kataru.serve.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    Sampling,
    TokenizeRequest,
    parse,
    usage,
)
from kataru.serve.schema import openapi

log = logging.getLogger("kataru.serve")
PUBLIC = {"/health", "/", "/page/markdown-it.min.js", "/openapi.json"}  # the page and the schema hold no secrets
PAGE = Path(__file__).with_name("page")


@dataclass
class Settings:
    served_model_name: str
    api_keys: list[str] = field(default_factory=list)
    max_queue: int = 256  # requests waiting for a row at most; more get 429
    max_body_bytes: int = 4 << 20
    log_prompts: bool = False
    metrics_public: bool = False


class Server:
    """One serving process: the model (loaded in the background), its engine, the metrics."""

    def __init__(self, load: Callable[[], LLM], settings: Settings) -> None:
        self.load, self.settings = load, settings
        self.llm: LLM | None = None
        self.failure: str | None = None
        self.created = int(time.time())
        self.metrics = Metrics(lambda: self.llm.engine.stats() if self.llm else None)

    def start_loading(self) -> None:
        def target() -> None:
            try:
                self.llm = self.load()
            except KataruError as err:
                self.failure = str(err)
                log.error("kataru: error: %s", err)
            except Exception as err:
                self.failure = f"{type(err).__name__}: {err}"
                log.exception("loading the model failed")

        threading.Thread(target=target, name="kataru-load", daemon=True).start()

    def ready(self) -> LLM:
        if self.llm is None:
            raise APIError(503, self.failure or "the model is still loading; retry when /health answers 200",
                           type="unavailable_error")
        return self.llm

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.settings.served_model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves "
                                f"`{self.settings.served_model_name}`", type="not_found_error", param="model",
                           code="model_not_found")


def create_app(load: Callable[[], LLM], settings: Settings) -> FastAPI:
    server = Server(load, settings)

    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.start_loading()
        yield
        if server.llm is not None:  # shutting down: whatever is still running is cancelled
            engine = server.llm.engine
            for request in [*engine.scheduler.waiting, *engine.scheduler.prefilling, *engine.scheduler.running]:
                engine.cancel(request)

    app = FastAPI(title="kataru", lifespan=lifespan)
    app.state.server = server
    app.add_middleware(Guard, settings=settings)
    app.openapi = lambda: openapi(app, settings.served_model_name)  # type: ignore[method-assign]

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        """Starlette's own answers (no such route, a method the route does not take) in OpenAI's shape too."""
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(err.status_code, "invalid_request_error")
        message = {404: f"no route {request.url.path}; see /docs for the API",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(err.status_code, str(err.detail))
        return JSONResponse(APIError(err.status_code, message, type=kind).body(), status_code=err.status_code,
                            headers=getattr(err, "headers", None))

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        """The chat page. Its own scripts run by nonce; nothing else may run or load from elsewhere."""
        nonce = secrets.token_urlsafe(16)
        html = (PAGE / "index.html").read_text("utf-8").replace("{{nonce}}", nonce)
        policy = (f"default-src 'self'; script-src 'self' 'nonce-{nonce}'; style-src 'self' 'nonce-{nonce}'; "
                  "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'self'; "
                  "frame-ancestors 'none'")
        return HTMLResponse(html, headers={"Content-Security-Policy": policy, "Cache-Control": "no-cache",
                                           "X-Content-Type-Options": "nosniff"})

    @app.get("/page/markdown-it.min.js", include_in_schema=False)
    async def markdown_it() -> FileResponse:
        return FileResponse(PAGE / "markdown-it.min.js", media_type="text/javascript",
                            headers={"Cache-Control": "max-age=86400"})

    @app.get("/health")
    async def health() -> JSONResponse:
        if server.llm is None:
            return JSONResponse({"status": "error" if server.failure else "loading", "message": server.failure},
                                status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        llm = server.ready()
        return {"object": "list", "data": [{
            "id": settings.served_model_name, "object": "model", "created": server.created, "owned_by": "kataru",
            "max_model_len": llm.config.max_seq_len,
            "meta": {"family": llm.config.family, "n_params": llm.config.num_parameters(),
                     "n_ctx_train": llm.config.max_seq_len, "prompt_style": llm.prompt_style.name,
                     "dtype": str(llm.dtype).removeprefix("torch."), "quantization": llm.quantization,
                     "sampling": {k: v for k, v in vars(llm.defaults).items() if k != "stop"}}}]}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        llm = server.ready()
        t = llm.tokenizer
        return {"tokenizer_class": t.config.get("tokenizer_class"), "eos_token": t.special_strings.get("eos_token"),
                "bos_token": t.special_strings.get("bos_token"), "pad_token": t.special_strings.get("pad_token"),
                "unk_token": t.special_strings.get("unk_token"), "chat_template": t.chat_template,
                "add_bos_token": t.add_bos, "add_eos_token": t.add_eos, "model_max_length": llm.config.max_seq_len,
                "vocab_size": t.vocab_size, "prompt_style": llm.prompt_style.name}

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        llm = server.ready()
        body = parse(TokenizeRequest, await read_json(request))
        server.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give either prompt or messages", param="prompt")
        if body.messages is not None:
            ids = chat_prompt(llm, body.messages, body.add_special_tokens)
        else:
            ids = encode(llm, body.prompt or "", True if body.add_special_tokens is None else body.add_special_tokens)
        out: dict[str, Any] = {"count": len(ids), "max_model_len": llm.config.max_seq_len, "tokens": ids}
        if body.return_token_strs:
            out["token_strs"] = [llm.tokenizer.id_to_token(i) for i in ids]
        return out

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        llm = server.ready()
        body = parse(DetokenizeRequest, await read_json(request))
        server.check_model(body.model)
        check_ids(llm, body.tokens, "tokens")
        return {"prompt": llm.tokenizer.decode(body.tokens)}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        llm = server.ready()
        body = parse(ChatRequest, await read_json(request))
        server.check_model(body.model)
        prompt = chat_prompt(llm, body.messages, body.add_special_tokens)
        limit = body.max_completion_tokens or body.max_tokens
        params = sampling(llm, body, prompt, limit, body.top_logprobs or 0 if body.logprobs else None)
        job = Job(server, request, "chat", [prompt], params, body)
        return await job.respond()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        llm = server.ready()
        body = parse(CompletionRequest, await read_json(request))
        server.check_model(body.model)
        if body.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        prompts = completion_prompts(llm, body)
        if body.max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens 0 only makes sense with echo (the prompt's log-probabilities)",
                           param="max_tokens")
        limit = 16 if body.max_tokens is None else body.max_tokens
        params = [sampling(llm, body, p, max(limit, 1), body.logprobs) for p in prompts]
        job = Job(server, request, "completion", prompts, params[0], body, per_prompt=params, generate=limit > 0)
        return await job.respond()

    return app


# --- requests ------------------------------------------------------------------------------------------
class Guard:
    """Pure ASGI middleware in front of every route: the API key, the body size limit (declared or streamed)
    and the access log of the routes that do not log themselves (generation logs its tokens when done)."""

    def __init__(self, app: Any, settings: Settings) -> None:
        self.app, self.settings = app, settings

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, path, status = time.monotonic(), scope["path"], [0]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        settings = self.settings
        try:
            admit(path, headers, settings.api_keys, settings.max_body_bytes, settings.metrics_public)
        except APIError as err:
            await JSONResponse(err.body(), status_code=err.status, headers=err.headers)(scope, receive, send)
            status[0] = err.status
        else:
            received = [0]

            async def limited() -> dict[str, Any]:
                message = await receive()
                if message["type"] == "http.request":
                    received[0] += len(message.get("body", b""))
                    if received[0] > settings.max_body_bytes:
                        raise too_large(received[0], settings.max_body_bytes)
                return message

            async def sending(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    status[0] = message["status"]
                await send(message)

            await self.app(scope, limited, sending)
        if not path.startswith("/v1/") or status[0] != 200:
            log.info("%s %s %s %d %.3fs", headers.get("x-request-id", "-"), scope["method"], path, status[0],
                     time.monotonic() - started)


def admit(path: str, headers: Mapping[str, str], api_keys: list[str], max_body_bytes: int,
          metrics_public: bool) -> None:
    """What is checked before a request is read: the API key (on every route but the public ones) and the
    body size its headers declare. `headers` with lower-case names."""
    if api_keys and path not in PUBLIC and not (path == "/metrics" and metrics_public):
        authorize(headers.get("authorization"), api_keys)
    size = headers.get("content-length", "")
    if size.isdigit() and int(size) > max_body_bytes:
        raise too_large(int(size), max_body_bytes)


def too_large(size: int, limit: int) -> APIError:
    return APIError(413, f"the request body is {size} bytes or more, beyond this server's limit of {limit}",
                    code="request_too_large")


def authorize(header: str | None, keys: list[str]) -> None:
    """A bearer key equal to one of the keys, compared in constant time (every key, always)."""
    given = header[7:] if header and header.startswith("Bearer ") else ""
    matched = False
    for key in keys:
        matched |= secrets.compare_digest(given.encode(), key.encode())
    if not matched:
        raise APIError(401, "a valid API key is required: send Authorization: Bearer <key>",
                       type="authentication_error", code="invalid_api_key")


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


# --- answering -----------------------------------------------------------------------------------------
class Job:
    """One API request: its engine requests (prompt x n), answered whole or as a stream."""

    def __init__(self, server: Server, http: Request, kind: str, prompts: list[list[int]], params: SamplingParams,
                 body: Any, per_prompt: list[SamplingParams] | None = None, generate: bool = True) -> None:
        self.server, self.http, self.kind, self.prompts, self.body = server, http, kind, prompts, body
        self.llm = server.ready()
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.generate = generate
        self.params = per_prompt or [params] * len(prompts)
        self.n = body.n
        self.echo = getattr(body, "echo", False)
        self.requests: list[EngineRequest] = []
        self.token_times: dict[int, list[float]] = {}
        self.started = time.monotonic()

    def submit(self) -> None:
        engine = self.llm.engine
        if not self.generate:
            return
        waiting = engine.stats()["waiting"]
        if waiting + len(self.prompts) * self.n > self.server.settings.max_queue:
            raise APIError(429, f"the server has {waiting} requests waiting (the limit is "
                                f"{self.server.settings.max_queue}); retry shortly", type="rate_limit_error",
                           headers={"Retry-After": "1"})
        metrics = self.server.metrics
        try:
            for prompt, params in zip(self.prompts, self.params, strict=True):
                for i in range(self.n):
                    seed = None if params.seed is None else (params.seed + i) % 2**63
                    request = engine.submit(prompt, SamplingParams(**{**vars(params), "seed": seed}))
                    request.on_finish = lambda r: metrics.finished(r, self.token_times.get(r.id, []))
                    self.requests.append(request)
        except KataruError as err:
            for request in self.requests:
                engine.cancel(request)
            raise APIError(400, str(err)) from None

    async def respond(self) -> Response:
        self.submit()
        if self.body.stream:
            return StreamingResponse(self.events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Request-Id": self.id})
        prompt_logprobs = await self.prompt_logprobs()
        waiting = asyncio.ensure_future(self.run())
        try:
            while not waiting.done():  # a client that goes away cancels its requests
                done, _ = await asyncio.wait({waiting}, timeout=0.1)
                if not done and await self.http.is_disconnected():
                    waiting.cancel()
                    self.finish_log(499)
                    return Response(status_code=499)
            await waiting
        finally:
            if not waiting.done():
                waiting.cancel()
        failed = next((r for r in self.requests if r.finish_reason == "error"), None)
        if failed is not None:
            self.finish_log(500)
            raise APIError(500, failed.error or "the engine failed", type="server_error")
        self.finish_log(200)
        return JSONResponse(self.answer(prompt_logprobs), headers={"X-Request-Id": self.id})

    async def run(self) -> None:
        async with aclosing(self.llm.engine.watch(self.requests)) as updates:  # closed (cancelling) at once
            async for _ in updates:
                self.note_times()

    def note_times(self) -> None:
        now = time.monotonic()
        for r in self.requests:
            times = self.token_times.setdefault(r.id, [])
            times.extend([now] * (len(r.tokens) - len(times)))

    def finish_log(self, status: int) -> None:
        prompt_tokens = sum(len(p) for p in self.prompts)
        completion = sum(len(r.tokens) for r in self.requests)
        text = f" prompt={json.dumps(self.llm.tokenizer.decode(self.prompts[0]), ensure_ascii=False)}" \
            if self.server.settings.log_prompts else ""
        log.info("%s POST %s %d prompt_tokens=%d completion_tokens=%d %.3fs%s", self.id, self.http.url.path, status,
                 prompt_tokens, completion, time.monotonic() - self.started, text)

    # --- whole answers --------------------------------------------------------------------------------
    def answer(self, prompt_logprobs: list[list[Any]] | None) -> dict[str, Any]:
        choices = []
        for index in range(len(self.prompts) * self.n):
            prompt = self.prompts[index // self.n]
            request = self.requests[index] if self.generate else None
            if self.kind == "chat":
                assert request is not None
                choices.append({"index": index, "message": {"role": "assistant", "content": request.text},
                                "logprobs": self.chat_logprobs(request, 0) if request.params.logprobs is not None
                                else None, "finish_reason": finish(request)})
            else:
                text = (self.llm.tokenizer.decode(prompt) if self.echo else "") + (request.text if request else "")
                choices.append({"index": index, "text": text, "logprobs": self.completion_logprobs(
                    request, prompt, prompt_logprobs[index // self.n] if prompt_logprobs else None),
                    "finish_reason": finish(request) if request else "length"})
        completion_tokens = sum(len(r.tokens) for r in self.requests)
        prompt_tokens = sum(len(p) for p in self.prompts) * (self.n if self.generate else 1)
        return {"id": self.id, "object": "chat.completion" if self.kind == "chat" else "text_completion",
                "created": self.created, "model": self.server.settings.served_model_name, "choices": choices,
                "usage": usage(prompt_tokens, completion_tokens)}

    def shown_tokens(self, request: EngineRequest) -> int:
        """How many of a request's tokens its text holds (an eos that ended it has no text)."""
        last = request.tokens[-1:] if request.tokens else []
        ended_by_eos = request.finish_reason == "stop" and last and not request.params.ignore_eos and (
            last[0] in self.llm.eos_ids or last[0] in request.params.stop_token_ids)
        return len(request.tokens) - (1 if ended_by_eos else 0)

    def entry(self, token: int, logprob: float) -> dict[str, Any]:
        raw = self.llm.tokenizer.bytes_of(token)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

    def chat_logprobs(self, request: EngineRequest, start: int, end: int | None = None) -> dict[str, Any]:
        end = self.shown_tokens(request) if end is None else end
        content = []
        for token, (logprob, top) in zip(request.tokens[start:end], request.logprobs[start:end], strict=True):
            content.append({**self.entry(token, logprob), "top_logprobs": [self.entry(t, lp) for t, lp in top]})
        return {"content": content}

    def completion_logprobs(self, request: EngineRequest | None, prompt: list[int],
                            prompt_logprobs: list[Any] | None) -> dict[str, Any] | None:
        wanted = self.body.logprobs
        if wanted is None:
            return None
        tokens: list[int] = []
        logprobs: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        if self.echo and prompt_logprobs is not None:
            for token, (logprob, top) in zip(prompt, prompt_logprobs, strict=True):
                tokens.append(token)
                logprobs.append(logprob)
                tops.append(None if logprob is None else {self.entry(t, lp)["token"]: lp for t, lp in top})
        if request is not None:  # every generated token, an eos too (lm-eval drops the one it asked for)
            for token, (logprob, top) in zip(request.tokens, request.logprobs, strict=True):
                tokens.append(token)
                logprobs.append(logprob)
                tops.append({self.entry(t, lp)["token"]: lp for t, lp in top})
        strings = [self.entry(t, 0.0)["token"] for t in tokens]
        offsets, at = [], 0
        for s in strings:
            offsets.append(at)
            at += len(s)
        return {"tokens": strings, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}

    async def prompt_logprobs(self) -> list[list[Any]] | None:
        """With echo and logprobs: every prompt token's log-probability after the ones before it (the first
        has none), computed between engine steps on the engine's worker thread."""
        if self.kind != "completion" or not self.echo or self.body.logprobs is None:
            return None
        import torch

        top_n = self.body.logprobs

        def compute() -> list[list[Any]]:
            out = []
            for prompt in self.prompts:
                logps = self.llm.logits([prompt])[0].log_softmax(-1)
                rows: list[Any] = [(None, [])]
                for t in range(1, len(prompt)):
                    top = torch.topk(logps[t - 1], top_n) if top_n else None
                    rows.append((float(logps[t - 1, prompt[t]]), [] if top is None else
                                 list(zip(top.indices.tolist(), top.values.tolist(), strict=True))))
                out.append(rows)
            return out

        return await self.llm.engine.run_in_worker(compute)

    # --- streams --------------------------------------------------------------------------------------
    async def events(self) -> AsyncIterator[str]:
        """OpenAI's server-sent events: a role chunk (chat), content deltas, a finishing chunk per choice, the
        usage chunk when asked, then [DONE]; an error after the headers is an error event."""
        include_usage = bool(self.body.stream_options and self.body.stream_options.include_usage)
        chat = self.kind == "chat"
        sent_text = [0] * len(self.requests)
        sent_tokens = [0] * len(self.requests)
        finished = [False] * len(self.requests)
        status = 200
        try:
            prompt_logprobs = await self.prompt_logprobs()
            if chat:
                for index in range(len(self.requests)):
                    yield self.chunk({"index": index, "delta": {"role": "assistant", "content": ""},
                                      "logprobs": None, "finish_reason": None}, include_usage)
            elif self.echo:
                for index in range(len(self.prompts) * self.n):
                    prompt = self.prompts[index // self.n]
                    logprobs = self.completion_logprobs(None, prompt, prompt_logprobs[index // self.n]) \
                        if prompt_logprobs else None
                    yield self.chunk({"index": index, "text": self.llm.tokenizer.decode(prompt),
                                      "logprobs": logprobs, "finish_reason": None}, include_usage)
            async with aclosing(self.llm.engine.watch(self.requests)) as updates:  # closed (cancelling) at once
                async for _ in updates:
                    self.note_times()
                    for index, request in enumerate(self.requests):
                        if finished[index]:
                            continue
                        if request.finish_reason == "error":
                            raise KataruError(request.error or "the engine failed")
                        text = request.text
                        shown = self.shown_tokens(request) if request.done and chat else len(request.tokens)
                        if len(text) > sent_text[index] or (request.done and shown > sent_tokens[index]):
                            piece = text[sent_text[index]:]
                            logprobs = self.delta_logprobs(request, sent_tokens[index], shown)
                            choice = ({"index": index, "delta": {"content": piece}} if chat
                                      else {"index": index, "text": piece})
                            yield self.chunk({**choice, "logprobs": logprobs, "finish_reason": None},
                                             include_usage)
                            sent_text[index], sent_tokens[index] = len(text), shown
                        if request.done:
                            finished[index] = True
                            choice = {"index": index, "delta": {}} if chat else {"index": index, "text": ""}
                            yield self.chunk({**choice, "logprobs": None, "finish_reason": finish(request)},
                                             include_usage)
            if include_usage:
                prompt_tokens = sum(len(p) for p in self.prompts) * self.n
                yield sse({"id": self.id, "object": self.stream_object(), "created": self.created,
                           "model": self.server.settings.served_model_name, "choices": [],
                           "usage": usage(prompt_tokens, sum(len(r.tokens) for r in self.requests))})
        except KataruError as err:
            status = 500
            yield sse(APIError(500, str(err), type="server_error").body())
        except (asyncio.CancelledError, GeneratorExit):
            status = 499  # the client went away: `watch` has cancelled the requests
            raise
        finally:
            self.finish_log(status)
        yield "data: [DONE]\n\n"

    def delta_logprobs(self, request: EngineRequest, start: int, end: int) -> dict[str, Any] | None:
        if request.params.logprobs is None or end <= start:
            return None
        if self.kind == "chat":
            return self.chat_logprobs(request, start, end)
        strings, logprobs, tops = [], [], []
        for token, (logprob, top) in zip(request.tokens[start:end], request.logprobs[start:end], strict=True):
            strings.append(self.entry(token, 0.0)["token"])
            logprobs.append(logprob)
            tops.append({self.entry(t, lp)["token"]: lp for t, lp in top})
        return {"tokens": strings, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": []}

    def stream_object(self) -> str:
        return "chat.completion.chunk" if self.kind == "chat" else "text_completion"

    def chunk(self, choice: dict[str, Any], include_usage: bool) -> str:
        event: dict[str, Any] = {"id": self.id, "object": self.stream_object(), "created": self.created,
                                 "model": self.server.settings.served_model_name, "choices": [choice]}
        if include_usage:
            event["usage"] = None
        return sse(event)


def finish(request: EngineRequest) -> str:
    return "stop" if request.finish_reason == "stop" else "length"


# Characters JSON leaves raw in strings that line-splitting SSE clients (httpx, str.splitlines) take for line
# breaks, cutting an event in two: escaped, every event stays on one line.
LINE_BREAKS = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"})


def sse(event: dict[str, Any]) -> str:
    return f"data: {json.dumps(event, ensure_ascii=False).translate(LINE_BREAKS)}\n\n"
