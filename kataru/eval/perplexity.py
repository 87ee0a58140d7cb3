"""Perplexity on held-out text, for the loaded dtype and each quantization of the same weights.

The text is the user's file, or the Aozora Bunko works kataru's own recipe holds out: `kataru data clean
--val-fraction 0.02` puts a work in the validation split by a hash of its id, and the same rule picks
them here (cleaned the same way), so kataru-tiny-ja never trained on them. Each window runs through
`forward` (every row through the same kernels generation uses).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from kataru.data.corpus import RECIPE_VAL_FRACTION, clean_aozora, is_validation, read_documents
from kataru.errors import KataruError
from kataru.files import data_folder
from kataru.llm import load
from kataru.model import Transformer
from kataru.quantize import quantize as quantize_model


def heldout_texts(path: Path | None, max_chars: int) -> list[str]:
    """The user's text file, or the held-out Aozora Bunko works of the data folder."""
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise KataruError(f"cannot read {path} as UTF-8 text ({err})") from None
        return [text[:max_chars]]
    files = sorted((data_folder("aozora") / "aozora").glob("aozora-sample*.jsonl.gz"))
    if not files:
        raise KataruError("no held-out text: give a UTF-8 text file (--text), or set KATARU_DATA to a data folder "
                          "with aozora/aozora-sample*.jsonl.gz")
    texts, total = [], 0
    for doc in read_documents(files):
        if not is_validation(doc.id, RECIPE_VAL_FRACTION):
            continue
        texts.append(clean_aozora(doc.text)[: max_chars - total])
        total += len(texts[-1])
        if total >= max_chars:
            break
    return texts


@torch.inference_mode()
def perplexity(model: Transformer, token_lists: list[list[int]], window: int, desc: str = "perplexity") -> float:
    """exp(mean next-token NLL) over non-overlapping windows of each text."""
    chunks = [ids[start:start + window + 1] for ids in token_lists for start in range(0, len(ids) - 1, window)]
    chunks = [c for c in chunks if len(c) >= 2]
    if not chunks:
        raise KataruError("the held-out text is too short to score (fewer than two tokens)")
    nll, count = 0.0, 0
    for chunk in tqdm(chunks, desc=desc, unit="window", leave=False):
        logits = model(torch.tensor([chunk[:-1]])).float()
        target = torch.tensor(chunk[1:])
        nll += torch.nn.functional.cross_entropy(logits[0], target, reduction="sum").item()
        count += len(chunk) - 1
    return float(torch.exp(torch.tensor(nll / count)))


def evaluate(folder: Path, dtype: str = "auto", methods: tuple[str, ...] = ("int8", "int4"),
             text: Path | None = None, max_chars: int = 20000, window: int = 512) -> dict[str, Any]:
    """Perplexity of the checkpoint as loaded, then of each quantized copy, on the same tokens."""
    if not folder.is_dir():
        raise KataruError(f"model folder {folder} does not exist (perplexity needs trained weights)")
    llm = load(folder, dtype=dtype, progress=False)
    tokens = [llm.tokenizer.encode(t, add_special_tokens=True) for t in heldout_texts(text, max_chars)]
    window = min(window, llm.config.max_seq_len - 1)
    name = str(llm.dtype).removeprefix("torch.")
    rows = [{"method": name, "perplexity": perplexity(llm.model, tokens, window, name)}]
    for method in methods:
        ppl = perplexity(quantize_model(llm.model, method, inplace=False), tokens, window, method)
        rows.append({"method": method, "perplexity": ppl})
    for row in rows:
        row["increase"] = row["perplexity"] / rows[0]["perplexity"] - 1
    return {"task": "perplexity", "target": str(folder), "tokens": sum(len(t) for t in tokens), "window": window,
            "rows": rows}
