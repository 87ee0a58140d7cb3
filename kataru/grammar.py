"""Constrained decoding on llguidance: an answer that must be JSON (any object, or one that matches a schema).

llguidance compiles a grammar against the tokenizer's vocabulary (each token's bytes) and, at every step,
says which tokens keep the answer inside the grammar; the sampler masks out the rest. When the grammar is
complete the matcher allows only eos, so the answer ends there.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import Tensor

from kataru.errors import KataruError
from kataru.tokenizer import Tokenizer


def json_grammar(schema: dict[str, Any] | None = None) -> str:
    """The llguidance grammar of a JSON object (schema None) or of a value matching a JSON schema."""
    from llguidance import LLMatcher

    try:
        # compact JSON: with free whitespace a weak model can fill its whole answer with blanks
        grammar = LLMatcher.grammar_from_json_schema(schema if schema is not None else {"type": "object"},
                                                     defaults={"whitespace_flexible": False})
    except Exception as err:
        raise KataruError(f"the JSON schema cannot be used ({str(err).splitlines()[0][:200]})") from None
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise KataruError(f"the JSON schema cannot be used ({'; '.join(messages)[:200]})")
    return grammar


class _Vocabulary:
    """What llguidance asks of a tokenizer: the ids of eos and bos, every token's bytes, and encoding."""

    def __init__(self, tokenizer: Tokenizer, eos_id: int) -> None:
        self.tokenizer = tokenizer
        self.eos_token_id = eos_id
        self.bos_token_id = tokenizer.bos_id
        self.tokens = tokenizer.token_bytes()
        self.special_token_ids = sorted(tokenizer.special_ids)

    def __call__(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)


class Grammars:
    """An engine's grammars: the vocabulary compiled once, a matcher per request."""

    def __init__(self, tokenizer: Tokenizer, eos_ids: set[int]) -> None:
        from llguidance import LLTokenizer, TokenizerWrapper

        eos = sorted(eos_ids)
        if not eos:
            raise KataruError("constrained decoding needs an eos token to end the answer; the checkpoint has none")
        self.vocab = tokenizer.vocab_size
        self.lltokenizer = LLTokenizer(TokenizerWrapper(_Vocabulary(tokenizer, eos[0])), n_vocab=self.vocab,
                                       eos_token=eos)

    def matcher(self, grammar: str) -> Matcher:
        return Matcher(self, grammar)


class Matcher:
    """One request's place in its grammar."""

    def __init__(self, grammars: Grammars, grammar: str) -> None:
        from llguidance import LLMatcher

        self.vocab = grammars.vocab
        self.matcher = LLMatcher(grammars.lltokenizer, grammar)
        if self.matcher.is_error():
            raise KataruError(f"the grammar cannot be used ({self.matcher.get_error()[:200]})")

    def allowed(self, vocab: int) -> Tensor:
        """[vocab] bool: the tokens the grammar allows next (ids past the tokenizer's vocabulary never)."""
        bits = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.uint8)
        mask = ((bits.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1).flatten().bool()[:self.vocab]
        if vocab > mask.numel():
            mask = torch.cat((mask, torch.zeros(vocab - mask.numel(), dtype=torch.bool)))
        return mask[:vocab]

    def consume(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise KataruError(f"the answer left its grammar ({self.matcher.get_error()[:200]})")


def schema_of(response_format: dict[str, Any]) -> dict[str, Any] | None:
    """OpenAI's response_format json_schema entry: the schema itself (None for json_object)."""
    if response_format.get("type") == "json_object":
        return None
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
        raise KataruError("response_format json_schema needs {\"json_schema\": {\"name\": ..., \"schema\": {...}}}")
    return spec.get("schema", {})


def dumps(schema: dict[str, Any] | None) -> str:
    return json.dumps(schema, sort_keys=True)
