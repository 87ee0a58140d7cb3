"""Prompt styles, one class each, producing the exact strings the model cards build.

A conversation is a list of {"role": "system"|"user"|"assistant", "content": str} messages; the last
user message may carry "inputs" (the alpaca-ja 入力 field). `render` returns the prompt text, and
`postprocess` maps generated text back (rinna's `<NL>`).
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any, ClassVar

from kataru.errors import KataruError

if TYPE_CHECKING:
    from kataru.tokenizer import Tokenizer

Message = dict[str, Any]

# llm-jp-3 instruct's chat template, used only when a llama checkpoint ships none.
LLM_JP_TEMPLATE = (
    "{{bos_token}}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '\\n\\n### 指示:\\n' + message['content'] }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '\\n\\n### 応答:\\n' + message['content'] + eos_token }}"
    "{% endif %}{% if loop.last and add_generation_prompt %}{{ '\\n\\n### 応答:\\n' }}{% endif %}{% endfor %}"
)


class PromptStyle:
    name: ClassVar[str]
    default_system: ClassVar[str | None] = None
    # Whether the card encodes the rendered prompt with the tokenizer's bos/eos.
    add_special_tokens: bool = False

    def render(self, messages: list[Message], tokenizer: Tokenizer) -> str:
        raise NotImplementedError

    def postprocess(self, text: str) -> str:
        return text

    def messages(self, prompt: str | list[Message], inputs: str | None = None,
                 system: str | None = None) -> list[Message]:
        """A conversation from a bare prompt or messages, with the card's system message unless replaced."""
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
        for m in messages:
            if m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
                raise KataruError(f"bad message {m!r}: each needs role system/user/assistant and string content")
        if inputs:
            users = [m for m in messages if m["role"] == "user"]
            if not users:
                raise KataruError("inputs need a user message to attach to")
            users[-1]["inputs"] = inputs
        has_system = bool(messages) and messages[0]["role"] == "system"
        if system is not None:
            messages = [{"role": "system", "content": system}, *messages[has_system:]]
        elif not has_system and self.default_system is not None:
            messages = [{"role": "system", "content": self.default_system}, *messages]
        return messages


class ChatTemplate(PromptStyle):
    """llm-jp: the checkpoint's own Jinja chat template, rendered as apply_chat_template does."""

    name = "llm-jp"
    default_system = "以下は、タスクを説明する指示です。要求を適切に満たす応答を書きなさい。"

    def render(self, messages: list[Message], tokenizer: Tokenizer) -> str:
        if any("inputs" in m for m in messages):
            raise KataruError("inputs (入力) belong to the alpaca-ja prompt style; put them in the message instead")
        try:
            template = compile_template(tokenizer.chat_template or LLM_JP_TEMPLATE)
        except Exception as err:  # jinja2's TemplateSyntaxError and friends
            raise KataruError(f"the checkpoint's chat template is not valid Jinja ({type(err).__name__}: "
                              f"{str(err).splitlines()[0][:160]}); fix chat_template in tokenizer_config.json or "
                              "choose another prompt style") from None
        try:
            return template.render(messages=messages, add_generation_prompt=True, tools=None, documents=None,
                                   **tokenizer.special_strings)
        except Exception as err:  # a template's raise_exception or a Jinja error
            raise KataruError(f"the chat template refused the conversation: {err}") from None


@lru_cache(maxsize=16)
def compile_template(source: str):  # type: ignore[no-untyped-def]
    """A Jinja template in the sandbox and with the globals transformers gives chat templates."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class AlpacaJa(PromptStyle):
    """Japanese StableLM Instruct (3B-4E1T, Gamma 7B): the card's build_prompt."""

    name = "alpaca-ja"
    default_system = ("以下は、タスクを説明する指示と、文脈のある入力の組み合わせです。"
                      "要求を適切に満たす応答を書きなさい。")
    sep = "\n\n### "

    def render(self, messages: list[Message], tokenizer: Tokenizer) -> str:
        prompt = ""
        for m in messages:
            if m["role"] == "system":
                prompt += m["content"]
            elif m["role"] == "user":
                prompt += self.sep + "指示: \n" + m["content"]
                if m.get("inputs"):
                    prompt += self.sep + "入力: \n" + m["inputs"]
            else:
                prompt += self.sep + "応答: \n" + m["content"]
        return prompt + self.sep + "応答: \n"


class Rinna(PromptStyle):
    """rinna japanese-gpt-neox instruction-sft: `ユーザー: …<NL>システム: …`, newlines as `<NL>`."""

    name = "rinna"
    speakers: ClassVar[dict[str, str]] = {"user": "ユーザー", "assistant": "システム"}

    def render(self, messages: list[Message], tokenizer: Tokenizer) -> str:
        turns = []
        for m in messages:
            if m["role"] == "system":
                raise KataruError("the rinna prompt style has no system message; drop --system")
            if m.get("inputs"):
                raise KataruError("inputs (入力) belong to the alpaca-ja prompt style; put them in the message instead")
            turns.append(f"{self.speakers[m['role']]}: {m['content']}".replace("\n", "<NL>"))
        return "<NL>".join(turns) + "<NL>" + "システム: "

    def postprocess(self, text: str) -> str:
        return text.replace("<NL>", "\n")


class Raw(PromptStyle):
    """Base models: the text as it is, user turns joined by newlines."""

    name = "raw"
    add_special_tokens = True  # as the tokenizer config says; the Alpha card turns it off

    def render(self, messages: list[Message], tokenizer: Tokenizer) -> str:
        if any(m.get("inputs") for m in messages):
            raise KataruError("inputs (入力) belong to the alpaca-ja prompt style")
        return "\n".join(m["content"] for m in messages if m["role"] != "system")


STYLES: dict[str, type[PromptStyle]] = {cls.name: cls for cls in (ChatTemplate, AlpacaJa, Rinna, Raw)}


def get_style(name: str) -> PromptStyle:
    if name not in STYLES:
        raise KataruError(f"unknown prompt style {name!r}; choose one of {', '.join(STYLES)}")
    return STYLES[name]()


def detect_style(family: str, tokenizer: Tokenizer) -> PromptStyle:
    """The style each card prescribes, read from the checkpoint."""
    if tokenizer.chat_template:
        return ChatTemplate()
    if family == "llama":
        return ChatTemplate()
    if family in ("stablelm", "mistral"):
        return AlpacaJa()
    if family == "gpt_neox" and tokenizer.token_to_id("<NL>") is not None:
        return Rinna()
    raw = Raw()
    raw.add_special_tokens = family != "japanese_stablelm_alpha"
    return raw
