"""One LLM from many threads and interleaved generators, and one engine under poisoned neighbours: every
answer is what its request gets alone, or one clear error for the request at fault, never wrong text."""

from __future__ import annotations

import threading

import pytest
import torch

import kataru
from kataru.engine import Engine
from kataru.errors import KataruError
from kataru.sampling import SamplingParams

PROMPTS = ["日本の首都は", "富士山の高さは", "吾輩は猫である", "東京タワー", "自然言語処理とは", "渋谷の観光地"]


def run_threads(fn, args: list, timeout: float = 120) -> list:  # type: ignore[no-untyped-def]
    """fn(arg) for every arg at once, each on its own thread; results in order; errors re-raised."""
    results: list = [None] * len(args)
    errors: list[BaseException] = []
    start = threading.Barrier(len(args))

    def work(i: int) -> None:
        try:
            start.wait()
            results[i] = fn(args[i])
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(args))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_many_threads_on_one_llm_get_what_each_gets_alone(dtype: str, checkpoints: dict) -> None:
    llm = kataru.load(checkpoints["llama"][0], dtype=dtype)
    alone = [kataru.load(checkpoints["llama"][0], dtype=dtype).complete([p], temperature=0, max_new_tokens=12,
                                                                         ignore_eos=True)[0].token_ids
             for p in PROMPTS]
    for _ in range(2):  # twice: the second round meets the rows and prefixes the first one left
        got = run_threads(lambda p: llm.complete([p], temperature=0, max_new_tokens=12, ignore_eos=True)[0].token_ids,
                          PROMPTS)
        assert got == alone
    texts = run_threads(lambda p: llm.generate(p, temperature=0, max_new_tokens=12, ignore_eos=True), PROMPTS)
    assert texts == [llm.generate(p, temperature=0, max_new_tokens=12, ignore_eos=True) for p in PROMPTS]
    assert not llm.engine.has_work()


def test_interleaved_generators_in_one_thread(checkpoints: dict) -> None:
    llm = kataru.load(checkpoints["mistral"][0], dtype="bfloat16")
    options = {"temperature": 0, "max_new_tokens": 20, "ignore_eos": True}
    expected = [llm.generate(p, **options) for p in PROMPTS[:3]]
    streams = [llm.stream(p, **options) for p in PROMPTS[:3]]
    texts = ["", "", ""]
    live = set(range(3))
    while live:  # one piece from each in turn
        for i in sorted(live):
            piece = next(streams[i], None)
            if piece is None:
                live.discard(i)
            else:
                texts[i] += piece
    assert texts == expected
    seeded = [llm.stream(p, seed=4, max_new_tokens=15) for p in PROMPTS[:2]]
    first = next(seeded[0])
    rest = ["".join(seeded[1]), first + "".join(seeded[0])]
    assert rest == [llm.generate(PROMPTS[1], seed=4, max_new_tokens=15), llm.generate(PROMPTS[0], seed=4,
                                                                                        max_new_tokens=15)]


def test_an_abandoned_generator_frees_its_request(checkpoints: dict) -> None:
    llm = kataru.load(checkpoints["llama"][0])
    stream = llm.stream("x", max_new_tokens=100, ignore_eos=True)
    next(stream)
    assert llm.engine.has_work()
    stream.close()  # a consumer that stops: the request is cancelled, its row free
    assert not llm.engine.has_work() and llm.engine.scheduler.reserved == 0
    assert llm.generate([]) == []


def test_a_poisoned_request_fails_alone(checkpoints: dict) -> None:
    llm = kataru.load(checkpoints["llama"][0], dtype="float32")
    vocab = llm.config.vocab_size
    params = SamplingParams(max_new_tokens=10, do_sample=False, ignore_eos=True)
    engine = Engine(llm.model, llm.eos_ids, max_batch=4)
    with pytest.raises(KataruError, match=f"token id {vocab} is outside the vocabulary"):
        engine.submit([5, 6, vocab], params)
    with pytest.raises(KataruError, match=r"temperature must be 0 \(greedy\) or at least"):
        engine.submit([5, 6], SamplingParams(temperature=1e-40))
    with pytest.raises(KataruError, match="seed must be a whole number"):
        engine.submit([5, 6], SamplingParams(seed=2**63))
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
    requests = [engine.submit(p, params) for p in prompts]
    poisoned = requests[1]
    decode = engine.runner.decode_step

    def nan_in_its_row(tokens, cache, rows, slots, span):  # type: ignore[no-untyped-def]
        logits = decode(tokens, cache, rows, slots, span)
        if len(poisoned.tokens) == 3 and not poisoned.done:
            logits[(rows == poisoned.row).nonzero()[0, 0]] = float("nan")
        return logits

    engine.runner.decode_step = nan_in_its_row
    engine.run()
    assert poisoned.finish_reason == "error" and len(poisoned.tokens) == 3
    assert "NaN or infinite" in (poisoned.error or "")
    fresh = Engine(llm.model, llm.eos_ids, max_batch=1)
    for request, prompt in zip(requests, prompts, strict=True):
        if request is not poisoned:
            alone = fresh.submit(prompt, params)
            fresh.run()
            assert request.finish_reason == "length" and request.tokens == alone.tokens
    assert engine.scheduler.reserved == 0 and not engine.has_work()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_bad_logit_marks_its_row_and_no_other(dtype: torch.dtype) -> None:
    """The engine's per-row check (one float32 sum) finds a single NaN, +inf or -inf among 100k finite logits,
    as torch.isfinite would, and passes rows of large finite logits."""
    from kataru.engine.core import finite_rows

    logits = (torch.randn(5, 99584) * 30).to(dtype)
    logits[1, 77], logits[2, 99583], logits[3, 0] = float("nan"), float("inf"), float("-inf")
    logits[4] = 3e4
    assert finite_rows(logits) == [True, False, False, False, True] == torch.isfinite(logits).all(-1).tolist()
    assert finite_rows(logits[1:2]) == [False] and finite_rows(logits[0]) == [True]


def test_a_request_whose_prefill_fails_ends_alone(checkpoints: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    llm = kataru.load(checkpoints["llama"][0], dtype="float32")
    params = SamplingParams(max_new_tokens=6, do_sample=False, ignore_eos=True)
    engine = Engine(llm.model, llm.eos_ids, max_batch=2)
    good, bad = engine.submit([5, 6, 7], params), engine.submit([8, 9, 10, 11], params)
    prefill = engine.runner.prefill

    def failing(chunk):  # type: ignore[no-untyped-def]
        if chunk.request is bad:
            raise RuntimeError("out of memory\nallocator trace")
        return prefill(chunk)

    monkeypatch.setattr(engine.runner, "prefill", failing)
    engine.run()
    assert bad.finish_reason == "error" and bad.error == "the engine failed (RuntimeError: out of memory)"
    assert good.finish_reason == "length" and len(good.tokens) == 6


def test_the_kv_cache_shrinks_when_idle_and_is_reported(checkpoints: dict) -> None:
    llm = kataru.load(checkpoints["llama"][0], dtype="float32")
    c = llm.config
    per_token = 2 * c.n_layer * c.kv_size * 4
    assert llm.info()["kv_cache"]["bytes"] == 0 and llm.info()["kv_cache"]["bytes_per_token"] == per_token
    llm.generate([f"{i}番目の質問" for i in range(16)], temperature=0, max_new_tokens=8)
    cache = llm.info()["kv_cache"]
    assert cache["bytes"] <= c.max_seq_len * per_token and cache["rows"] <= 1  # one context's worth kept
    keep_nothing = kataru.load(checkpoints["llama"][0], dtype="float32", idle_cache_tokens=0)
    keep_nothing.generate("x", max_new_tokens=3)
    assert keep_nothing.info()["kv_cache"]["bytes"] == 0
    assert torch.is_tensor(llm.logits([[5, 6]]))
