"""The model cards of the seed checkpoints: their `generate(...)` arguments and prompt style, by checkpoint.

A card belongs to a checkpoint, not to an architecture: any LLaMA folder is not llm-jp. A folder is a seed
when one of its names (its directory name, the `models--org--name` folder of a Hugging Face cache around
it, or config.json's `_name_or_path`) matches the card's repository and its architecture is the card's.
A seed gets its card's sampling; any other checkpoint gets its generation_config.json, then transformers'
`GenerationConfig` defaults (greedy, top_k 50), with max_new_tokens 128 where transformers would stop at
20 tokens of prompt and answer together. `defaults` says which applied and why.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GENERATION_FIELDS = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens")
# transformers' GenerationConfig defaults for the fields above; kataru's max_new_tokens replaces max_length=20
TRANSFORMERS_DEFAULTS: dict[str, Any] = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
                                         "repetition_penalty": 1.0, "max_new_tokens": 128}
LLM_JP_SAMPLING = {"do_sample": True, "top_p": 0.95, "temperature": 0.7, "repetition_penalty": 1.05,
                   "max_new_tokens": 100}


@dataclass(frozen=True)
class Card:
    repo: str
    family: str
    names: str  # a regular expression over a checkpoint's names
    sampling: dict[str, Any]
    prompt_style: str


CARDS = (
    Card("llm-jp/llm-jp-3.1-1.8b-instruct4 (and the other llm-jp-3 instruct models)", "llama",
         r"llm-jp-3(\.1)?-[0-9.]+b-instruct", LLM_JP_SAMPLING, "llm-jp"),
    Card("rinna/japanese-gpt-neox-3.6b-instruction-sft", "gpt_neox", r"japanese-gpt-neox-3\.6b-instruction-sft",
         {"do_sample": True, "temperature": 0.7, "max_new_tokens": 128}, "rinna"),
    Card("stabilityai/japanese-stablelm-3b-4e1t-instruct", "stablelm", r"japanese-stablelm-3b-4e1t-instruct",
         {"do_sample": True, "temperature": 1.0, "top_p": 0.95, "max_new_tokens": 256}, "alpaca-ja"),
    Card("stabilityai/japanese-stablelm-instruct-gamma-7b", "mistral", r"japanese-stablelm-instruct-gamma-7b",
         {"do_sample": True, "temperature": 1.0, "top_p": 0.95, "max_new_tokens": 256}, "alpaca-ja"),
    Card("stabilityai/japanese-stablelm-base-alpha-7b", "japanese_stablelm_alpha",
         r"japanese-stablelm-base-alpha-7b", {"do_sample": True, "temperature": 1.0, "top_p": 0.95,
                                              "max_new_tokens": 128}, "raw"),
)


def checkpoint_names(folder: Path, hf_config: dict[str, Any]) -> list[str]:
    """What a checkpoint folder calls itself: its name, a hub cache's repository folder, `_name_or_path`."""
    names = []
    for path in dict.fromkeys((folder.absolute(), folder.resolve())):  # as given, and a link's target
        names.append(path.name)
        for parent in path.parents:  # .../models--org--name/snapshots/<commit>
            if parent.name.startswith("models--"):
                names.append(parent.name.removeprefix("models--").replace("--", "/"))
                break
    if isinstance(hf_config.get("_name_or_path"), str):
        names.append(hf_config["_name_or_path"])
    return names


def find_card(folder: Path, family: str, hf_config: dict[str, Any]) -> tuple[Card, str] | None:
    """(card, the name that matched) for a seed checkpoint, else None."""
    for card in CARDS:
        if card.family != family:
            continue
        for name in checkpoint_names(folder, hf_config):
            if re.search(card.names, name, re.IGNORECASE):
                return card, name
    return None


def defaults(folder: Path, family: str, hf_config: dict[str, Any],
             generation_config: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """(sampling defaults, where they come from) for a checkpoint folder."""
    found = find_card(folder, family, hf_config)
    if found is not None:
        card, name = found
        # the card's arguments over transformers' defaults: a card that does not name top_k gets 50, as
        # transformers' generate gives it
        return {**TRANSFORMERS_DEFAULTS, **card.sampling}, f"the model card of {card.repo} ({name!r} is that model)"
    saved = {k: generation_config[k] for k in GENERATION_FIELDS if generation_config.get(k) is not None}
    source = (f"generation_config.json ({', '.join(saved)}), then transformers' defaults" if saved
              else "transformers' defaults (no sampling fields in generation_config.json)")
    return {**TRANSFORMERS_DEFAULTS, **saved}, source
