"""`kataru eval jglue`: the jp-stable harness's prompts written out here by hand from its task definitions, its
document order and few-shot draws against direct use of random.Random(42), acc_norm by characters, and the
command on the real JGLUE files."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

import kataru
from kataru.cli import main
from kataru.eval import jglue

DOC = {"goal": "電車に乗るときに使うものは？", "choices": ["切符", "傘", "鍋", "枕", "鉛筆"], "gold": 0}
SHOT = {"goal": "雨の日にさすものは？", "choices": ["靴", "傘", "本", "皿", "机"], "gold": 1}


def test_jcommonsenseqa_prompts_as_the_harness_writes_them() -> None:
    p = jglue.JCOMMONSENSEQA
    assert jglue.context(p["0.1"], DOC, [SHOT]) == (
        "[問題]に対する[答え]を[選択肢]の中から選んでください。\n\n"
        "[問題]:雨の日にさすものは？\n[選択肢]:[靴, 傘, 本, 皿, 机]\n[答え]:傘\n\n"
        "[問題]:電車に乗るときに使うものは？\n[選択肢]:[切符, 傘, 鍋, 枕, 鉛筆]\n[答え]:")
    assert jglue.context(p["0.2"], DOC, [SHOT]) == (
        "質問と回答の選択肢を入力として受け取り、選択肢から回答を選択してください。なお、回答は選択肢の番号(例:0)"
        "でするものとします。 \n\n質問:雨の日にさすものは？\n選択肢:0.靴,1.傘,2.本,3.皿,4.机\n回答:1\n\n"
        "質問:電車に乗るときに使うものは？\n選択肢:0.切符,1.傘,2.鍋,3.枕,4.鉛筆\n回答:")
    assert jglue.context(p["0.2.1"], DOC, []) == (
        "与えられた選択肢の中から、最適な答えを選んでください。 \n\n"
        "質問：電車に乗るときに使うものは？\n選択肢：\n- 切符\n- 傘\n- 鍋\n- 枕\n- 鉛筆\n回答：")
    assert jglue.context(p["0.3"], DOC, [SHOT]) == (
        "以下は、タスクを説明する指示と、文脈のある入力の組み合わせです。要求を適切に満たす応答を書きなさい。\n\n"
        "### 指示:\n与えられた選択肢の中から、最適な答えを選んでください。出力は以下から選択してください：\n"
        "- 靴\n- 傘\n- 本\n- 皿\n- 机\n\n### 入力:\n雨の日にさすものは？\n\n### 応答:\n傘\n\n"
        "### 指示:\n与えられた選択肢の中から、最適な答えを選んでください。出力は以下から選択してください：\n"
        "- 切符\n- 傘\n- 鍋\n- 枕\n- 鉛筆\n\n### 入力:\n電車に乗るときに使うものは？\n\n### 応答:\n")
    assert jglue.context(p["0.4"], DOC, [SHOT]) == (
        "ユーザー: 与えられた選択肢の中から、最適な答えを選んでください。<NL>システム: 分かりました。<NL>"
        "ユーザー: 質問：雨の日にさすものは？<NL>選択肢：<NL>- 靴<NL>- 傘<NL>- 本<NL>- 皿<NL>- 机<NL>システム: 傘<NL>"
        "ユーザー: 質問：電車に乗るときに使うものは？<NL>選択肢：<NL>- 切符<NL>- 傘<NL>- 鍋<NL>- 枕<NL>- 鉛筆<NL>"
        "システム: ")


def test_jnli_prompts_as_the_harness_writes_them() -> None:
    doc = {"premise": "猫が寝ている。", "hypothesis": "動物がいる。", "choices": jglue.NLI_CHOICES, "gold": 0}
    shot = {"premise": "犬が走る。", "hypothesis": "犬は止まっている。", "choices": jglue.NLI_CHOICES, "gold": 1}
    assert jglue.context(jglue.JNLI["0.2"], doc, [shot]) == (
        "前提と仮説の関係を含意、矛盾、中立の中から回答してください。\n\n制約:\n"
        "- 前提から仮説が、論理的知識や常識的知識を用いて導出可能である場合は含意と出力\n"
        "- 前提と仮説が両立しえない場合は矛盾と出力\n- そのいずれでもない場合は中立と出力\n\n"
        "前提:犬が走る。\n仮説:犬は止まっている。\n関係:矛盾\n\n前提:猫が寝ている。\n仮説:動物がいる。\n関係:")
    assert jglue.context(jglue.JNLI["0.3"], doc, []) == (
        "以下は、タスクを説明する指示と、文脈のある入力の組み合わせです。要求を適切に満たす応答を書きなさい。\n\n"
        "### 指示:\n与えられた前提と仮説の関係を回答してください。\n\n出力は以下から選択してください：\n含意\n矛盾\n中立"
        "\n\n### 入力:\n前提：猫が寝ている。\n仮説：動物がいる。\n\n### 応答:\n")
    assert jglue.context(jglue.JNLI["0.4"], doc, [shot]) == (
        "ユーザー: 与えられた前提と仮説の関係を回答してください。出力は以下から選択してください：<NL>含意<NL>矛盾<NL>"
        "中立<NL>システム: 分かりました。<NL>ユーザー: 前提：犬が走る。<NL>仮説：犬は止まっている。<NL>システム: 矛盾<NL>"
        "ユーザー: 前提：猫が寝ている。<NL>仮説：動物がいる。<NL>システム: ")


def jcqa_folder(tmp_path: Path, valid: int, train: int) -> Path:
    folder = tmp_path / "jglue" / "jcommonsenseqa-v1.3"
    folder.mkdir(parents=True)
    for name, n in (("valid-v1.3.json", valid), ("train-v1.3.json", train)):
        rows = [{"q_id": i, "question": f"{name[0]}問{i}", **{f"choice{c}": f"答{i}-{c}" for c in range(5)},
                 "label": i % 5} for i in range(n)]
        (folder / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return folder.parent


def test_document_order_and_shots_follow_random_42(tmp_path: Path) -> None:
    data = jcqa_folder(tmp_path, valid=12, train=30)
    llm = kataru.load(progress=False)
    result = jglue.evaluate(llm, "jcommonsenseqa", data, "0.1", shots=3, limit=5, progress=False)
    valid, train = jglue.read_docs("jcommonsenseqa", data)
    rnd = random.Random(42)  # the harness: shuffle the documents, then the same generator draws each one's shots
    order = list(valid)
    rnd.shuffle(order)
    expected = []
    for doc in order[:5]:
        shots = rnd.sample(train, 3)
        expected.append("[問題]に対する[答え]を[選択肢]の中から選んでください。\n\n" + "\n\n".join(
            f"[問題]:{s['goal']}\n[選択肢]:[{', '.join(s['choices'])}]\n[答え]:{s['choices'][s['gold']]}"
            for s in shots) + f"\n\n[問題]:{doc['goal']}\n[選択肢]:[{', '.join(doc['choices'])}]\n[答え]:")
    assert [item["context"] for item in result["items"]] == expected
    assert result["shots_from"] == "train" and result["documents"] == 5


def test_without_a_train_split_shots_come_from_valid_without_the_document_and_by_label() -> None:
    valid = [{"premise": f"p{i}", "hypothesis": "h", "choices": jglue.NLI_CHOICES, "gold": g}
             for i, g in enumerate([0] * 6 + [1] * 3 + [2] * 3)]
    draws = jglue.Shots(jglue.JNLI["0.2"], None, valid, stratified=True)
    rnd = random.Random(42)
    for doc in valid:
        shots = draws.draw(doc, 3, rnd)
        assert doc not in shots and len(shots) <= 3 and len({s["premise"] for s in shots}) == len(shots)
    # 4 drawn (one more than asked) by the ratios 1/2, 1/4, 1/4: 2, 1, 1
    counts = [g for g in (s["gold"] for s in draws._stratified(4, random.Random(0)))]
    assert sorted(counts) == [0, 0, 1, 2]


def test_acc_norm_divides_by_the_choices_characters(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = jcqa_folder(tmp_path, valid=1, train=5)
    row = json.loads((data / "jcommonsenseqa-v1.3" / "valid-v1.3.json").read_text())
    row.update(choice0="あ", choice1="いいいい", label=1)
    (data / "jcommonsenseqa-v1.3" / "valid-v1.3.json").write_text(json.dumps(row, ensure_ascii=False) + "\n")
    # log-likelihoods -2 for the 1-character choice, -4 for the 4-character one: acc picks 0, acc_norm picks 1
    monkeypatch.setattr(jglue, "score_shared", lambda model, head, choices, n: [(-2.0, False), (-4.0, False)] +
                        [(-50.0, False)] * 3)
    result = jglue.evaluate(kataru.load(progress=False), "jcommonsenseqa", data, "0.1", shots=0, progress=False)
    assert (result["acc"], result["acc_norm"]) == (0.0, 1.0)


def test_the_command_on_the_real_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from helpers import SHARED

    pytest.importorskip("fugashi", reason="JSQuAD's metric needs kataru[eval]")
    if not (SHARED / "jglue" / "jnli-v1.3" / "valid-v1.3.json").is_file():
        pytest.skip("no JGLUE in the data folder ($KATARU_DATA or shared/data beside the checkout)")
    out = tmp_path / "jglue.json"
    assert main(["eval", "jglue", "--prompt-version", "0.2", "--limit", "4", "--output", str(out), "--json",
                 "--plot", str(tmp_path / "jglue.png")]) in (0, None)
    assert (tmp_path / "jglue.png").read_bytes()[:4] == b"\x89PNG"
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == report and report["harness"].startswith("jp-stable")
    jcqa, jnli, jsquad = report["results"]
    assert jsquad["task"] == "jsquad" and jsquad["shots"] == 2 and len(jsquad["items"]) == 4 and "f1" in jsquad
    assert (jcqa["task"], jcqa["task_version"], jcqa["shots"], jcqa["shots_from"]) == ("jcommonsenseqa", "1.1", 3,
                                                                                       "train")
    assert jnli["shots_from"].startswith("valid") and jnli["documents"] == 4 and len(jnli["items"]) == 4
    assert all(len(i["logprobs"]) == 3 and i["context"].count("関係:") == 4 for i in jnli["items"])
    # the embedded model speaks llm-jp's chat format, which no jp-stable version is: auto says so and uses it
    assert main(["eval", "jglue", "--tasks", "jnli", "--limit", "2", "--json"]) in (0, None)
    (chat,) = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["results"]
    assert chat["prompt_version"] == "chat" and "not a jp-stable" in chat["prompt_note"]
    assert main(["eval", "jglue", "--prompt-version", "0.9"]) == 2
    assert "no prompt version 0.9" in capsys.readouterr().err


QA = {"id": "q1", "title": "梅雨", "context": "梅雨 [SEP] 梅雨は雨の多い時期である。", "question": "梅雨は何の時期か。",
      "answers": ["雨の多い時期", "雨"]}
QA_SHOT = {"id": "q0", "title": "富士山", "context": "富士山 [SEP] 富士山は日本一高い山である。",
           "question": "日本一高い山は？", "answers": ["富士山"]}


def test_jsquad_prompts_as_the_harness_writes_them() -> None:
    assert jglue.context(jglue.JSQUAD["0.1"], QA, [QA_SHOT]) == (
        "[題名]と[問題]から[質問]に対する[答え]を抜き出しなさい\n\n"
        "[題名]:富士山\n[問題]:富士山は日本一高い山である。\n[質問]:日本一高い山は？\n[答え]:富士山\n\n"
        "[題名]:梅雨\n[問題]:梅雨は雨の多い時期である。\n[質問]:梅雨は何の時期か。\n[答え]:")
    assert jglue.context(jglue.JSQUAD["0.4"], QA, [QA_SHOT]) == (
        "ユーザー: 与えられた文脈から、質問に対する答えを抜き出してください。<NL>システム: 分かりました。<NL>"
        "ユーザー: 文脈：富士山は日本一高い山である。<NL>質問：日本一高い山は？<NL>システム: 富士山<NL>"
        "ユーザー: 文脈：梅雨は雨の多い時期である。<NL>質問：梅雨は何の時期か。<NL>システム: ")
    assert jglue.context(jglue.JSQUAD["0.2"], QA, []) == (
        "質問に対する回答を文章から一言で抽出してください。回答は名詞で答えてください。\n\n"
        "文章:梅雨は雨の多い時期である。\n質問:梅雨は何の時期か。\n回答:")
    assert jglue.context(jglue.JSQUAD["0.3"], QA, [QA_SHOT]) == (
        "以下は、タスクを説明する指示と、文脈のある入力の組み合わせです。要求を適切に満たす応答を書きなさい。\n\n"
        "### 指示:\n与えられた文脈から、質問に対する答えを抜き出してください。\n\n### 入力:\n"
        "文脈：富士山は日本一高い山である。\n質問：日本一高い山は？\n\n### 応答:\n富士山\n\n"
        "### 指示:\n与えられた文脈から、質問に対する答えを抜き出してください。\n\n### 入力:\n"
        "文脈：梅雨は雨の多い時期である。\n質問：梅雨は何の時期か。\n\n### 応答:\n")
    assert jglue.JSQUAD["0.4"].until == "<NL>" and jglue.JSQUAD["0.3"].until == "\n"


def test_jsquad_exact_match_and_f1_as_hand_computed() -> None:
    pytest.importorskip("fugashi", reason="JSQuAD's metric needs kataru[eval]")
    assert jglue.exact_match("ＡＢＣ😀", "ABC") == 1.0  # neologdn folds full-width letters; emoji go
    assert jglue.exact_match("東京都", "東京") == 0.0
    # MeCab: 東京 / 都 / です against 東京 / 都: precision 2/3, recall 1
    assert jglue.f1("東京都です", "東京都") == pytest.approx(0.8)
    assert jglue.words("小笠原諸島、です。") == ["小笠原", "諸島", "です"]  # punctuation left out
    assert jglue.f1("。", "東京") == 0.0


def test_jsquad_answers_stop_at_the_separator_within_the_longest_gold(tmp_path: Path) -> None:
    pytest.importorskip("fugashi", reason="JSQuAD's metric needs kataru[eval]")
    folder = tmp_path / "jglue" / "jsquad-v1.3"
    folder.mkdir(parents=True)
    paragraphs = [{"context": q["context"], "qas": [{"id": q["id"], "question": q["question"], "is_impossible": False,
                                                   "answers": [{"text": a, "answer_start": 0} for a in q["answers"]]}]}
                  for q in (QA, QA_SHOT)]
    (folder / "valid-v1.3.json").write_text(json.dumps({"version": "v1.0", "data": [
        {"title": "梅雨", "paragraphs": paragraphs[:1]}, {"title": "富士山", "paragraphs": paragraphs[1:]}]},
        ensure_ascii=False))
    llm = kataru.load(progress=False)
    result = jglue.evaluate(llm, "jsquad", folder.parent, "0.2", shots=1, progress=False)
    assert result["shots_from"].startswith("valid") and result["documents"] == 2
    for item in result["items"]:
        longest = max(len(llm.tokenizer.encode(a)) for a in item["answers"])
        assert "\n" not in item["prediction"] and len(llm.tokenizer.encode(item["prediction"])) <= longest + 1
        assert item["f1"] == max(jglue.f1(item["prediction"], a) for a in item["answers"])
    assert result["f1"] == pytest.approx(100 * sum(i["f1"] for i in result["items"]) / 2)


def test_a_chat_model_gets_each_document_in_its_chat_template(tmp_path: Path) -> None:
    llm = kataru.load(progress=False)  # llm-jp's chat template
    data = jcqa_folder(tmp_path, valid=3, train=10)
    result = jglue.evaluate(llm, "jcommonsenseqa", data, "auto", shots=1, limit=1, progress=False)
    assert result["prompt_version"] == "chat" and "chat template" in result["prompt_note"]
    item = result["items"][0]
    valid, train = jglue.read_docs("jcommonsenseqa", data)
    rnd = random.Random(42)
    order = list(valid)
    rnd.shuffle(order)
    doc, (shot,) = order[0], rnd.sample(train, 1)

    def user(d: dict) -> str:
        listed = "\n".join(f"- {c}" for c in d["choices"])
        return f"与えられた選択肢の中から、最適な答えを選んでください。\n\n質問：{d['goal']}\n選択肢：\n{listed}"

    messages = [{"role": "user", "content": user(shot)},
                {"role": "assistant", "content": shot["choices"][shot["gold"]]}, {"role": "user", "content": user(doc)}]
    assert item["context"] == llm.prompt_text(messages)


def test_jnli_1_1_has_english_labels_and_plain_shots(tmp_path: Path) -> None:
    doc = {"premise": "猫が寝ている。", "hypothesis": "動物がいる。", "choices": jglue.NLI_EN, "gold": 0}
    assert jglue.context(jglue.JNLI_11["0.2"], doc, []) == (
        "前提と仮説の関係をentailment、contradiction、neutralの中から回答してください。\n\n制約:\n"
        "- 前提から仮説が、論理的知識や常識的知識を用いて導出可能である場合はentailmentと出力\n"
        "- 前提と仮説が両立しえない場合はcontradictionと出力\n- そのいずれでもない場合はneutralと出力\n\n"
        "前提:猫が寝ている。\n仮説:動物がいる。\n関係:")
    assert jglue.JNLI_11["0.4"].description == (
        "ユーザー: 与えられた前提と仮説の関係を回答してください。出力は以下から選択してください：<NL>entailment<NL>"
        "contradiction<NL>neutral<NL>システム: 分かりました。<NL>")
    folder = tmp_path / "jglue" / "jnli-v1.3"
    folder.mkdir(parents=True)
    labels = ["entailment", "contradiction", "neutral"]
    (folder / "valid-v1.3.json").write_text("".join(json.dumps(
        {"sentence1": f"前提{i}", "sentence2": f"仮説{i}", "label": labels[i % 3]}, ensure_ascii=False) + "\n"
        for i in range(9)))
    result = jglue.evaluate(kataru.load(progress=False), "jnli-1.1", folder.parent, "0.2", shots=2, limit=3,
                            progress=False)
    assert result["task_version"] == "1.1" and all(i["choices"] == jglue.NLI_EN for i in result["items"])
    valid, _ = jglue.read_docs("jnli-1.1", folder.parent)
    rnd = random.Random(42)  # no train split: k + 1 drawn from valid, the document itself left out; not stratified
    order = list(valid)
    rnd.shuffle(order)
    for doc, item in zip(order[:3], result["items"], strict=True):
        shots = [s for s in rnd.sample(valid, 3) if s != doc][:2]
        assert item["context"] == jglue.context(jglue.JNLI_11["0.2"], doc, shots)
