"""Loading peaks near the size of the weights in the target dtype (measured in a fresh process)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

MEASURE = """
import sys, torch, kataru
from pathlib import Path
from kataru.config import ModelConfig, read_config_file
from kataru.model import Transformer

def status(key):
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024

with torch.device("meta"):  # import what the meta device pulls in before measuring
    Transformer(ModelConfig.from_hf(read_config_file(Path(sys.argv[1]))))
base = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM)
llm = kataru.load(sys.argv[1], dtype=sys.argv[2], progress=False)
weights = sum(p.numel() * p.element_size() for p in llm.model.parameters())
print(weights, status("VmHWM") - base)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to measure peak memory")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_peak_memory_while_loading(dtype: str, tokenizer_dirs: dict, tmp_path_factory: pytest.TempPathFactory) -> None:
    import torch
    import transformers as T

    folder = tmp_path_factory.getbasetemp() / "memory-model"
    if not folder.exists():
        torch.manual_seed(0)
        config = T.LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                               num_attention_heads=8, max_position_embeddings=256)
        T.LlamaForCausalLM(config).save_pretrained(folder)  # float32 on disk: bfloat16 converts while loading
        for f in tokenizer_dirs["llama"][0].iterdir():
            shutil.copy(f, folder / f.name)
    out = subprocess.run([sys.executable, "-c", MEASURE, str(folder), dtype], capture_output=True, text=True,
                         timeout=300, check=True).stdout.split()
    weights, peak = int(out[0]), int(out[1])
    # 1.2x the weights, plus a constant for the 16 MB read buffer and rotary tables.
    assert peak <= 1.2 * weights + 40e6, json.dumps({"weights_mb": weights / 1e6, "peak_mb": peak / 1e6})
