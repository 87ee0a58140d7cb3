"""The engine on real models: same greedy outputs as running alone, joins, cancellation, memory budget, chunked
prefill, exact prefix reuse, async streams, compiled and graphed decode steps."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from unittest import mock

import pytest
import torch
from helpers import generate_alone

import kataru
from kataru import kernels
from kataru.engine import Engine, GraphedDecode
from kataru.errors import KataruError
from kataru.model import Linear
from kataru.sampling import SamplingParams


def alone(llm: kataru.LLM, prompt: list[int], params: SamplingParams) -> list[int]:
    return generate_alone(llm.model, prompt, params, llm.eos_ids)


def prompts(vocab: int, lengths: list[int], seed: int = 3) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
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
    assert sorted(engine.scheduler.free_rows) == [0, 1, 2] and engine.scheduler.reserved == 0


def test_cancelling_a_neighbour_frees_its_row_and_leaves_others_unchanged(checkpoints: dict) -> None:
    llm = kataru.load(checkpoints["llama"][0], dtype="float32")
    params = SamplingParams(max_new_tokens=16, do_sample=False, ignore_eos=True)
    a, b = prompts(llm.config.vocab_size, [9, 14])
    engine = Engine(llm.model, llm.eos_ids, max_batch=2)
    keep, drop = engine.submit(a, params), engine.submit(b, params)
    engine.step()
    engine.step()
    assert engine.scheduler.free_rows == [] and engine.scheduler.reserved == keep.reserved + drop.reserved
    engine.cancel(drop)
    assert drop.finish_reason == "cancelled" and engine.scheduler.free_rows == [drop.row]
    assert engine.scheduler.reserved == keep.reserved
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
        assert running.id in [s.request_id for s in steps]  # the running request decodes on every step
    assert late.prefilled == 37 and late.tokens and got == [2, 3, 4, 5, 6]
    assert neighbour in engine.scheduler.prefilling and neighbour.prefilled == 0  # 5 + 6 > 8: its chunk waits
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
    assert request.prefilled == 20 and engine.scheduler.free_rows == []
    assert engine.scheduler.reserved == request.reserved
    engine.cancel(request)
    assert request.finish_reason == "cancelled" and not request.tokens
    assert engine.scheduler.free_rows == [0] and engine.scheduler.reserved == 0 and not engine.has_work()
    again = engine.submit(prompt, params)  # the 20 tokens already in the row are not prefilled again
    engine.run()
    assert again.reused == 20 and engine.scheduler.reused_tokens == 20
    assert again.tokens == alone(llm, prompt, params)


def test_budget_makes_requests_wait_and_refuses_what_never_fits(checkpoints: dict) -> None:
    llm = kataru.load(checkpoints["llama"][0], dtype="float32")
    params = SamplingParams(max_new_tokens=10, do_sample=False, ignore_eos=True)
    a, b = prompts(llm.config.vocab_size, [20, 20])
    engine = Engine(llm.model, llm.eos_ids, max_batch=4, max_cache_tokens=45)  # room for one request of 30
    first, second = engine.submit(a, params), engine.submit(b, params)
    engine.step()
    assert first in engine.scheduler.running and second in engine.scheduler.waiting  # waits for memory, not a row
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
    assert sampled[0].tokens == alone(llm, p, SamplingParams(max_new_tokens=8, seed=1, top_k=0, ignore_eos=True))
    assert stopped.tokens == [first] and stopped.finish_reason == "stop"


@pytest.mark.parametrize("weights", ["float32", "bfloat16", "int8", "int4"])
def test_prefix_reuse_gives_the_tokens_of_a_fresh_prefill_in_every_dtype(weights: str, checkpoints: dict) -> None:
    """A prompt that shares a prefix with an earlier one continues from the earlier one's cached chunks and
    gets the very tokens a fresh engine gives it, for shared prefixes around every chunk boundary: reuse
    resumes at a chunk boundary, and those chunks were computed exactly as the new prompt's own would be."""
    quantize = weights if weights.startswith("int") else None
    llm = kataru.load(checkpoints["llama"][0], dtype="float32" if weights == "float32" else "bfloat16",
                      quantize=quantize)
    params = SamplingParams(max_new_tokens=8, do_sample=False, ignore_eos=True)
    (base,) = prompts(llm.config.vocab_size, [40], seed=11)
    tails = prompts(llm.config.vocab_size, [5, 6], seed=12)
    shared = [7, 8, 9, 15, 16, 17, 23, 24, 25]
    reused = []
    for n in shared:
        first, second = base[:n] + tails[0], base[:n] + tails[1]
        warm = Engine(llm.model, llm.eos_ids, max_batch=1, prefill_chunk=8)
        warm.submit(first, params)
        warm.run()
        again = warm.submit(second, params)
        warm.run()
        fresh = Engine(llm.model, llm.eos_ids, max_batch=1, prefill_chunk=8)
        expected = fresh.submit(second, params)
        fresh.run()
        assert again.tokens == expected.tokens, f"shared prefix of {n} tokens"
        reused.append(again.reused)
    assert reused == [n - n % 8 for n in shared]  # 0, 8, 8, 8, 16, 16, 16, 24, 24


def test_decode_written_slots_are_never_reused(checkpoints: dict) -> None:
    """The next turn of a chat holds the previous answer, which decode steps wrote: the row serves the whole
    chunks of the previous prompt only, and the turn's tokens are those of a fresh prefill."""
    llm = kataru.load(checkpoints["llama"][0], dtype="bfloat16")
    params = SamplingParams(max_new_tokens=8, do_sample=False, ignore_eos=True)
    first_prompt, extra = prompts(llm.config.vocab_size, [21, 5])
    engine = Engine(llm.model, llm.eos_ids, max_batch=2, prefill_chunk=4)
    first = engine.submit(first_prompt, params)
    neighbour = engine.submit(prompts(llm.config.vocab_size, [9], seed=5)[0], params)
    engine.run()
    follow_up = first_prompt + first.tokens + extra
    second = engine.submit(follow_up, params)
    engine.run()
    assert second.row == first.row != neighbour.row and second.reused == 20
    fresh = Engine(llm.model, llm.eos_ids, max_batch=1, prefill_chunk=4)
    expected = fresh.submit(follow_up, params)
    fresh.run()
    assert second.tokens == expected.tokens


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
    engine = Engine(llm.model, llm.eos_ids, max_batch=2)
    decode = engine.runner.decode_step

    def held_decode(*args):  # type: ignore[no-untyped-def]
        threads.add(threading.get_ident())
        if len(keep.tokens) == 3:  # one step is held until the loop side releases it
            step_started.set()
            assert release.wait(timeout=30), "the event loop never ran while the step was held"
        return decode(*args)

    engine.runner.decode_step = held_decode
    keep, drop = engine.submit(a, params), engine.submit(b, params)

    async def main() -> list[int]:
        kept = asyncio.ensure_future(collect(keep))
        dropped = asyncio.ensure_future(collect(drop))
        while not step_started.is_set():
            await asyncio.sleep(0.01)
        engine.cancel(drop)  # returns at once: the held step owns the rows
        assert drop.finish_reason is None and drop.row not in engine.scheduler.free_rows
        release.set()
        assert await dropped == drop.tokens and len(drop.tokens) == 4  # the held step still decoded it
        assert drop.finish_reason == "cancelled" and drop.row in engine.scheduler.free_rows
        return await kept

    async def collect(request):  # type: ignore[no-untyped-def]
        return [t async for t in engine.stream(request)]

    assert asyncio.run(main()) == alone(llm, a, params)
    assert threading.get_ident() not in threads and len(threads) == 1  # one worker thread, not the loop's
    assert engine.scheduler.reserved == 0 and sorted(engine.scheduler.free_rows) == [0, 1]


def test_a_failing_step_ends_its_streams_with_one_clear_error(checkpoints: dict) -> None:
    llm = kataru.load(checkpoints["llama"][0], dtype="float32")
    params = SamplingParams(max_new_tokens=8, do_sample=False, ignore_eos=True)

    def broken(*args):  # type: ignore[no-untyped-def]
        raise RuntimeError("device lost\nmore detail")

    engine = Engine(llm.model, llm.eos_ids, max_batch=1)
    engine.runner.decode_step = broken
    first, queued = (engine.submit(p, params) for p in prompts(llm.config.vocab_size, [5, 6]))

    async def collect(request):  # type: ignore[no-untyped-def]
        return [t async for t in engine.stream(request)]

    async def main() -> list:
        return await asyncio.gather(collect(first), collect(queued), return_exceptions=True)

    results = asyncio.run(main())
    for result in results:
        assert isinstance(result, KataruError) and str(result) == "the engine failed (RuntimeError: device lost)"
    assert first.finish_reason == queued.finish_reason == "error" and not engine.has_work()
    assert engine.scheduler.reserved == 0 and engine.scheduler.free_rows == [0]


@pytest.mark.parametrize("quantize", [None, "int8", "packed"])
def test_compiled_decode_step_matches_eager(checkpoints: dict, quantize: str | None,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.compile'd one-token steps (dynamic batch and key length) give the eager engine's tokens, in one
    graph that keeps kataru's CPU kernels (as torch operators) where they run ("packed": bf16 layers that keep
    only their packed panels, as a plan that runs them everywhere leaves them)."""
    from torch._dynamo.utils import counters

    packed = quantize == "packed"
    if packed and not kernels.available():
        pytest.skip("no C compiler or AVX2: no packed layout here")
    llm = kataru.load(checkpoints["llama"][0], dtype="bfloat16" if packed else "float32",
                      quantize=None if packed else quantize)
    for m in llm.model.modules():
        if packed and isinstance(m, Linear):
            m.settle({"packed"}, shared=m.weight is llm.model.tok_embeddings.weight)
    params = [SamplingParams(max_new_tokens=n, do_sample=False, ignore_eos=True) for n in (10, 6, 9)]
    ps = prompts(llm.config.vocab_size, [4, 13, 8])
    expected = [alone(llm, p, q) for p, q in zip(ps, params, strict=True)]

    inside, calls = {"decode": False}, {"_linear_int8": 0, "_linear_packed": 0, "_decode_attention": 0}

    def counting(name: str):  # type: ignore[no-untyped-def]
        kernel = getattr(kernels, name)

        def counted(*args):  # type: ignore[no-untyped-def]
            calls[name] += inside["decode"]
            return kernel(*args)
        return counted

    for name in calls:
        monkeypatch.setattr(kernels, name, counting(name))

    counters.clear()
    engine = Engine(llm.model, llm.eos_ids, max_batch=3, compile=True)
    compiled = engine.runner.decode_step
    assert compiled != llm.model.decode

    def decode(*args):  # type: ignore[no-untyped-def]
        inside["decode"] = True
        try:
            return compiled(*args)
        finally:
            inside["decode"] = False

    engine.runner.decode_step = decode
    first = engine.submit(ps[0], params[0])
    engine.step()
    engine.step()
    rest = [engine.submit(p, q) for p, q in zip(ps[1:], params[1:], strict=True)]
    engine.run()
    assert [r.tokens for r in [first, *rest]] == expected
    assert not counters["graph_break"], dict(counters["graph_break"])
    if kernels.available():
        assert calls["_decode_attention"] > 0
        assert calls["_linear_int8"] > 0 if quantize == "int8" else calls["_linear_int8"] == 0
        assert calls["_linear_packed"] > 0 if packed else calls["_linear_packed"] == 0


def test_decode_falls_back_to_eager_when_the_compiler_fails(checkpoints: dict, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    llm = kataru.load(checkpoints["llama"][0], dtype="float32")

    def broken_compiler(fn: object, **kwargs: object):  # type: ignore[no-untyped-def]
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


def test_a_model_error_inside_the_compiled_step_is_not_hidden(checkpoints: dict,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the compiler's own errors fall back to eager decoding; a bug in the step is raised as it is."""
    llm = kataru.load(checkpoints["llama"][0], dtype="float32")

    def compiler(fn: object, **kwargs: object):  # type: ignore[no-untyped-def]
        def run(*args: object) -> torch.Tensor:
            raise ValueError("shape bug in the model")
        return run

    monkeypatch.setattr(torch, "compile", compiler)
    engine = Engine(llm.model, llm.eos_ids, max_batch=1, compile=True)
    request = engine.submit([5, 6, 7], SamplingParams(max_new_tokens=4, do_sample=False, ignore_eos=True))
    engine.run()
    assert request.finish_reason == "error" and request.error == "the engine failed (ValueError: shape bug in the model)"


def run_graphed(llm: kataru.LLM, graphed: GraphedDecode, ps: list[list[int]], params: list[SamplingParams],
                monkeypatch: pytest.MonkeyPatch) -> tuple[list[list[int]], list[tuple[int, int, int]]]:
    """(each request's tokens, (batch size, span, longest row's span) of each decode step the model ran) on a
    4-row engine."""
    steps: list[tuple[int, int, int]] = []
    decode = llm.model.decode

    def record(tokens, cache, rows, slots, span):  # type: ignore[no-untyped-def]
        steps.append((tokens.shape[0], span, int(slots.max()) + 1))
        return decode(tokens, cache, rows, slots, span)

    monkeypatch.setattr(llm.model, "decode", record)
    engine = Engine(llm.model, llm.eos_ids, max_batch=4)
    engine.runner.decode_step = graphed
    requests = [engine.submit(p, q) for p, q in zip(ps, params, strict=True)]
    engine.run()
    return [r.tokens for r in requests], steps


@pytest.mark.parametrize("use_kernels", [True, False])
def test_static_decode_step_pads_batches_and_keeps_the_tokens(checkpoints: dict, use_kernels: bool,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The step CUDA graphs replay, run eagerly: three rows padded to four, then two and one as requests
    finish, attending over a span bucket (64 slots, then 128 as the longest row passes 64) under the mask,
    give the tokens of running alone."""
    llm = kataru.load(checkpoints["llama"][0], dtype="float32")
    params = [SamplingParams(max_new_tokens=n, do_sample=False, ignore_eos=True) for n in (9, 14, 5)]
    ps = prompts(llm.config.vocab_size, [7, 56, 4])
    with contextlib.nullcontext() if use_kernels else kernels.disabled():
        expected = [alone(llm, p, q) for p, q in zip(ps, params, strict=True)]
        tokens, steps = run_graphed(llm, GraphedDecode(llm.model, capture=False), ps, params, monkeypatch)
    assert tokens == expected
    assert {size for size, _, _ in steps} == {4, 2, 1}  # three rows ran as four; two as two, one as one
    assert {span for _, span, _ in steps} == {64, 128}
    for _, span, longest in steps:  # the smallest bucket that holds the longest row
        assert longest <= span and (span == 64 or longest > span // 2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback where CUDA graphs cannot be captured")
def test_graph_capture_failure_falls_back_to_eager(checkpoints: dict, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """After a failed capture the step runs at the batch's own shapes: three rows are not padded to four."""
    llm = kataru.load(checkpoints["llama"][0], dtype="float32")
    params = [SamplingParams(max_new_tokens=n, do_sample=False, ignore_eos=True) for n in (6, 9, 4)]
    ps = prompts(llm.config.vocab_size, [5, 8, 3])
    graphed = GraphedDecode(llm.model, capture=True)  # no CUDA here: capture fails on first use
    tokens, steps = run_graphed(llm, graphed, ps, params, monkeypatch)
    assert tokens == [alone(llm, p, q) for p, q in zip(ps, params, strict=True)]
    err = capsys.readouterr().err
    assert err.count("CUDA graph capture failed") == 1 and "decoding eagerly" in err and graphed.failed
    assert {size for size, _, _ in steps} == {3, 2, 1} and not graphed.graphs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA graphs)")
def test_cuda_graphs_replay_the_eager_tokens(checkpoints: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    llm = kataru.load(checkpoints["llama"][0], dtype="float32", device="cuda")
    graphed = llm.engine.runner.decode_step
    assert isinstance(graphed, GraphedDecode) and graphed.capture
    params = [SamplingParams(max_new_tokens=n, do_sample=False, ignore_eos=True) for n in (9, 14, 5)]
    ps = prompts(llm.config.vocab_size, [7, 12, 4])
    expected = [alone(llm, p, q) for p, q in zip(ps, params, strict=True)]
    tokens, _ = run_graphed(llm, graphed, ps, params, monkeypatch)
    assert tokens == expected and set(graphed.graphs) == {(4, 64), (2, 64), (1, 64)}


def test_engines_on_one_model_keep_their_own_caches(checkpoints: dict) -> None:
    """The cache belongs to the engine: two engines on one model (or a quantized copy of it) never see each
    other's rows, and the model holds no cache at all."""
    llm = kataru.load(checkpoints["llama"][0], dtype="float32")
    params = SamplingParams(max_new_tokens=6, do_sample=False, ignore_eos=True)
    first, other = prompts(llm.config.vocab_size, [24, 24], seed=8)
    a = Engine(llm.model, llm.eos_ids, max_batch=1, prefill_chunk=8)
    b = Engine(llm.model, llm.eos_ids, max_batch=1, prefill_chunk=8)
    a.submit(first, params)
    a.run()
    b.submit(other, params)  # b writes its own row 0
    b.run()
    again = a.submit([*first, 5, 6], params)
    a.run()
    assert again.reused == 24 and again.tokens == alone(llm, [*first, 5, 6], params)
    assert not any("cache" in name for name, _ in llm.model.named_buffers())
    assert a.runner.cache is not b.runner.cache


def test_a_growing_cache_grows_with_demand_and_shrinks_when_idle(checkpoints: dict) -> None:
    llm = kataru.load(checkpoints["llama"][0], dtype="float32")
    params = SamplingParams(max_new_tokens=4, do_sample=False, ignore_eos=True)
    engine = Engine(llm.model, llm.eos_ids, max_batch=8, grow=True, idle_cache_tokens=256, prefill_chunk=8)
    assert engine.runner.cache is None and engine.stats()["cache_bytes"] == 0
    ps = prompts(llm.config.vocab_size, [20] * 6, seed=4)
    requests = [engine.submit(p, params) for p in ps]
    engine.step()
    stats = engine.stats()  # every request admitted at once: rows grown by doubling, 1, 2, 4, 8
    assert stats["cache_rows"] == 8 and stats["cache_slots"] == 256 and stats["prefilling"] == 6
    engine.run()
    assert [r.tokens for r in requests] == [alone(llm, p, params) for p in ps]
    stats = engine.stats()  # one 256-slot row kept: the last request's prefix, for the next call to reuse
    assert stats["cache_rows"] == 1 and stats["cache_slots"] == 256
    assert stats["cache_bytes"] == 2 * llm.config.n_layer * 256 * llm.config.kv_size * 4
    again = engine.submit(ps[-1] + [7], params)
    engine.run()
    assert again.reused == 16 and again.tokens == alone(llm, ps[-1] + [7], params)


@contextlib.contextmanager
def planned(llm: kataru.LLM, tmp_path, paths: dict[str, str]):  # type: ignore[no-untyped-def]
    """The model's layers under a plan of this test that runs `paths[bucket]` (as `kataru.load` reads plans
    with KATARU_DISPATCH=cached), the process's plans forgotten afterwards."""
    from kataru import dispatch

    file = tmp_path / "plans.json"
    saved = os.environ.get("KATARU_DISPATCH")
    keys = {dispatch.plan_key(m) for m in llm.model.modules() if getattr(m, "plan_kind", None)}
    ms = {b: {paths[b]: 1.0, "torch": 2.0 if paths[b] != "torch" else 1.0} for b in dispatch.BUCKETS}
    plans = {key: dispatch.Plan(key, ms) for key in keys}
    c, dtype = llm.model.config, dispatch.SHORT.get(llm.model.tok_embeddings.weight.dtype)
    for kind in dispatch.STEP_KINDS:  # a decode step's attention and norm too: none is left to a timing
        key = f"{kind}-{dtype}:{c.dim}/{c.n_head}/{c.n_kv_head}"
        plans[key] = dispatch.Plan(key, {b: {"kernel": 2.0, "torch": 1.0} if paths[b] == "torch" else
                                         {"kernel": 1.0, "torch": 2.0} for b in dispatch.DECODE})
    try:
        untimed = AssertionError("a plan of this test was timed instead of read")
        with mock.patch.object(dispatch, "plan_file", lambda: file), \
                mock.patch.object(dispatch, "measure", side_effect=untimed), \
                mock.patch.object(dispatch, "measure_step", side_effect=untimed):
            dispatch.write_plans(file, plans)
            os.environ["KATARU_DISPATCH"] = "cached"
            dispatch.reset()
            dispatch.prepare(llm.model)
            yield
    finally:
        os.environ["KATARU_DISPATCH"] = saved if saved is not None else "kernels"
        dispatch.reset()


def staggered(engine: Engine, ps: list[list[int]], params: SamplingParams) -> list[list[int]]:
    """Requests joining one per step while the earlier ones decode; their tokens."""
    requests = []
    for p in ps:
        requests.append(engine.submit(p, params))
        engine.step()
    engine.run()
    return [r.tokens for r in requests]


@pytest.mark.skipif(not kernels.available(), reason="kataru's AVX2 kernels do not run here: no matmul path gives "
                                                    "a row the same bits at any row count, nothing to fuse")
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_a_prompt_chunk_and_the_decode_batch_in_one_pass_give_the_bits_of_two(checkpoints: dict, tmp_path,
                                                                              quantize: str | None) -> None:
    """Where every matmul treats a row alike at any row count, a step's last prompt chunk goes through the
    model with the decode batch (`Transformer.mixed`, the weights read once): the logits and the cache are
    bit for bit those of a prefill and a decode step, and requests joining a running batch get the tokens of
    unfused steps and of running alone in an engine (in bf16 the cache's chunked prefill differs from a whole
    forward by rounding)."""
    llm = kataru.load(checkpoints["llama"][0], dtype="bfloat16", quantize=quantize)
    with planned(llm, tmp_path, dict.fromkeys(("1", "2-8", "9-64", "prompt"), "kernel")):
        model = llm.model
        cache = model.new_cache(4, 64)
        ps = prompts(llm.config.vocab_size, [9, 14, 6, 21])
        with torch.inference_mode():
            for row, p in enumerate(ps[:3]):
                model.prefill(torch.tensor([p]), cache, row, 0)
            tokens, rows = torch.tensor([[5], [7], [11]]), torch.tensor([0, 1, 2])
            slots = torch.tensor([len(p) for p in ps[:3]])
            chunk, twin = torch.tensor([ps[3][:16]]), model.new_cache(4, 64)
            for mine, theirs in zip(cache.k + cache.v, twin.k + twin.v, strict=True):
                theirs.copy_(mine)
            last, decoded = model.mixed(chunk, 3, 0, tokens, cache, rows, slots, 15)
            assert torch.equal(last, model.prefill(chunk, twin, 3, 0))
            assert torch.equal(decoded, model.decode(tokens, twin, rows, slots, 15))
            assert all(torch.equal(a, b) for a, b in zip(cache.k + cache.v, twin.k + twin.v, strict=True))
        params = SamplingParams(max_new_tokens=10, do_sample=False, ignore_eos=True)
        ps = prompts(llm.config.vocab_size, [5, 30, 11, 18, 3], seed=5)
        fused = Engine(model, llm.eos_ids, max_batch=4, prefill_chunk=8)
        unfused = Engine(model, llm.eos_ids, max_batch=4, prefill_chunk=8, fuse=False)
        solo = [staggered(Engine(model, llm.eos_ids, max_batch=4, prefill_chunk=8), [p], params)[0] for p in ps]
        assert staggered(fused, ps, params) == staggered(unfused, ps, params) == solo
        assert fused.stats()["fused_steps"] >= 8 and unfused.stats()["fused_steps"] == 0


@pytest.mark.skipif(not kernels.available(), reason="kataru's AVX2 kernels do not run here")
def test_no_fused_step_where_a_path_treats_rows_by_their_count(checkpoints: dict, tmp_path) -> None:
    """torch's GEMM for prompt chunks (or float32 weights, which always take it) could give a decode row
    other bits beside a chunk: such steps stay two passes."""
    llm = kataru.load(checkpoints["llama"][0], dtype="bfloat16")
    params = SamplingParams(max_new_tokens=6, do_sample=False, ignore_eos=True)
    ps = prompts(llm.config.vocab_size, [5, 30, 11])
    with planned(llm, tmp_path, {"1": "kernel", "2-8": "kernel", "9-64": "kernel", "prompt": "torch"}):
        engine = Engine(llm.model, llm.eos_ids, max_batch=4, prefill_chunk=8)
        staggered(engine, ps, params)
        assert engine.stats()["fused_steps"] == 0
    f32 = kataru.load(checkpoints["llama"][0], dtype="float32")
    with planned(f32, tmp_path, dict.fromkeys(("1", "2-8", "9-64", "prompt"), "kernel")):
        engine = Engine(f32.model, f32.eos_ids, max_batch=4, prefill_chunk=8)
        staggered(engine, ps, params)
        assert engine.stats()["fused_steps"] == 0
