"""lm-evaluation-harness on kataru (`KataruLM`): log-likelihoods equal the model's own, rolling likelihoods
cover every token once, generation equals the engine's, and a local YAML task through `simple_evaluate`
scores as `kataru eval jcommonsenseqa` on the same questions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import kataru

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is a test extra: scripts/setup.sh test")
from lm_eval.api.instance import Instance  # noqa: E402

from kataru.eval.harness import KataruLM  # noqa: E402


@pytest.fixture(scope="module")
def lm() -> KataruLM:
    return KataruLM(kataru.load(progress=False), batch_size=4)


def request(kind: str, *args: object) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def direct_logp(llm: kataru.LLM, ids: list[int], start: int) -> float:
    """Summed log p of ids[start:] given what comes before, from one forward pass of the whole sequence."""
    with torch.no_grad():
        logps = llm.model(torch.tensor([ids[:-1]])).float().log_softmax(-1)[0]
    return float(sum(logps[i - 1, ids[i]] for i in range(start, len(ids))))


def test_loglikelihoods_are_the_models_own(lm: KataruLM) -> None:
    llm = lm.llm
    pairs = [("日本の首都は", "東京です"), ("日本の首都は", "大阪です"), ("吾輩は猫である。名前は", "まだ無い"),
             ("", "こんにちは")]
    got = lm.loglikelihood([request("loglikelihood", c, x) for c, x in pairs], disable_tqdm=True)
    for (context, continuation), (logp, greedy) in zip(pairs, got, strict=True):
        head = (llm.tokenizer.encode(context, add_special_tokens=llm.prompt_style.add_special_tokens) if context
                else [llm.tokenizer.bos_id])  # an empty context: the continuation after the beginning of a text
        ids = head + llm.tokenizer.encode(continuation)
        assert logp == pytest.approx(direct_logp(llm, ids, len(head)), abs=1e-3)
        assert isinstance(greedy, bool)
    text = "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。"
    (rolling,) = lm.loglikelihood_rolling([request("loglikelihood_rolling", text)], disable_tqdm=True)
    ids = [llm.tokenizer.bos_id, *llm.tokenizer.encode(text)]
    assert rolling == pytest.approx(direct_logp(llm, ids, 1), abs=1e-3)  # every token once, after BOS


def test_the_harness_keeps_its_own_models_beside_kataru() -> None:
    from lm_eval.api.registry import get_model

    assert get_model("kataru") is KataruLM and get_model("local-completions").__name__ == "LocalCompletionsAPI"


def test_generation_is_the_engines(lm: KataruLM) -> None:
    prompts = ["日本の首都はどこですか。", "春といえば"]
    kwargs = {"until": ["。"], "max_gen_toks": 20, "do_sample": False}
    got = lm.generate_until([request("generate_until", p, dict(kwargs)) for p in prompts], disable_tqdm=True)
    expected = [c.text for c in lm.llm.complete(prompts, raw=True, temperature=0, max_new_tokens=20, stop=["。"])]
    assert got == expected and all("。" not in text for text in got)


def test_a_local_task_scores_as_kataru_eval(lm: KataruLM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    from helpers import jcqa_task

    from kataru.eval.jcommonsenseqa import evaluate

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    llm = lm.llm
    tasks = jcqa_task(llm, 30, tmp_path, "jcqa_local")
    if tasks is None:
        pytest.skip("no JGLUE in the data folder (it lives outside the repository)")
    data = tmp_path / "questions.jsonl"
    results = lm_eval.simple_evaluate(model=lm, tasks=["jcqa_local"],
                                      task_manager=lm_eval.tasks.TaskManager(include_path=str(tasks)))
    expected = evaluate(llm, data, progress=False)["acc"]
    assert results["results"]["jcqa_local"]["acc,none"] == pytest.approx(expected) and expected > 0

    from kataru.cli import main  # the same through `kataru eval lm-eval`

    assert main(["eval", "lm-eval", "--tasks", "jcqa_local", "--include-path", str(tasks), "--json"]) in (0, None)
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["results"]["jcqa_local"]["acc,none"] == pytest.approx(expected)
