"""A small synthetic Aozora-style corpus, prepared with kataru's own data, tokenizer and pretraining commands."""

from __future__ import annotations

import json
import random
from pathlib import Path

from helpers import CORPUS

HEADER = """{title}
{author}

-------------------------------------------------------
【テキスト中に現れる記号について】

《》：ルビ
（例）吾輩《わがはい》

［＃］：入力者注　主に外字の説明や、傍点の位置の指定
-------------------------------------------------------

"""
FOOTER = """


底本：「テスト全集」テスト社
　　　1970（昭和45）年1月1日発行
入力：テスト
青空文庫作成ファイル：
このファイルは、インターネットの図書館、青空文庫（http://www.aozora.gr.jp/）で作られました。
"""
RUBY = [("吾輩《わがはい》", "吾輩"), ("十六｜歳《さい》", "十六歳"), ("薄暗《うすぐら》い", "薄暗い")]


def aozora_work(index: int, rng: random.Random) -> tuple[str, str]:
    """(raw Aozora file, the text kataru's cleaner should give) for a synthetic work."""
    title, author = f"作品{index}", f"著者{index % 7}"
    body_raw, body_clean = [], []
    for _ in range(rng.randint(6, 12)):
        line = "".join(rng.choice(CORPUS[:7] + CORPUS[10:]) for _ in range(rng.randint(1, 3)))
        raw, clean = rng.choice(RUBY)
        body_raw.append("　" + raw + line)
        body_clean.append("　" + clean + line)
    raw = HEADER.format(title=title, author=author) + "［＃３字下げ］第一章［＃「第一章」は中見出し］\n" + \
        "\n".join(body_raw) + FOOTER
    clean = f"{title}\n{author}\n第一章\n" + "\n".join(body_clean)
    return raw.replace("\n", "\r\n"), clean


def write_corpus(path: Path, works: int = 120, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    cleaned = []
    with path.open("w", encoding="utf-8") as f:
        for i in range(works):
            raw, clean = aozora_work(i, rng)
            f.write(json.dumps({"path": f"cards/{i:06d}/work.txt", "text": raw}, ensure_ascii=False) + "\n")
            cleaned.append(clean)
    return cleaned


def prepare(root: Path) -> dict[str, Path]:
    """raw corpus -> clean -> tokenizer -> packed tokens, all with kataru's functions."""
    from kataru.data.corpus import clean_corpus, tokenize_corpus
    from kataru.train.vocabulary import train_tokenizer

    raw = root / "raw.jsonl"
    write_corpus(raw)
    clean_corpus([str(raw)], root / "clean", val_fraction=0.1, min_chars=50, progress=False)
    train_tokenizer([str(root / "clean" / "train.jsonl")], root / "tok", vocab_size=420, max_lines=20000)
    tokenize_corpus(root / "clean", root / "tok", root / "tokens", workers=2, progress=False)
    return {"raw": raw, "clean": root / "clean", "tok": root / "tok", "tokens": root / "tokens"}


TINY_ARGS = ["--dim", "32", "--layers", "2", "--heads", "2", "--intermediate", "64", "--seq-len", "32",
             "--context", "256", "--batch-size", "4", "--lr", "3e-3", "--warmup-steps", "5", "--eval-windows", "4",
             "--no-progress"]
