"""Peak memory of loading a checkpoint and generating with it, against the weights plus the KV cache.

usage: .venv/bin/python bench/peak_rss.py [--shape llm-jp-3.1-1.8b] [--work DIR] [--methods bf16,int8,int4]

Writes a random-weight Hugging Face checkpoint of the seed shape once (transformers, bf16, with the embedded
model's tokenizer: its ids lie inside every shape's vocabulary), and `kataru quantize` copies of it; then,
for each, a fresh process imports kataru, resets its peak (Linux /proc/self/clear_refs), loads the folder
with `kataru.load`, generates 64 tokens after a ~500-token prompt, and reports its peak resident memory
above the imports, next to the bytes of the weights and of the KV cache the engine held at its largest.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MEASURE = """
import json, sys, torch
import kataru
from kataru.config import ModelConfig, read_config_file
from kataru.model import Transformer

def status(key):
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024

with torch.device("meta"):  # import what loading pulls in before measuring
    Transformer(ModelConfig.from_hf(read_config_file(kataru.llm.DEFAULT_MODEL)))
base = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM)
llm = kataru.load(sys.argv[1], progress=False)
request = llm.engine.submit(llm.tokenizer.encode("日本語の文章です。" * 100), kataru.SamplingParams(
    max_new_tokens=64, do_sample=False, ignore_eos=True))
kv = 0
for _ in llm.engine.follow(request):  # the cache at its largest (the engine shrinks it when idle)
    kv = max(kv, llm.engine.stats()["cache_bytes"])
peak = status("VmHWM") - base
weights = sum(t.numel() * t.element_size() for t in {id(t): t for t in [*llm.model.parameters(),
                                                                        *llm.model.buffers()]}.values())
print(json.dumps({"weights": weights, "kv": kv, "peak": peak}))
"""


def make_checkpoint(shape: str, folder: Path) -> None:
    import torch
    import transformers

    from kataru.config import ModelConfig
    from kataru.llm import DEFAULT_MODEL
    from kataru.shapes import HF_CLASSES, shape_config

    hf_config = shape_config(shape)
    vocab = json.loads((Path(DEFAULT_MODEL) / "config.json").read_text())["vocab_size"]
    if hf_config["vocab_size"] < vocab:
        sys.exit(f"--shape {shape}: its vocabulary ({hf_config['vocab_size']}) is smaller than the embedded "
                 f"model's tokenizer ({vocab}) whose ids the prompt uses; pick a seed shape")
    cls = getattr(transformers, HF_CLASSES[ModelConfig.from_hf(hf_config).family])
    torch.manual_seed(0)
    model = cls(cls.config_class(**{k: v for k, v in hf_config.items() if k != "model_type"}))
    model.to(torch.bfloat16).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(Path(DEFAULT_MODEL) / name, folder / name)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="llm-jp-3.1-1.8b")
    parser.add_argument("--work", type=Path, default=Path("/tmp/kataru-rss"))
    parser.add_argument("--methods", default="bf16,int8,int4")
    args = parser.parse_args()
    if not Path("/proc/self/clear_refs").exists():
        raise SystemExit("needs Linux /proc to measure peak memory")
    source = args.work / args.shape
    if not (source / "config.json").exists():
        make_checkpoint(args.shape, source)
    print(f"{'weights':<8}{'weights GB':>11}{'KV GB':>8}{'peak GB':>9}{'peak / (weights + KV)':>23}")
    for method in args.methods.split(","):
        folder = source if method == "bf16" else args.work / f"{args.shape}-{method}"
        if method != "bf16" and not (folder / "config.json").exists():
            subprocess.run([sys.executable, "-m", "kataru", "quantize", str(source), str(folder), "--method", method],
                           check=True, capture_output=True)
        run = subprocess.run([sys.executable, "-c", MEASURE, str(folder)], capture_output=True, text=True, cwd=ROOT)
        if run.returncode != 0:
            raise SystemExit(run.stderr.strip().splitlines()[-1])
        r = json.loads(run.stdout.strip().splitlines()[-1])
        print(f"{method:<8}{r['weights'] / 1e9:>11.2f}{r['kv'] / 1e9:>8.2f}{r['peak'] / 1e9:>9.2f}"
              f"{r['peak'] / (r['weights'] + r['kv']):>22.3f}x")


if __name__ == "__main__":
    main()
