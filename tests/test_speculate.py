"""Speculative decoding: greedy tokens equal to plain decoding for every family, dtype and proposer, alone and in
batches, through prefix reuse, cancellation, stop strings, eos and max_tokens; sampled tokens distributed as
the model's (a chi-square test that also catches a wrong acceptance rule); the adaptive rule; errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from helpers import FAMILIES, make_checkpoint

import kataru
from kataru import sampling as sampling_module
from kataru.config import ModelConfig
from kataru.engine import Engine
from kataru.engine.speculate import PRIOR, Draft, NgramIndex, Options, Speculator, StepCost
from kataru.errors import KataruError
from kataru.model import Transformer
from kataru.sampling import SamplingParams, process_logits

# A repetition penalty below 1 favours tokens already seen: the random models then copy, as grounded answers do,
# and prompt lookup's proposals get kept.
GREEDY = SamplingParams(max_new_tokens=24, do_sample=False, ignore_eos=True, repetition_penalty=0.6)


def looping_prompts(vocab: int, lengths: list[int], seed: int = 3) -> list[list[int]]:
    """Prompts made of a repeated random phrase with a few changed tokens: prompt lookup finds n-grams in them,
    and the models' greedy answers, which loop, repeat them."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        phrase = torch.randint(3, vocab, (7,), generator=g).tolist()
        ids = (phrase * (n // 7 + 1))[:n]
        for i in torch.randint(0, n, (max(1, n // 9),), generator=g).tolist():
            ids[i] = int(torch.randint(3, vocab, (1,), generator=g))
        out.append(ids)
    return out


def run(engine: Engine, ps: list[list[int]], params: SamplingParams | list[SamplingParams],
        stagger: bool = True) -> list[list[int]]:
    """Requests joining one per step (stagger) or all at once; their tokens."""
    requests = []
    for i, p in enumerate(ps):
        requests.append(engine.submit(p, params[i] if isinstance(params, list) else params))
        if stagger:
            engine.step()
    engine.run()
    assert all(r.finish_reason in ("stop", "length") for r in requests), [r.error for r in requests]
    return [r.tokens for r in requests]


def engines(llm: kataru.LLM, draft: Draft | None = None, **kw: object) -> dict[str, Engine]:
    """A plain engine and one per proposer (fixed: every proposal verified, so that the tests exercise them)."""
    out = {"plain": Engine(llm.model, llm.eos_ids, **kw),
           "ngram": Engine(llm.model, llm.eos_ids, speculation=Options("ngram", 6, 1, 3, adaptive=False), **kw)}
    if draft is not None:
        out["draft"] = Engine(llm.model, llm.eos_ids, speculation=Options("draft", 5, draft=draft, adaptive=False),
                              **kw)
    return out


def spec_totals(engine: Engine) -> tuple[int, int]:
    stats = engine.stats()
    return stats["spec_draft_tokens"], stats["spec_accepted_tokens"]


@pytest.fixture(scope="module")
def drafts(tokenizer_dirs: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Per family a one-layer checkpoint with the family's tokenizer and other random weights: a draft that
    proposes wrong tokens as often as right ones."""
    out = {}
    for family in FAMILIES:
        folder = tmp_path_factory.mktemp(f"draft-{family}")
        make_checkpoint(family, tokenizer_dirs, folder, num_hidden_layers=1)
        out[family] = folder
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_speculation_gives_the_tokens_of_plain_decoding(family: str, checkpoints: dict, drafts: dict) -> None:
    """Prompt lookup, a draft that is the model itself (everything kept) and a draft of other weights (much
    rejected), each alone and in a batch of 8 with prompts of mixed lengths joining a running batch: the very
    tokens of plain decoding."""
    llm = kataru.load(checkpoints[family][0], dtype="float32")
    vocab = llm.config.vocab_size
    ps = looping_prompts(vocab, [5, 30, 11, 18, 40, 9, 23, 14])
    params = [SamplingParams(max_new_tokens=n, do_sample=False, ignore_eos=True, repetition_penalty=r)
              for n, r in zip([24, 17, 30, 9, 24, 21, 12, 28], [1.0, 0.5, 1.1, 0.7, 0.5, 1.2, 1.0, 0.6], strict=True)]
    expected = [run(Engine(llm.model, llm.eos_ids), [p], q)[0] for p, q in zip(ps, params, strict=True)]
    same = Draft(llm.model)
    other = Draft(kataru.load(drafts[family], dtype="float32").model)
    for name, draft in (("itself", same), ("other", other)):
        for how, engine in engines(llm, draft, max_batch=8, prefill_chunk=8).items():
            assert run(engine, ps, params) == expected, f"{how} (draft: {name}) in a batch"
            proposed, accepted = spec_totals(engine)
            if how == "plain":
                assert proposed == 0
                continue
            assert proposed > 0, how
            assert accepted > 0 if how == "ngram" or name == "itself" else accepted < proposed
            if how == "draft" and name == "itself":
                assert accepted > 0.9 * proposed  # the same model proposes what it then picks
    for how, engine in engines(llm, other, max_batch=1).items():  # alone
        assert [run(engine, [p], q)[0] for p, q in zip(ps, params, strict=True)] == expected, how


@pytest.mark.parametrize("weights", ["bfloat16", "int8", "int4"])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_speculation_keeps_the_bits_where_the_kernels_are_row_invariant(family: str, weights: str,
                                                                               checkpoints: dict, drafts: dict) -> None:
    """In bf16 and with quantized weights the decode kernels give a row the same bits at any row count: the
    k+1 rows of a verification are the bits of k+1 decode steps, so even the log-probability of every token is
    that of plain decoding, in a batch of 8 and alone."""
    quantize = None if weights == "bfloat16" else weights
    llm = kataru.load(checkpoints[family][0], dtype="bfloat16", quantize=quantize)
    draft = Draft(kataru.load(drafts[family], dtype="bfloat16", quantize=quantize).model)
    ps = looping_prompts(llm.config.vocab_size, [5, 30, 11, 18, 40, 9, 23, 14], seed=7)
    params = SamplingParams(max_new_tokens=20, do_sample=False, ignore_eos=True, logprobs=0, repetition_penalty=0.6)
    for batch in (8, 1):
        outs = {}
        for how, engine in engines(llm, draft, max_batch=batch, prefill_chunk=8).items():
            requests = [engine.submit(p, params) for p in (ps if batch == 8 else ps[:3])]
            engine.run()
            outs[how] = [(r.tokens, r.logprobs) for r in requests]
            assert how == "plain" or spec_totals(engine)[0] > 0
        assert outs["ngram"] == outs["plain"] and outs["draft"] == outs["plain"], f"batch of {batch}"


def test_speculation_in_fused_steps_and_through_prefix_reuse_and_cancellation(checkpoints: dict, tmp_path) -> None:
    """Where a prompt chunk and the decode batch run in one pass, the proposals' rows go with them; a request
    that reuses a prefix left by a speculating one gets the tokens of a fresh plain engine (the prefix cache
    keeps prompt chunks only, never a proposal); a cancelled neighbour leaves the others' tokens alone."""
    from test_engine import planned

    llm = kataru.load(checkpoints["llama"][0], dtype="bfloat16")
    with planned(llm, tmp_path, dict.fromkeys(("1", "2-8", "9-64", "prompt"), "kernel")):
        vocab = llm.config.vocab_size
        ps = looping_prompts(vocab, [5, 30, 11, 18, 40, 9], seed=11)
        plain = run(Engine(llm.model, llm.eos_ids, max_batch=4, prefill_chunk=8), ps, GREEDY)
        spec = Engine(llm.model, llm.eos_ids, max_batch=4, prefill_chunk=8,
                      speculation=Options("ngram", 6, 1, 3, adaptive=False))
        assert run(spec, ps, GREEDY) == plain
        assert spec.stats()["fused_steps"] > 0 and spec.stats()["spec_drafts"] > 0
        # prefix reuse: the next prompts start with the earlier ones' prompts
        held = [list(h) for h in spec.scheduler.cached.values()]
        assert held and all(any(h == p[:len(h)] for p in ps) for h in held)  # prompt tokens only
        follow = [p + looping_prompts(vocab, [6], seed=20 + i)[0] for i, p in enumerate(ps[2:])]
        fresh = run(Engine(llm.model, llm.eos_ids, max_batch=4, prefill_chunk=8), follow, GREEDY, stagger=False)
        assert run(spec, follow, GREEDY, stagger=False) == fresh
        assert spec.stats()["reused_tokens"] == 8 + 16 + 40 + 8  # every prompt's whole chunks
        # cancellation mid-run
        requests = [spec.submit(p, GREEDY) for p in ps[:4]]
        for _ in range(8):
            spec.step()
        spec.cancel(requests[1])
        spec.run()
        assert requests[1].finish_reason == "cancelled"
        assert [r.tokens for i, r in enumerate(requests) if i != 1] == [t for i, t in enumerate(plain[:4]) if i != 1]
        assert spec.scheduler.reserved == 0 and sorted(spec.scheduler.free_rows) == list(range(spec.scheduler.rows))


def test_eos_max_tokens_and_the_context_end_land_where_plain_decoding_puts_them(checkpoints: dict) -> None:
    """An eos inside an accepted run ends the answer at it (nothing after it is kept or streamed); max_tokens and
    the end of the context cut proposals, never fail."""
    llm = kataru.load(checkpoints["llama"][0], dtype="float32")
    (p,) = looping_prompts(llm.config.vocab_size, [20], seed=5)
    plain = run(Engine(llm.model, llm.eos_ids), [p], GREEDY)[0]
    eos = plain[len(plain) // 2]
    first = plain.index(eos)
    for proposer in ("ngram", "draft"):
        options = Options(proposer, 8, 1, 3, draft=Draft(llm.model), adaptive=False)
        for max_new in (1, 2, 3, 7, 24):
            params = SamplingParams(max_new_tokens=max_new, do_sample=False, ignore_eos=True, repetition_penalty=0.6)
            engine = Engine(llm.model, llm.eos_ids, speculation=options)
            assert run(engine, [p], params)[0] == plain[:max_new]
        engine = Engine(llm.model, {eos}, speculation=options)
        request = engine.submit(p, SamplingParams(max_new_tokens=24, do_sample=False, repetition_penalty=0.6))
        streamed = []
        for update in engine.follow(request):
            streamed.append(list(update.tokens))
            assert eos not in update.tokens[:-1]
        assert request.tokens == plain[:first + 1] and request.finish_reason == "stop"
        assert streamed[-1] == request.tokens
        if proposer == "draft":  # the model as its own draft: the eos came inside a run of kept proposals
            assert request.spec.accepted >= first - 2  # all but the prefill's token and a bonus token or two
        # the end of the context: a prompt 6 tokens short of it
        long = (p * 20)[:llm.config.max_seq_len - 6]
        params = SamplingParams(max_new_tokens=50, do_sample=False, ignore_eos=True, repetition_penalty=0.6)
        expected = run(Engine(llm.model, llm.eos_ids), [long], params)[0]
        engine = Engine(llm.model, llm.eos_ids, speculation=options)
        request = engine.submit(long, params)
        engine.run()
        assert request.tokens == expected and request.finish_reason == "length"


def test_stop_strings_cut_an_accepted_run_where_plain_decoding_stops(checkpoints: dict) -> None:
    """The model drafting for itself keeps every proposal, so each stop string falls inside a run of kept tokens:
    the text, the tokens and the streamed pieces are those of plain decoding."""
    folder = checkpoints["llama"][0]
    llm = kataru.load(folder, dtype="float32", speculate=f"draft:{folder}", speculate_tokens=6)
    llm.engine.speculator.options.adaptive = False  # propose every step (the tiny model's rows are not cheap)
    prompt = "吾輩は猫である。名前はまだ無い。吾輩は猫である。名前は"
    options = {"temperature": 0, "max_new_tokens": 40, "ignore_eos": True, "repetition_penalty": 0.6}
    plain = llm.complete([prompt], **options, speculate="off")[0]
    text = plain.text
    whole = [i for i in range(len(text) - 1) if "\ufffd" not in text[i:i + 2]]  # not half a character
    assert len(whole) > 6, text
    for i in (whole[2], whole[len(whole) // 2], whole[-1]):
        for stop in (text[i], text[i:i + 2]):
            want = llm.complete([prompt], **options, stop=[stop], speculate="off")[0]
            got = llm.complete([prompt], **options, stop=[stop])[0]
            assert (got.text, got.token_ids, got.finish_reason) == (want.text, want.token_ids, want.finish_reason)
            assert stop not in got.text and got.finish_reason == "stop"
            assert got.speculation["accepted_tokens"] > len(got.token_ids) // 2
            assert "".join(llm.stream(prompt, **options, stop=[stop])) == want.text


# --- sampling: the model's distribution ---------------------------------------------------------------------
def tiny_vocab_model(seed: int, layers: int = 1) -> Transformer:
    config = ModelConfig.from_hf({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 6,
                                  "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": layers,
                                  "num_attention_heads": 2, "max_position_embeddings": 64, "rms_norm_eps": 1e-5})
    torch.manual_seed(seed)
    model = Transformer(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.6)
    return model.eval()


PROMPT = [0, 1, 2, 3, 4, 5, 0, 2, 4, 1, 3, 5, 5, 0, 3]  # every token, so that prompt lookup always proposes
SAMPLED = SamplingParams(max_new_tokens=3, temperature=0.9, top_k=4, top_p=0.95, repetition_penalty=1.3,
                         ignore_eos=True)


def model_distribution(model: Transformer, n: int) -> dict[tuple[int, ...], float]:
    """P(first n tokens) under the model with SAMPLED's processing: the product of each step's processed
    softmax given the tokens before (penalties over the prompt and the answer so far)."""
    out: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(n):
        grown: dict[tuple[int, ...], float] = {}
        for prefix, prob in out.items():
            ids = PROMPT + list(prefix)
            with torch.inference_mode():
                logits = model(torch.tensor([ids]))[0, -1].float()
            seen = torch.zeros(6, dtype=torch.bool)
            seen[ids] = True
            probs = process_logits(logits, seen, SAMPLED).softmax(-1)
            for token in range(6):
                if probs[token] > 0:
                    grown[(*prefix, token)] = prob * float(probs[token])
        out = grown
    return out


def chi_square_p(model: Transformer, options: Options | None, draws: int = 3000) -> float:
    """The p-value of the engine's first three sampled tokens (3000 seeded draws) against the model's exact
    distribution; cells expected fewer than 5 times are pooled."""
    from scipy.stats import chi2

    engine = Engine(model, set(), max_batch=64, speculation=options)
    requests = [engine.submit(PROMPT, SamplingParams(**{**vars(SAMPLED), "seed": i})) for i in range(draws)]
    engine.run()
    counts: dict[tuple[int, ...], int] = {}
    for r in requests:
        counts[tuple(r.tokens)] = counts.get(tuple(r.tokens), 0) + 1
    expected = model_distribution(model, 3)
    assert set(counts) <= set(expected)
    stat, cells, pool_seen, pool_expected = 0.0, 0, 0, 0.0
    for cell, prob in expected.items():
        e, o = prob * draws, counts.get(cell, 0)
        if e < 5:
            pool_seen, pool_expected = pool_seen + o, pool_expected + e
            continue
        stat += (o - e) ** 2 / e
        cells += 1
    if pool_expected > 0:
        stat += (pool_seen - pool_expected) ** 2 / pool_expected
        cells += 1
    if options is not None:
        assert engine.stats()["spec_draft_tokens"] >= draws  # every request verified a proposal
    return float(chi2.sf(stat, cells - 1))


def wrong_draw(probs: torch.Tensor, proposal: int, draft: torch.Tensor | None, generator: torch.Generator | None) -> int:
    """A plausible mistake: keep the proposal with probability p(d), else draw from p itself (not from what is
    left after the proposal), which favours proposed tokens."""
    if float(torch.rand((), generator=generator)) < float(probs[proposal]):
        return proposal
    return int(torch.multinomial(probs, 1, generator=generator))


def test_sampled_tokens_follow_the_models_distribution_and_a_wrong_rule_is_caught(monkeypatch) -> None:
    """On a vocabulary of 6 with temperature, top-k, top-p and a repetition penalty, the first three tokens of
    3000 seeded requests match the model's exact distribution (chi-square) without speculation, with prompt
    lookup and with a draft of other weights; the same test rejects a rule that resamples from p."""
    model = tiny_vocab_model(0)
    draft = Draft(tiny_vocab_model(1))
    ngram = Options("ngram", 2, 1, 2, adaptive=False)
    drafted = Options("draft", 2, draft=draft, adaptive=False)
    for options in (None, ngram, drafted):
        assert chi_square_p(model, options) > 1e-3
    monkeypatch.setattr(sampling_module, "speculative_draw", wrong_draw)
    assert chi_square_p(model, ngram) < 1e-6
    assert chi_square_p(model, drafted) < 1e-6


# --- the adaptive rule ----------------------------------------------------------------------------------------
def test_the_rule_speculates_where_rows_are_cheap_and_stops_where_they_cost_their_price() -> None:
    """With step costs flat in the rows (memory-bound) a sequence whose proposals are kept speculates deep; with
    costs proportional to the rows (compute-bound) or proposals rarely kept, nothing is proposed."""
    from kataru.engine.scheduler import Request

    model = tiny_vocab_model(0)
    spec = Speculator(model, Options("ngram", 8, 1, 2))

    def decide(cost: StepCost, hits: float, misses: float, batch: int) -> list[int]:
        spec.cost = lambda batch: cost  # type: ignore[method-assign]
        requests = []
        for _ in range(batch):
            r = Request([1, 2, 3], SamplingParams(max_new_tokens=100))
            spec.state(r)
            r.spec.counts = [hits, misses, hits, misses]
            requests.append(r)
        return spec.choose(requests, [r.spec for r in requests], [8] * batch)

    flat = StepCost({1: 1.0, 32: 1.2}, 0.0)
    linear = StepCost({1: 1.0, 32: 32.0}, 0.0)
    assert decide(flat, 20, 1, 1) == [8]
    assert sum(decide(flat, 20, 1, 4)) > 8
    assert decide(linear, 20, 1, 1) == [0] and decide(linear, 20, 1, 8) == [0] * 8
    assert decide(flat, 0, 30, 1) == [1]  # a row that costs nothing pays even for a 3% chance
    assert decide(StepCost({1: 1.0, 2: 1.1, 32: 1.5}, 0.0), 0, 30, 1) == [0]  # not at 10% more
    assert sum(decide(flat, 20, 1, 30)) <= 1  # a step of at most MAX_ROWS rows
    linear.observe(1, 0, 2.0)  # measured steps correct the calibration
    assert linear.seconds(1, 0) == pytest.approx(2.0) and linear.seconds(2, 0) == pytest.approx(4.0)


def test_acceptance_is_tracked_for_a_steps_first_proposal_and_for_the_runs_after_it() -> None:
    """Copying comes in runs: a sequence whose first proposal is kept and then the rest too, one whose first
    is kept and nothing after, and one whose proposals all fail are told apart, and old steps fade."""
    from kataru.engine.speculate import State

    runs, first_only, none = State("ngram"), State("ngram"), State("ngram")
    for _ in range(10):
        runs.record(8, 8)
        first_only.record(8, 1)
        none.record(8, 0)
    assert runs.rates()[0] > 0.8 and runs.rates()[1] > 0.9
    assert first_only.rates()[0] > 0.8 and first_only.rates()[1] < 0.25
    assert none.rates()[0] < 0.2
    for _ in range(10):
        none.record(4, 4)  # the text turned to copying: the old failures fade
    assert none.rates()[0] > 0.75


def test_the_adaptive_rule_still_gives_plain_tokens(checkpoints: dict) -> None:
    llm = kataru.load(checkpoints["mistral"][0], dtype="float32", speculate="ngram")
    ps = looping_prompts(llm.config.vocab_size, [12, 33, 7], seed=9)
    plain = [llm.complete([p], temperature=0, max_new_tokens=30, ignore_eos=True, raw=True, speculate="off")[0]
             for p in [llm.tokenizer.decode(q) for q in ps]]
    spec = [llm.complete([p], temperature=0, max_new_tokens=30, ignore_eos=True, raw=True)[0]
            for p in [llm.tokenizer.decode(q) for q in ps]]
    assert [c.token_ids for c in spec] == [c.token_ids for c in plain]
    assert all(c.speculation is None for c in plain) and all(c.speculation["method"] == "ngram" for c in spec)
    assert llm.engine.speculator.costs["1"].ratio  # measured, then corrected by the steps


def test_prompt_lookup_finds_the_most_recent_longest_match() -> None:
    index = NgramIndex(1, 3)
    index.extend([5, 6, 7, 8, 9, 6, 7, 1, 2, 5, 6, 7])
    assert index.propose(3) == [8, 9, 6]  # the trigram "5 6 7" (at 0) before the more recent bigram "6 7" (at 5)
    index = NgramIndex(1, 2)
    index.extend([6, 7, 8, 9, 6, 7, 1, 2, 6, 7])
    assert index.propose(3) == [1, 2, 6]  # "6 7" at 0 and at 4: the most recent
    index = NgramIndex(2, 3)
    index.extend([1, 2, 3, 4, 9, 9, 1, 2, 3])
    assert index.propose(8) == [4, 9, 9, 1, 2, 3]  # the longest n-gram wins; proposals stop where the text ends
    index.extend([7])
    assert index.propose(4) == []  # "3 7" and "2 3 7" never occurred


# --- errors and the user's entry points ------------------------------------------------------------------------
def test_bad_speculation_settings_are_refused_in_one_line(checkpoints: dict, tokenizer_dirs: dict, tmp_path) -> None:
    folder = checkpoints["llama"][0]
    for tokens in (0, -3):
        with pytest.raises(KataruError, match="--speculate-tokens must be a whole number of at least 1"):
            kataru.load(folder, speculate="ngram", speculate_tokens=tokens)
    with pytest.raises(KataruError, match="speculate must be ngram, draft:FOLDER or off"):
        kataru.load(folder, speculate="medusa")
    with pytest.raises(KataruError, match="--speculate-min-ngram"):
        kataru.load(folder, speculate="ngram", speculate_ngram=(3, 2))
    with pytest.raises(KataruError, match=r"the draft's tokenizer differs from the model's: \d+ tokens against"):
        kataru.load(folder, speculate=f"draft:{checkpoints['gpt_neox'][0]}")
    other = tmp_path / "other-ids"  # the same vocabulary size, other pieces at the same ids
    make_checkpoint("mistral", tokenizer_dirs, other, num_hidden_layers=1)
    llama_size, mistral_size = (kataru.load(f).tokenizer.vocab_size for f in (folder, other))
    if llama_size == mistral_size:
        with pytest.raises(KataruError, match=r"token \d+ is"):
            kataru.load(folder, speculate=f"draft:{other}")
    with pytest.raises(KataruError, match="does not exist"):
        kataru.load(folder, speculate=f"draft:{tmp_path / 'nowhere'}")
    llm = kataru.load(folder)
    with pytest.raises(KataruError, match="no draft model"):
        llm.engine.submit([1, 2, 3], SamplingParams(speculate="draft"))
    for argv, message in ((["--speculate-tokens", "0"], "--speculate-tokens must be"),
                          (["--speculate", f"draft:{checkpoints['stablelm'][0]}"], "the draft's tokenizer differs")):
        result = subprocess.run([sys.executable, "-m", "kataru", "generate", str(folder), "hi", "--speculate",
                                 "ngram", *argv], capture_output=True, text=True, timeout=300)
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def test_generate_json_reports_what_was_proposed_and_kept(checkpoints: dict, drafts: dict) -> None:
    folder = checkpoints["llama"][0]
    common = [sys.executable, "-m", "kataru", "generate", str(folder), "吾輩は猫である。吾輩は猫である。吾輩は",
              "--temperature", "0", "--max-new-tokens", "30", "--ignore-eos", "--json"]
    plain = json.loads(subprocess.run(common, capture_output=True, text=True, check=True, timeout=300).stdout)
    assert plain["speculation"] is None
    for how in ("ngram", f"draft:{drafts['llama']}"):
        out = json.loads(subprocess.run([*common, "--speculate", how, "--speculate-tokens", "4"], capture_output=True,
                                        text=True, check=True, timeout=300).stdout)
        assert out["token_ids"] == plain["token_ids"] and out["text"] == plain["text"]
        spec = out["speculation"]
        assert spec["method"] == how.split(":")[0] and spec["accepted_tokens"] <= spec["draft_tokens"]


def test_the_server_speculates_reports_metrics_and_lets_a_request_turn_it_off(checkpoints: dict) -> None:
    import openai
    from serve_helpers import Threaded

    folder = checkpoints["llama"][0]
    def load() -> kataru.LLM:
        llm = kataru.load(folder, dtype="float32", speculate="ngram", speculate_ngram=(1, 3))
        llm.engine.speculator.options.adaptive = False  # propose every step (the tiny model's rows are not cheap)
        return llm

    server = Threaded(load)
    try:
        client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="none")
        prompt = "吾輩は猫である。名前はまだ無い。吾輩は猫である。名前は"
        answers = {}
        for label, extra in (("on", {}), ("off", {"speculate": False})):
            out = client.completions.create(model="m", prompt=prompt, max_tokens=40, temperature=0,
                                            extra_body={"ignore_eos": True, "repetition_penalty": 0.6, **extra})
            answers[label] = out.choices[0].text
            stats = server.server.ready().engine.stats()
            if label == "on":
                drafted = stats["spec_draft_tokens"]
                assert drafted > 0
            else:
                assert stats["spec_draft_tokens"] == drafted  # this request proposed nothing
        assert answers["on"] == answers["off"]
        stream = client.completions.create(model="m", prompt=prompt, max_tokens=40, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True, "repetition_penalty": 0.6})
        assert "".join(chunk.choices[0].text for chunk in stream) == answers["off"]
        metrics = httpx.get(f"{server.base}/metrics").text
        values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
                  if line.startswith("kataru:spec_decode")}
        assert values["kataru:spec_decode_num_draft_tokens_total"] >= drafted
        assert 0 < values["kataru:spec_decode_num_accepted_tokens_total"] <= values[
            "kataru:spec_decode_num_draft_tokens_total"]
        bad = httpx.post(f"{server.base}/v1/completions", json={"prompt": "x", "speculate": "maybe"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "speculate"
    finally:
        server.stop()


def test_step_cost_is_measured_once_and_read_back(checkpoints: dict, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("KATARU_CACHE", str(tmp_path))
    llm = kataru.load(checkpoints["stablelm"][0], dtype="float32")
    cost = StepCost.measure(llm.model)
    assert set(cost.base) >= {1, 2, 8, 31} and all(t > 0 for t in cost.base.values()) and cost.per_token >= 0
    again = StepCost.cached(llm.model)
    assert again is not None and again.base == cost.base and math.isclose(again.per_token, cost.per_token)


def test_a_verification_takes_the_paths_of_a_plain_step_of_its_batch(checkpoints: dict, tmp_path) -> None:
    """A plan may run one row on a kernel and more rows on torch's GEMM (an AMX CPU's plan): a sequence decoding
    alone verifies its k+1 rows on the one-row path (`dispatch.pinned`), so its log-probabilities are the bits of
    plain decoding still."""
    from test_engine import planned

    from kataru import dispatch

    llm = kataru.load(checkpoints["llama"][0], dtype="bfloat16")
    with planned(llm, tmp_path, {"1": "kernel", "2-8": "torch", "9-64": "torch", "prompt": "torch"}):
        ps = looping_prompts(llm.config.vocab_size, [30, 11, 40], seed=13)
        params = SamplingParams(max_new_tokens=20, do_sample=False, ignore_eos=True, logprobs=0,
                                repetition_penalty=0.6)
        for attention in ("kernel", "torch"):  # torch's SDPA: each row over its own slots, as its step would
            ms = {"kernel": 1.0, "torch": 2.0} if attention == "kernel" else {"kernel": 2.0, "torch": 1.0}
            for kind in ("attention", "norm"):
                dispatch._state["kinds"][f"{kind}-bf16"] = dispatch.Plan(kind, dict.fromkeys(dispatch.DECODE, ms))
            outs = {}
            for how, engine in engines(llm, Draft(llm.model), max_batch=1).items():
                requests = [engine.submit(p, params) for p in ps]
                engine.run()
                outs[how] = [(r.tokens, r.logprobs) for r in requests]
                assert how == "plain" or spec_totals(engine)[1] > 0
            assert outs["ngram"] == outs["plain"] and outs["draft"] == outs["plain"], f"{attention} attention"


def test_the_llm_jp_pairing_drafts_with_its_tokenizer_and_another_generation_is_refused(tmp_path) -> None:
    """llm-jp-3.1-1.8b-instruct4 drafts for llm-jp-3.1-13b-instruct4: both carry the v3.1 tokenizer (here the
    real one, as its upload's tokenizer.json, under two tiny LLaMA models of other widths); a draft with the
    v3.0b1 tokenizer of the same size is refused, naming the first token that differs."""
    import shutil

    import transformers
    from helpers import SHARED, unigram_tokenizer_json

    source = SHARED / "tokenizers"
    if not (source / "llm-jp-v3.1" / "llm-jp-tokenizer-100k.ver3.1.model").is_file():
        pytest.skip(f"the llm-jp tokenizers are not in the data folder ({source}); set KATARU_DATA")

    def checkpoint(name: str, version: str, hidden: int, layers: int) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        model_file = next((source / version).glob("*.model"))
        unigram_tokenizer_json(model_file, folder / "tokenizer.json")
        for extra in ("tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(source / "llm-jp-v3.1" / extra, folder / extra)
        vocab = kataru.tokenizer.Tokenizer(folder).vocab_size
        torch.manual_seed(layers)
        config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                          num_hidden_layers=layers, num_attention_heads=2,
                                          max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
        transformers.LlamaForCausalLM(config).save_pretrained(folder)
        return folder

    target = checkpoint("13b-like", "llm-jp-v3.1", 64, 2)
    draft = checkpoint("1.8b-like", "llm-jp-v3.1", 32, 1)
    older = checkpoint("v3.0b1", "llm-jp-v3.0b1", 32, 1)
    llm = kataru.load(target, dtype="float32", speculate=f"draft:{draft}", speculate_tokens=4)
    prompt = "自然言語処理とは何か。自然言語処理とは"
    plain = llm.complete([prompt], temperature=0, max_new_tokens=20, ignore_eos=True, speculate="off")[0]
    drafted = llm.complete([prompt], temperature=0, max_new_tokens=20, ignore_eos=True)[0]
    assert drafted.token_ids == plain.token_ids and drafted.speculation["method"] == "draft"
    with pytest.raises(KataruError, match=r"the draft's tokenizer differs from the model's: (token \d+ is|\d+ tokens)"):
        kataru.load(target, speculate=f"draft:{older}")


def test_a_failing_draft_costs_its_requests_their_proposals_and_nothing_else(checkpoints: dict, capsys) -> None:
    llm = kataru.load(checkpoints["llama"][0], dtype="float32")
    broken = Draft(kataru.load(checkpoints["llama"][0], dtype="float32").model)

    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the draft's weights are gone")

    broken.model.decode = fail  # type: ignore[method-assign]
    ps = looping_prompts(llm.config.vocab_size, [12, 30], seed=4)
    plain = run(Engine(llm.model, llm.eos_ids), ps, GREEDY)
    engine = Engine(llm.model, llm.eos_ids, speculation=Options("draft", 4, draft=broken, adaptive=False))
    assert run(engine, ps, GREEDY) == plain
    assert engine.stats()["spec_draft_tokens"] == 0
    err = capsys.readouterr().err
    assert err.count("the draft model failed (RuntimeError: the draft's weights are gone)") == 1


def test_lookups_not_worth_verifying_are_still_scored_and_new_sequences_start_from_the_engines_record() -> None:
    """A sequence whose lookups the rule declines learns whether they would have been kept from the tokens that
    come (no verification needed), and a sequence new to the engine starts from what its others kept."""
    from kataru.engine.scheduler import Request

    spec = Speculator(tiny_vocab_model(0), Options("ngram", 4, 1, 2))
    spec.cost = lambda batch: StepCost({1: 1.0, 32: 40.0}, 0.0)  # type: ignore[method-assign]  # rows dear
    request = Request([1, 2, 3, 4, 1, 2], SamplingParams(max_new_tokens=40))
    request.tokens = [3]
    (proposal,) = spec.propose([request], 64, 64)
    assert proposal.tokens == [] and request.spec.shadow == (1, [4, 1, 2, 3])  # "2 3" looked up, not verified
    request.tokens += [4, 1, 2]
    spec.propose([request], 64, 64)
    assert request.spec.shadow == (1, [4, 1, 2, 3]) and request.spec.counts == [0.0] * 4  # not known yet
    request.tokens += [9]
    spec.propose([request], 64, 64)
    assert request.spec.counts == [1.0, 0.0, 2.0, 1.0]  # first kept, two more kept, the fourth not
    assert spec.prior("ngram")[0] > PRIOR["ngram"][0]  # a sequence new to the engine expects more


def test_kataru_bench_speculate_measures_both_workloads_with_the_same_tokens(capsys: pytest.CaptureFixture[str]
                                                                             ) -> None:
    """`kataru bench speculate` on the embedded model: grounded prompts (JSQuAD contexts, Aozora passages) and
    open-ended ones (MT-Bench-ja writing) decoded without speculation, with the adaptive rule and with a fixed
    k, the same tokens in every mode, and a replay of those answers on another shape's measured step costs."""
    from helpers import SHARED

    from kataru.cli import main

    needed = [SHARED / "jglue" / "jsquad-v1.3" / "valid-v1.3.json", SHARED / "mt-bench-ja" / "question.jsonl"]
    if not all(p.is_file() for p in needed) or not list((SHARED / "aozora").glob("*.jsonl.gz")):
        pytest.skip(f"the workloads come from the data folder {SHARED} (JSQuAD, Aozora, MT-Bench-ja): absent here")
    capsys.readouterr()
    assert main(["bench", "speculate", "--limit", "2", "--new-tokens", "24", "--cost-of", "tiny", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["speculate"] == "ngram" and set(report["kataru"]) == {"grounded", "open-ended"}
    for name, result in report["kataru"].items():
        assert result["prompts"] == 2 and result["identical"], name
        modes = result["modes"]
        assert set(modes) == {"off", "adaptive", "fixed"} and modes["off"]["draft_tokens"] == 0
        assert modes["fixed"]["draft_tokens"] > 0 and 0 <= modes["fixed"]["accepted_tokens"] <= \
            modes["fixed"]["draft_tokens"]
        assert all(m["tokens"] == modes["off"]["tokens"] > 0 for m in modes.values())
    assert set(report["replay"]["workloads"]) == {"grounded", "open-ended"}
