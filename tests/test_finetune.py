"""SFT (full and LoRA), merge-lora and DPO on a micro-pretrained model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import CORPUS

from kataru.cli import main
from kataru.llm import load
from kataru.prompts import ChatTemplate
from kataru.scoring import IGNORE, encode_answer, pad_batch
from kataru.tokenizer import Tokenizer
from kataru.train.dpo import DPOTask, dpo_loss
from kataru.train.loop import TrainConfig, Trainer
from kataru.train.lora import LoRALinear, apply_lora, merge_lora
from kataru.train.sft import SFTTask, encode_example
from kataru.train.weights import AdapterWeights, FullWeights, load_trainable

FLAGS = ["--batch-size", "4", "--warmup-steps", "1", "--no-progress", "--seq-len", "200"]


def sft_rows(n: int = 24) -> list[dict]:
    rows = []
    for i in range(n):
        question, answer = CORPUS[i % 7], CORPUS[(i + 3) % 7]
        rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    return rows


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sft") / "sft.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in sft_rows()), encoding="utf-8")
    return path


def test_sft_labels_mask_the_prompt(pretrained: Path) -> None:
    tokenizer, style = Tokenizer(pretrained / "final"), ChatTemplate()
    row = {"instruction": "日本の首都は？", "input": "一語で", "output": "東京です。"}
    ids, labels = encode_example(row, style, tokenizer, max_len=200)
    prompt_text = style.render(style.messages([{"role": "user", "content": "日本の首都は？\n\n一語で"}]), tokenizer)
    prompt = tokenizer.encode(prompt_text)
    answer = [*tokenizer.encode("東京です。"), tokenizer.eos_id]
    assert ids == prompt + answer
    assert labels == [IGNORE] * len(prompt) + answer
    batch = pad_batch([(ids, labels), (ids[:-3], labels[:-3])], tokenizer.pad_id, torch.device("cpu"))
    assert batch["targets"][0].tolist() == labels[1:]
    assert batch["targets"][1].tolist() == labels[1:-3] + [IGNORE] * 3  # padding never counts
    assert batch["inputs"][1, -3:].tolist() == [tokenizer.pad_id] * 3
    assert int(batch["tokens"]) == 2 * len(answer) - 3


def test_full_sft_command_trains_and_exports(pretrained: Path, sft_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "sft"
    assert main(["sft", str(pretrained / "final"), "--data", str(sft_file), "--out", str(out),
                 "--max-steps", "20", "--lr", "3e-3", "--eval-every", "10", *FLAGS]) == 0
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < log[0]["loss"]
    llm = load(out / "final")
    assert llm.prompt_style.name == "llm-jp"


def lora_model(pretrained: Path) -> tuple[dict, torch.nn.Module]:
    hf, model = load_trainable(pretrained / "final")
    apply_lora(model, r=4, alpha=8)
    return hf, model


def test_lora_trains_only_the_adapters(pretrained: Path, tmp_path: Path) -> None:
    hf, model = lora_model(pretrained)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    tokenizer = Tokenizer(pretrained / "final")

    task = SFTTask(sft_rows(), ChatTemplate(), tokenizer, 200, AdapterWeights({"r": 4, "alpha": 8, "targets": []}))
    Trainer(model, task, TrainConfig(max_steps=3, batch_size=4, lr=1e-2, warmup_steps=1), tmp_path, {"model": hf},
            progress=False).run()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), n
    assert any(m.lora_b.abs().sum() > 0 for m in model.modules() if isinstance(m, LoRALinear))


def test_merged_lora_gives_the_adapter_logits(pretrained: Path, sft_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "lora"
    assert main(["sft", str(pretrained / "final"), "--data", str(sft_file), "--out", str(out), "--lora",
                 "--lora-r", "4", "--max-steps", "6", "--lr", "1e-2", *FLAGS]) == 0
    adapter = out / "final"
    assert {p.name for p in adapter.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    assert main(["merge-lora", str(pretrained / "final"), str(adapter), "--out", str(tmp_path / "merged")]) == 0

    from kataru.train.lora import load_adapter

    _, model = load_trainable(pretrained / "final")
    apply_lora(model, r=4, alpha=16.0)
    load_adapter(model, adapter)
    ids = torch.tensor([Tokenizer(pretrained / "final").encode("吾輩は猫である。名前はまだ無い。")])
    with torch.no_grad():
        with_adapter = model(ids)
        merged_in_memory = merge_lora(model)(ids)
    merged = load(tmp_path / "merged").logits(ids.tolist())
    base = load(pretrained / "final").logits(ids.tolist())
    assert not torch.allclose(with_adapter, base, atol=1e-3)  # the adapter changed something
    assert torch.allclose(merged_in_memory, with_adapter, atol=1e-5, rtol=0)
    assert torch.allclose(merged, with_adapter, atol=1e-5, rtol=0)


def test_dpo_loss_matches_the_formula() -> None:
    pc, pr, rc, rr = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0]), torch.tensor([-1.5, -2.0]), \
        torch.tensor([-1.5, -2.0])
    loss, margin = dpo_loss(pc, pr, rc, rr, beta=0.1)
    m = [0.1 * ((-1.0 + 1.5) - (-2.0 + 1.5)), 0.1 * ((-3.0 + 2.0) - (-1.0 + 2.0))]
    assert margin.tolist() == pytest.approx(m)
    expected = sum(math.log1p(math.exp(-x)) for x in m) / 2
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_one_dpo_step_raises_the_margin(pretrained: Path, tmp_path: Path) -> None:
    hf, policy = load_trainable(pretrained / "final")
    _, reference = load_trainable(pretrained / "final")
    tokenizer = Tokenizer(pretrained / "final")
    rows = [{"prompt": CORPUS[i % 7], "chosen": CORPUS[(i + 1) % 7], "rejected": CORPUS[(i + 2) % 7]}
            for i in range(8)]
    task = DPOTask(rows, ChatTemplate(), tokenizer, 200, reference.requires_grad_(False), 0.1,
                   FullWeights(hf, pretrained / "final"))
    batch = task.batch_of(list(range(8)), torch.device("cpu"))
    with torch.no_grad():
        before = task.loss(policy, batch)[1]["reward_margin"]
    assert before == pytest.approx(0.0, abs=1e-5)  # the policy starts as the reference
    Trainer(policy, task, TrainConfig(max_steps=1, batch_size=8, lr=1e-3, warmup_steps=1), tmp_path,
            {"model": hf}, progress=False).run()
    with torch.no_grad():
        loss_after, after = task.loss(policy, batch)
    assert after["reward_margin"] > before
    assert float(loss_after) < math.log(2)


def test_dpo_command_reports_margins(pretrained: Path, tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": CORPUS[i % 7], "chosen": CORPUS[(i + 1) % 7], "rejected": CORPUS[(i + 2) % 7]}
            for i in range(24)]
    pairs.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "dpo"
    assert main(["dpo", str(pretrained / "final"), "--data", str(pairs), "--out", str(out), "--max-steps", "4",
                 "--eval-every", "2", "--lr", "1e-3", *FLAGS]) == 0
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert {"reward_margin", "reward_accuracy", "val_reward_margin"} <= set(log[-1])
    assert log[-1]["reward_margin"] > 0
    load(out / "final")


def test_finetune_input_errors(pretrained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "x"}]}\n', encoding="utf-8")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    for data, message in ((bad, "ending with the assistant"), (empty, "empty"),
                          (tmp_path / "none.jsonl", "does not exist")):
        assert main(["sft", str(pretrained / "final"), "--data", str(data), "--out", str(tmp_path / "o"),
                     *FLAGS]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err
    assert encode_answer(Tokenizer(pretrained / "final"), "")[-1] == Tokenizer(pretrained / "final").eos_id
