"""Which requests run in a step, and where: pure bookkeeping over cache rows and a token budget.

Requests wait, then prefill (a row of the KV cache and their memory taken, the prompt going into the cache
in chunks), then run (one token per decode step), then finish. Each step the scheduler admits what fits,
hands out at most `prefill_chunk` prompt tokens, and lists the running requests to decode. No tensors
here: the engine asks the runner to carry a plan out, and the tests drive the scheduler with a fake model.

Memory is a budget of cache tokens: a request reserves its prompt plus max_new_tokens (capped at the
context) and waits while the budget or the rows are taken; one that could never fit is refused when it is
submitted. Cancelling frees the row and the reservation at once.

Chunks: a prompt is prefilled in chunks of `prefill_chunk` tokens counted from its first token (the last
one shorter), each chunk one forward. Several short prompts share a step's budget, but no prompt's chunk
is ever cut to fit a neighbour, so the computation a prompt gets depends only on the prompt.

Prefix reuse: a free row keeps the keys and values of the request that last used it, and a new request
whose prompt starts with those tokens takes that row and prefills only the rest. Only whole chunks of a
prompt are kept, and reuse resumes at a chunk boundary: the reused chunks were computed exactly as the
new prompt's own chunks would be (same tokens, same chunk, same cache before them), so the result is the
same bits as a fresh prefill in every dtype. Slots written by decode steps are never reused, since a
prompt's prefill computes the same tokens in another order (prefill_chunk=None turns reuse off).

Rows and slots: the cache is `rows` x `slots`; with `grow` it starts empty and grows (rows by doubling,
slots in steps of `SLOT_STEP`) as requests need, up to max_rows x max_slots, and shrinks back to at most
`idle_tokens` when nothing runs, keeping the rows of the most recent prefixes.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kataru.errors import KataruError

if TYPE_CHECKING:
    from kataru.sampling import SamplingParams

SLOT_STEP = 256  # a growing cache lengthens its rows by this many slots at a time


@dataclass(eq=False)
class Request:
    prompt: list[int]
    params: SamplingParams
    id: int = 0
    row: int | None = None
    reserved: int = 0  # cache tokens held for it while admitted
    prefilled: int = 0  # prompt tokens whose keys and values are in the cache
    reused: int = 0  # of those, the ones a previous request left in its row
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # what may be shown so far (the engine's outputs fill it when it has a tokenizer)
    finish_reason: str | None = None  # stop | length | cancelled | error
    error: str | None = None  # why, when finish_reason is "error"
    sampling: Any = None  # the outputs' per-request state (generator, seen tokens, text stream)
    spec: Any = None  # its speculation (`speculate.State`): proposer, acceptance so far, draft position
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)  # per token, if asked
    times: dict[str, float] = field(default_factory=dict)  # submitted, admitted, first_token, finished
    wake: Callable[[], None] | None = None  # tells a waiting consumer that tokens or the end came
    on_finish: Callable[[Request], None] | None = None  # called once it has ended, however (metrics)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def length(self) -> int:
        """Tokens in the cache: the prompt (as far as prefilled) and every generated token but the newest."""
        return self.prefilled + max(len(self.tokens) - 1, 0)


@dataclass
class Chunk:
    """Prompt tokens [start, end) of a request, prefilled in one forward."""

    request: Request
    start: int
    end: int


@dataclass
class Resize:
    """The cache's new shape; `moves` maps each row to keep to its row in the new cache."""

    rows: int
    slots: int
    moves: dict[int, int]


@dataclass
class Plan:
    resize: Resize | None
    prefill: list[Chunk]
    decode: list[Request]


class Scheduler:
    def __init__(self, context: int, max_rows: int, max_slots: int, budget: int, prefill_chunk: int | None,
                 prefix_reuse: bool = True, grow: bool = False, idle_tokens: int | None = None) -> None:
        if max_rows < 1:
            raise KataruError(f"max_batch must be at least 1, got {max_rows}")
        if prefill_chunk is not None and prefill_chunk < 1:
            raise KataruError(f"prefill_chunk must be a positive number of tokens (or None), got {prefill_chunk}")
        if idle_tokens is not None and idle_tokens < 0:
            raise KataruError(f"idle_cache_tokens must be >= 0, got {idle_tokens}")
        self.context = context
        self.max_rows, self.max_slots, self.budget = max_rows, min(max_slots, context), budget
        self.prefill_chunk = prefill_chunk
        self.prefix_reuse = prefix_reuse and prefill_chunk is not None
        self.grow, self.idle_tokens = grow, idle_tokens
        self.rows, self.slots = (0, 0) if grow else (max_rows, self.max_slots)  # the cache as allocated
        self.free_rows: list[int] = list(range(self.rows))
        self.cached: dict[int, list[int]] = {}  # free row -> the prompt chunks whose keys/values it holds
        self.last_used: dict[int, int] = {}  # row -> when it was last freed (for shrinking)
        self.clock = itertools.count()
        self.waiting: deque[Request] = deque()
        self.prefilling: deque[Request] = deque()  # admitted, prompt not all in the cache yet
        self.running: list[Request] = []
        self.reserved = 0
        self.reused_tokens = 0
        self.pending: Resize | None = None  # a resize planned at admission, carried out before the step runs

    # --- requests ------------------------------------------------------------------------------------
    def reservation(self, prompt_len: int, max_new_tokens: int) -> int:
        """The cache tokens a request holds, refused now if it could never be admitted."""
        reserved = min(prompt_len + max_new_tokens, self.context)
        if reserved > self.max_slots:
            raise KataruError(f"the request needs {reserved} cache slots, more than the engine's rows of "
                              f"{self.max_slots}; lower max_new_tokens or build the engine with a longer row_len")
        if reserved > self.budget:
            raise KataruError(f"the request needs {reserved} cache tokens, more than the engine's budget of "
                              f"{self.budget}; lower max_new_tokens or raise max_cache_tokens")
        return reserved

    def add(self, request: Request) -> None:
        request.reserved = self.reservation(len(request.prompt), request.params.max_new_tokens)
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    @property
    def free_tokens(self) -> int:
        return self.budget - self.reserved

    @property
    def rows_in_use(self) -> int:
        return len(self.prefilling) + len(self.running)

    # --- the plan of a step --------------------------------------------------------------------------
    def schedule(self) -> Plan:
        """Admit what fits, choose this step's prompt chunks, and list the running requests to decode (a
        request whose prompt completes in this step gets its first token from the prefill, not a decode)."""
        decode = list(self.running)
        while self.waiting and self.waiting[0].reserved <= self.free_tokens and self._row_available():
            self._admit(self.waiting.popleft())
        resize, self.pending = self.pending, None
        return Plan(resize, self._chunks(), decode)

    def _row_available(self) -> bool:
        return bool(self.free_rows) or (self.grow and self._rows_after_pending() < self.max_rows)

    def _chunks(self) -> list[Chunk]:
        budget = self.prefill_chunk or float("inf")
        chunks: list[Chunk] = []
        spent = 0
        for request in self.prefilling:
            start = request.prefilled
            end = min(len(request.prompt), start + (self.prefill_chunk or len(request.prompt)))
            if spent and spent + end - start > budget:
                break
            chunks.append(Chunk(request, start, end))
            spent += end - start
        return chunks

    def _admit(self, request: Request) -> None:
        self._ensure_slots(request.reserved)
        request.row, request.prefilled = self._pick_row(request.prompt)
        request.reused = request.prefilled
        self.reused_tokens += request.prefilled
        self.reserved += request.reserved
        self.prefilling.append(request)

    def reusable(self, held: list[int], prompt: list[int]) -> int:
        """How many of `prompt`'s tokens a row holding `held` serves: their common prefix, down to a chunk
        boundary, leaving at least one prompt token to prefill (its logits give the first new token)."""
        if not self.prefix_reuse or self.prefill_chunk is None:
            return 0
        n, limit = 0, min(len(held), len(prompt) - 1)
        while n < limit and held[n] == prompt[n]:
            n += 1
        return n - n % self.prefill_chunk

    def _pick_row(self, prompt: list[int]) -> tuple[int, int]:
        """(row, prompt tokens already in it): the free row with the longest reusable prefix, else an empty
        row (a new one if the cache may grow), else the row whose prefix was used longest ago."""
        best, reuse = None, 0
        for row in self.free_rows:
            n = self.reusable(self.cached.get(row, []), prompt)
            if n > reuse:
                best, reuse = row, n
        if best is None:
            empty = [r for r in self.free_rows if r not in self.cached]
            if empty:
                best = empty[0]
            elif self.grow and self._rows_after_pending() < self.max_rows:
                best = self._add_row()
            else:
                best = min(self.free_rows, key=lambda r: self.last_used.get(r, -1))
        if best in self.free_rows:
            self.free_rows.remove(best)
        self.cached.pop(best, None)
        return best, reuse

    # --- growing and shrinking the cache ---------------------------------------------------------------
    def _rows_after_pending(self) -> int:
        return self.pending.rows if self.pending else self.rows

    def _slots_after_pending(self) -> int:
        return self.pending.slots if self.pending else self.slots

    def _resize(self, rows: int, slots: int) -> None:
        """Plan a larger cache keeping every row where it is (merged with a resize already planned)."""
        moves = {r: r for r in range(self.rows)}
        self.pending = Resize(max(rows, self._rows_after_pending()), max(slots, self._slots_after_pending()), moves)

    def _add_row(self) -> int:
        rows = self._rows_after_pending()
        new_rows = min(self.max_rows, max(1, 2 * rows))
        self._resize(new_rows, self._slots_after_pending())
        self.free_rows += list(range(rows + 1, new_rows))
        return rows

    def _ensure_slots(self, needed: int) -> None:
        if needed <= self._slots_after_pending():
            return
        if not self.grow:  # cannot happen: `reservation` refuses what exceeds max_slots
            raise KataruError(f"the request needs {needed} slots and the engine's rows hold {self.slots}")
        slots = min(self.max_slots, -(-needed // SLOT_STEP) * SLOT_STEP)
        self._resize(self._rows_after_pending(), slots)

    def applied(self, resize: Resize) -> None:
        """The runner carried `resize` out: rows and slots now have that shape."""
        self.rows, self.slots = resize.rows, resize.slots

    def idle_resize(self) -> Resize | None:
        """With nothing to run, a smaller cache of at most `idle_tokens`, keeping the rows whose prefixes
        were used last (None: nothing to release)."""
        if not self.grow or self.idle_tokens is None or self.has_work() or self.rows * self.slots <= self.idle_tokens:
            return None
        slots = min(self.slots, self.idle_tokens)
        most = self.idle_tokens // slots if slots else 0
        kept = sorted(self.cached, key=lambda r: self.last_used.get(r, -1), reverse=True)[:most]
        rows = len(kept)
        slots = slots if rows else 0
        moves = {old: new for new, old in enumerate(kept)}
        chunk = self.prefill_chunk or 1
        self.cached = {moves[old]: held[:slots - slots % chunk] for old, held in self.cached.items() if old in moves}
        self.last_used = {moves[old]: t for old, t in self.last_used.items() if old in moves}
        self.free_rows = list(range(rows))
        return Resize(rows, slots, moves)

    # --- the end of a request --------------------------------------------------------------------------
    def finish(self, request: Request, reason: str) -> None:
        """End a request: free its row and reservation; its row keeps the whole chunks of its prompt."""
        request.finish_reason = reason
        if request in self.waiting:
            self.waiting.remove(request)
            return
        if request not in self.running and request not in self.prefilling:
            return
        (self.running if request in self.running else self.prefilling).remove(request)
        self.reserved -= request.reserved
        assert request.row is not None
        self.free_rows.append(request.row)
        self.free_rows.sort()
        self.last_used[request.row] = next(self.clock)
        if self.prefix_reuse and self.prefill_chunk:
            kept = request.prefilled - request.prefilled % self.prefill_chunk
            if kept:
                self.cached[request.row] = request.prompt[:kept]

    def prefilled(self, chunk: Chunk) -> bool:
        """Record a prefilled chunk; True when it completed the prompt (the request now runs)."""
        request = chunk.request
        request.prefilled = chunk.end
        if request.prefilled < len(request.prompt):
            return False
        self.prefilling.remove(request)
        self.running.append(request)
        return True
