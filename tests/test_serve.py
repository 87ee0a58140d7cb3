"""`kataru serve` against the official `openai` client and plain HTTP, on loopback: the embedded model in a
real server process, tiny checkpoints of every family in-process. Times are never asserted, only bounded."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest
import torch
from serve_helpers import KEY, Process, Threaded

import kataru

MESSAGES = [{"role": "user", "content": "日本の首都はどこですか"}]


@pytest.fixture(scope="module")
def live():  # type: ignore[no-untyped-def]
    server = Process("--api-key", KEY, "--max-num-seqs", "8")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def llm() -> kataru.LLM:
    return kataru.load()


def client(live: Process, **kw: object) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.base}/v1", api_key=KEY, max_retries=0, timeout=120, **kw)


def metric(base: str, name: str) -> float:
    text = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).text
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")]
    assert values, f"{name} missing from /metrics"
    return values[0]


def test_chat_and_completions_with_the_openai_client(live: Process, llm: kataru.LLM) -> None:
    c = client(live)
    models = c.models.list()
    assert [m.id for m in models.data] == ["kataru-tiny-ja"]
    chat = c.chat.completions.create(model="kataru-tiny-ja", messages=MESSAGES, temperature=0, max_tokens=12)
    expected = llm.complete([MESSAGES], temperature=0, max_new_tokens=12)[0]
    assert chat.choices[0].message.content == expected.text and chat.choices[0].finish_reason == "length"
    assert chat.usage.prompt_tokens == len(llm.encode_prompt(MESSAGES)) == len(expected.prompt_token_ids)
    assert chat.usage.completion_tokens == len(expected.token_ids) == 12
    done = c.completions.create(model="kataru-tiny-ja", prompt="吾輩は猫である。", temperature=0, max_tokens=10)
    raw = llm.complete(["吾輩は猫である。"], raw=True, temperature=0, max_new_tokens=10)[0]
    assert done.choices[0].text == raw.text and done.usage.prompt_tokens == len(raw.prompt_token_ids)
    default = c.completions.create(model="kataru-tiny-ja", prompt="吾輩は", temperature=0,
                                   extra_body={"ignore_eos": True})
    assert default.usage.completion_tokens == 16  # OpenAI's default max_tokens on /v1/completions


def test_n_seeds_and_stop_strings(live: Process) -> None:
    c = client(live)
    first = c.chat.completions.create(messages=MESSAGES, model="kataru-tiny-ja", n=3, seed=7, max_tokens=15)
    again = c.chat.completions.create(messages=MESSAGES, model="kataru-tiny-ja", n=3, seed=7, max_tokens=15)
    other = c.chat.completions.create(messages=MESSAGES, model="kataru-tiny-ja", n=3, seed=8, max_tokens=15)
    texts = [ch.message.content for ch in first.choices]
    assert [ch.index for ch in first.choices] == [0, 1, 2] and len(set(texts)) > 1  # n samples, not one thrice
    assert texts == [ch.message.content for ch in again.choices]  # seeded: reproducible
    assert texts != [ch.message.content for ch in other.choices]
    full = c.chat.completions.create(messages=MESSAGES, model="kataru-tiny-ja", temperature=0, max_tokens=30)
    text = full.choices[0].message.content
    stop = text[6:8]
    cut = c.chat.completions.create(messages=MESSAGES, model="kataru-tiny-ja", temperature=0, max_tokens=30,
                                    stop=[stop])
    assert cut.choices[0].message.content == text[:text.find(stop)] and cut.choices[0].finish_reason == "stop"


def test_logprobs_bytes_rebuild_the_text(live: Process) -> None:
    c = client(live)
    chat = c.chat.completions.create(messages=MESSAGES, model="kataru-tiny-ja", temperature=0, max_tokens=40,
                                     logprobs=True, top_logprobs=3, extra_body={"repetition_penalty": 1.0})
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert bytes(b for entry in content for b in entry.bytes).decode("utf-8") == chat.choices[0].message.content
    for entry in content:  # greedy, no penalty: the chosen token is the likeliest of the model's distribution
        assert len(entry.top_logprobs) == 3 and entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob


def test_echo_prompt_logprobs_equal_kataru_logits(live: Process, llm: kataru.LLM) -> None:
    """lm-eval's log-likelihood request: token ids, echo, logprobs; also max_tokens 0 (the prompt alone)."""
    ids = llm.tokenizer.encode("吾輩は猫である。名前はまだ無い。", add_special_tokens=True)
    expected = llm.logits([ids])[0].log_softmax(-1)
    for max_tokens in (0, 1):
        out = client(live).completions.create(model="kataru-tiny-ja", prompt=ids, echo=True, logprobs=2,
                                              max_tokens=max_tokens, temperature=0, seed=1234)
        lp = out.choices[0].logprobs
        assert len(lp.token_logprobs) == len(ids) + max_tokens and lp.token_logprobs[0] is None
        got = torch.tensor(lp.token_logprobs[1:len(ids)])
        want = torch.tensor([float(expected[t - 1, ids[t]]) for t in range(1, len(ids))])
        assert (got - want).abs().max() < 1e-4
        assert all(len(top) == 2 for top in lp.top_logprobs[1:])
        assert out.choices[0].text.startswith(llm.tokenizer.decode(ids))


def test_streams_join_to_the_whole_answer_and_usage_only_when_asked(live: Process) -> None:
    c = client(live)
    whole = c.chat.completions.create(messages=MESSAGES, model="kataru-tiny-ja", temperature=0, max_tokens=25)
    chunks = list(c.chat.completions.create(messages=MESSAGES, model="kataru-tiny-ja", temperature=0, max_tokens=25,
                                            stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length" and all(ch.usage is None for ch in chunks)
    with_usage = list(c.chat.completions.create(messages=MESSAGES, model="kataru-tiny-ja", temperature=0,
                                                max_tokens=25, stream=True, stream_options={"include_usage": True}))
    assert with_usage[-1].choices == [] and with_usage[-1].usage.completion_tokens == 25
    assert with_usage[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(ch.usage is None for ch in with_usage[:-1])
    text = "".join(ch.choices[0].text for ch in c.completions.create(
        model="kataru-tiny-ja", prompt="吾輩は", temperature=0, max_tokens=20, stream=True))
    assert text == c.completions.create(model="kataru-tiny-ja", prompt="吾輩は", temperature=0,
                                        max_tokens=20).choices[0].text


def test_async_client_and_32_concurrent_streams_equal_each_alone(live: Process) -> None:
    prompts = [f"質問{i}: " + "猫" * (i % 7) for i in range(32)]
    lengths = [4 + (i * 5) % 37 for i in range(32)]
    c = client(live)
    alone = [c.completions.create(model="kataru-tiny-ja", prompt=p, temperature=0, max_tokens=n,
                                  extra_body={"ignore_eos": True}).choices[0].text
             for p, n in zip(prompts, lengths, strict=True)]

    async def stream_all() -> list[str]:
        ac = openai.AsyncOpenAI(base_url=f"{live.base}/v1", api_key=KEY, max_retries=0, timeout=120)

        async def one(prompt: str, n: int) -> str:
            stream = await ac.completions.create(model="kataru-tiny-ja", prompt=prompt, temperature=0,
                                                 max_tokens=n, stream=True, extra_body={"ignore_eos": True})
            return "".join([chunk.choices[0].text async for chunk in stream])

        return list(await asyncio.gather(*(one(p, n) for p, n in zip(prompts, lengths, strict=True))))

    assert asyncio.run(stream_all()) == alone  # none lost, none mixed up
    assert metric(live.base, "kataru:num_requests_running") == 0
    assert metric(live.base, "kataru:kv_cache_usage_perc") == 0


def test_errors_map_to_the_clients_exceptions(live: Process) -> None:
    c = client(live)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        c.chat.completions.create(messages=MESSAGES, model="kataru-tiny-ja", temperature=5)
    with pytest.raises(openai.BadRequestError, match="maximum context length is 1024"):
        c.chat.completions.create(messages=[{"role": "user", "content": "猫" * 1500}], model="kataru-tiny-ja")
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        c.chat.completions.create(messages=MESSAGES, model="gpt-4o")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{live.base}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.APIStatusError) as caught:
        c.completions.create(model="kataru-tiny-ja", prompt="猫" * (5 << 20))
    assert caught.value.status_code == 413


def test_queue_full_is_429_and_an_engine_failure_500_and_the_server_goes_on() -> None:
    server = Threaded(kataru.load, max_queue=0)
    try:
        c = openai.OpenAI(base_url=f"{server.base}/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.RateLimitError, match="requests waiting"):
            c.completions.create(model="m", prompt="x", max_tokens=2)
        server.server.settings.max_queue = 10
        engine = server.server.llm.engine
        decode = engine.runner.decode_step

        def broken(*args):  # type: ignore[no-untyped-def]
            raise RuntimeError("device lost")

        engine.runner.decode_step = broken
        with pytest.raises(openai.InternalServerError, match="device lost"):
            c.completions.create(model="m", prompt="x", max_tokens=5)
        with pytest.raises(openai.APIError, match="device lost"):  # after the headers: an error event
            list(c.completions.create(model="m", prompt="x", max_tokens=5, stream=True))
        engine.runner.decode_step = decode
        assert c.completions.create(model="m", prompt="x", max_tokens=3).usage.completion_tokens == 3
        assert httpx.get(f"{server.base}/health").status_code == 200
    finally:
        server.stop()


def test_a_client_that_disconnects_frees_its_row_within_a_step() -> None:
    server = Threaded(kataru.load)
    try:
        engine = server.server.llm.engine
        body = {"model": "m", "prompt": "吾輩は", "max_tokens": 900, "stream": True, "ignore_eos": True}
        with httpx.Client(timeout=60) as http, http.stream("POST", f"{server.base}/v1/completions", json=body) as r:
            lines = r.iter_lines()
            for _ in range(4):
                next(lines)
            assert engine.stats()["running"] == 1
        deadline = time.monotonic() + 10
        while engine.has_work() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not engine.has_work() and engine.stats()["reserved_tokens"] == 0
        finished = server.server.metrics.request_success.labels("cancelled")._value.get()
        assert finished == 1
        text = httpx.get(f"{server.base}/metrics").text
        assert "kataru:num_requests_running 0.0" in text
        # a non-streamed request whose client leaves is cancelled too
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.base}/v1/completions", json={**body, "stream": False}, timeout=1.0)
        deadline = time.monotonic() + 10
        while engine.has_work() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not engine.has_work()
    finally:
        server.stop()


def test_sigterm_finishes_or_closes_every_stream_and_exits_0() -> None:
    server = Process("--grace", "3")
    results: list[str] = []

    def stream(n: int) -> None:
        body = {"prompt": "吾輩は", "max_tokens": n, "stream": True, "ignore_eos": True}
        try:
            with httpx.stream("POST", f"{server.base}/v1/completions", json=body, timeout=60) as r:
                results.append("done" if any(line == "data: [DONE]" for line in r.iter_lines()) else "closed")
        except httpx.HTTPError:
            results.append("closed")

    threads = [threading.Thread(target=stream, args=(n,)) for n in (5, 900, 900)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    try:
        assert server.terminate(timeout=60) == 0
    finally:
        server.stop()
    for t in threads:
        t.join(30)
    assert len(results) == 3 and results.count("done") >= 1 and set(results) <= {"done", "closed"}


def test_every_route_but_health_needs_the_key(live: Process) -> None:
    routes = [("GET", "/v1/models", None), ("GET", "/metrics", None), ("GET", "/tokenizer_info", None),
              ("POST", "/tokenize", {"prompt": "x"}), ("POST", "/detokenize", {"tokens": [5]}),
              ("POST", "/v1/completions", {"prompt": "x"}), ("POST", "/v1/chat/completions", {"messages": MESSAGES})]
    for method, path, body in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = httpx.request(method, live.base + path, json=body, headers=headers, timeout=30)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", (path, headers)
        r = httpx.request(method, live.base + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        assert r.status_code == 200, (path, r.text)
    assert httpx.get(live.base + "/health").status_code == 200


def test_the_key_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    import secrets

    from kataru.serve import app
    from kataru.serve.protocol import APIError

    calls: list[tuple[bytes, bytes]] = []
    compare = secrets.compare_digest
    monkeypatch.setattr(app.secrets, "compare_digest", lambda a, b: calls.append((a, b)) or compare(a, b))
    app.authorize("Bearer k2", ["k1", "k2", "k3"])
    assert calls == [(b"k2", b"k1"), (b"k2", b"k2"), (b"k2", b"k3")]  # every key, no early exit
    with pytest.raises(APIError):
        app.authorize("Bearer nope", ["k1"])


@pytest.mark.parametrize("body, fragment", [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b"[1, 2]", "must be a JSON object"),
    (json.dumps({"messages": []}).encode(), "messages"),
    (json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(), "role"),
    (json.dumps({"messages": MESSAGES, "max_tokens": -1}).encode(), "max_tokens"),
    (json.dumps({"messages": MESSAGES, "max_tokens": 10**9}).encode(), "maximum context length"),
    (json.dumps({"messages": MESSAGES, "max_tokens": "ten"}).encode(), "max_tokens"),
    (json.dumps({"messages": MESSAGES, "n": 1000}).encode(), "n"),
    (json.dumps({"messages": MESSAGES, "temperature": "hot"}).encode(), "temperature"),
    (json.dumps({"messages": MESSAGES, "stream_options": {"include_usage": True}}).encode(), "stream_options"),
    (json.dumps({"messages": MESSAGES, "response_format": {"type": "xml"}}).encode(), "response_format"),
    (json.dumps({"messages": MESSAGES, "logit_bias": {"5": 1}}).encode(), "logit_bias"),
])
def test_bad_input_is_4xx_in_openais_shape_and_the_server_goes_on(live: Process, body: bytes, fragment: str) -> None:
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(f"{live.base}/v1/chat/completions", content=body, headers=headers, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and fragment in error["message"]
    ok = httpx.post(f"{live.base}/v1/chat/completions", headers=headers, timeout=60,
                    json={"messages": MESSAGES, "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_json_response_format_gives_json(live: Process) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["name", "age"], "additionalProperties": False}
    c = client(live)
    answer = c.chat.completions.create(messages=MESSAGES, model="kataru-tiny-ja", max_tokens=60, seed=3,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "person", "schema": schema}})
    value = json.loads(answer.choices[0].message.content)
    assert set(value) == {"name", "age"} and isinstance(value["age"], int) and len(value["name"]) <= 6
    assert answer.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "stablelm", "mistral", "japanese_stablelm_alpha"])
def test_chat_renders_every_family_as_kataru_generate_does(family: str, checkpoints: dict) -> None:
    """The checkpoint's own prompt style: llm-jp's chat template, alpaca-ja with the system message replacing
    the card's, rinna's <NL> dialogue, and for the base model one user message continued as it is."""
    from fastapi.testclient import TestClient

    from kataru.serve.app import Settings, create_app

    folder = checkpoints[family][0]
    llm = kataru.load(folder)
    app = create_app(lambda: kataru.load(folder), Settings(served_model_name=family))
    conversations = [MESSAGES, [{"role": "system", "content": "簡潔に答えてください。"}, *MESSAGES],
                     [*MESSAGES, {"role": "assistant", "content": "東京です。"}, {"role": "user", "content": "本当？"}]]
    with TestClient(app) as http:
        deadline = time.monotonic() + 60
        while http.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        for messages in conversations:
            tokens = http.post("/tokenize", json={"messages": messages}).json()
            answer = http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 3, "temperature": 0})
            try:
                expected = llm.encode_prompt(messages)
            except kataru.KataruError as err:  # rinna has no system message; a base model, no conversation
                assert tokens["error"]["type"] == "invalid_request_error" and answer.status_code == 400
                assert str(err).split(";")[0] in answer.json()["error"]["message"] or family == "japanese_stablelm_alpha"
                continue
            if family == "japanese_stablelm_alpha" and len(messages) > 1:
                assert answer.status_code == 400 and "base model with no chat template" in answer.text
                continue
            assert tokens["tokens"] == expected and answer.status_code == 200, answer.text
            assert answer.json()["usage"]["prompt_tokens"] == len(expected)
            text = llm.complete([messages], temperature=0, max_new_tokens=3)[0].text
            assert answer.json()["choices"][0]["message"]["content"] == text


def test_lm_eval_local_completions_scores_as_kataru_eval(live: Process, llm: kataru.LLM, tmp_path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """lm-evaluation-harness' local-completions model, with the remote tokenizer (no download), runs a
    log-likelihood task over JCommonsenseQA questions against the live server: every choice's log-likelihood
    as kataru scores it, and the same accuracy as `kataru eval` on those questions."""
    import lm_eval
    from helpers import jcqa_task

    from kataru.data.jglue import question_text
    from kataru.eval.jcommonsenseqa import evaluate
    from kataru.scoring import score_choices

    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # the key local-completions sends (the tokenizer takes auth_token)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tasks = jcqa_task(llm, 40, tmp_path, "jcqa_kataru")
    if tasks is None:
        pytest.skip("no JGLUE in the data folder (it lives outside the repository)")
    data = tmp_path / "questions.jsonl"
    results = lm_eval.simple_evaluate(
        model="local-completions", tasks=["jcqa_kataru"], log_samples=True,
        task_manager=lm_eval.tasks.TaskManager(include_path=str(tasks)),
        model_args=f"base_url={live.base}/v1/completions,model=kataru-tiny-ja,tokenizer_backend=remote,"
                   f"auth_token={KEY},num_concurrent=4,max_retries=1")
    for sample in results["samples"]["jcqa_kataru"]:
        row = sample["doc"]
        theirs = torch.tensor([resp[0][0] for resp in sample["resps"]])
        ours = score_choices(llm.model, llm.tokenizer, llm.encode_prompt(question_text(row)), row["choices"])
        # lm-eval moves the prompt's final newline into each continuation: the same term in every choice
        assert (theirs - theirs[0] - (ours - ours[0])).abs().max() < 1e-3
    accuracy = evaluate(llm, data, progress=False)["acc"]
    assert results["results"]["jcqa_kataru"]["acc,none"] == pytest.approx(accuracy) and accuracy > 0


def test_bench_serve_loads_a_server_on_loopback_only(live: Process, capsys: pytest.CaptureFixture, tmp_path) -> None:
    from kataru.cli import main

    assert main(["bench", "serve", "--url", live.base, "--api-key", KEY, "--concurrency", "1,3", "--requests", "3",
                 "--prompt-tokens", "8", "--output-tokens", "5", "--json", "--plot", str(tmp_path / "serve.png")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(r["server"], r["concurrency"]) for r in report["runs"]] == [("kataru", 1), ("kataru", 3)]
    for run in report["runs"]:
        assert run["requests"] == 3 and run["failed"] == 0 and run["output_tokens"] == 15
        assert run["output_tok_s"] > 0 and run["ttft_p50_s"] <= run["ttft_p99_s"]
        assert run["itl_p50_s"] is not None and run["bandwidth_gbs"] > 0
    assert (tmp_path / "serve.png").stat().st_size > 0
    assert main(["bench", "serve", "--url", "http://10.1.2.3:8000"]) == 2
    assert "only loads servers on this machine" in capsys.readouterr().err


def test_penalties_and_stop_token_ids(live: Process, llm: kataru.LLM) -> None:
    c = client(live)
    plain = c.chat.completions.create(messages=MESSAGES, model="kataru-tiny-ja", temperature=0, max_tokens=30,
                                      extra_body={"repetition_penalty": 1.0})
    penalized = c.chat.completions.create(messages=MESSAGES, model="kataru-tiny-ja", temperature=0, max_tokens=30,
                                          frequency_penalty=2.0, presence_penalty=2.0,
                                          extra_body={"repetition_penalty": 1.0})
    expected = llm.complete([MESSAGES], temperature=0, max_new_tokens=30, repetition_penalty=1.0,
                            frequency_penalty=2.0, presence_penalty=2.0)[0]
    assert penalized.choices[0].message.content == expected.text != plain.choices[0].message.content
    first = llm.complete([MESSAGES], temperature=0, max_new_tokens=1)[0].token_ids[0]
    stopped = c.chat.completions.create(messages=MESSAGES, model="kataru-tiny-ja", temperature=0, max_tokens=30,
                                        extra_body={"stop_token_ids": [first]})
    assert stopped.choices[0].finish_reason == "stop" and stopped.usage.completion_tokens == 1


def test_access_log_has_ids_status_tokens_and_never_the_prompt(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    for log_prompts in (False, True):
        server = Threaded(kataru.load, log_prompts=log_prompts)
        try:
            with caplog.at_level(logging.INFO, logger="kataru.serve"):
                caplog.clear()
                answer = httpx.post(f"{server.base}/v1/completions", timeout=60,
                                    json={"prompt": "秘密の質問です", "max_tokens": 3, "ignore_eos": True}).json()
                httpx.get(f"{server.base}/health")
                deadline = time.monotonic() + 10  # the middleware logs once the response has gone out
                while time.monotonic() < deadline and not any(
                        "GET /health 200" in r.getMessage() for r in caplog.records):
                    time.sleep(0.02)
        finally:
            server.stop()
        lines = [r.getMessage() for r in caplog.records if r.name == "kataru.serve"]
        line = next(x for x in lines if answer["id"] in x)
        assert " 200 " in line and "prompt_tokens=" in line and "completion_tokens=3" in line and "s" in line
        assert ("秘密の質問" in "\n".join(lines)) == log_prompts
        assert any("GET /health 200" in x for x in lines)


def test_an_event_stays_on_one_line_whatever_the_text() -> None:
    """JSON leaves U+2028, U+2029 and NEL raw in strings; clients that split lines as str.splitlines does
    (httpx) would cut the event in two. They are escaped, and the text comes back the same."""
    from kataru.serve.app import sse

    text = "改行\u2028段落\u2029次\x85行\n終わり"
    event = sse({"choices": [{"text": text}]})
    assert len(event.strip().splitlines()) == 1 and json.loads(event[len("data: "):])["choices"][0]["text"] == text
