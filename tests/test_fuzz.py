"""The server fuzzed against its own OpenAPI schema with schemathesis: whatever body the schema allows (and
bodies it does not: schemathesis' negative cases), every route answers a documented status in the documented
shape (OpenAI's error object for all but 200), never a 500 or a traceback in the log, and afterwards answers a
plain request exactly as before. The long run is `scripts/soak.sh fuzz` (docs/reliability.md)."""

from __future__ import annotations

import logging
import os

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from serve_helpers import Threaded

import kataru

PROBE = {"prompt": "吾輩は猫である。", "max_tokens": 24, "temperature": 0}
KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
EXAMPLES = int(os.environ.get("KATARU_FUZZ_EXAMPLES", "25"))  # per route and phase; scripts/soak.sh fuzz: more


class Tracebacks(logging.Handler):
    """Every record logged with an exception (a traceback in the server's log)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or record.levelno >= logging.ERROR:
            self.records.append(record)


@pytest.fixture(scope="module")
def live():  # type: ignore[no-untyped-def]
    watcher = Tracebacks()
    loggers = [logging.getLogger(name) for name in ("kataru.serve", "uvicorn", "uvicorn.error", "fastapi")]
    for logger in loggers:
        logger.addHandler(watcher)
    server = Threaded(lambda: kataru.load(progress=False, max_batch=16), max_queue=64, api_keys=[KEY])
    server.watcher = watcher
    server.probe = httpx.post(f"{server.base}/v1/completions", json=PROBE, headers=AUTH,
                              timeout=60).json()["choices"][0]["text"]
    yield server
    server.stop()
    for logger in loggers:
        logger.removeHandler(watcher)


def checks():  # type: ignore[no-untyped-def]
    """What every answer is held to: no 5xx; a status the schema lists for the route, with its media type and
    shape; and a body the schema forbids (a negative case) refused with a 4xx. Not "every allowed body gets a
    200": a prompt that does not fit the context, or a feature kataru lacks, is a documented 400."""
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        negative_data_rejection,
        response_schema_conformance,
        status_code_conformance,
    )

    return [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
            negative_data_rejection]


def fuzz(operation, mode, base: str, statuses) -> None:  # type: ignore[no-untyped-def]
    """Hypothesis' cases of one route in one mode (bodies the schema allows, or forbids), each sent and checked."""
    from hypothesis import Phase, given

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def run(case) -> None:  # type: ignore[no-untyped-def]
        response = case.call(base_url=base, timeout=120)
        statuses[(operation.label, mode.value, response.status_code)] += 1
        case.validate_response(response, checks=checks())

    run()


def test_every_body_gets_a_documented_status_in_the_documented_shape(live) -> None:  # type: ignore[no-untyped-def]
    from collections import Counter

    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    api = schemathesis.openapi.from_url(f"{live.base}/openapi.json", headers=AUTH)
    api.config.generation.update(with_security_parameters=False)  # the key is right: bodies are what vary

    @api.auth()
    class Bearer:  # the server's key on every case (schemathesis' own auth cases aside)
        def get(self, case, context):  # type: ignore[no-untyped-def]
            return KEY

        def set(self, case, data, context):  # type: ignore[no-untyped-def]
            case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}
    statuses: Counter[tuple[str, str, int]] = Counter()
    failures: list[str] = []
    labels = []
    for result in api.get_all_operations():
        operation = result.ok()
        labels.append(operation.label)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                fuzz(operation, mode, live.base, statuses)
            except Unsatisfiable:  # a route that takes nothing (GET /health) has no request to make invalid
                assert mode == GenerationMode.NEGATIVE and operation.method.upper() == "GET", operation.label
            except Exception as err:  # every route and mode runs; the failures are listed together
                failures.append(f"{operation.label} ({mode.value}): {str(err).strip()[:1500]}")
    live.statuses = statuses
    report = os.environ.get("KATARU_FUZZ_REPORT")
    if report:
        import json

        rows = [{"operation": op, "mode": mode, "status": status, "count": n}
                for (op, mode, status), n in sorted(statuses.items())]
        with open(report, "w") as f:
            json.dump({"examples_per_route_and_mode": EXAMPLES, "cases": sum(statuses.values()), "statuses": rows,
                       "failures": failures}, f, indent=1)
    assert len(labels) == 8, labels  # every route: chat, completions, models, tokenize, detokenize, ...
    assert not failures, "\n\n".join(failures)
    assert sum(statuses.values()) >= 8 * 2 * min(EXAMPLES, 5)


def test_after_the_fuzz_no_traceback_was_logged_and_a_plain_request_answers_as_before(live) -> None:  # type: ignore[no-untyped-def]
    assert not live.watcher.records, [r.getMessage() for r in live.watcher.records[:3]]
    after = httpx.post(f"{live.base}/v1/completions", json=PROBE, headers=AUTH,
                       timeout=60).json()["choices"][0]["text"]
    assert after == live.probe
    stats = live.server.ready().engine.stats()
    assert stats["running"] == 0 and stats["waiting"] == 0 and stats["reserved_tokens"] == 0


def test_unknown_routes_and_methods_answer_in_openais_shape(live) -> None:  # type: ignore[no-untyped-def]
    for method, path, status in (("GET", "/v2/nothing", 404), ("DELETE", "/v1/completions", 405),
                                 ("GET", "/tokenize", 405)):
        response = httpx.request(method, f"{live.base}{path}", headers=AUTH)
        assert response.status_code == status
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and path in error["message"]
    schema = httpx.get(f"{live.base}/openapi.json").json()
    assert set(schema["paths"]) == {"/health", "/v1/models", "/metrics", "/tokenizer_info", "/tokenize", "/detokenize",
                                    "/v1/chat/completions", "/v1/completions"}
    body = schema["components"]["schemas"]["ChatRequest"]["properties"]
    assert {"messages", "temperature", "max_tokens", "stream", "response_format", "speculate"} <= set(body)
