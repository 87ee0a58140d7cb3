"""Continuous batching: same greedy outputs as running alone, joins, cancellation, memory budget, async."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import gc
import threading

import pytest
import torch

import kataru
from kataru import kernels
from kataru.engine import Engine, GraphedDecode
from kataru.errors import KataruError
from kataru.generation import SamplingParams, decode_steps


def alone(llm: kataru.LLM, prompt: list[int], params: SamplingParams) -> list[int]:
    return [s.token_id for s in decode_steps(llm.model, [prompt], [params], llm.eos_ids)]


def prompts(vocab: int, lengths: list[int]) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("family", ["llama", "mistral", "gpt_neox"])
def test_requests_joining_mid_batch_match_running_alone(family: str, checkpoints: dict) -> None:
    llm = kataru.load(checkpoints[family][0], dtype="float32")
    params = [SamplingParams(max_new_tokens=n, do_sample=False, ignore_eos=True, repetition_penalty=1.1)
              for n in (12, 20, 7, 15)]
    ps = prompts(llm.config.vocab_size, [5, 30, 11, 18])
    expected = [alone(llm, p, q) for p, q in zip(ps, params, strict=True)]
    engine = Engine(llm.model, llm.eos_ids, max_batch=3)
    first = [engine.submit(p, q) for p, q in zip(ps[:2], params[:2], strict=True)]
    for _ in range(4):
        engine.step()
    later = [engine.submit(p, q) for p, q in zip(ps[2:], params[2:], strict=True)]  # join at a step boundary
    engine.run()
    assert [r.tokens for r in first + later] == expected
    assert all(r.finish_reason == "length" for r in first + later)
    assert sorted(engine.free_rows) == [0, 1, 2] and engine.reserved == 0


def test_cancelling_a_neighbour_frees_its_row_and_leaves_others_unchanged(checkpoints: dict) -> None:
    llm = kataru.load(checkpoints["llama"][0], dtype="float32")
    params = SamplingParams(max_new_tokens=16, do_sample=False, ignore_eos=True)
    a, b = prompts(llm.config.vocab_size, [9, 14])
    engine = Engine(llm.model, llm.eos_ids, max_batch=2)
    keep, drop = engine.submit(a, params), engine.submit(b, params)
    engine.step()
    engine.step()
    assert engine.free_rows == [] and engine.reserved == keep.reserved + drop.reserved
    engine.cancel(drop)
    assert drop.finish_reason == "cancelled" and engine.free_rows == [drop.row]
    assert engine.reserved == keep.reserved
    engine.run()
    assert keep.tokens == alone(llm, a, params)


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_chunked_prefill_keeps_neighbours_decoding_and_matches_running_alone(family: str, checkpoints: dict) -> None:
    llm = kataru.load(checkpoints[family][0], dtype="float32")
    params = SamplingParams(max_new_tokens=10, do_sample=False, ignore_eos=True)
    short, long, other = prompts(llm.config.vocab_size, [4, 37, 6])
    engine = Engine(llm.model, llm.eos_ids, max_batch=3, prefill_chunk=8)
    running = engine.submit(short, params)
    engine.step()
    late = engine.submit(long, params)  # 37 tokens: chunks of 8, 8, 8, 8, 5
    neighbour = engine.submit(other, params)  # admitted, but its 6 tokens never share a step with late's chunks
    got = []
    for _ in range(5):
        steps = engine.step()
        got.append(len(running.tokens))
        assert running.id in [s.row for s in steps]  # the running request decodes on every step
    assert late.prefilled == 37 and late.tokens and got == [2, 3, 4, 5, 6]
    assert neighbour in engine.prefilling and neighbour.prefilled == 0  # 5 + 6 > 8: its whole chunk waits
    engine.run()
    for request, prompt in ((running, short), (late, long), (neighbour, other)):
        assert request.tokens == alone(llm, prompt, params)
    with pytest.raises(KataruError, match="prefill_chunk must be a positive"):
        Engine(llm.model, llm.eos_ids, prefill_chunk=0)


def test_cancelling_during_chunked_prefill_frees_the_row_and_keeps_what_was_prefilled(checkpoints: dict) -> None:
    llm = kataru.load(checkpoints["llama"][0], dtype="float32")
    params = SamplingParams(max_new_tokens=6, do_sample=False, ignore_eos=True)
    (prompt,) = prompts(llm.config.vocab_size, [30])
    engine = Engine(llm.model, llm.eos_ids, max_batch=1, prefill_chunk=10)
    request = engine.submit(prompt, params)
    engine.step()
    engine.step()
    assert request.prefilled == 20 and engine.free_rows == [] and engine.reserved == request.reserved
    engine.cancel(request)
    assert request.finish_reason == "cancelled" and not request.tokens
    assert engine.free_rows == [0] and engine.reserved == 0 and not engine.has_work()
    again = engine.submit(prompt, params)  # the 20 tokens already in the row are not prefilled again
    engine.run()
    assert engine.reused_tokens == 20 and again.tokens == alone(llm, prompt, params)


def test_budget_makes_requests_wait_and_refuses_what_never_fits(checkpoints: dict) -> None:
    llm = kataru.load(checkpoints["llama"][0], dtype="float32")
    params = SamplingParams(max_new_tokens=10, do_sample=False, ignore_eos=True)
    a, b = prompts(llm.config.vocab_size, [20, 20])
    engine = Engine(llm.model, llm.eos_ids, max_batch=4, max_cache_tokens=45)  # room for one request of 30
    first, second = engine.submit(a, params), engine.submit(b, params)
    engine.step()
    assert first in engine.running and second in engine.waiting  # waits for memory, not for a row
    engine.run()
    assert first.tokens == alone(llm, a, params) and second.tokens == alone(llm, b, params)
    with pytest.raises(KataruError, match="more than the engine's budget"):
        engine.submit(list(range(3, 43)), params)
    with pytest.raises(KataruError, match="longer than the model's context"):
        engine.submit(list(range(3, 3 + llm.config.max_seq_len + 5)), params)


def test_per_request_sampling_and_eos(checkpoints: dict) -> None:
    llm = kataru.load(checkpoints["stablelm"][0], dtype="float32")
    p = prompts(llm.config.vocab_size, [10])[0]
    greedy = SamplingParams(max_new_tokens=8, do_sample=False, ignore_eos=True)
    first = alone(llm, p, greedy)[0]
    engine = Engine(llm.model, {first}, max_batch=4)
    sampled = [engine.submit(p, SamplingParams(max_new_tokens=8, seed=s, top_k=0, ignore_eos=True))
               for s in (1, 1, 2)]
    stopped = engine.submit(p, SamplingParams(max_new_tokens=8, do_sample=False))
    engine.run()
    assert sampled[0].tokens == sampled[1].tokens != sampled[2].tokens
    assert stopped.tokens == [first] and stopped.finish_reason == "stop"


def test_async_stream(checkpoints: dict) -> None:
    llm = kataru.load(checkpoints["mistral"][0], dtype="float32")
    params = SamplingParams(max_new_tokens=9, do_sample=False, ignore_eos=True)
    ps = prompts(llm.config.vocab_size, [6, 13])
    engine = Engine(llm.model, llm.eos_ids, max_batch=2)

    async def collect(prompt: list[int]) -> list[int]:
        return [t async for t in engine.stream(engine.submit(prompt, params))]

    async def main() -> list[list[int]]:
        return list(await asyncio.gather(*(collect(p) for p in ps)))

    assert asyncio.run(main()) == [alone(llm, p, params) for p in ps]


def test_streams_step_on_a_worker_thread_and_cancel_without_waiting_for_the_step(checkpoints: dict) -> None:
    """While a step computes, the event loop runs (a server answers); a cancel asked for then frees the row
    as soon as the step ends, and the neighbour's tokens are those of running alone."""
    llm = kataru.load(checkpoints["llama"][0], dtype="float32")
    params = SamplingParams(max_new_tokens=8, do_sample=False, ignore_eos=True)
    a, b = prompts(llm.config.vocab_size, [7, 10])
    step_started, release = threading.Event(), threading.Event()
    threads = set()

    def held_decode(*args, **kwargs):  # type: ignore[no-untyped-def]
        threads.add(threading.get_ident())
        if len(keep.tokens) == 3:  # one step is held until the loop side releases it
            step_started.set()
            assert release.wait(timeout=30), "the event loop never ran while the step was held"
        return llm.model(*args, **kwargs)

    engine = Engine(llm.model, llm.eos_ids, max_batch=2, decode=held_decode)
    keep, drop = engine.submit(a, params), engine.submit(b, params)

    async def main() -> list[int]:
        kept = asyncio.ensure_future(collect(keep))
        dropped = asyncio.ensure_future(collect(drop))
        while not step_started.is_set():
            await asyncio.sleep(0.01)
        engine.cancel(drop)  # returns at once: the held step owns the rows
        assert drop.finish_reason is None and drop.row not in engine.free_rows
        release.set()
        assert await dropped == drop.tokens and len(drop.tokens) == 4  # the held step still decoded it
        assert drop.finish_reason == "cancelled" and drop.row in engine.free_rows
        return await kept

    async def collect(request):  # type: ignore[no-untyped-def]
        return [t async for t in engine.stream(request)]

    assert asyncio.run(main()) == alone(llm, a, params)
    assert threading.get_ident() not in threads and len(threads) == 1  # one worker thread, not the loop's
    assert engine.reserved == 0 and sorted(engine.free_rows) == [0, 1]


def test_a_failing_step_ends_every_stream_with_one_clear_error(checkpoints: dict) -> None:
    llm = kataru.load(checkpoints["llama"][0], dtype="float32")
    params = SamplingParams(max_new_tokens=8, do_sample=False, ignore_eos=True)

    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("device lost\nmore detail")

    engine = Engine(llm.model, llm.eos_ids, max_batch=1, decode=broken)
    first, queued = (engine.submit(p, params) for p in prompts(llm.config.vocab_size, [5, 6]))

    async def collect(request):  # type: ignore[no-untyped-def]
        return [t async for t in engine.stream(request)]

    async def main() -> list:
        return await asyncio.gather(collect(first), collect(queued), return_exceptions=True)

    results = asyncio.run(main())
    for result in results:
        assert isinstance(result, KataruError) and str(result) == "the engine failed (RuntimeError: device lost)"
    assert first.finish_reason == queued.finish_reason == "error" and not engine.has_work()
    assert engine.reserved == 0 and engine.free_rows == [0]


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_compiled_decode_step_matches_eager(checkpoints: dict, quantize: str | None,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.compile'd one-token steps (dynamic batch and key length) give the eager engine's tokens, in one
    graph that keeps kataru's CPU kernels (as torch operators) where they run."""
    from torch._dynamo.utils import counters

    llm = kataru.load(checkpoints["llama"][0], dtype="float32", quantize=quantize, compile=True)
    params = [SamplingParams(max_new_tokens=n, do_sample=False, ignore_eos=True) for n in (10, 6, 9)]
    ps = prompts(llm.config.vocab_size, [4, 13, 8])
    expected = [alone(llm, p, q) for p, q in zip(ps, params, strict=True)]

    inside, calls = {"decode": False}, {"_linear_int8": 0, "_decode_attention": 0}
    def counting(name: str):  # type: ignore[no-untyped-def]
        kernel = getattr(kernels, name)

        def counted(*args):  # type: ignore[no-untyped-def]
            calls[name] += inside["decode"]
            return kernel(*args)
        return counted

    for name in calls:
        monkeypatch.setattr(kernels, name, counting(name))

    def decode(*args, **kwargs):  # type: ignore[no-untyped-def]
        inside["decode"] = True
        try:
            return llm.decode(*args, **kwargs)
        finally:
            inside["decode"] = False

    counters.clear()
    engine = Engine(llm.model, llm.eos_ids, max_batch=3, decode=decode)
    first = engine.submit(ps[0], params[0])
    engine.step()
    engine.step()
    rest = [engine.submit(p, q) for p, q in zip(ps[1:], params[1:], strict=True)]
    engine.run()
    assert [r.tokens for r in [first, *rest]] == expected
    assert llm.decode is not llm.model
    assert not counters["graph_break"], dict(counters["graph_break"])
    if kernels.available():
        assert calls["_decode_attention"] > 0
        assert calls["_linear_int8"] > 0 if quantize else calls["_linear_int8"] == 0


def test_decode_falls_back_to_eager_when_the_compiler_fails(checkpoints: dict, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    llm = kataru.load(checkpoints["llama"][0], dtype="float32")

    def broken_compiler(model: torch.nn.Module, **kwargs: object):  # type: ignore[no-untyped-def]
        def run(*args: object, **kw: object) -> torch.Tensor:
            raise RuntimeError("InductorError: no working C++ compiler found\nlong trace")
        return run

    monkeypatch.setattr(torch, "compile", broken_compiler)
    params = SamplingParams(max_new_tokens=8, do_sample=False, ignore_eos=True)
    (prompt,) = prompts(llm.config.vocab_size, [6])
    engine = Engine(llm.model, llm.eos_ids, max_batch=1, compile=True)
    request = engine.submit(prompt, params)
    engine.run()
    assert request.tokens == alone(llm, prompt, params)
    err = capsys.readouterr().err
    assert err.count("torch.compile failed") == 1 and "decoding eagerly" in err and "long trace" not in err


def run_graphed(llm: kataru.LLM, graphed: GraphedDecode, ps: list[list[int]],
                params: list[SamplingParams]) -> tuple[list[list[int]], list[tuple[int, int, int]]]:
    """(each request's tokens, (batch size, span, longest row's span) of each decode step the model ran) on a
    4-row engine."""
    steps: list[tuple[int, int, int]] = []

    def record(module: torch.nn.Module, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
        if args[0].shape[1] == 1:
            steps.append((args[0].shape[0], kwargs["span"], int(kwargs["start"].max()) + 1))

    hook = llm.model.register_forward_hook(record, with_kwargs=True)
    try:
        engine = Engine(llm.model, llm.eos_ids, max_batch=4, decode=graphed)
        requests = [engine.submit(p, q) for p, q in zip(ps, params, strict=True)]
        engine.run()
    finally:
        hook.remove()
    return [r.tokens for r in requests], steps


@pytest.mark.parametrize("use_kernels", [True, False])
def test_static_decode_step_pads_batches_and_keeps_the_tokens(checkpoints: dict, use_kernels: bool) -> None:
    """The step CUDA graphs replay, run eagerly: three rows padded to four, then two and one as requests
    finish, attending over a span bucket (64 slots, then 128 as the longest row passes 64) under the mask,
    give the tokens of running alone."""
    llm = kataru.load(checkpoints["llama"][0], dtype="float32")
    params = [SamplingParams(max_new_tokens=n, do_sample=False, ignore_eos=True) for n in (9, 14, 5)]
    ps = prompts(llm.config.vocab_size, [7, 56, 4])
    with contextlib.nullcontext() if use_kernels else kernels.disabled():
        expected = [alone(llm, p, q) for p, q in zip(ps, params, strict=True)]
        tokens, steps = run_graphed(llm, GraphedDecode(llm.model, capture=False), ps, params)
    assert tokens == expected
    assert {size for size, _, _ in steps} == {4, 2, 1}  # three rows ran as four; two as two, one as one
    assert {span for _, span, _ in steps} == {64, 128}
    for _, span, longest in steps:  # the smallest bucket that holds the longest row
        assert longest <= span and (span == 64 or longest > span // 2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback where CUDA graphs cannot be captured")
def test_graph_capture_failure_falls_back_to_eager(checkpoints: dict, capsys: pytest.CaptureFixture[str]) -> None:
    """After a failed capture the step runs at the batch's own shapes: three rows are not padded to four."""
    llm = kataru.load(checkpoints["llama"][0], dtype="float32")
    params = [SamplingParams(max_new_tokens=n, do_sample=False, ignore_eos=True) for n in (6, 9, 4)]
    ps = prompts(llm.config.vocab_size, [5, 8, 3])
    graphed = GraphedDecode(llm.model, capture=True)  # no CUDA here: capture fails on first use
    tokens, steps = run_graphed(llm, graphed, ps, params)
    assert tokens == [alone(llm, p, q) for p, q in zip(ps, params, strict=True)]
    err = capsys.readouterr().err
    assert err.count("CUDA graph capture failed") == 1 and "decoding eagerly" in err and graphed.failed
    assert {size for size, _, _ in steps} == {3, 2, 1} and not graphed.graphs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA graphs)")
def test_cuda_graphs_replay_the_eager_tokens(checkpoints: dict) -> None:
    llm = kataru.load(checkpoints["llama"][0], dtype="float32", device="cuda")
    assert isinstance(llm.decode, GraphedDecode) and llm.decode.capture
    params = [SamplingParams(max_new_tokens=n, do_sample=False, ignore_eos=True) for n in (9, 14, 5)]
    ps = prompts(llm.config.vocab_size, [7, 12, 4])
    expected = [alone(llm, p, q) for p, q in zip(ps, params, strict=True)]
    tokens, _ = run_graphed(llm, llm.decode, ps, params)
    assert tokens == expected and set(llm.decode.graphs) == {(4, 64), (2, 64), (1, 64)}


def test_prefix_reuse_prefills_only_the_new_tokens_with_the_same_result(checkpoints: dict) -> None:
    llm = kataru.load(checkpoints["llama"][0], dtype="float32")
    params = SamplingParams(max_new_tokens=8, do_sample=False, ignore_eos=True)
    first_prompt, other, extra = prompts(llm.config.vocab_size, [12, 9, 5])
    engine = Engine(llm.model, llm.eos_ids, max_batch=2)
    first = engine.submit(first_prompt, params)
    neighbour = engine.submit(other, params)
    engine.run()
    # The next turn: the whole first exchange, then new tokens. Its row holds all but the newest token.
    follow_up = first_prompt + first.tokens + extra
    second = engine.submit(follow_up, params)
    engine.run()
    assert engine.reused_tokens == len(first_prompt) + len(first.tokens) - 1
    assert second.row == first.row != neighbour.row
    assert second.tokens == alone(llm, follow_up, params)
    # Anyone else writing the cache (here the single-request path) makes the engine forget what rows held.
    alone(llm, other, params)
    third = engine.submit(follow_up + second.tokens, params)
    engine.run()
    assert engine.reused_tokens == len(first_prompt) + len(first.tokens) - 1  # unchanged: nothing trusted
    assert third.tokens == alone(llm, follow_up + second.tokens, params)



def test_a_model_holds_its_engine_weakly(checkpoints: dict) -> None:
    """The model remembers which engine wrote its cache rows without keeping it alive, so copying a model an
    engine ran on copies weights and cache but not the engine (whose lock cannot be copied)."""
    llm = kataru.load(checkpoints["llama"][0], dtype="float32")
    params = SamplingParams(max_new_tokens=4, do_sample=False, ignore_eos=True)
    engine = Engine(llm.model, llm.eos_ids, max_batch=1)
    first = engine.submit([5, 6, 7, 8], params)
    engine.run()
    assert llm.model.cache_owner is engine
    clone = copy.deepcopy(llm.model)
    assert torch.equal(clone.layers[0].attention.kv_cache.k, llm.model.layers[0].attention.kv_cache.k)
    other = Engine(clone, llm.eos_ids, max_batch=1)
    again = other.submit([5, 6, 7, 8], params)
    other.run()
    assert again.tokens == first.tokens and other.reused_tokens == 0  # it trusts no row it did not write
    del engine, first
    gc.collect()
    assert llm.model.cache_owner is None

def test_chat_turns_reuse_the_previous_turn(checkpoints: dict) -> None:
    llm = kataru.load(checkpoints["llama"][0], dtype="float32")
    history = [{"role": "user", "content": "こんにちは"}]
    reply = llm.generate(history, temperature=0, max_new_tokens=6, ignore_eos=True, raw=False)
    history += [{"role": "assistant", "content": reply}, {"role": "user", "content": "もう一度"}]
    cached = llm.complete([history], temperature=0, max_new_tokens=6, ignore_eos=True)[0]
    assert llm._last_engine.reused_tokens > 0
    fresh = llm.complete([history], temperature=0, max_new_tokens=6, ignore_eos=True, use_cache=False)[0]
    assert cached.token_ids == fresh.token_ids
