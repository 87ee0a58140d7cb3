"""`kataru train-tokenizer`: a Unigram byte-fallback tokenizer, written as tokenizer.json."""

from __future__ import annotations

import argparse

FORMATTER = argparse.ArgumentDefaultsHelpFormatter


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", help=".jsonl(.gz) with a text field, or .txt files")
    p.add_argument("--out", required=True, help="folder for tokenizer.json and tokenizer_config.json")
    p.add_argument("--vocab-size", type=int, default=8000, help="pieces in the vocabulary")
    p.add_argument("--field", default="text", help="the JSON field holding the text")
    p.add_argument("--max-lines", type=int, default=400_000, help="lines sampled for training")
    p.add_argument("--character-coverage", type=float, default=0.9995,
                   help="share of characters the pieces must cover (the rest fall back to bytes)")


def run(args: argparse.Namespace) -> None:
    from pathlib import Path

    from kataru.train.vocabulary import train_tokenizer

    print(train_tokenizer(args.inputs, Path(args.out), args.vocab_size, args.field, args.max_lines,
                          args.character_coverage))
