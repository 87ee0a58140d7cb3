"""`kataru tokenize`: token ids of a text, as the checkpoint's reference tokenizer gives them."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="checkpoint folder, only its tokenizer files are read (default: the "
                                            "embedded kataru-tiny-ja)")
    p.add_argument("text", nargs="?", help="the text (or use --file)")
    p.add_argument("--file", help="tokenize each line of this file")
    p.add_argument("--special", action="store_true", help="add bos/eos as the tokenizer config says")
    p.add_argument("--tokens", action="store_true", help="print the pieces beside the ids")
    p.add_argument("--json", action="store_true", help="one JSON list per text")


def run(args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    from kataru.errors import KataruError
    from kataru.files import check_input
    from kataru.llm import DEFAULT_MODEL
    from kataru.tokenizer import Tokenizer

    model, text = args.model, args.text
    if text is None and args.file is None and model is not None and not Path(model).is_dir():
        model, text = None, model  # `kataru tokenize TEXT`: the embedded model's tokenizer
    folder = Path(model) if model else DEFAULT_MODEL
    if not folder.is_dir():
        raise KataruError(f"model folder {folder} does not exist; give the path of a local checkpoint folder")
    if (text is None) == (args.file is None):
        raise KataruError("give either a text or --file FILE")
    tokenizer = Tokenizer(folder)
    if args.file:
        path = check_input(Path(args.file), "text file")
        try:
            texts = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise KataruError(f"cannot read {path} as UTF-8 text ({err})") from None
    else:
        texts = [text]
    for line in texts:
        ids = tokenizer.encode(line, add_special_tokens=args.special)
        if args.json:
            row = [[i, tokenizer.id_to_token(i)] for i in ids] if args.tokens else ids
            print(json.dumps(row, ensure_ascii=False))
        elif args.tokens:
            print(" ".join(f"{i}:{tokenizer.id_to_token(i)}" for i in ids))
        else:
            print(" ".join(map(str, ids)))
