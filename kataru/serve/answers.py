"""Answering one API request: its engine requests (prompt x n), awaited whole or streamed as server-sent events,
cancelled the moment the client goes away, and logged once with its token counts."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from kataru.engine import Request as EngineRequest
from kataru.errors import KataruError
from kataru.sampling import SamplingParams
from kataru.serve.protocol import APIError, usage
from kataru.serve.server import Server

log = logging.getLogger("kataru.serve")


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
