"""`kataru data`: prepare training data (clean, tokenize, derive SFT and DPO sets)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_command", required=True)
    d = argparse.ArgumentDefaultsHelpFormatter
    clean = sub.add_parser("clean", help="clean (Aozora notation), deduplicate and split documents", formatter_class=d)
    clean.add_argument("inputs", nargs="+", help=".jsonl(.gz) with a text field, or .txt files")
    clean.add_argument("--out", required=True, help="folder for train.jsonl, val.jsonl and stats.json")
    clean.add_argument("--field", default="text", help="the JSON field holding the text")
    clean.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out (by id)")
    clean.add_argument("--min-chars", type=int, default=200, help="drop documents shorter than this")
    clean.add_argument("--aozora", choices=["auto", "always", "never"], default="auto",
                       help="parse Aozora Bunko notation: where detected, always or never")
    tok = sub.add_parser("tokenize", help="tokenize cleaned train/val JSONL into packed token files",
                         formatter_class=d)
    tok.add_argument("folder", help="output of `kataru data clean`")
    tok.add_argument("--tokenizer", required=True, help="folder with tokenizer.json")
    tok.add_argument("--out", required=True, help="folder for train.bin, val.bin and meta.json")
    tok.add_argument("--workers", type=int, help="tokenizing processes (default: the CPUs, at most 8)")
    sft = sub.add_parser("sft", help="derive instruction data from JGLUE train splits and Aozora works",
                         formatter_class=d)
    sft.add_argument("--jglue", help="JGLUE datasets folder (jcommonsenseqa-v1.3/, jsts-v1.3/)")
    sft.add_argument("--aozora", help="cleaned train.jsonl from `kataru data clean`")
    sft.add_argument("--out", required=True, help="messages JSONL to write")
    sft.add_argument("--max-examples", type=int, help="keep at most this many (after shuffling)")
    sft.add_argument("--seed", type=int, default=0, help="shuffle seed")
    dpo = sub.add_parser("dpo", help="preference pairs from a model's own answers (rejection sampling)",
                         formatter_class=d)
    dpo.add_argument("model", help="the SFT model that answers")
    dpo.add_argument("--sft-data", required=True, help="messages JSONL (e.g. from `kataru data sft`)")
    dpo.add_argument("--out", required=True, help="pairs JSONL to write")
    dpo.add_argument("--samples", type=int, default=4, help="answers sampled per prompt")
    dpo.add_argument("--max-prompts", type=int, default=500, help="prompts to answer")
    dpo.add_argument("--seed", type=int, default=0, help="sampling seed")


def run(args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    if args.data_command == "clean":
        from kataru.data.corpus import clean_corpus

        stats = clean_corpus(args.inputs, Path(args.out), args.val_fraction, args.min_chars, args.field, args.aozora)
        print(json.dumps(vars(stats)))
    elif args.data_command == "tokenize":
        from kataru.data.corpus import tokenize_corpus

        meta = tokenize_corpus(Path(args.folder), Path(args.tokenizer), Path(args.out), args.workers)
        print(json.dumps(meta["splits"]))
    elif args.data_command == "sft":
        from kataru.data.instructions import derive_sft

        print(json.dumps(derive_sft(Path(args.out), args.jglue and Path(args.jglue), args.aozora and
                                    Path(args.aozora), args.seed, args.max_examples)))
    else:
        from kataru.train.pairs import build_pairs

        print(json.dumps(build_pairs(Path(args.model), Path(args.sft_data), Path(args.out), args.samples,
                                     args.max_prompts, args.seed)))
