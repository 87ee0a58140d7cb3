"""The kataru command: info, generate, chat and tokenize, with machine-readable output."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

import kataru
from kataru.cli import main


def run(capsys: pytest.CaptureFixture, *args: object) -> str:
    assert main([str(a) for a in args]) == 0
    return capsys.readouterr().out


def test_info(capsys: pytest.CaptureFixture, checkpoints: dict) -> None:
    folder = checkpoints["gpt_neox"][0]
    info = json.loads(run(capsys, "info", folder, "--json"))
    assert info["family"] == "gpt_neox" and info["prompt_style"] == "rinna" and info["context"] == 256
    assert info["path"] == str(folder.resolve())
    text = run(capsys, "info", folder)
    assert "prompt_style" in text and "rinna" in text


def test_generate_json_matches_the_api(capsys: pytest.CaptureFixture, checkpoints: dict) -> None:
    folder = checkpoints["llama"][0]
    out = json.loads(run(capsys, "generate", folder, "自然言語処理とは何か", "--json", "--temperature", "0",
                         "--max-new-tokens", "12"))
    assert set(out) == {"text", "token_ids", "prompt_token_ids", "finish_reason", "speculation"}
    expected = kataru.load(folder).complete(["自然言語処理とは何か"], temperature=0, max_new_tokens=12)[0]
    assert out == expected.to_dict()
    streamed = run(capsys, "generate", folder, "自然言語処理とは何か", "--temperature", "0", "--max-new-tokens", "12")
    assert streamed == expected.text + "\n"


def test_generate_flags(capsys: pytest.CaptureFixture, checkpoints: dict) -> None:
    folder = checkpoints["stablelm"][0]
    llm = kataru.load(folder)
    out = json.loads(run(capsys, "generate", folder, "ことわざ", "--inputs", "情けは人のためならず", "--json",
                         "--seed", "4", "--max-new-tokens", "8", "--ignore-eos"))
    assert out["prompt_token_ids"] == llm.encode_prompt("ことわざ", inputs="情けは人のためならず")
    assert len(out["token_ids"]) == 8
    raw = json.loads(run(capsys, "generate", folder, "生の文", "--raw", "--json", "--max-new-tokens", "2"))
    assert raw["prompt_token_ids"] == llm.tokenizer.encode("生の文", add_special_tokens=True)
    system = json.loads(run(capsys, "generate", checkpoints["llama"][0], "x", "--system", "短く。", "--json",
                            "--max-new-tokens", "1"))
    llama = kataru.load(checkpoints["llama"][0])
    assert system["prompt_token_ids"] == llama.encode_prompt("x", system="短く。")


def test_tokenize(capsys: pytest.CaptureFixture, checkpoints: dict, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    folder = checkpoints["llama"][0]
    ref = AutoTokenizer.from_pretrained(folder)
    text = "吾輩は猫である</s>"
    assert json.loads(run(capsys, "tokenize", folder, text, "--json")) == ref.encode(text, add_special_tokens=False)
    assert run(capsys, "tokenize", folder, text).split() == [str(i) for i in ref.encode(text, add_special_tokens=False)]
    lines = ["吾輩は猫である。", "Hello  world", "😀 絵文字"]
    path = tmp_path / "lines.txt"
    path.write_text("\n".join(lines), encoding="utf-8")
    out = run(capsys, "tokenize", folder, "--file", path, "--json").splitlines()
    assert [json.loads(row) for row in out] == [ref.encode(t, add_special_tokens=False) for t in lines]
    special = json.loads(run(capsys, "tokenize", checkpoints["gpt_neox"][0], "猫", "--special", "--json"))
    assert special[-1] == kataru.load(checkpoints["gpt_neox"][0]).tokenizer.eos_id  # T5Tokenizer adds </s>
    pieces = json.loads(run(capsys, "tokenize", folder, "猫", "--json", "--tokens"))
    assert all(isinstance(i, int) and isinstance(p, str) for i, p in pieces)


def test_chat_keeps_history(capsys: pytest.CaptureFixture, checkpoints: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = checkpoints["gpt_neox"][0]
    monkeypatch.setattr("sys.stdin", io.StringIO("こんにちは\n東京の名所は？\n/exit\n"))
    out = run(capsys, "chat", folder, "--temperature", "0", "--max-new-tokens", "6")
    replies = out.splitlines()
    llm = kataru.load(folder)
    first = llm.generate([{"role": "user", "content": "こんにちは"}], temperature=0, max_new_tokens=6)
    second = llm.generate([{"role": "user", "content": "こんにちは"}, {"role": "assistant", "content": first},
                           {"role": "user", "content": "東京の名所は？"}], temperature=0, max_new_tokens=6)
    assert out == first + "\n" + second + "\n"
    assert len(replies) >= 2


def test_console_script_freezes_what_the_imports_made(monkeypatch: pytest.MonkeyPatch) -> None:
    """The installed `kataru` command keeps the collector off torch's import-time objects, then runs main."""
    from importlib.metadata import entry_points

    from kataru import cli

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "kataru"]
    assert script.value == "kataru.cli:run"
    order: list[str] = []
    monkeypatch.setattr(cli.gc, "freeze", lambda: order.append("freeze"))
    monkeypatch.setattr(cli, "main", lambda: order.append("main") or 0)
    assert cli.run() == 0 and order == ["freeze", "main"]


def test_every_command_is_listed_and_training_flags_show_help_and_defaults(capsys: pytest.CaptureFixture) -> None:
    from kataru.cli import COMMANDS

    with pytest.raises(SystemExit):
        main(["--help"])
    listing = capsys.readouterr().out
    assert all(name in listing for name in COMMANDS)
    for command, flags in (("pretrain", ["--lr LR", "peak learning rate (AdamW) (default: 0.001)",
                                         "--max-steps MAX_STEPS", "(default: 1000)", "hidden size (default: 256)"]),
                           ("sft", ["--lora-r LORA_R", "adapter rank (default: 8)", "(default: 0.0003)"]),
                           ("dpo", ["DPO's beta", "(default: 0.1)"]),
                           ("train-tokenizer", ["--character-coverage", "(default: 0.9995)"])):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        for flag in flags:
            assert flag in text, (command, flag)


def test_tokenize_defaults_to_the_embedded_model(capsys: pytest.CaptureFixture) -> None:
    ids = json.loads(run(capsys, "tokenize", "吾輩は猫である", "--json"))
    assert ids == kataru.load().tokenizer.encode("吾輩は猫である")
