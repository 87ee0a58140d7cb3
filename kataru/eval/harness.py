"""lm-evaluation-harness on kataru: `KataruLM`, registered as the harness model "kataru", so that
`lm_eval.simple_evaluate(model=KataruLM(folder), tasks=...)`, `lm_eval --model kataru --model_args
pretrained=FOLDER` and `kataru eval lm-eval` run any harness task (local YAML tasks included) offline.

Log-likelihoods: the context and the continuation are tokenized apart (the context with the checkpoint's
special tokens, as `kataru eval` encodes a prompt; the continuation without), and the requests that share a
context are scored together, the context computed once (`kataru.scoring.score_shared`). Generation goes
through the engine, which batches the requests (`batch_size` at a time) and stops them at the task's `until`
strings.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lm_eval.models  # noqa: F401 - the harness's own models first: it loads them only into an empty registry
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from kataru.llm import DEFAULT_MODEL, LLM, load
from kataru.scoring import score_pairs, score_shared


def _batches(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


@register_model("kataru")
class KataruLM(LM):
    def __init__(self, pretrained: str | LLM | None = None, dtype: str = "auto", quantize: str | None = None,
                 batch_size: int | str = 8, max_length: int | None = None, **_: Any) -> None:
        super().__init__()
        self.llm = pretrained if isinstance(pretrained, LLM) else load(
            pretrained or DEFAULT_MODEL, dtype=dtype, quantize=quantize or None,
            max_batch=int(batch_size) if str(batch_size).isdigit() else 8, progress=False)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.max_length = int(max_length or self.llm.config.max_seq_len)

    # --- scoring -------------------------------------------------------------------------------------------
    def _context(self, text: str) -> list[int]:
        return self.llm.tokenizer.encode(text, add_special_tokens=self.llm.prompt_style.add_special_tokens)

    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        return score_pairs(self.llm.model, pairs, self.max_length, self.batch_size)

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        tokenizer = self.llm.tokenizer
        start = [tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id]  # for an empty context
        pairs = []
        for request in requests:
            context, continuation = request.args
            pairs.append((self._context(context) if context else start, tokenizer.encode(continuation)))
        groups: dict[tuple[int, ...], list[int]] = {}  # the requests that share a context: scored together
        for i, (context, _) in enumerate(pairs):
            groups.setdefault(tuple(context), []).append(i)
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        bar = tqdm(total=len(pairs), desc="loglikelihood", disable=disable_tqdm)
        for context, members in groups.items():
            scored = score_shared(self.llm.model, list(context), [pairs[i][1] for i in members], self.max_length)
            for i, result in zip(members, scored, strict=True):
                results[i] = result
            bar.update(len(members))
        bar.close()
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """The whole text's log-likelihood, in windows of the context length that each predict new tokens
        (the harness's rolling windows, the first one after the beginning-of-sequence token)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        prefix = self.llm.tokenizer.bos_id if self.llm.tokenizer.bos_id is not None else self.llm.tokenizer.eos_id
        out = []
        for request in tqdm(requests, desc="loglikelihood_rolling", disable=disable_tqdm):
            tokens = self.llm.tokenizer.encode(request.args[0])
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=tokens, prefix_token=prefix, max_seq_len=self.max_length, context_len=1)]
            out.append(sum(logp for logp, _ in self._score([(list(c), list(t)) for c, t in windows])))
        return out

    # --- generation ----------------------------------------------------------------------------------------
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        out: list[str] = []
        for chunk in tqdm(list(_batches(requests, self.batch_size)), desc="generate_until", disable=disable_tqdm):
            groups: dict[str, list[int]] = {}  # requests with the same settings go to the engine together
            for i, request in enumerate(chunk):
                groups.setdefault(repr(sorted(request.args[1].items())), []).append(i)
            texts = [""] * len(chunk)
            for indices in groups.values():
                kwargs = dict(chunk[indices[0]].args[1])
                until = kwargs.pop("until", None) or []
                until = [until] if isinstance(until, str) else list(until)
                sampling = {"max_new_tokens": int(kwargs.pop("max_gen_toks", 256)),
                            "stop": until or None, "temperature": float(kwargs.pop("temperature", 0.0))}
                if not kwargs.pop("do_sample", False):
                    sampling["temperature"] = 0.0
                prompts = [chunk[i].args[0] for i in indices]
                room = [self.max_length - len(self._context(p)) for p in prompts]
                sampling["max_new_tokens"] = max(1, min([sampling["max_new_tokens"], *room]))
                for i, completion in zip(indices, self.llm.complete(prompts, raw=True, **sampling), strict=True):
                    texts[i] = completion.text
            out.extend(texts)
        return out
