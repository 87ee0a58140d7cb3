"""The embedded kataru-tiny-ja: small, loads in kataru and transformers alike, answers with no model argument."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kataru.cli import main
from kataru.llm import DEFAULT_MODEL, load

ROOT = Path(__file__).resolve().parents[1]
JAPANESE = re.compile(r"[\u3040-\u30ff\u4e00-\u9fff]")


def test_default_model_is_small_and_described_by_info(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert Path(info["path"]) == DEFAULT_MODEL
    assert info["family"] == "llama" and info["prompt_style"] == "llm-jp"
    assert info["parameters"] <= 25_000_000
    assert sum(f.stat().st_size for f in DEFAULT_MODEL.iterdir()) <= 50 * 2**20
    assert info["parameters"] == json.loads((DEFAULT_MODEL / "training.json").read_text())["parameters"]


def test_default_model_logits_equal_transformers() -> None:
    transformers = pytest.importorskip("transformers")
    llm = load()
    reference = transformers.AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    prompt = llm.prompt_text("日本の首都はどこですか")
    assert prompt == tokenizer.apply_chat_template(
        [{"role": "system", "content": llm.prompt_style.default_system},
         {"role": "user", "content": "日本の首都はどこですか"}], tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids == llm.encode_prompt("日本の首都はどこですか")
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits
    assert torch.allclose(llm.logits([ids]), expected, atol=1e-4, rtol=0)
    greedy = reference.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, len(ids):].tolist()
    assert llm.complete(["日本の首都はどこですか"], temperature=0, max_new_tokens=16, ignore_eos=True)[0].token_ids \
        == greedy


def test_generate_with_no_model_argument_writes_japanese() -> None:
    done = subprocess.run([sys.executable, "-m", "kataru", "generate", "日本の首都はどこですか", "--seed", "0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert len(JAPANESE.findall(done.stdout)) >= 5, done.stdout


def test_chat_with_no_model_argument() -> None:
    done = subprocess.run([sys.executable, "-m", "kataru", "chat", "--seed", "1", "--max-new-tokens", "30"],
                          input="こんにちは\n/exit\n", cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert JAPANESE.search(done.stdout)


def test_jcommonsenseqa_scoring_matches_transformers(tmp_path: Path) -> None:
    """The eval's choice for each question is the argmax of transformers' summed answer log-probabilities."""
    transformers = pytest.importorskip("transformers")
    from kataru.data.jglue import question_text
    from kataru.eval.jcommonsenseqa import evaluate

    rows = [{"q_id": i, "question": q, "choice0": "東京", "choice1": "大阪", "choice2": "京都", "choice3": "札幌",
             "choice4": "福岡", "label": i % 5} for i, q in enumerate(["日本の首都は？", "一番北の都市は？", "古都は？"])]
    path = tmp_path / "questions.json"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    llm = load()
    result = evaluate(llm, path, progress=False)
    reference = transformers.AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32).eval()
    correct = 0
    for row in rows:
        prompt = llm.encode_prompt(question_text(row))
        scores = []
        for k in range(5):
            answer = llm.tokenizer.encode(row[f"choice{k}"])
            with torch.no_grad():
                logp = reference(torch.tensor([prompt + answer])).logits[0].log_softmax(-1)
            scores.append(sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(answer)))
        correct += int(max(range(5), key=scores.__getitem__) == row["label"])
    assert result["acc"] == correct / 3 and result["questions"] == 3
