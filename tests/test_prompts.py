"""Prompt strings byte-identical to the cards' own code and to transformers' apply_chat_template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import kataru
from kataru.errors import KataruError
from kataru.prompts import AlpacaJa, ChatTemplate, Raw, Rinna, get_style
from kataru.tokenizer import Tokenizer


def card_build_prompt(user_query: str, inputs: str = "", sep: str = "\n\n### ") -> str:
    """Japanese StableLM Instruct's build_prompt, as printed on its model card."""
    sys_msg = "以下は、タスクを説明する指示と、文脈のある入力の組み合わせです。要求を適切に満たす応答を書きなさい。"
    p = sys_msg
    roles = ["指示", "応答"]
    msgs = [": \n" + user_query, ": \n"]
    if inputs:
        roles.insert(1, "入力")
        msgs.insert(1, ": \n" + inputs)
    for role, msg in zip(roles, msgs, strict=False):
        p += sep + role + msg
    return p


def card_rinna_prompt(utterances: list[dict[str, str]]) -> str:
    """rinna japanese-gpt-neox-3.6b-instruction-sft's card example."""
    prompt = [f"{uttr['speaker']}: {uttr['text']}" for uttr in utterances]
    prompt = "<NL>".join(prompt)
    return prompt + "<NL>" + "システム: "


@pytest.mark.parametrize("inputs", ["", "情けは人のためならず"])
def test_alpaca_ja_equals_card_build_prompt(inputs: str, checkpoints: dict) -> None:
    tokenizer = Tokenizer(checkpoints["stablelm"][0])
    query = "与えられたことわざの意味を小学生でも分かるように教えてください。"
    style = AlpacaJa()
    assert style.render(style.messages(query, inputs or None), tokenizer) == card_build_prompt(query, inputs)


def test_rinna_equals_card_example(checkpoints: dict) -> None:
    tokenizer = Tokenizer(checkpoints["gpt_neox"][0])
    utterances = [
        {"speaker": "ユーザー", "text": "コンタクトレンズを慣れるにはどうすればよいですか？"},
        {"speaker": "システム", "text": "これについて具体的に説明していただけますか？何が難しいのでしょうか？"},
        {"speaker": "ユーザー", "text": "目が痛いのです。"},
    ]
    roles = {"ユーザー": "user", "システム": "assistant"}
    messages = [{"role": roles[u["speaker"]], "content": u["text"]} for u in utterances]
    style = Rinna()
    assert style.render(style.messages(messages), tokenizer) == card_rinna_prompt(utterances)
    # newlines become <NL> on the way in and come back on the way out
    assert style.render([{"role": "user", "content": "一行目\n二行目"}], tokenizer) == "ユーザー: 一行目<NL>二行目<NL>システム: "
    assert style.postprocess("はい<NL>いいえ") == "はい\nいいえ"
    with pytest.raises(KataruError, match="no system message"):
        style.render(style.messages("x", system="s"), tokenizer)


CHATS = [
    [{"role": "user", "content": "自然言語処理とは何か"}],
    [{"role": "system", "content": "あなたは親切なアシスタントです。"}, {"role": "user", "content": "こんにちは"},
     {"role": "assistant", "content": "こんにちは！"}, {"role": "user", "content": "東京の名所は？"}],
]
FANCY_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('bad role') }}{% endif %}{% if loop.index > 10 %}{% break %}{% endif %}"
    "<|{{ m['role'] }}|>\n  {{ m['content'] | trim }}{{ eos_token if m['role'] == 'assistant' }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}{{ {'n': messages|length} | tojson }}"
)


@pytest.mark.parametrize("template", ["checkpoint", "fancy", "file"])
@pytest.mark.parametrize("chat", CHATS)
def test_chat_template_equals_apply_chat_template(template: str, chat: list, checkpoints: dict,
                                                  tmp_path: Path) -> None:
    import shutil

    from transformers import AutoTokenizer

    folder = tmp_path / "tok"
    shutil.copytree(checkpoints["llama"][0], folder)
    if template != "checkpoint":
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        if template == "fancy":
            config["chat_template"] = FANCY_TEMPLATE
        else:
            del config["chat_template"]
            (folder / "chat_template.jinja").write_text(FANCY_TEMPLATE)
        config_path.write_text(json.dumps(config, ensure_ascii=False))
    ref = AutoTokenizer.from_pretrained(folder)
    expected = ref.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    style = ChatTemplate()
    ours = Tokenizer(folder)
    assert style.render(chat, ours) == expected
    if chat[0]["role"] == "system":  # a conversation's own system message is kept as it is
        assert style.render(style.messages(chat), ours) == expected
    # and the token ids of the prompt equal apply_chat_template(tokenize=True)
    ids = ref.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ours.encode(style.render(chat, ours), add_special_tokens=False) == list(ids)


def test_llm_jp_default_system_message_and_builtin_fallback(checkpoints: dict, tmp_path: Path) -> None:
    llm = kataru.load(checkpoints["llama"][0])
    text = llm.prompt_text("自然言語処理とは何か")
    assert text == "<s>以下は、タスクを説明する指示です。要求を適切に満たす応答を書きなさい。\n\n### 指示:\n自然言語処理とは何か\n\n### 応答:\n"
    assert llm.prompt_text("x", system="簡潔に答えて。").startswith("<s>簡潔に答えて。\n\n### 指示:\nx")
    ids = llm.encode_prompt("自然言語処理とは何か")
    assert ids.count(llm.tokenizer.bos_id) == 1 and ids[0] == llm.tokenizer.bos_id  # bos from the template only
    tokenizer = Tokenizer(checkpoints["llama"][0])
    tokenizer.chat_template = None  # a checkpoint without a template falls back to the built-in copy
    assert ChatTemplate().render([{"role": "user", "content": "x"}], tokenizer) == "<s>\n\n### 指示:\nx\n\n### 応答:\n"


def test_styles_are_detected_and_overridable(checkpoints: dict) -> None:
    expected = {"llama": "llm-jp", "gpt_neox": "rinna", "stablelm": "alpaca-ja", "mistral": "alpaca-ja",
                "japanese_stablelm_alpha": "raw"}
    for family, name in expected.items():
        assert kataru.load(checkpoints[family][0]).prompt_style.name == name
    assert kataru.load(checkpoints["llama"][0], prompt_style="alpaca-ja").prompt_style.name == "alpaca-ja"
    with pytest.raises(KataruError, match="unknown prompt style"):
        get_style("chatml")


def test_raw_and_alpha_encoding(checkpoints: dict) -> None:
    llm = kataru.load(checkpoints["japanese_stablelm_alpha"][0])
    assert llm.prompt_text("吾輩は猫である") == "吾輩は猫である"
    assert llm.encode_prompt("吾輩は猫である") == llm.tokenizer.encode("吾輩は猫である", add_special_tokens=False)
    assert isinstance(llm.prompt_style, Raw) and not llm.prompt_style.add_special_tokens
    with pytest.raises(KataruError, match="alpaca-ja"):
        llm.prompt_text("x", inputs="y")
