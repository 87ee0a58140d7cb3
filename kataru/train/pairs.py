"""Preference pairs by rejection sampling, as the llm-jp instruct card builds them.

For every prompt the SFT model answers several times; the answers are scored against the reference and
the best and the worst become (chosen, rejected). Scores: JCommonsenseQA — the gold choice is chosen and
the wrong choice the model itself finds most likely is rejected; JSTS — distance of the number to the
gold similarity; free text (Aozora) — character-bigram F1 with the reference passage. Pairs whose two
answers score the same are dropped.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from kataru.errors import KataruError
from kataru.files import read_jsonl, write_atomic
from kataru.llm import LLM, load
from kataru.scoring import score_choices
from kataru.train.sft import to_messages


def bigram_f1(answer: str, reference: str) -> float:
    a = Counter(answer[i:i + 2] for i in range(len(answer) - 1))
    r = Counter(reference[i:i + 2] for i in range(len(reference) - 1))
    overlap = sum((a & r).values())
    if not overlap:
        return 0.0
    precision, recall = overlap / sum(a.values()), overlap / sum(r.values())
    return 2 * precision * recall / (precision + recall)


def similarity_score(answer: str, gold: float) -> float:
    match = re.search(r"\d+(\.\d+)?", answer)
    return -5.0 if match is None else -abs(float(match.group()) - gold)


def likeliest_wrong(llm: LLM, prompt: list[dict[str, str]], choices: list[str], gold: str) -> str:
    """The wrong choice the model itself finds most likely as the answer."""
    wrong = [c for c in choices if c != gold]
    return wrong[int(score_choices(llm.model, llm.tokenizer, llm.encode_prompt(prompt), wrong).argmax())]


def build_pairs(model: Path, sft_data: Path, out: Path, samples: int = 4, max_prompts: int = 500, seed: int = 0,
                max_new_tokens: int = 64) -> dict[str, int]:
    if samples < 2:
        raise KataruError("--samples must be at least 2 to have a best and a worst answer")
    llm = load(model)
    rows = read_jsonl(sft_data)
    random.Random(seed).shuffle(rows)
    rows = rows[:max_prompts]
    prompts = [to_messages(r)[0][:-1] for r in rows]
    references = [to_messages(r)[0][-1]["content"] for r in rows]
    answers: list[list[str]] = [[] for _ in rows]
    free = [i for i, r in enumerate(rows) if "choices" not in r]
    for s in tqdm(range(samples), desc="sampling answers", unit="round"):
        for start in range(0, len(free), 32):
            chunk = free[start:start + 32]
            done = llm.complete([prompts[i] for i in chunk], temperature=1.0, top_p=0.95, seed=seed * 1000 + s,
                                max_new_tokens=max_new_tokens)
            for i, completion in zip(chunk, done, strict=True):
                answers[i].append(completion.text.strip())
    pairs, counts = [], Counter()
    for i, row in enumerate(tqdm(rows, desc="scoring", unit="prompt")):
        source = row.get("source", "text")
        if "choices" in row:
            chosen, rejected = references[i], likeliest_wrong(llm, prompts[i], row["choices"], references[i])
        else:
            if "score" in row:
                scored = sorted(answers[i], key=lambda a, g=row["score"]: similarity_score(a, g))
                best, worst = similarity_score(scored[-1], row["score"]), similarity_score(scored[0], row["score"])
            else:
                scored = sorted(answers[i], key=lambda a, ref=references[i]: bigram_f1(a, ref))
                best, worst = bigram_f1(scored[-1], references[i]), bigram_f1(scored[0], references[i])
            if best <= worst:
                counts["tied"] += 1
                continue
            chosen, rejected = scored[-1], scored[0]
        pairs.append({"prompt": prompts[i], "chosen": chosen, "rejected": rejected, "source": source})
        counts[source] += 1
    if not pairs:
        raise KataruError("no preference pair could be built (every prompt's answers scored the same)")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    return dict(counts)
