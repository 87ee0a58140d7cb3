"""What the experiments in bench/ share: the arguments naming a seed shape, and an engine on it holding
greedy requests not yet stepped. (Run them from the repository root: .venv/bin/python bench/NAME.py.)"""

from __future__ import annotations

import argparse

import torch

from kataru.engine import Engine
from kataru.model import Transformer
from kataru.quantize import quantize
from kataru.sampling import SamplingParams
from kataru.shapes import build_shape


def shape_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", default="llm-jp-3.1-1.8b", help="a seed shape (random weights)")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers than the real shape")
    parser.add_argument("--quantize", choices=["int8", "int4"], default=None, help="quantize the weights")
    parser.add_argument("--batch", type=int, default=1, help="requests decoding together")
    parser.add_argument("--prompt", type=int, default=32, help="tokens in each request's prompt")


def shape_model(shape: str, layers: int | None, method: str | None) -> Transformer:
    """A bf16 random model of the shape, quantized if asked."""
    model, _ = build_shape(shape, layers, torch.bfloat16)
    return quantize(model, method) if method else model


def shape_engine(model: Transformer, batch: int, new_tokens: int, compile: bool = False, prompt: int = 32) -> Engine:
    """An engine holding `batch` greedy requests of a `prompt`-token prompt and new_tokens each, not yet stepped."""
    params = SamplingParams(max_new_tokens=new_tokens, do_sample=False, ignore_eos=True)
    engine = Engine(model, set(), max_batch=batch, row_len=prompt + new_tokens, compile=compile)
    for _ in range(batch):
        engine.submit([5 + i % 1000 for i in range(prompt)], params)
    return engine


def decoding(engine: Engine, batch: int) -> Engine:
    """The engine stepped until its `batch` requests are past their prompts (all rows decode from the next step)."""
    while len(engine.scheduler.running) < batch:
        engine.step()
    return engine
