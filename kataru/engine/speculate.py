"""Speculative decoding that keeps the model's own tokens: propose several next tokens cheaply, check them all
in one forward pass, keep the ones the model agrees with.

A decode step reads every weight to make one token per row; at a small batch the CPU waits on memory, and a
step of k+1 rows costs little more than one of a single row. So a sequence with proposals d1..dk goes
through the step as k+1 rows of its own cache row at slots L..L+k (its newest token, then the proposals):
the decode path, in which every row writes its key and value at its slot and attends its row's slots up to
its own, exactly as a decode step of that token would (where the matmuls give a row the same bits at any row
count, `dispatch` row invariance, the very bits of k+1 decode steps; prompt-chunk attention computes
otherwise, which is why verification does not take the chunked-prefill path). The engine then takes the
rows in order as plain decoding takes each step (`outputs.accept`, the same sampling state, penalties,
grammar and stop rules) and goes on while the model's token equals the next proposal:

- greedy: row i's token is the model's own argmax, so the tokens are those of decoding without speculation;
- sampling: Leviathan et al. 2023 / Chen et al. 2023 (`sampling.speculative_draw`): a proposal d drawn from
  the draft's distribution q is kept with probability min(1, p(d) / q(d)), else the token is drawn from
  (p - q)+ normalised, which makes every token a draw from the model's p (after its repetition penalty,
  temperature, top-k and top-p); a prompt-lookup proposal is a q that is one-hot.

Rejected proposals leave keys and values in slots past the sequence's length, which nothing reads (every
query sees its own row up to its own slot) and the next steps overwrite; the prefix cache keeps only prompt
chunks, so it never holds one.

Proposers: `ngram` (prompt lookup, as transformers' prompt_lookup_num_tokens, vLLM's ngram and llama.cpp's
lookup: the last n tokens found earlier in the prompt or the answer, and what followed them) and `draft` (a
smaller checkpoint with the same tokenizer, run on its own KV cache whose rows mirror the engine's).

How many to propose is chosen per step, not fixed: each sequence's acceptance so far gives the expected
tokens of each further proposal, and the cost of a step of n rows (measured once on the model, corrected by
what the engine's steps take) says what they cost; the engine takes the proposals that maximise tokens per
second. At a batch whose step is compute-bound, extra rows cost their full price and speculation stops.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from kataru.errors import KataruError
from kataru.sampling import process_logits

if TYPE_CHECKING:
    from kataru.engine.scheduler import Request, Resize
    from kataru.model import KVCache, Transformer
    from kataru.tokenizer import Tokenizer

METHODS = ("ngram", "draft")
DEFAULT_TOKENS = 8  # proposals per sequence and step at most (the adaptive rule uses fewer where they do not pay)
DEFAULT_NGRAM = (1, 5)  # n-gram lengths looked up, longest first (single tokens too: the rule weighs them)
# Rows of one step at most: below the row counts where a decode step's RMSNorm and the dispatch plan's prompt
# bucket take other paths (`Linear.upcast_rows`, `dispatch.bucket`), so a row's bits stay those of a decode step.
MAX_ROWS = 31
# Acceptance assumed before the engine has seen any: of a step's first proposal, and of each further one once the
# ones before it were kept (copying comes in runs: a kept proposal makes the next likelier). A new sequence starts
# from what the engine's sequences showed so far (the same method), weighed as PRIOR_WEIGHT verifications.
PRIOR = {"ngram": (0.5, 0.7), "draft": (0.6, 0.7)}
PRIOR_WEIGHT = 2.0
DECAY = 0.8  # weight of a sequence's older acceptance counts at each verification
ENGINE_DECAY = 0.95  # the same over all sequences (the prior of a new one)
SHORT_GAP = 16  # a draft behind by more tokens than this catches up by a prefill, else as rows of a decode call


@dataclass
class Options:
    """How an engine speculates: `method` for requests that do not say (None: only those that ask), `tokens`
    proposals per sequence and step at most, prompt lookup over n-grams of `min_ngram`..`max_ngram` tokens,
    and the draft model, when there is one. adaptive=False proposes all it can every step (tests, and the
    benchmark that shows what the adaptive rule saves)."""

    method: str | None = None
    tokens: int = DEFAULT_TOKENS
    min_ngram: int = DEFAULT_NGRAM[0]
    max_ngram: int = DEFAULT_NGRAM[1]
    draft: Draft | None = None
    adaptive: bool = True

    def validate(self) -> Options:
        if self.method is not None and self.method not in METHODS:
            raise KataruError(f"unknown speculation method {self.method!r}; use ngram or draft:FOLDER")
        if isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or self.tokens < 1:
            raise KataruError(f"--speculate-tokens must be a whole number of at least 1, got {self.tokens!r}")
        if not (isinstance(self.min_ngram, int) and isinstance(self.max_ngram, int)
                and 1 <= self.min_ngram <= self.max_ngram):
            raise KataruError(f"n-gram lengths must satisfy 1 <= --speculate-min-ngram <= --speculate-max-ngram, got "
                              f"{self.min_ngram!r} and {self.max_ngram!r}")
        if self.method == "draft" and self.draft is None:
            raise KataruError("speculation by a draft needs its folder: speculate='draft:FOLDER'")
        return self


def parse_method(value: str | bool | None) -> tuple[str | None, str | None]:
    """(method, draft folder) of a user's `speculate` value: "ngram", "draft:FOLDER", "off"/False, None."""
    if value is None:
        return None, None
    if value is False or value == "off":
        return "off", None
    if value is True:
        return "ngram", None
    if isinstance(value, str) and value == "ngram":
        return "ngram", None
    if isinstance(value, str) and value.startswith("draft:") and value[6:]:
        return "draft", value[6:]
    raise KataruError(f"speculate must be ngram, draft:FOLDER or off, got {value!r}")


# --- proposers ---------------------------------------------------------------------------------------------
class NgramIndex:
    """Prompt lookup over a growing sequence: where each n-gram (min_n..max_n tokens) last occurred with a
    token after it, kept in one dict per n and updated as tokens come (O(max_n) per token at any length); the
    proposal follows the most recent earlier occurrence of the longest n-gram that ends the sequence."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n
        self.tokens: list[int] = []
        self.after: list[dict[tuple[int, ...], int]] = [{} for _ in range(max_n + 1)]

    def extend(self, tokens: list[int]) -> None:
        seq = self.tokens
        for token in tokens:
            j = len(seq)
            seq.append(token)
            for n in range(self.min_n, min(self.max_n, j) + 1):  # the n-gram ending just before `token`
                self.after[n][tuple(seq[j - n:j])] = j

    def propose(self, k: int) -> list[int]:
        seq = self.tokens
        for n in range(min(self.max_n, len(seq)), self.min_n - 1, -1):
            start = self.after[n].get(tuple(seq[len(seq) - n:]))
            if start is not None:
                return seq[start:start + k]
        return []


class Draft:
    """A smaller checkpoint with the same tokenizer, proposing its own greedy (or sampled) tokens from a KV cache
    whose rows mirror the engine's (row r holds the draft's keys of the sequence in the engine's row r)."""

    def __init__(self, model: Transformer, name: str = "draft") -> None:
        self.model, self.name = model, name
        self.cache: KVCache | None = None
        self.cost: StepCost | None = None

    def resize(self, resize: Resize) -> None:
        if resize.rows == 0:
            self.cache = None
        elif self.cache is None:
            self.cache = self.model.new_cache(resize.rows, resize.slots)
        else:
            self.cache = self.cache.resized(self.model.config, resize.rows, resize.slots, resize.moves)


def check_draft(target: Tokenizer, draft: Tokenizer, target_vocab: int, draft_vocab: int) -> None:
    """Refuse, in one line naming the first difference, a draft whose tokenizer is not the model's: the same ids
    must mean the same tokens, and the same special tokens must be special."""
    def fail(what: str) -> None:
        raise KataruError(f"the draft's tokenizer differs from the model's: {what}; a draft must use the very same "
                          "tokenizer (vocabulary, ids and special tokens)")

    if target.vocab_size != draft.vocab_size:
        fail(f"{draft.vocab_size} tokens against {target.vocab_size}")
    for name in ("bos_id", "eos_id", "pad_id", "unk_id"):
        if getattr(target, name) != getattr(draft, name):
            fail(f"{name.removesuffix('_id')} token id {getattr(draft, name)} against {getattr(target, name)}")
    for i in range(target.vocab_size):
        if target.id_to_token(i) != draft.id_to_token(i):
            fail(f"token {i} is {draft.id_to_token(i)!r} against {target.id_to_token(i)!r}")
    if target.special_ids != draft.special_ids:
        first = min(target.special_ids ^ draft.special_ids)
        fail(f"token {first} ({target.id_to_token(first)!r}) is special in one and not the other")
    if min(target_vocab, draft_vocab) < target.vocab_size:
        fail(f"the model's output has {min(target_vocab, draft_vocab)} ids, fewer than the tokenizer's "
             f"{target.vocab_size}")


# --- the cost of a step ------------------------------------------------------------------------------------
GRID = (1, 2, 3, 4, 6, 8, 12, 16, 24, MAX_ROWS)
_costs: weakref.WeakKeyDictionary[Any, dict[str | None, StepCost]] = weakref.WeakKeyDictionary()


class StepCost:
    """Seconds of one decode call of n rows whose contexts sum to c: base(n) + per_token * c.

    Measured once per model and pinned batch (then cached beside the dispatch plans for this CPU): decode calls
    of up to 31 rows of one sequence (or until they cost three times one) at the start of a scratch cache, as
    verification makes them, under the paths a plain step of `pin` rows takes (`dispatch.pinned`; None: each
    call its own), and the fewest rows at 16 and at 512 slots for what each slot of context adds. The engine's
    own decode calls correct it (a running ratio per row count), so that the choice follows what steps take
    now, at this context and on this machine's load.
    """

    def __init__(self, base: dict[int, float], per_token: float) -> None:
        self.base = dict(sorted(base.items()))
        self.per_token = per_token
        self.ratio: dict[int, float] = {}

    def predicted(self, rows: int, context: int) -> float:
        points = list(self.base.items())
        lo = max((p for p in points if p[0] <= rows), default=points[0])
        hi = min((p for p in points if p[0] >= rows), default=points[-1])
        if lo[0] == hi[0]:
            if rows > hi[0] and len(points) > 1:  # past the grid: the last segment's slope
                (n0, t0), (n1, t1) = points[-2], points[-1]
                return t1 + (t1 - t0) / (n1 - n0) * (rows - n1) + self.per_token * context
            base = lo[1]
        else:
            base = lo[1] + (hi[1] - lo[1]) * (rows - lo[0]) / (hi[0] - lo[0])
        return base + self.per_token * context

    def seconds(self, rows: int, context: int) -> float:
        ratio = 1.0
        if self.ratio:
            ratio = self.ratio[min(self.ratio, key=lambda n: (abs(n - rows), n))]
        return self.predicted(rows, context) * ratio

    def observe(self, rows: int, context: int, seconds: float) -> None:
        ratio = seconds / max(self.predicted(rows, context), 1e-9)
        old = self.ratio.get(rows)
        self.ratio[rows] = ratio if old is None else 0.7 * old + 0.3 * ratio

    @classmethod
    def of(cls, model: Transformer, pin: int | None = None) -> StepCost:
        """The model's cost for verifying a batch of `pin` sequences, measured the first time (or read from the
        cache file of this CPU, model and plan)."""
        from kataru import dispatch

        costs = _costs.setdefault(model, {})
        key = None if pin is None else dispatch.bucket(pin)
        if key not in costs:
            costs[key] = cls.cached(model, pin) or cls.measure(model, pin)
        return costs[key]

    @staticmethod
    def _file(model: Transformer, pin: int | None) -> Any:
        from kataru import dispatch, kernels

        layers = sorted({(getattr(m, "plan_kind", None) or "", dispatch.plan_key(m) if getattr(m, "plan_kind", None)
                          else "", str(getattr(m, "weight", torch.empty(0)).dtype)) for m in model.modules()
                         if hasattr(m, "plan_kind")})
        plans = {k: p.to_json() for k, p in dispatch.plans_for(model).items()}
        weight = model.tok_embeddings.weight
        what = json.dumps([vars(model.config), layers, plans, str(weight.dtype), str(weight.device),
                           getattr(model, "quantization", None), dispatch.mode(), dispatch._state["invariant"],
                           None if pin is None else dispatch.bucket(pin), GRID], sort_keys=True, default=str)
        digest = hashlib.sha256(what.encode()).hexdigest()[:20]
        return kernels.cache_dir().parent / "speculate" / f"{dispatch.plan_file().stem}-{digest}.json"

    @classmethod
    def cached(cls, model: Transformer, pin: int | None = None) -> StepCost | None:
        if model.tok_embeddings.weight.device.type != "cpu":
            return None
        try:
            data = json.loads(cls._file(model, pin).read_text())
            return cls({int(n): float(t) for n, t in data["base"].items()}, float(data["per_token"]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    @classmethod
    def measure(cls, model: Transformer, pin: int | None = None) -> StepCost:
        import contextlib

        from kataru import dispatch

        weight = model.tok_embeddings.weight
        device = weight.device
        context = max(1, min(512, model.config.max_seq_len - GRID[-1] - 2))
        cache = model.new_cache(1, context + GRID[-1] + 1)

        def call(rows: int, start: int) -> float:
            tokens = torch.ones(rows, 1, dtype=torch.long, device=device)
            slots = torch.arange(start, start + rows, device=device)
            best = float("inf")
            for _ in range(2):
                _sync(device)
                begin = time.perf_counter()
                model.decode(tokens, cache, torch.zeros(rows, dtype=torch.long, device=device), slots, start + rows)
                _sync(device)
                best = min(best, time.perf_counter() - begin)
            return best

        grid = [n for n in GRID if n >= (pin or 1)]
        with torch.inference_mode(), dispatch.pinned(pin) if pin is not None else contextlib.nullcontext():
            call(grid[0], 0)  # warm-up: first-call allocations, caches
            base: dict[int, float] = {}
            for n in grid:  # up to where rows cost three times the first: past it, the last slope goes on
                base[n] = call(n, 0)
                if len(base) > 2 and base[n] > 3 * base[grid[0]]:
                    break
            near, far = call(grid[0], 16), call(grid[0], context)
        per_token = max(0.0, (far - near) / (grid[0] * max(context - 16, 1)))
        cost = cls(base, per_token)
        if device.type == "cpu":
            from kataru.files import write_atomic

            path = cls._file(model, pin)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(path, json.dumps({"base": base, "per_token": per_token}) + "\n")
            except OSError:
                pass  # a read-only cache: measured again next time
        return cost


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- one sequence's speculation ----------------------------------------------------------------------------
@dataclass
class State:
    """A request's speculation: its method, its prompt-lookup index, its acceptance so far, and how much of it
    the draft's cache holds."""

    method: str
    index: NgramIndex | None = None
    counts: list[float] = field(default_factory=lambda: [0.0] * 4)  # decayed: first kept, first not, next kept, not
    shadow: tuple[int, list[int]] | None = None  # a lookup not verified (where its tokens start), scored as they come
    draft_len: int = 0  # tokens of the sequence whose keys the draft's cache row holds
    proposed: int = 0  # proposals verified, and those the model kept
    accepted: int = 0
    steps: int = 0  # verifications with at least one proposal
    failed: bool = False  # its draft failed: it decodes on without proposals

    def rates(self, prior: tuple[float, float] | None = None) -> tuple[float, float]:
        """(P(a step's first proposal is kept), P(a further one is kept | those before it were))."""
        return rates(self.counts, prior or PRIOR[self.method])

    def record(self, proposed: int, kept: int) -> None:
        tally(self.counts, proposed, kept, DECAY)


def rates(counts: list[float], prior: tuple[float, float]) -> tuple[float, float]:
    c = counts
    return ((c[0] + prior[0] * PRIOR_WEIGHT) / (c[0] + c[1] + PRIOR_WEIGHT),
            (c[2] + prior[1] * PRIOR_WEIGHT) / (c[2] + c[3] + PRIOR_WEIGHT))


def tally(counts: list[float], proposed: int, kept: int, decay: float) -> None:
    """Add a verification of `proposed` tokens of which the first `kept` were kept to decayed counts."""
    for i in range(4):
        counts[i] *= decay
    counts[0 if kept else 1] += 1
    if kept:
        counts[2] += kept - 1
        counts[3] += kept < proposed


@dataclass
class Proposal:
    """Tokens to verify after a sequence's newest token, and for a sampled draft the distribution each was drawn
    from (None: a proposal that is certain, as prompt lookup's, or greedy)."""

    tokens: list[int] = field(default_factory=list)
    probs: list[Tensor] | None = None


def sequence(request: Request) -> list[int]:
    return [*request.prompt, *request.tokens]


class Speculator:
    """The engine's proposals for each step: which sequences speculate, how far, and with what tokens."""

    def __init__(self, model: Transformer, options: Options | None = None) -> None:
        self.model = model
        self.options = (options or Options()).validate()
        self.costs: dict[str, StepCost] = {}  # per pinned bucket of the batch (`dispatch.pinned`)
        self.totals = {"drafts": 0, "draft_tokens": 0, "accepted_tokens": 0}
        self.seen = {method: [0.0] * 4 for method in METHODS}  # every sequence's verifications, per method
        self.warned = False  # that a draft failed (said once)

    @property
    def draft(self) -> Draft | None:
        return self.options.draft

    def method(self, request: Request) -> str | None:
        asked = request.params.speculate
        method = self.options.method if asked is None else asked
        return None if method in (None, "off") else method

    def check(self, request: Request) -> None:
        """Refuse at submission what cannot run (a draft asked of an engine without one)."""
        if self.method(request) == "draft" and self.draft is None:
            raise KataruError("this engine has no draft model; load it with speculate='draft:FOLDER' "
                              "(kataru ... --speculate draft:FOLDER)")

    def cost(self, batch: int) -> StepCost:
        """What verification costs for a batch of this many sequences (measured at its first use)."""
        from kataru import dispatch

        key = dispatch.bucket(batch)
        if key not in self.costs:
            self.costs[key] = StepCost.of(self.model, batch)
        return self.costs[key]

    def prepare(self, batch: int = 1) -> None:
        """Measure (or read) the step costs now rather than at the first speculative step."""
        self.cost(batch)
        if self.draft is not None and self.draft.cost is None:
            self.draft.cost = StepCost.of(self.draft.model)

    def state(self, request: Request) -> State | None:
        if request.spec is None:
            method = self.method(request)
            if method is None:
                return None
            request.spec = State(method)
            if method == "ngram":
                o = self.options
                request.spec.index = NgramIndex(o.min_ngram, o.max_ngram)
                request.spec.index.extend(request.prompt)
        return request.spec  # type: ignore[no-any-return]

    # --- a step's proposals ------------------------------------------------------------------------------
    def propose(self, batch: list[Request], context: int, row_slots: int) -> list[Proposal]:
        """One proposal per request of the decode batch (most of them empty where speculation does not pay)."""
        proposals = [Proposal() for _ in batch]
        states = [self.state(r) for r in batch]
        if not any(states) or len(batch) >= MAX_ROWS:
            return proposals
        offers: list[int] = []
        lookups: list[list[int]] = []
        for r, s in zip(batch, states, strict=True):
            room = min(self.options.tokens, r.params.max_new_tokens - len(r.tokens) - 1,
                       context - 2 - r.length, row_slots - 1 - r.length)
            found: list[int] = []
            if s is not None and s.failed:
                room = 0
            if s is not None and s.method == "ngram":
                assert s.index is not None
                s.index.extend(r.tokens[len(s.index.tokens) - len(r.prompt):])
                self.score_shadow(r, s)
                found = s.index.propose(room) if room > 0 else []
            elif s is not None and room > 0:
                found = [0] * room  # a draft can propose up to `room`
            lookups.append(found)
            offers.append(len(found))
        if not any(offers):
            return proposals
        if self.options.adaptive:
            self.prepare(len(batch))
            ks = self.choose(batch, states, offers)
        else:
            ks, rows = [], len(batch)
            for offer in offers:
                ks.append(min(offer, MAX_ROWS - rows))
                rows += ks[-1]
        for i, (r, s, k) in enumerate(zip(batch, states, ks, strict=True)):
            if s is None or not offers[i] or k:
                continue
            if s.method == "ngram":  # not worth it now: whether it would have been kept is known for free later
                s.shadow = s.shadow or (len(r.tokens), lookups[i])
            else:  # a draft's would cost its run: its sequence's own record fades towards the engine's
                s.counts = [c * 0.95 for c in s.counts]
        drafted = [(r, k) for r, s, k in zip(batch, states, ks, strict=True) if k and s is not None
                   and s.method == "draft"]
        drafts: dict[int, Proposal] = {}
        if drafted:
            try:
                drafts = self.run_draft(drafted)
            except Exception as err:  # the draft's failure costs these requests their proposals, nothing more
                self.draft_failed([r for r, _ in drafted], err)
                ks = [0 if s is not None and s.method == "draft" else k for s, k in zip(states, ks, strict=True)]
        for i, (r, s, k) in enumerate(zip(batch, states, ks, strict=True)):
            if k:
                proposals[i] = drafts[r.id] if r.id in drafts else Proposal(lookups[i][:k])
                s.shadow = None  # type: ignore[union-attr]  # its verification speaks for the same tokens
        return proposals

    def choose(self, batch: list[Request], states: list[State | None], offers: list[int]) -> list[int]:
        """Proposals per sequence that maximise expected tokens per second of the step: the j-th proposal of a
        sequence adds P(all j kept) = first * next**(j - 1) tokens on average (`State.rates`); the rows (and the
        draft's steps) cost what `StepCost` says."""
        cost = self.cost(len(batch))
        b = len(batch)
        kept = [s.rates(self.prior(s.method)) if s is not None else (0.0, 0.0) for s in states]
        gains = sorted(((kept[i][0] * kept[i][1] ** (j - 1), -j, i) for i in range(b)
                        for j in range(1, offers[i] + 1)), reverse=True)
        ks = [0] * b
        expected, rows, context = float(b), b, sum(r.length for r in batch)
        best, best_ks = expected / cost.seconds(rows, context), list(ks)
        for gain, _, i in gains:
            if rows + 1 > MAX_ROWS:
                break
            ks[i] += 1
            rows += 1
            expected += gain
            context += batch[i].length + ks[i]
            rate = expected / (cost.seconds(rows, context) + self.draft_seconds(batch, states, ks))
            if rate > best:
                best, best_ks = rate, list(ks)
        return best_ks

    def draft_seconds(self, batch: list[Request], states: list[State | None], ks: list[int]) -> float:
        """The draft's share of a step: one call that catches every drafting sequence up and proposes its first
        token, then one call per further proposal over the sequences that propose that many."""
        if self.draft is None or self.draft.cost is None:
            return 0.0
        cost, total = self.draft.cost, 0.0
        drafting = [(r, s, k) for r, s, k in zip(batch, states, ks, strict=True) if k and s is not None
                    and s.method == "draft"]
        if not drafting:
            return 0.0
        gap = sum(min(len(r.prompt) + len(r.tokens) - s.draft_len, SHORT_GAP) for r, s, _ in drafting)
        total += cost.seconds(gap, sum(r.length for r, _, _ in drafting))
        for j in range(2, max(k for _, _, k in drafting) + 1):
            rows = [r for r, _, k in drafting if k >= j]
            total += cost.seconds(len(rows), sum(r.length + j for r in rows))
        return total

    @torch.inference_mode()
    def run_draft(self, items: list[tuple[Request, int]]) -> dict[int, Proposal]:
        """The draft's k tokens for each (request, k): the sequence caught up in the draft's cache (a prefill
        where it is far behind, else rows of one decode call), then k - 1 decode calls over those still going.
        Each token is the draft's pick after the request's own penalties, temperature, top-k and top-p."""
        draft = self.draft
        assert draft is not None and draft.cache is not None
        model, cache = draft.model, draft.cache
        device = model.tok_embeddings.weight.device
        vocab = self.model.config.vocab_size
        last: dict[int, Tensor] = {}
        rows: list[tuple[Request, int, int]] = []  # (request, first slot, tokens) caught up as decode rows
        for r, _ in items:
            s, seq = r.spec, sequence(r)
            while len(seq) - s.draft_len > SHORT_GAP:  # far behind (a new request): prefill in chunks
                end = min(len(seq) - 1, s.draft_len + 128)
                model.prefill(torch.tensor([seq[s.draft_len:end]], device=device), cache, r.row, s.draft_len)
                s.draft_len = end
            rows.append((r, s.draft_len, len(seq) - s.draft_len))
        tokens = [sequence(r)[start + j] for r, start, n in rows for j in range(n)]
        slots = [start + j for _, start, n in rows for j in range(n)]
        where = [r.row for r, _, n in rows for _ in range(n)]
        logits = model.decode(torch.tensor(tokens, device=device).unsqueeze(1), cache,
                              torch.tensor(where, device=device), torch.tensor(slots, device=device), max(slots) + 1)
        at = 0
        for r, start, n in rows:
            at += n
            last[r.id] = logits[at - 1]
            r.spec.draft_len = start + n
        out = {r.id: Proposal([], [] if not r.params.greedy else None) for r, _ in items}
        going = list(items)
        step = 0
        while going:
            step += 1
            for r, _ in going:
                token, probs = self.draft_pick(r, last[r.id], out[r.id].tokens, vocab)
                out[r.id].tokens.append(token)
                if probs is not None:
                    out[r.id].probs.append(probs)  # type: ignore[union-attr]
            going = [(r, k) for r, k in going if k > step]
            if going:
                tokens = [out[r.id].tokens[-1] for r, _ in going]
                slots = [r.spec.draft_len for r, _ in going]
                logits = model.decode(torch.tensor(tokens, device=device).unsqueeze(1), cache,
                                      torch.tensor([r.row for r, _ in going], device=device),
                                      torch.tensor(slots, device=device), max(slots) + 1)
                for i, (r, _) in enumerate(going):
                    last[r.id] = logits[i]
                    r.spec.draft_len += 1
        return out

    @staticmethod
    def draft_pick(request: Request, logits: Tensor, proposed: list[int], vocab: int) -> tuple[int, Tensor | None]:
        """The draft's next token after the request's own logits processing, and for sampling the distribution
        it was drawn from (over the model's vocabulary)."""
        logits = logits.float()
        if logits.shape[-1] > vocab:
            logits = logits[:vocab]
        elif logits.shape[-1] < vocab:
            logits = torch.cat((logits, logits.new_full((vocab - logits.shape[-1],), -float("inf"))))
        state, params = request.sampling, request.params
        seen = state.seen
        if proposed and params.repetition_penalty != 1.0:
            seen = seen.clone()
            seen[torch.tensor(proposed, device=seen.device)] = True
        processed = process_logits(logits, seen, params, state.counts)
        if params.greedy:
            return int(processed.argmax()), None
        probs = processed.softmax(-1)
        return int(torch.multinomial(probs, 1, generator=state.generator)), probs

    # --- after verification ------------------------------------------------------------------------------
    def verified(self, request: Request, proposal: Proposal, accepted: int) -> None:
        """Record a verification: `accepted` of the proposal's tokens were kept."""
        s: State | None = request.spec
        k = len(proposal.tokens)
        if s is None or not k:
            return
        s.record(k, accepted)
        tally(self.seen[s.method], k, accepted, ENGINE_DECAY)
        s.proposed += k
        s.accepted += accepted
        s.steps += 1
        self.totals["drafts"] += 1
        self.totals["draft_tokens"] += k
        self.totals["accepted_tokens"] += accepted
        if s.method == "draft":  # the draft's cache holds the sequence up to the last proposal it ran on
            s.draft_len = min(s.draft_len, len(request.prompt) + len(request.tokens) - 1)

    def prior(self, method: str) -> tuple[float, float]:
        """What a sequence of this method is assumed to keep before its own verifications say: the engine's."""
        return rates(self.seen[method], PRIOR[method])

    def score_shadow(self, request: Request, s: State) -> None:
        """A lookup left unverified counts, once the tokens it guessed have come, as a verification would have."""
        if s.shadow is None:
            return
        at, guess = s.shadow
        made = request.tokens[at:]
        n = 0
        while n < min(len(guess), len(made)) and guess[n] == made[n]:
            n += 1
        if n < len(made) or n == len(guess):  # a token it guessed wrong has come, or all it guessed
            s.record(len(guess), n)
            tally(self.seen[s.method], len(guess), n, ENGINE_DECAY)
            s.shadow = None

    def prefilled(self, request: Request, end: int) -> None:
        """The engine prefilled the request's prompt up to `end`: a drafting request's draft does the same, so that
        its first proposals need no long catch-up."""
        s = self.state(request)
        if s is None or s.method != "draft" or s.failed or self.draft is None or self.draft.cache is None:
            return
        device = self.draft.model.tok_embeddings.weight.device
        try:
            with torch.inference_mode():
                while s.draft_len < end:
                    stop = min(end, s.draft_len + 128)
                    self.draft.model.prefill(torch.tensor([request.prompt[s.draft_len:stop]], device=device),
                                             self.draft.cache, request.row, s.draft_len)
                    s.draft_len = stop
        except Exception as err:
            self.draft_failed([request], err)

    def draft_failed(self, requests: list[Request], err: Exception) -> None:
        """The draft raised: its requests decode on without proposals (the same tokens, only slower), and stderr
        says why once."""
        for request in requests:
            request.spec.failed = True
        if not self.warned:
            self.warned = True
            text = str(err).strip().splitlines()
            print(f"kataru: the draft model failed ({type(err).__name__}: {text[0][:160] if text else ''}); "
                  "decoding on without its proposals", file=sys.stderr)

    def observe(self, batch: int, rows: int, context: int, seconds: float) -> None:
        """A decode call of `rows` rows for `batch` sequences took `seconds`."""
        from kataru import dispatch

        cost = self.costs.get(dispatch.bucket(batch))
        if cost is not None:
            cost.observe(rows, context, seconds)

    def resize(self, resize: Resize) -> None:
        if self.draft is not None:
            self.draft.resize(resize)


def acceptance(proposed: int, accepted: int) -> dict[str, Any]:
    """What a report says of speculation: proposals, those kept, and the rate."""
    return {"draft_tokens": proposed, "accepted_tokens": accepted,
            "acceptance_rate": round(accepted / proposed, 4) if proposed else None}
