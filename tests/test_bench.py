"""`kataru bench` runs end to end on a tiny shape (numbers are printed, never asserted as times)."""

from __future__ import annotations

import json

import pytest
import torch

from kataru import kernels
from kataru.bench import Result, format_table, median_result
from kataru.cli import main
from kataru.config import ModelConfig
from kataru.shapes import SHAPES, build_shape


def test_bench_float16_weights_measure_the_kernels_against_torch(capsys: pytest.CaptureFixture) -> None:
    """fp16 weights run on kataru's CPU kernel too, so the bench times the same engine on torch's matmul beside it."""
    assert main(["bench", "speed", "tiny", "--dtype", "float16", "--prompt-tokens", "40", "--new-tokens", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dtype"] == "float16" and report["half_kernel"] == kernels.available()
    torch_mm = ["kataru torch mm"] if kernels.available() else []
    assert [r["engine"] for r in report["results"]] == ["kataru", *torch_mm]
    assert all(r["prefill_tok_s"] > 0 and r["decode_b8_tok_s"] > 0 for r in report["results"])


def test_bench_tiny_with_transformers(capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", "speed", "tiny", "--compare", "transformers", "--quantize", "int8,int4", "--prompt-tokens", "64",
                 "--new-tokens", "4", "--device", "cpu", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["device"] == "cpu" and "peak_gpu_gb" not in report
    assert report["half_kernel"] == (report["dtype"] in ("bfloat16", "float16") and kernels.available())
    # with kataru's CPU kernel, the same engine on torch's matmul is measured too
    torch_mm = ["kataru torch mm"] if report["half_kernel"] else []
    assert [r["engine"] for r in report["results"]] == ["kataru", *torch_mm, "kataru int8", "kataru int4",
                                                        "transformers"]
    for r in report["results"]:
        assert r["prefill_tok_s"] > 0 and r["decode_b1_tok_s"] > 0 and r["decode_b8_tok_s"] > 0
    assert set(report["ratios"]) == {"prefill", "decode_b1", "decode_b8"}
    assert report["bandwidth_gbs"] > 0 and report["roofline_decode_tok_s"] > 0
    assert "kataru/transformers" in format_table(report)


def test_rounds_take_turns_and_report_medians(capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", "speed", "tiny", "--rounds", "3", "--quantize", "int8", "--prompt-tokens", "32", "--new-tokens",
                 "3", "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    n = 3 * len(report["results"])
    assert report["rounds"] == 3 and f"{n}/{n}" in captured.err  # the progress bar counts every run
    assert report["results"][-1]["engine"] == "kataru int8" and report["results"][-1]["roofline_fraction"] is None
    assert report["results"][0]["roofline_fraction"] > 0
    assert "medians of 3 rounds" in format_table(report)
    runs = [Result("k", p, 1 / p, d, 4 * d) for p, d in [(10.0, 3.0), (30.0, 1.0), (20.0, 2.0)]]
    median = median_result(runs)
    assert (median.engine, median.prefill_tok_s, median.ttft_s, median.decode_b1_tok_s, median.decode_b8_tok_s) == \
        ("k", 20.0, 1 / 20, 2.0, 8.0)
    assert main(["bench", "speed", "tiny", "--rounds", "0"]) == 2
    assert "rounds=0: measure each engine at least once" in capsys.readouterr().err


def test_bench_shapes_mirror_real_configs() -> None:
    assert {name: shape["torch_dtype"] for name, shape in SHAPES.items() if name != "tiny"} == {
        "llm-jp-3.1-1.8b": "bfloat16", "rinna-3.6b": "float16", "jslm-3b-4e1t": "bfloat16", "gamma-7b": "bfloat16",
        "alpha-7b": "float32"}  # as each model is published: dtype auto benchmarks what users load
    assert ModelConfig.from_hf(SHAPES["gamma-7b"]).num_parameters() == 7_241_732_096  # Mistral-7B-v0.1
    jslm = ModelConfig.from_hf(SHAPES["jslm-3b-4e1t"])
    assert jslm.num_parameters() == 2_795_443_200  # the card's parameter count
    assert ModelConfig.from_hf(SHAPES["alpha-7b"]).intermediate_size == 11008


def test_shared_weights_give_the_same_logits() -> None:
    model, reference = build_shape("tiny", None, torch.float32, with_reference=True)
    ids = torch.randint(0, 1024, (1, 40))
    with torch.no_grad():
        assert (model(ids) - reference(ids).logits).abs().max() < 1e-4


def test_eval_perplexity_reports_each_method(checkpoints: dict, tmp_path, capsys: pytest.CaptureFixture) -> None:
    text = tmp_path / "heldout.txt"
    text.write_text("吾輩は猫である。名前はまだ無い。" * 20, encoding="utf-8")
    folder = checkpoints["llama"][0]
    assert main(["eval", "perplexity", str(folder), "--quantize", "int8,int4", "--data", str(text), "--json",
                 "--dtype", "float32"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    methods = [r["method"] for r in report["rows"]]
    assert methods == ["float32", "int8", "int4"]
    assert all(f"{m}: " in captured.err and "window" in captured.err for m in methods)  # a progress bar per method
    base, int8, int4 = (r["perplexity"] for r in report["rows"])
    assert 1 < base < 10 * 439  # a random model over a 439-token vocabulary is near uniform
    assert abs(int8 / base - 1) < 0.05  # int8 barely moves it (see test_quantize for the bound)
    assert int4 > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_tiny_on_cuda(capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", "speed", "tiny", "--compare", "transformers", "--quantize", "int8,int4", "--prompt-tokens", "64",
                 "--new-tokens", "4", "--device", "cuda", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["device"].startswith("cuda") and report["gpu"] and report["peak_gpu_gb"] > 0
    assert not report["half_kernel"]  # kataru's CPU kernels have no part on a GPU
    assert [r["engine"] for r in report["results"]] == ["kataru", "kataru int8", "kataru int4", "transformers"]
    for r in report["results"]:
        assert r["prefill_tok_s"] > 0 and r["decode_b1_tok_s"] > 0 and r["decode_b8_tok_s"] > 0
