"""Tokenizers of a checkpoint folder, without transformers.

Two backends give the ids transformers gives:
- `tokenizer.json` runs on the `tokenizers` library (what transformers' fast tokenizers wrap);
- a sentencepiece `.model` alone runs on `sentencepiece` with the slow-tokenizer semantics the cards
  were written for: split the text on added/special tokens, encode each piece with sentencepiece as
  the model was trained (rinna: no dummy prefix, whitespace kept; nerdstash: no dummy prefix), look the
  special tokens up in the vocabulary or append them after it (nerdstash's `▁▁`).
bos/eos are added as tokenizer_config.json says (add_bos_token / add_eos_token), and decoding holds
incomplete UTF-8 back while streaming (`StreamDecoder`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kataru.errors import KataruError
from kataru.files import read_json

# In transformers' order, which decides the ids of special tokens missing from the vocabulary.
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Defaults of the transformers classes the seed checkpoints name, for configs that leave them out.
CLASS_DEFAULTS = {"LlamaTokenizer": (True, False), "T5Tokenizer": (False, True)}


@dataclass
class AddedToken:
    content: str
    id: int
    special: bool = True
    lstrip: bool = False
    rstrip: bool = False


def _content(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def _read_json(path: Path) -> dict[str, Any]:
    return read_json(path, "restore it from the checkpoint", default={}) if path.is_file() else {}


class Tokenizer:
    """Encode/decode text exactly as the checkpoint's reference tokenizer does."""

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        self.folder = folder
        config = {**_read_json(folder / "special_tokens_map.json"), **_read_json(folder / "tokenizer_config.json")}
        self.config = config
        self.chat_template = self._chat_template(folder, config)
        tokenizer_class = str(config.get("tokenizer_class") or "").removesuffix("Fast")
        self.class_defaults = CLASS_DEFAULTS.get(tokenizer_class, (False, False))
        self.add_bos = bool(config.get("add_bos_token", self.class_defaults[0]))
        self.add_eos = bool(config.get("add_eos_token", self.class_defaults[1]))
        self.clean_up_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        self.special_strings = {k: _content(config.get(k)) for k in SPECIAL_KEYS if _content(config.get(k))}
        extra = config.get("additional_special_tokens") or config.get("extra_special_tokens") or []
        if isinstance(extra, dict):
            extra = list(extra.values())
        self.extra_specials = [c for c in (_content(x) for x in extra) if c]

        self._token_bytes: list[bytes] | None = None
        json_path = folder / "tokenizer.json"
        sp_models = sorted(folder.glob("*.model"))
        if json_path.is_file():
            self.backend: _Backend = _TokenizersBackend(json_path, self)
        elif sp_models:
            self.backend = _SentencePieceBackend(sp_models[0], self)
        else:
            raise KataruError(
                f"no tokenizer in {folder}: expected tokenizer.json or a sentencepiece .model file; "
                "copy the tokenizer files of the checkpoint into the folder"
            )
        self.bos_id = self._special_id("bos_token")
        self.eos_id = self._special_id("eos_token")
        self.pad_id = self._special_id("pad_token")
        self.unk_id = self._special_id("unk_token")

    @staticmethod
    def _chat_template(folder: Path, config: dict[str, Any]) -> str | None:
        jinja = folder / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text(encoding="utf-8")
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        if template is None:
            template = _read_json(folder / "chat_template.json").get("chat_template")
        return template

    def _special_id(self, key: str) -> int | None:
        text = self.special_strings.get(key)
        return None if text is None else self.token_to_id(text)

    @property
    def vocab_size(self) -> int:
        return self.backend.vocab_size()

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str:
        return self.backend.id_to_token(token_id)

    @property
    def special_ids(self) -> set[int]:
        return self.backend.special_ids()

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise KataruError(f"text to tokenize must be a string, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: bytes that were not UTF-8 (Python's surrogateescape)
            raise KataruError("the text holds bytes that are not UTF-8; convert it (e.g. iconv -f SHIFT_JIS -t "
                              "UTF-8)") from None
        return self.backend.encode(text, add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        text = self.backend.decode(list(ids), skip_special_tokens)
        return clean_up_tokenization(text) if self.clean_up_spaces else text

    def bytes_of(self, token_id: int) -> bytes:
        """`token_bytes()[token_id]`, and no bytes for an id past the tokenizer (a model's padded vocabulary)."""
        table = self.token_bytes()
        return table[token_id] if 0 <= token_id < len(table) else b""

    def token_bytes(self) -> list[bytes]:
        """The bytes each token id stands for (a byte-fallback piece is one byte, `▁` a space, a byte-level
        piece its bytes, a special token its text), so that the bytes of an answer's tokens joined are its
        UTF-8 text even where one character spans several tokens. Made once."""
        if self._token_bytes is None:
            self._token_bytes = [self.backend.token_bytes(i) for i in range(self.vocab_size)]
        return self._token_bytes

    def with_bos_eos(self, ids: list[int]) -> list[int]:
        head = [self.bos_id] if self.add_bos and self.bos_id is not None else []
        tail = [self.eos_id] if self.add_eos and self.eos_id is not None else []
        return head + ids + tail


def clean_up_tokenization(text: str) -> str:
    """transformers' clean_up_tokenization_spaces rule (used by configs that turn it on)."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE: the printable character standing for each byte, inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _piece_bytes(piece: str) -> bytes:
    """A sentencepiece-style piece: `<0xNN>` is that byte, `▁` a space."""
    match = BYTE_PIECE.match(piece)
    return bytes([int(match.group(1), 16)]) if match else piece.replace("▁", " ").encode("utf-8")


class _Backend:
    def token_bytes(self, token_id: int) -> bytes: ...
    def vocab_size(self) -> int: ...
    def token_to_id(self, token: str) -> int | None: ...
    def id_to_token(self, token_id: int) -> str: ...
    def special_ids(self) -> set[int]: ...
    def encode(self, text: str, add_special_tokens: bool) -> list[int]: ...
    def decode(self, ids: list[int], skip_special_tokens: bool) -> str: ...


class _TokenizersBackend(_Backend):
    def __init__(self, path: Path, owner: Tokenizer) -> None:
        from tokenizers import AddedToken as HFAddedToken
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self.tok = HFTokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception for malformed files
            raise KataruError(f"{path} cannot be read as a tokenizer ({str(err)[:200]}); copy it again") from None
        self.owner = owner
        specials = [*owner.special_strings.values(), *owner.extra_specials]
        missing = [t for t in specials if self.tok.token_to_id(t) is None]
        if missing:
            self.tok.add_special_tokens([HFAddedToken(t, special=True, normalized=False) for t in missing])
        # As transformers does: with a tokenizer.json its post-processor adds bos/eos and the add_bos_token
        # flags of the config are ignored; without a post-processor the tokenizer class's defaults apply.
        self.manual_bos_eos = self.tok.post_processor is None
        if self.manual_bos_eos:
            owner.add_bos, owner.add_eos = owner.class_defaults
        self._special = {i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}
        self._added = {i: t.content for i, t in self.tok.get_added_tokens_decoder().items()}
        self._byte_level = '"ByteLevel"' in json.dumps(json.loads(self.tok.to_str()).get("decoder"))
        self._alphabet = _byte_level_alphabet() if self._byte_level else {}

    def token_bytes(self, token_id: int) -> bytes:
        if token_id in self._added:
            return self._added[token_id].encode("utf-8")
        piece = self.tok.id_to_token(token_id) or ""
        if self._byte_level:
            return bytes(self._alphabet.get(c, 0) for c in piece) if all(c in self._alphabet for c in piece) \
                else piece.encode("utf-8")
        return _piece_bytes(piece)

    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str:
        return self.tok.id_to_token(token_id) or ""

    def special_ids(self) -> set[int]:
        return self._special

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        if add_special_tokens and not self.manual_bos_eos:
            return self.tok.encode(text, add_special_tokens=True).ids
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return self.owner.with_bos_eos(ids) if add_special_tokens else ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


class _SentencePieceBackend(_Backend):
    def __init__(self, path: Path, owner: Tokenizer) -> None:
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as err:
            raise KataruError(f"{path} cannot be read as a sentencepiece model ({err}); copy it again") from None
        self.owner = owner
        self.size = self.sp.get_piece_size()
        self.added: dict[str, AddedToken] = {}
        self.by_id: dict[int, AddedToken] = {}
        for key, entry in (owner.config.get("added_tokens_decoder") or {}).items():
            self._add(AddedToken(entry["content"], int(key), bool(entry.get("special", True)),
                                 bool(entry.get("lstrip", False)), bool(entry.get("rstrip", False))))
        for content, token_id in _read_json(owner.folder / "added_tokens.json").items():
            if content not in self.added:
                self._add(AddedToken(content, int(token_id), special=False))
        for content in [*owner.special_strings.values(), *owner.extra_specials]:
            if content not in self.added:
                self._add(AddedToken(content, self._id_for(content)))
        # Longest first, so that e.g. "▁▁" wins over a shorter token starting at the same place.
        self.patterns = sorted(self.added, key=len, reverse=True)

    def _id_for(self, content: str) -> int:
        piece_id = self.sp.piece_to_id(content)
        if piece_id < self.size and self.sp.id_to_piece(piece_id) == content:
            return piece_id
        return max([self.size - 1, *self.by_id]) + 1

    def _add(self, token: AddedToken) -> None:
        self.added[token.content] = token
        self.by_id[token.id] = token

    def vocab_size(self) -> int:
        return max([self.size - 1, *self.by_id]) + 1

    def token_bytes(self, token_id: int) -> bytes:
        if token_id in self.by_id:
            return self.by_id[token_id].content.replace("▁", " ").encode("utf-8")
        if not 0 <= token_id < self.size:
            return b""
        if self.sp.is_byte(token_id):
            return _piece_bytes(self.sp.id_to_piece(token_id))
        if self.sp.is_control(token_id) or self.sp.is_unknown(token_id):
            return self.sp.id_to_piece(token_id).encode("utf-8")
        return _piece_bytes(self.sp.id_to_piece(token_id))

    def token_to_id(self, token: str) -> int | None:
        if token in self.added:
            return self.added[token].id
        piece_id = self.sp.piece_to_id(token)
        return piece_id if self.sp.id_to_piece(piece_id) == token else None

    def id_to_token(self, token_id: int) -> str:
        if token_id in self.by_id:
            return self.by_id[token_id].content
        return self.sp.id_to_piece(token_id) if 0 <= token_id < self.size else ""

    def special_ids(self) -> set[int]:
        return {t.id for t in self.added.values() if t.special}

    def split(self, text: str) -> list[str | AddedToken]:
        """Split on added tokens, leftmost match first and the longest at one place."""
        parts: list[str | AddedToken] = []
        pos, start = 0, 0
        while pos < len(text):
            match = next((p for p in self.patterns if text.startswith(p, pos)), None) if self.patterns else None
            if match is None:
                pos += 1
                continue
            parts.append(text[start:pos])
            parts.append(self.added[match])
            pos += len(match)
            start = pos
        parts.append(text[start:])
        for i, part in enumerate(parts):  # lstrip/rstrip eat whitespace beside the token
            if isinstance(part, AddedToken):
                if part.lstrip and i > 0 and isinstance(parts[i - 1], str):
                    parts[i - 1] = parts[i - 1].rstrip()  # type: ignore[union-attr]
                if part.rstrip and i + 1 < len(parts) and isinstance(parts[i + 1], str):
                    parts[i + 1] = parts[i + 1].lstrip()  # type: ignore[union-attr]
        return parts

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids: list[int] = []
        for part in self.split(text):
            if isinstance(part, AddedToken):
                ids.append(part.id)
            elif part:
                ids.extend(self.sp.encode(part))
        return self.owner.with_bos_eos(ids) if add_special_tokens else ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        out: list[str] = []
        run: list[int] = []
        for token_id in ids:
            token = self.by_id.get(token_id)
            if token is None and not 0 <= token_id < self.size:
                continue  # a padded embedding row the tokenizer has no piece for: no text
            if token is None and self.sp.is_control(token_id):
                token = AddedToken(self.sp.id_to_piece(token_id), token_id)  # <s>, </s> of the model itself
            if token is None:
                run.append(token_id)
                continue
            if run:
                out.append(self.sp.decode(run))
                run = []
            if not (skip_special_tokens and token.special):
                out.append(token.content)
        if run:
            out.append(self.sp.decode(run))
        return "".join(out)


class StreamDecoder:
    """Turns generated ids into text pieces, never emitting a broken character.

    Decodes a sliding window of ids and emits only what the newest id adds, once the text no longer
    ends in U+FFFD (an incomplete byte-fallback or byte-level sequence).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _window(self) -> tuple[str, str]:
        """Text of the window up to the last emitted id, and of the whole window."""
        decode = self.tokenizer.decode
        return (decode(self.ids[self.prefix_offset:self.read_offset], self.skip),
                decode(self.ids[self.prefix_offset:], self.skip))

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text, new_text = self._window()
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return new_text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an unfinished byte sequence at the very end)."""
        prefix_text, new_text = self._window()
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text):]
