"""JGLUE as the jp-stable harness measures it (Stability-AI/lm-evaluation-harness, branch jp-stable), the
harness the seed models' Japanese tables come from: its prompt versions, its few-shot assembly and draws, its
tokenization and its metrics, so that a checkpoint's figures compare with the published ones.

Mechanics (each decides the numbers): the evaluated documents are shuffled with `random.Random(42)`, and the
same generator draws each document's shots (`sample` from the train split; stratified by label for JNLI;
from the valid split outside the document where the data has no train split, as the harness itself does);
the context is `DESCRIPTION + FEWSHOT_SEP.join(text + target of each shot) + FEWSHOT_SEP + text`; context
and each choice are tokenized apart without special tokens and scored by log-likelihood, the sequence cut
on the left to the model's context (computed once for all the choices: `score_shared`); `acc` is the
argmax, `acc_norm` the argmax per character of the choice.
Implemented: JCommonsenseQA 1.1 (prompt versions 0.1, 0.2, 0.2.1, 0.3, 0.4), JNLI 1.3 (0.2, 0.3, 0.4; its
labels in Japanese, shots stratified) and 1.1 (`jnli-1.1`: English labels, plain shots: the published tables') and
JSQuAD 1.1 (0.1, 0.2, 0.3, 0.4; greedy answers, exact match and F1 over MeCab words).
"""

from __future__ import annotations

import random
import re
import statistics
import string
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from kataru.charts import pyplot
from kataru.data.jglue import CHOICE_KEYS, read_questions
from kataru.errors import KataruError
from kataru.files import iter_jsonl, read_json
from kataru.scoring import score_shared

ALPACA = "以下は、タスクを説明する指示と、文脈のある入力の組み合わせです。要求を適切に満たす応答を書きなさい。\n\n"
NLI_CHOICES = ["含意", "矛盾", "中立"]
NLI_LABELS = {"entailment": 0, "contradiction": 1, "neutral": 2}


@dataclass(frozen=True)
class Prompt:
    description: str
    text: Callable[[dict[str, Any]], str]
    target: Callable[[dict[str, Any]], str]
    fewshot_sep: str = "\n\n"
    until: str = "\n"  # generation tasks stop at the task's separator


def _choice(doc: dict[str, Any]) -> str:
    return doc["choices"][doc["gold"]]


def _listed(doc: dict[str, Any], sep: str = "\n") -> str:
    return sep.join(f"- {choice}" for choice in doc["choices"])


CHOOSE = "与えられた選択肢の中から、最適な答えを選んでください。"
FROM = "出力は以下から選択してください："
RELATION = "与えられた前提と仮説の関係を回答してください。"
NLI_RULES = ("前提と仮説の関係を含意、矛盾、中立の中から回答してください。\n\n制約:\n"
             "- 前提から仮説が、論理的知識や常識的知識を用いて導出可能である場合は含意と出力\n"
             "- 前提と仮説が両立しえない場合は矛盾と出力\n"
             "- そのいずれでもない場合は中立と出力\n\n")


def _alpaca(instruction: str, inputs: str) -> str:
    return f"### 指示:\n{instruction}\n\n### 入力:\n{inputs}\n\n### 応答:\n"


def _numbered(d: dict[str, Any]) -> str:
    return ",".join(f"{i}.{c}" for i, c in enumerate(d["choices"]))


JCOMMONSENSEQA = {
    "0.1": Prompt("[問題]に対する[答え]を[選択肢]の中から選んでください。\n\n",
                  lambda d: f"[問題]:{d['goal']}\n[選択肢]:[{', '.join(d['choices'])}]\n[答え]:", _choice),
    "0.2": Prompt("質問と回答の選択肢を入力として受け取り、選択肢から回答を選択してください。"
                  "なお、回答は選択肢の番号(例:0)でするものとします。 \n\n",
                  lambda d: f"質問:{d['goal']}\n選択肢:{_numbered(d)}\n回答:", lambda d: str(d["gold"])),
    "0.2.1": Prompt(CHOOSE + " \n\n", lambda d: f"質問：{d['goal']}\n選択肢：\n{_listed(d)}\n回答：", _choice),
    "0.3": Prompt(ALPACA, lambda d: _alpaca(f"{CHOOSE}{FROM}\n{_listed(d)}", d["goal"]), _choice),
    "0.4": Prompt(f"ユーザー: {CHOOSE}<NL>システム: 分かりました。<NL>",
                  lambda d: f"ユーザー: 質問：{d['goal']}<NL>選択肢：<NL>{_listed(d, '<NL>')}<NL>システム: ",
                  _choice, "<NL>"),
}
JNLI = {
    "0.2": Prompt(NLI_RULES, lambda d: f"前提:{d['premise']}\n仮説:{d['hypothesis']}\n関係:", _choice, "\n\n"),
    "0.3": Prompt(ALPACA, lambda d: _alpaca(f"{RELATION}\n\n{FROM}\n" + "\n".join(NLI_CHOICES),
                                            f"前提：{d['premise']}\n仮説：{d['hypothesis']}"), _choice, "\n\n"),
    "0.4": Prompt(f"ユーザー: {RELATION}{FROM}<NL>" + "<NL>".join(NLI_CHOICES) + "<NL>システム: 分かりました。<NL>",
                  lambda d: f"ユーザー: 前提：{d['premise']}<NL>仮説：{d['hypothesis']}<NL>システム: ",
                  _choice, "<NL>"),
}
NLI_EN = ["entailment", "contradiction", "neutral"]  # JNLI 1.1's labels, those of the published tables
JNLI_11 = {
    "0.2": Prompt("前提と仮説の関係をentailment、contradiction、neutralの中から回答してください。\n\n制約:\n"
                  "- 前提から仮説が、論理的知識や常識的知識を用いて導出可能である場合はentailmentと出力\n"
                  "- 前提と仮説が両立しえない場合はcontradictionと出力\n"
                  "- そのいずれでもない場合はneutralと出力\n\n",
                  lambda d: f"前提:{d['premise']}\n仮説:{d['hypothesis']}\n関係:", _choice),
    "0.3": Prompt(ALPACA, lambda d: _alpaca(f"{RELATION}\n\n{FROM}\n" + "\n".join(NLI_EN),
                                            f"前提：{d['premise']}\n仮説：{d['hypothesis']}"), _choice),
    "0.4": Prompt(f"ユーザー: {RELATION}{FROM}<NL>" + "<NL>".join(NLI_EN) + "<NL>システム: 分かりました。<NL>",
                  lambda d: f"ユーザー: 前提：{d['premise']}<NL>仮説：{d['hypothesis']}<NL>システム: ",
                  _choice, "<NL>"),
}
EXTRACT = "与えられた文脈から、質問に対する答えを抜き出してください。"


def _passage(d: dict[str, Any]) -> str:
    return d["context"].split("[SEP]")[-1].strip()


def _first_answer(d: dict[str, Any]) -> str:
    return d["answers"][0]


JSQUAD = {
    "0.1": Prompt("[題名]と[問題]から[質問]に対する[答え]を抜き出しなさい\n\n",
                  lambda d: f"[題名]:{d['title']}\n[問題]:{_passage(d)}\n[質問]:{d['question']}\n[答え]:",
                  _first_answer),
    "0.2": Prompt("質問に対する回答を文章から一言で抽出してください。回答は名詞で答えてください。\n\n",
                  lambda d: f"文章:{_passage(d)}\n質問:{d['question']}\n回答:", _first_answer),
    "0.3": Prompt(ALPACA, lambda d: _alpaca(EXTRACT, f"文脈：{_passage(d)}\n質問：{d['question']}"), _first_answer),
    "0.4": Prompt(f"ユーザー: {EXTRACT}<NL>システム: 分かりました。<NL>",
                  lambda d: f"ユーザー: 文脈：{_passage(d)}<NL>質問：{d['question']}<NL>システム: ", _first_answer,
                  "<NL>", "<NL>"),
}
# task: (version, prompts, the ja8 suite's shots)
TASKS = {"jcommonsenseqa": ("1.1", JCOMMONSENSEQA, 3), "jnli": ("1.3", JNLI, 3), "jnli-1.1": ("1.1", JNLI_11, 3),
         "jsquad": ("1.1", JSQUAD, 2)}
GENERATED = {"jsquad"}
AUTO = {"rinna": "0.4", "alpaca-ja": "0.3", "raw": "0.2"}  # the jp-stable prompt version of each card's format


def read_docs(task: str, folder: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(valid documents, train documents or None) in the harness's shape: goal/premise..., choices, gold."""
    if task == "jcommonsenseqa":
        def shape(row: dict[str, Any]) -> dict[str, Any]:
            return {"goal": row["question"], "choices": [row[k] for k in CHOICE_KEYS], "gold": row["label"]}

        base = folder / "jcommonsenseqa-v1.3"
        train = base / "train-v1.3.json"
        return ([shape(r) for r in read_questions(base / "valid-v1.3.json")],
                [shape(r) for r in read_questions(train)] if train.is_file() else None)
    if task == "jsquad":
        def questions(path: Path) -> list[dict[str, Any]]:
            data = read_json(path, "pass JSQuAD's valid-v1.3.json (SQuAD format)")
            try:
                return [{"id": qa["id"], "title": article["title"], "context": paragraph["context"],
                         "question": qa["question"], "answers": [a["text"] for a in qa["answers"]]}
                        for article in data["data"] for paragraph in article["paragraphs"] for qa in paragraph["qas"]]
            except (KeyError, TypeError):
                raise KataruError(f"{path} is not in JSQuAD's (SQuAD's) format: data/paragraphs/qas") from None

        base = folder / "jsquad-v1.3"
        train = base / "train-v1.3.json"
        return questions(base / "valid-v1.3.json"), (questions(train) if train.is_file() else None)
    base = folder / "jnli-v1.3"
    choices = NLI_EN if task == "jnli-1.1" else NLI_CHOICES

    def pairs(path: Path) -> list[dict[str, Any]]:
        docs = []
        for number, row in iter_jsonl(path, "pass JNLI's valid-v1.3.json"):
            if row.get("label") not in NLI_LABELS:
                raise KataruError(f"{path}:{number} is not a JNLI row (sentence1, sentence2, label)")
            docs.append({"premise": row["sentence1"], "hypothesis": row["sentence2"], "choices": choices,
                         "gold": NLI_LABELS[row["label"]]})
        return docs

    train = base / "train-v1.3.json"
    return pairs(base / "valid-v1.3.json"), (pairs(train) if train.is_file() else None)


class Shots:
    """The harness's few-shot draws: `rnd.sample` from the train split, or, without one, from the valid split
    one more than needed with the evaluated document left out; stratified by target for JNLI."""

    def __init__(self, prompt: Prompt, train: list[dict[str, Any]] | None, valid: list[dict[str, Any]],
                 stratified: bool) -> None:
        self.prompt, self.pool, self.from_valid, self.stratified = prompt, train or valid, train is None, stratified
        self.by_target: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for doc in self.pool:
            self.by_target[prompt.target(doc)].append(doc)

    def _stratified(self, k: int, rnd: random.Random) -> list[dict[str, Any]]:
        counts = {t: int(len(docs) / len(self.pool) * k) for t, docs in self.by_target.items()}
        for _ in range(k - sum(counts.values())):
            counts[min(counts, key=counts.get)] += 1  # type: ignore[arg-type]
        picked = [doc for t, n in counts.items() for doc in rnd.sample(self.by_target[t], n)]
        rnd.shuffle(picked)
        return picked

    def draw(self, doc: dict[str, Any], k: int, rnd: random.Random) -> list[dict[str, Any]]:
        if k == 0:
            return []
        n = k + 1 if self.from_valid else k
        shots = self._stratified(n, rnd) if self.stratified else rnd.sample(self.pool, n)
        return [shot for shot in shots if shot != doc][:k] if self.from_valid else shots


def context(prompt: Prompt, doc: dict[str, Any], shots: list[dict[str, Any]]) -> str:
    labeled = prompt.fewshot_sep.join(prompt.text(s) + prompt.target(s) for s in shots)
    return prompt.description + (labeled + prompt.fewshot_sep if shots else "") + prompt.text(doc)


# "chat": not a jp-stable version. A chat model without one of the harness's formats (llm-jp) gets each
# document as a user message in its own chat template, the shots as earlier turns answered by the assistant.
CHAT = {
    "jcommonsenseqa": lambda d: f"{CHOOSE}\n\n質問：{d['goal']}\n選択肢：\n{_listed(d)}",
    "jnli": lambda d: (f"{RELATION}{FROM}\n" + "\n".join(NLI_CHOICES)
                       + f"\n\n前提：{d['premise']}\n仮説：{d['hypothesis']}"),
    "jnli-1.1": lambda d: (f"{RELATION}{FROM}\n" + "\n".join(NLI_EN)
                           + f"\n\n前提：{d['premise']}\n仮説：{d['hypothesis']}"),
    "jsquad": lambda d: f"{EXTRACT}\n\n文脈：{_passage(d)}\n質問：{d['question']}",
}
CHAT_NOTE = "the checkpoint's chat template (kataru's; not a jp-stable prompt version)"


def chat_context(llm: Any, task: str, prompt: Prompt, doc: dict[str, Any], shots: list[dict[str, Any]]) -> str:
    messages = []
    for shot in shots:
        messages += [{"role": "user", "content": CHAT[task](shot)},
                     {"role": "assistant", "content": prompt.target(shot)}]
    return llm.prompt_text([*messages, {"role": "user", "content": CHAT[task](doc)}])


def resolve_version(task: str, version: str, style: str) -> str:
    prompts = TASKS[task][1]
    if version == "auto":
        version = "chat" if style == "llm-jp" else AUTO.get(style, "")
        if not version:
            raise KataruError(f"no prompt version matches the {style!r} prompt style; pass --prompt-version "
                              f"{'|'.join(prompts)}|chat")
    if version != "chat" and version not in prompts:
        raise KataruError(f"{task} has no prompt version {version}; use one of {', '.join(prompts)} or chat")
    return version


def evaluate(llm: Any, task: str, folder: Path, version: str = "auto", shots: int | None = None,
             limit: int | None = None, batch_size: int = 8, progress: bool = True) -> dict[str, Any]:
    """acc and acc_norm of a loaded `kataru.LLM` on one task, with every item's context, scores and prediction."""
    task_version, prompts, default_shots = TASKS[task]
    version = resolve_version(task, version, llm.prompt_style.name)
    prompt = prompts["0.3" if version == "chat" else version]  # chat: the targets and separator of 0.3

    def make(doc: dict[str, Any], shots: list[dict[str, Any]]) -> str:
        return chat_context(llm, task, prompt, doc, shots) if version == "chat" else context(prompt, doc, shots)

    k = default_shots if shots is None else shots
    valid, train = read_docs(task, folder)
    draw = Shots(prompt, train, valid, stratified=task == "jnli")
    docs = list(valid)
    rnd = random.Random()
    rnd.seed(42)
    rnd.shuffle(docs)
    docs = docs[:limit]
    tokenizer = llm.tokenizer
    header = {"task": task, "task_version": task_version, "prompt_version": version,
              **({"prompt_note": CHAT_NOTE} if version == "chat" else {}), "shots": k,
              "shots_from": "train" if train is not None else "valid (outside the evaluated document)"}
    if task in GENERATED:
        contexts = [make(doc, draw.draw(doc, k, rnd)) for doc in docs]
        return {**header, **extract(llm, prompt, docs, contexts, batch_size, progress)}
    items = []
    for doc in tqdm(docs, desc=f"{task}-{task_version}-{version}", unit="doc", disable=not progress):
        ctx = make(doc, draw.draw(doc, k, rnd))
        head = tokenizer.encode(ctx, add_special_tokens=False)
        scored = score_shared(llm.model, head, [tokenizer.encode(c, add_special_tokens=False) for c in doc["choices"]],
                              llm.config.max_seq_len)
        logps = [logp for logp, _ in scored]
        pred = max(range(len(logps)), key=logps.__getitem__)
        pred_norm = max(range(len(logps)), key=lambda i: logps[i] / len(doc["choices"][i]))
        items.append({"context": ctx, "choices": doc["choices"], "gold": doc["gold"], "logprobs": logps,
                      "prediction": pred, "prediction_norm": pred_norm})
    return {**header, "documents": len(items),
            "acc": statistics.fmean(i["prediction"] == i["gold"] for i in items) if items else None,
            "acc_norm": statistics.fmean(i["prediction_norm"] == i["gold"] for i in items) if items else None,
            "items": items}


def extract(llm: Any, prompt: Prompt, docs: list[dict[str, Any]], contexts: list[str], batch_size: int,
            progress: bool) -> dict[str, Any]:
    """Greedy answers stopped at the task's separator, at most as many tokens as the longest gold answer (the
    harness's dynamic length), the context cut on the left to fit; exact match and F1 (×100) as JSQuAD's."""
    from kataru.sampling import SamplingParams

    tokenizer, engine = llm.tokenizer, llm.engine
    # rinna's <NL> reaches the text as a newline (its card's postprocessing): stop at either
    stops = [prompt.until, "\n"] if prompt.until == "<NL>" else [prompt.until]
    items: list[dict[str, Any]] = []
    bar = tqdm(total=len(docs), desc="jsquad", unit="doc", disable=not progress)
    for start in range(0, len(docs), batch_size):
        requests = []
        for doc, ctx in zip(docs[start:start + batch_size], contexts[start:start + batch_size], strict=True):
            new = max(len(tokenizer.encode(a, add_special_tokens=False)) for a in doc["answers"])
            ids = tokenizer.encode(ctx, add_special_tokens=False)[-(llm.config.max_seq_len - new - 1):]
            params = SamplingParams(max_new_tokens=new, do_sample=False, stop=stops).validate()
            requests.append((doc, ctx, engine.submit(ids, params)))
        for doc, ctx, request in requests:
            engine.wait(request)
            answer = request.text
            items.append({"id": doc["id"], "context": ctx, "answers": doc["answers"], "prediction": answer,
                          "exact_match": max(exact_match(answer, gold) for gold in doc["answers"]),
                          "f1": max(f1(answer, gold) for gold in doc["answers"])})
        bar.update(len(requests))
    bar.close()
    n = max(1, len(items))
    return {"documents": len(items), "exact_match": 100 * sum(i["exact_match"] for i in items) / n,
            "f1": 100 * sum(i["f1"] for i in items) / n, "items": items}


PUNCTUATION = set("！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～"
                  "｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿"
                  "–—‘’‛“”„‟…‧﹏.") | set(string.punctuation)
EMOJI = re.compile("[\U0001F600-\U0001F64F\U0001F300-\U0001F5FF\U0001F680-\U0001F6FF\U0001F1E0-\U0001F1FF"
                   "\U00002702-\U000027B0]+")


def normalize(text: str) -> str:
    """JSQuAD's answer normalisation: emoji removed, neologdn's normalisation, runs of whitespace as one space."""
    try:
        import emoji
        import neologdn
    except ImportError:
        raise KataruError("JSQuAD's metric needs neologdn and emoji: pip install 'kataru[eval]'") from None
    text = EMOJI.sub("", "".join("" if emoji.is_emoji(c) else c for c in text))
    return " ".join(neologdn.normalize(text).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize(prediction) == normalize(gold))


_tagger: dict[str, Any] = {}


def words(text: str) -> list[str]:
    """MeCab's words (fugashi with unidic-lite) of the normalised text, punctuation left out."""
    if "tagger" not in _tagger:
        try:
            from fugashi import Tagger
        except ImportError:
            raise KataruError("JSQuAD's F1 needs MeCab: pip install 'kataru[eval]' (fugashi, unidic-lite)") from None
        _tagger["tagger"] = Tagger("-Owakati")
    return [w for w in _tagger["tagger"].parse(normalize(text)).split() if w not in PUNCTUATION]


def f1(prediction: str, gold: str) -> float:
    predicted, expected = words(prediction), words(gold)
    same = sum((Counter(predicted) & Counter(expected)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(expected)
    return 2 * precision * recall / (precision + recall)


def plot(results: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Each task's headline figures as bars (acc and acc_norm; JSQuAD's EM and F1), ×100 (`kataru.charts`)."""
    plt = pyplot()

    labels, values = [], []
    for r in results:
        pairs = [("EM", r["exact_match"]), ("F1", r["f1"])] if "f1" in r else [("acc", 100 * r["acc"]),
                                                                             ("acc_norm", 100 * r["acc_norm"])]
        for name, value in pairs:
            labels.append(f"{r['task']} {r['prompt_version']}\n{name}")
            values.append(value)
    figure, axes = plt.subplots(figsize=(1.4 * len(values) + 2, 4))
    bars = axes.bar(range(len(values)), values, color=["#4c72b0", "#9db4d8"] * len(results))
    axes.bar_label(bars, fmt="%.1f")
    axes.set_xticks(range(len(values)), labels, fontsize=8)
    axes.set_ylim(0, 100)
    axes.set_ylabel("×100")
    axes.set_title(title or "JGLUE (jp-stable mechanics)")
    figure.savefig(path, bbox_inches="tight", dpi=120)
    plt.close(figure)
