"""Japanese MT-Bench with an LLM judge, as llm-jp-judge runs it (data: `mt-bench-ja-llmjp/` in the data folder).

80 questions of 2 turns in 8 categories. Answers: the checkpoint's own prompt format with llm-jp-judge's
system prompt, up to 1024 new tokens, the temperature of the question's category; turn 2 sees the model's
own first answer. Judging: any OpenAI-compatible endpoint, temperature 0, up to 2048 tokens, single-answer
grading with a reference answer for math, reasoning and coding, turn 2 judged with the whole dialogue; the
score is `[[N]]` (1-10), a judgment without one is asked again, then counted missing. Answers and judgments
are appended to JSONL as they come, so a killed run resumes where it stopped.

`replay` scores judgments already made (FastChat's `model_judgment/gpt-4_single.jsonl` of `mt-bench-ja/`)
without any judge: the averages of that leaderboard.
"""

from __future__ import annotations

import json
import re
import statistics
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kataru.charts import pyplot
from kataru.errors import KataruError
from kataru.files import iter_jsonl, read_jsonl

SYSTEM = "以下は、タスクを説明する指示です。要求を適切に満たす応答を書きなさい。"
TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0, "reasoning": 0.0,
               "stem": 0.1, "humanities": 0.1}
NEEDS_REFERENCE = {"math", "reasoning", "coding"}
FILES = {"ja": ("question_full-v3.jsonl", "base-gpt4o-with-human-annotation-v0.jsonl", "mt_bench_ja_prompt_v1.yaml"),
         "en": ("en-question-v0.jsonl", "en-gpt-4-v0.jsonl", "en-mt_bench_en_prompt_v0.yaml")}
MAX_NEW_TOKENS, JUDGE_MAX_TOKENS, JUDGE_TRIES = 1024, 2048, 3


@dataclass
class Bench:
    questions: list[dict[str, Any]]  # question_id, category, turns
    references: dict[Any, list[str]]  # question_id -> reference answers of both turns
    prompts: dict[str, dict[str, str]]  # judge prompt name -> prompt_template, system_prompt, regex


def load_bench(folder: Path, lang: str = "ja", limit: int | None = None) -> Bench:
    import yaml

    questions_file, references_file, prompts_file = (folder / name for name in FILES[lang])
    for path in (questions_file, references_file, prompts_file):
        if not path.is_file():
            raise KataruError(f"{path} is missing; MT-Bench needs llm-jp-judge's questions, references and judge "
                              "prompts in that folder (see the data folder's MANIFEST.md)")
    questions = read_jsonl(questions_file)[:limit]
    references = {r["question_id"]: r["choices"][0]["turns"] for r in read_jsonl(references_file)}
    try:
        prompts = yaml.safe_load(prompts_file.read_text("utf-8"))
    except yaml.YAMLError as err:
        raise KataruError(f"{prompts_file} is not valid YAML ({err.__class__.__name__}); restore the file") from None
    return Bench(questions, references, prompts)


def judge_prompt(bench: Bench, question: dict[str, Any], answers: list[str], turn: int) -> tuple[str, str, str]:
    """(system prompt, user prompt, score pattern) of llm-jp-judge's single-answer grading for this turn."""
    reference = question["category"] in NEEDS_REFERENCE and question["question_id"] in bench.references
    name = ("single-math-v1" if reference else "single-v1") + ("-multi-turn" if turn == 2 else "")
    spec = bench.prompts[name]
    q, refs = question["turns"], bench.references.get(question["question_id"], ["", ""])
    fields = {"question": q[0], "answer": answers[0], "ref_answer_1": refs[0], "question_1": q[0],
              "question_2": q[1] if len(q) > 1 else "", "answer_1": answers[0],
              "answer_2": answers[1] if len(answers) > 1 else "", "ref_answer_2": refs[1] if len(refs) > 1 else ""}
    return spec["system_prompt"], spec["prompt_template"].format(**fields), spec.get("regex", r"\[\[(10|[1-9])\]\]")


def parse_score(judgment: str, pattern: str) -> int | None:
    found = re.findall(pattern, judgment)
    return int(found[-1]) if found else None


class Judge:
    """An OpenAI-compatible chat endpoint that grades (OpenAI's, a `kataru serve`, a vLLM)."""

    def __init__(self, url: str, model: str, key: str | None = None, timeout: float = 600,
                 max_tokens: int = JUDGE_MAX_TOKENS) -> None:
        import httpx

        self.max_tokens = max_tokens
        self.url = url.rstrip("/") + ("" if url.rstrip("/").endswith("/v1") else "/v1") + "/chat/completions"
        self.model = model
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.Client(timeout=timeout, headers=headers)

    def __call__(self, system: str, prompt: str) -> str:
        import httpx

        body = {"model": self.model, "temperature": 0, "max_tokens": self.max_tokens,
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": prompt}]}
        for attempt in range(3):  # a network error or a 5xx: wait and ask again
            try:
                response = self.client.post(self.url, json=body)
            except httpx.HTTPError as err:
                error = f"{type(err).__name__}: {err}"
            else:
                if response.status_code == 200:
                    return response.json()["choices"][0]["message"]["content"] or ""
                error = f"HTTP {response.status_code}: {response.text[:200]}"
                if response.status_code < 500 and response.status_code != 429:
                    break
            time.sleep(0.5 * 2**attempt)
        raise KataruError(f"the judge at {self.url} failed: {error}")


class Log:
    """One JSONL file appended to from several threads; what it already holds is read back on resume."""

    def __init__(self, path: Path) -> None:
        self.path, self.lock = path, threading.Lock()
        if path.exists():  # a run killed mid-write leaves a torn last line: cut it, its item is done again
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):
                path.write_bytes(data[:data.rfind(b"\n") + 1])
        self.rows = [row for _, row in iter_jsonl(path)] if path.exists() else []

    def append(self, row: dict[str, Any]) -> None:
        with self.lock:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                f.flush()
            self.rows.append(row)


def answer_all(generate: Callable[[list[dict[str, str]], float], str], bench: Bench, log: Log, workers: int,
               progress: Any = None) -> dict[Any, list[str]]:
    """Both turns of every question not yet in the log, `workers` questions at a time (the engine batches
    them); each answer is logged as soon as its second turn is done."""
    done = {row["question_id"]: row["turns"] for row in log.rows}

    def one(question: dict[str, Any]) -> None:
        temperature = TEMPERATURE.get(question["category"], 0.7)
        history: list[dict[str, str]] = []
        answers = []
        for text in question["turns"]:
            history.append({"role": "user", "content": text})
            answers.append(generate(history, temperature))
            history.append({"role": "assistant", "content": answers[-1]})
        log.append({"question_id": question["question_id"], "category": question["category"], "turns": answers})
        done[question["question_id"]] = answers
        if progress is not None:
            progress.update()

    todo = [q for q in bench.questions if q["question_id"] not in done]
    if progress is not None:
        progress.update(len(bench.questions) - len(todo))
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for future in [pool.submit(one, q) for q in todo]:
            future.result()
    return done


def judge_all(judge: Callable[[str, str], str], bench: Bench, answers: dict[Any, list[str]], log: Log,
              workers: int = 4, progress: Any = None) -> None:
    """Grade every (question, turn) not yet in the log; an unparsable judgment is asked again up to
    JUDGE_TRIES times, then logged with score None (missing)."""
    done = {(row["question_id"], row["turn"]) for row in log.rows}
    jobs = [(q, turn) for q in bench.questions for turn in range(1, len(q["turns"]) + 1)
            if (q["question_id"], turn) not in done]

    def one(question: dict[str, Any], turn: int) -> None:
        system, prompt, pattern = judge_prompt(bench, question, answers[question["question_id"]], turn)
        judgment, score, tries = "", None, 0
        while score is None and tries < JUDGE_TRIES:
            tries += 1
            judgment = judge(system, prompt)
            score = parse_score(judgment, pattern)
        log.append({"question_id": question["question_id"], "category": question["category"], "turn": turn,
                    "score": score, "tries": tries, "judgment": judgment})
        if progress is not None:
            progress.update()

    if progress is not None:
        progress.update(sum(len(q["turns"]) for q in bench.questions) - len(jobs))
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for future in [pool.submit(one, q, t) for q, t in jobs]:
            future.result()


def summarize(judgments: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The mean over every scored judgment, per turn and per category; how many are missing."""
    rows = list(judgments)
    scored = [r for r in rows if r.get("score") is not None and r["score"] != -1]

    def mean(selected: list[dict[str, Any]]) -> float | None:
        return statistics.fmean(r["score"] for r in selected) if selected else None

    categories = sorted({r["category"] for r in rows if r.get("category")})
    return {"score": mean(scored), "judgments": len(rows), "missing": len(rows) - len(scored),
            "turns": {str(t): mean([r for r in scored if r["turn"] == t]) for t in sorted({r["turn"] for r in rows})},
            "categories": {c: mean([r for r in scored if r.get("category") == c]) for c in categories}}


def replay(judgments_file: Path, questions_file: Path | None = None) -> dict[str, dict[str, Any]]:
    """Per model: the summary of judgments already made (FastChat's single-answer JSONL: model, question_id,
    turn, score; a score of -1 is FastChat's unparsable judgment, left out as its show_result does)."""
    categories = {}
    if questions_file is not None:
        categories = {str(q["question_id"]): q["category"] for q in read_jsonl(questions_file)}
    by_model: dict[str, list[dict[str, Any]]] = {}
    for _, row in iter_jsonl(judgments_file):
        row = {**row, "category": categories.get(str(row["question_id"]))}
        by_model.setdefault(row["model"], []).append(row)
    return dict(sorted(((m, summarize(rows)) for m, rows in by_model.items()),
                       key=lambda item: -(item[1]["score"] or 0)))


def table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown: one row per model (score, turn 1, turn 2, missing), then the categories."""
    categories = sorted({c for r in results.values() for c in r["categories"]})

    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    lines = ["| model | score | turn 1 | turn 2 | missing | " + " | ".join(categories) + " |",
             "|---|---|---|---|---|" + "---|" * len(categories)]
    for model, r in results.items():
        lines.append(f"| {model} | {fmt(r['score'])} | {fmt(r['turns'].get('1'))} | {fmt(r['turns'].get('2'))} | "
                     f"{r['missing']} | " + " | ".join(fmt(r["categories"].get(c)) for c in categories) + " |")
    return "\n".join(lines)


def radar(results: dict[str, dict[str, Any]], path: Path) -> None:
    """Each model's mean score per category on a radar chart (`kataru.charts`)."""
    import math

    plt = pyplot()

    categories = sorted({c for r in results.values() for c in r["categories"]})
    angles = [2 * math.pi * i / len(categories) for i in range(len(categories))] + [0.0]
    figure = plt.figure(figsize=(7, 7))
    axes = figure.add_subplot(polar=True)
    for model, r in results.items():
        values = [r["categories"].get(c) or 0 for c in categories]
        axes.plot(angles, values + values[:1], label=f"{model} ({r['score']:.2f})" if r["score"] else model)
    axes.set_xticks(angles[:-1], categories)
    axes.set_ylim(0, 10)
    axes.legend(loc="upper right", bbox_to_anchor=(1.35, 1.12), fontsize=8)
    figure.savefig(path, bbox_inches="tight", dpi=120)
    plt.close(figure)
