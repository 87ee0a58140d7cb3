"""The scheduler alone, driven by a fake model: admission under the token budget and the rows, prefix-row
choice, cancellation mid-prefill and mid-decode, fairness of chunked prefill, growing and shrinking."""

from __future__ import annotations

import pytest

from kataru.engine.scheduler import Plan, Request, Scheduler
from kataru.errors import KataruError
from kataru.sampling import SamplingParams


class FakeModel:
    """Carries plans out the way the engine does, with token 7 for every new token; records what ran."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.plans: list[Plan] = []

    def step(self) -> Plan:
        s = self.scheduler
        plan = s.schedule()
        if plan.resize is not None:
            s.applied(plan.resize)
        self.plans.append(plan)
        for chunk in plan.prefill:
            if s.prefilled(chunk):
                self.emit(chunk.request)
        for request in plan.decode:
            if not request.done:
                self.emit(request)
        return plan

    def emit(self, request: Request) -> None:
        request.tokens.append(7)
        if len(request.tokens) >= request.params.max_new_tokens:
            self.scheduler.finish(request, "length")

    def run(self) -> None:
        while self.scheduler.has_work():
            self.step()


def request(prompt_len: int, new: int = 4, first: int = 100) -> Request:
    return Request(list(range(first, first + prompt_len)), SamplingParams(max_new_tokens=new, do_sample=False))


def make(rows: int = 2, slots: int = 64, budget: int | None = None, chunk: int | None = 8, **kw: object) -> Scheduler:
    return Scheduler(context=2048, max_rows=rows, max_slots=slots, budget=budget or rows * slots,
                     prefill_chunk=chunk, **kw)  # type: ignore[arg-type]


def test_admission_waits_for_the_budget_then_for_a_row() -> None:
    s = make(rows=3, budget=60)
    a, b, c = request(20, 10), request(10, 10), request(20, 10)  # reserve 30, 20, 30
    for r in (a, b, c):
        s.add(r)
    fake = FakeModel(s)
    fake.step()
    assert list(s.prefilling) == [a, b] and a.prefilled == 8 and b.prefilled == 0  # one chunk a step
    assert list(s.waiting) == [c] and s.reserved == 50 and s.free_tokens == 10
    fake.run()
    assert all(r.finish_reason == "length" for r in (a, b, c)) and s.reserved == 0
    rows_only = make(rows=1, budget=1000)
    first, second = request(5), request(5)
    rows_only.add(first)
    rows_only.add(second)
    FakeModel(rows_only).step()
    assert list(rows_only.waiting) == [second]  # budget to spare, no row
    with pytest.raises(KataruError, match="more than the engine's budget"):
        make(rows=2, slots=64, budget=20).add(request(15, 10))
    with pytest.raises(KataruError, match="more than the engine's rows of 64"):
        make(rows=2, slots=64, budget=500).add(request(60, 10))


def test_chunked_prefill_is_fair_and_never_cuts_a_chunk_for_a_neighbour() -> None:
    s = make(rows=4, slots=128, chunk=8)
    running = request(3, new=20)
    s.add(running)
    fake = FakeModel(s)
    fake.step()
    long, short1, short2 = request(20, first=300), request(5, first=400), request(3, first=500)
    for r in (long, short1, short2):
        s.add(r)
    spans = []
    for _ in range(4):
        plan = fake.step()
        spans.append([(c.request is long, c.start, c.end) for c in plan.prefill])
        assert running in plan.decode  # the running request decodes on every step
        assert sum(c.end - c.start for c in plan.prefill) <= 8 or len(plan.prefill) == 1
    # long: 8, 8, then its last 4 beside short2's 3 (4 + 5 > 8 keeps short1 waiting; the order is kept)
    assert spans == [[(True, 0, 8)], [(True, 8, 16)], [(True, 16, 20)], [(False, 0, 5), (False, 0, 3)]]
    whole = make(rows=4, slots=128, chunk=None)
    for r in (request(50, first=1), request(60, first=2)):
        whole.add(r)
    plan = FakeModel(whole).step()
    assert [(c.start, c.end) for c in plan.prefill] == [(0, 50), (0, 60)]  # None: every prompt whole, at once


def test_prefix_reuse_picks_the_longest_chunk_aligned_prefix_and_evicts_the_oldest() -> None:
    s = make(rows=3, slots=128, chunk=8)
    fake = FakeModel(s)
    prompts = [list(range(100, 130)), list(range(100, 112)) + list(range(900, 930)), list(range(500, 540))]
    for p in prompts:
        s.add(Request(p, SamplingParams(max_new_tokens=2, do_sample=False)))
    fake.run()
    row_of = {len(held) + held[-1]: row for row, held in s.cached.items()}
    assert sorted(len(held) for held in s.cached.values()) == [24, 40, 40]  # whole chunks of 30, 42, 40 tokens
    follow = Request([*range(100, 130), 1, 2], SamplingParams(max_new_tokens=2, do_sample=False))
    s.add(follow)
    fake.step()
    assert follow.row == row_of[24 + 123] and follow.reused == 24 and follow.prefilled == 32
    near = Request([*range(100, 111), 5], SamplingParams(max_new_tokens=2, do_sample=False))
    s.add(near)  # 11 tokens in common with two rows: reuse rounds down to 8, the first row with it wins
    fake.run()
    assert near.reused == 8
    # every row now holds a prefix: a stranger takes the row whose prefix was used longest ago
    order = sorted(s.cached, key=lambda r: s.last_used[r])
    stranger = request(10, first=2000)
    s.add(stranger)
    fake.step()
    assert stranger.row == order[0] and stranger.reused == 0
    assert make(chunk=None).reusable(list(range(50)), list(range(60))) == 0  # whole prompts: no reuse


def test_cancelling_mid_prefill_and_mid_decode_frees_row_and_budget_and_keeps_whole_chunks() -> None:
    s = make(rows=2, slots=128, chunk=8)
    fake = FakeModel(s)
    prefilling, decoding = request(30, new=10, first=100), request(12, new=10, first=300)
    s.add(decoding)
    fake.step()
    fake.step()
    assert decoding in s.running
    s.add(prefilling)
    fake.step()
    fake.step()
    assert prefilling.prefilled == 16 and prefilling in s.prefilling
    s.finish(prefilling, "cancelled")
    s.finish(decoding, "cancelled")
    assert s.reserved == 0 and sorted(s.free_rows) == [0, 1] and not s.has_work()
    assert s.cached[prefilling.row] == prefilling.prompt[:16]  # what was prefilled, whole chunks
    assert s.cached[decoding.row] == decoding.prompt[:8]  # the prompt's whole chunks, no decoded slot
    waiting = request(5)
    s.add(waiting)
    s.finish(waiting, "cancelled")
    assert not s.waiting and waiting.finish_reason == "cancelled"


def test_a_growing_cache_doubles_rows_rounds_slots_and_shrinks_to_the_latest_prefixes() -> None:
    s = make(rows=8, slots=1024, chunk=8, grow=True, idle_tokens=512)
    assert (s.rows, s.slots) == (0, 0)
    fake = FakeModel(s)
    for i in range(5):
        s.add(request(40, new=4, first=100 * (i + 1)))
    plan = fake.step()
    assert plan.resize is not None and (plan.resize.rows, plan.resize.slots) == (8, 256)
    long = request(300, new=10, first=5000)  # needs 310 slots: rows lengthen to 512
    fake.run()
    s.add(long)
    plan = fake.step()
    assert plan.resize is not None and plan.resize.slots == 512 and plan.resize.moves == {r: r for r in range(8)}
    fake.run()
    resize = s.idle_resize()
    assert resize is not None and (resize.rows, resize.slots) == (1, 512)
    assert resize.moves == {long.row: 0} and s.cached == {0: long.prompt[:296]}
    s.applied(resize)
    assert s.idle_resize() is None and s.free_rows == [0]
