"""`kataru serve`: the OpenAI API over one engine, on FastAPI and uvicorn. This module is the map of routes;
what each needs lives beside it: server.py (the model and its engine), admission.py (key, size, access log),
inputs.py (a body made into prompt ids and sampling), answers.py (whole or streamed), protocol.py (fields and
errors), schema.py (the OpenAPI description), page/ (the chat page).

The model loads on a thread after the server starts (`/health` answers 503 until it is ready). Every
generation request becomes engine requests (one per choice); the engine steps on its own worker thread, so
the event loop only moves bytes. A client that goes away cancels its requests at once, which frees their
rows and budget. Every route but `/health` (and `/metrics` when public) needs the API key when one is set.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException

from kataru.llm import LLM
from kataru.serve.admission import Guard, admit, authorize, too_large  # noqa: F401 (importable from here)
from kataru.serve.answers import Job, sse  # noqa: F401
from kataru.serve.inputs import chat_prompt, check_ids, completion_prompts, encode, read_json, sampling
from kataru.serve.protocol import APIError, ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest, parse
from kataru.serve.schema import openapi
from kataru.serve.server import Server, Settings

PAGE = Path(__file__).with_name("page")


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
