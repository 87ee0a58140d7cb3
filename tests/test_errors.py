"""Every bad input gets one line naming the problem and the fix, and exit code 2 from the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kataru.cli import main


def run_cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    return code, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    assert err.startswith("kataru: error: ") and "\n" not in err and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


@pytest.fixture
def ckpt(checkpoints: dict, tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(checkpoints["llama"][0], folder)
    return folder


def edit_weights(folder: Path, change) -> None:  # type: ignore[no-untyped-def]
    path = folder / "model.safetensors"
    state = load_file(str(path))
    change(state)
    save_file(state, str(path), metadata={"format": "pt"})


def test_missing_folder_and_config(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    assert_one_line_error(*run_cli(capsys, "info", tmp_path / "nope"), "does not exist")
    assert_one_line_error(*run_cli(capsys, "info", tmp_path), "no config.json")
    (tmp_path / "config.json").write_text("{not json")
    assert_one_line_error(*run_cli(capsys, "info", tmp_path), "not valid JSON")


def test_unknown_architecture(capsys: pytest.CaptureFixture, ckpt: Path) -> None:
    config = json.loads((ckpt / "config.json").read_text())
    config["model_type"], config["architectures"] = "bert", ["BertForMaskedLM"]
    (ckpt / "config.json").write_text(json.dumps(config))
    assert_one_line_error(*run_cli(capsys, "info", ckpt), "unknown architecture", "'bert'", "llama")


def test_missing_and_extra_tensors_are_named(capsys: pytest.CaptureFixture, ckpt: Path) -> None:
    edit_weights(ckpt, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    assert_one_line_error(*run_cli(capsys, "info", ckpt), "lacks tensor(s) model.layers.1.mlp.up_proj.weight")
    edit_weights(ckpt, lambda s: s.update({"model.layers.1.mlp.up_proj.weight": torch.zeros(160, 64),
                                          "model.layers.7.self_attn.q_proj.weight": torch.zeros(64, 64)}))
    assert_one_line_error(*run_cli(capsys, "info", ckpt), "unexpected tensor(s) model.layers.7.self_attn.q_proj.weight")


def test_known_buffers_are_skipped(ckpt: Path) -> None:
    import kataru

    edit_weights(ckpt, lambda s: s.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(8)}))
    assert kataru.load(ckpt).config.n_layer == 2


def test_shape_mismatch(capsys: pytest.CaptureFixture, ckpt: Path) -> None:
    edit_weights(ckpt, lambda s: s.update({"model.layers.0.self_attn.o_proj.weight": torch.zeros(64, 32)}))
    assert_one_line_error(*run_cli(capsys, "info", ckpt), "shape mismatch", "model.layers.0.self_attn.o_proj.weight")


def test_truncated_safetensors_and_bin(capsys: pytest.CaptureFixture, ckpt: Path) -> None:
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert_one_line_error(*run_cli(capsys, "info", ckpt), "model.safetensors is truncated or corrupt")
    path.write_bytes(b"garbage")
    assert_one_line_error(*run_cli(capsys, "info", ckpt), "truncated or corrupt")
    path.unlink()
    torch.save({"model.embed_tokens.weight": torch.zeros(3)}, ckpt / "pytorch_model.bin")
    raw = (ckpt / "pytorch_model.bin").read_bytes()
    (ckpt / "pytorch_model.bin").write_bytes(raw[: len(raw) // 2])
    assert_one_line_error(*run_cli(capsys, "info", ckpt), "pytorch_model.bin is truncated or corrupt")


class Payload:
    """An object whose unpickling would run code; kataru must never unpickle it."""

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (print, ("pwned",))


def test_pickle_with_code_is_refused(capsys: pytest.CaptureFixture, ckpt: Path) -> None:
    (ckpt / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2), "x": Payload()}, ckpt / "pytorch_model.bin")
    code = main(["info", str(ckpt)])
    captured = capsys.readouterr()
    assert_one_line_error(code, captured.err.strip(), "never executes pickled code")
    assert "pwned" not in captured.out


def test_missing_shard_and_no_weights(capsys: pytest.CaptureFixture, tokenizer_dirs: dict, tmp_path: Path) -> None:
    from helpers import make_checkpoint

    make_checkpoint("llama", tokenizer_dirs, tmp_path, layout="sharded")
    capsys.readouterr()
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    shards[-1].unlink()
    assert_one_line_error(*run_cli(capsys, "info", tmp_path), f"shard {shards[-1].name}", "is missing")
    for f in tmp_path.glob("*.safetensors*"):
        f.unlink()
    assert_one_line_error(*run_cli(capsys, "info", tmp_path), "no weights")


def test_generation_errors(capsys: pytest.CaptureFixture, ckpt: Path) -> None:
    assert_one_line_error(*run_cli(capsys, "generate", ckpt, "猫" * 400), "longer than the model's context")
    assert_one_line_error(*run_cli(capsys, "generate", ckpt, "x", "--top-p", "1.5"), "invalid sampling parameter: top_p")
    assert_one_line_error(*run_cli(capsys, "generate", ckpt, "x", "--temperature", "-1"), "temperature")
    assert_one_line_error(*run_cli(capsys, "generate", ckpt, "x", "--dtype", "int3"), "unknown dtype")
    assert_one_line_error(*run_cli(capsys, "generate", ckpt, "x", "--prompt-style", "chatml"), "unknown prompt style")


def test_unusable_devices(capsys: pytest.CaptureFixture, ckpt: Path) -> None:
    assert_one_line_error(*run_cli(capsys, "generate", ckpt, "x", "--device", "banana"), "unknown device 'banana'")
    assert_one_line_error(*run_cli(capsys, "generate", ckpt, "x", "--device", "mps"), "'mps' is not supported")
    assert_one_line_error(*run_cli(capsys, "bench", "speed", "tiny", "--device", "banana"), "unknown device")
    if not torch.cuda.is_available():
        assert_one_line_error(*run_cli(capsys, "generate", ckpt, "x", "--device", "cuda"), "sees no CUDA GPU",
                              "use device cpu")
        assert_one_line_error(*run_cli(capsys, "bench", "speed", "tiny", "--device", "cuda:0"), "sees no CUDA GPU")
    else:
        count = torch.cuda.device_count()
        assert_one_line_error(*run_cli(capsys, "generate", ckpt, "x", "--device", f"cuda:{count}"),
                              f"only {count} CUDA device(s)")


def test_missing_tokenizer(capsys: pytest.CaptureFixture, ckpt: Path) -> None:
    (ckpt / "tokenizer.json").unlink()
    assert_one_line_error(*run_cli(capsys, "tokenize", ckpt, "x"), "no tokenizer")


def test_real_process_exit_code_and_no_traceback(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "kataru", "generate", str(tmp_path / "missing"), "x"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "does not exist" in result.stderr


ROOT = Path(__file__).resolve().parents[1]


def run_process(*args: str | bytes, stdin: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kataru", *args], input=stdin, capture_output=True, timeout=180,
                          cwd=ROOT)


def assert_process_one_line(result: subprocess.CompletedProcess, *fragments: str) -> None:
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert err.startswith("kataru: error: ") and err.strip().count("\n") == 0 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


def test_text_that_is_not_utf8_is_one_line(ckpt: Path) -> None:
    """Bytes that are not UTF-8, in the prompt argument (Python hands them over as lone surrogates) or on stdin."""
    assert_process_one_line(run_process(b"generate", bytes(ckpt), b"\xff\xfe caf\xe9"), "not UTF-8")
    assert_process_one_line(run_process("generate", str(ckpt), "-", stdin=b"\x82\xa0\x82\xa2"), "standard input",
                            "not UTF-8")


def test_generate_from_stdin_drops_the_final_newline(capsys: pytest.CaptureFixture, ckpt: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    main(["generate", str(ckpt), "吾輩は猫", "--json", "--max-new-tokens", "2"])
    from_argument = json.loads(capsys.readouterr().out)["prompt_token_ids"]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("吾輩は猫\n".encode())))
    main(["generate", str(ckpt), "-", "--json", "--max-new-tokens", "2"])
    assert json.loads(capsys.readouterr().out)["prompt_token_ids"] == from_argument


@pytest.mark.parametrize("config, fragment", [
    ([1, 2, 3], "holds a JSON list, not a JSON object"),
    ({"num_hidden_layers": -2}, "num_hidden_layers = -2; it must be a whole number of at least 1"),
    ({"hidden_size": "big"}, "hidden_size = 'big'"),
    ({"rope_theta": "ten thousand", "rope_parameters": None}, "wrong type or value"),
    ({"num_attention_heads": 0}, "num_attention_heads = 0; it must be a whole number of at least 1"),
    ({"num_key_value_heads": 3}, "must be a multiple of the second"),
    ({"rms_norm_eps": -1.0}, "rms_norm_eps / layer_norm_eps = -1.0; it must be a positive number"),
])
def test_a_config_of_the_wrong_shape_is_one_line(capsys: pytest.CaptureFixture, ckpt: Path, config: object,
                                                 fragment: str) -> None:
    path = ckpt / "config.json"
    if isinstance(config, dict):
        config = {**json.loads(path.read_text()), **config}
    path.write_text(json.dumps(config))
    assert_one_line_error(*run_cli(capsys, "info", ckpt), fragment)


def test_a_chat_template_that_is_not_jinja_is_one_line(capsys: pytest.CaptureFixture, ckpt: Path) -> None:
    path = ckpt / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["chat_template"] = "{% for message in messages %}{{ message['content'] }"
    path.write_text(json.dumps(config))
    assert_one_line_error(*run_cli(capsys, "generate", ckpt, "x"), "chat template is not valid Jinja",
                          "TemplateSyntaxError")


def test_sampling_values_that_would_break_a_step_are_one_line(capsys: pytest.CaptureFixture, ckpt: Path) -> None:
    assert_one_line_error(*run_cli(capsys, "generate", ckpt, "x", "--seed", str(2**63)), "seed must be")
    assert_one_line_error(*run_cli(capsys, "generate", ckpt, "x", "--temperature", "1e-40"),
                          "temperature must be 0 (greedy) or at least")
    assert_one_line_error(*run_cli(capsys, "generate", ckpt, "x", "--repetition-penalty", "1e300"),
                          "repetition_penalty must be in")
    assert_one_line_error(*run_cli(capsys, "chat", ckpt, "--top-p", "2"), "top_p")  # before the first message


def test_nan_logits_are_one_line_not_an_empty_answer(capsys: pytest.CaptureFixture, ckpt: Path) -> None:
    edit_weights(ckpt, lambda s: s["model.norm.weight"].fill_(float("nan")))
    for temperature in ("0", "1"):
        assert_one_line_error(*run_cli(capsys, "generate", ckpt, "x", "--temperature", temperature),
                              "NaN or infinite")


def test_output_piped_into_head_ends_without_a_traceback(ckpt: Path, tmp_path: Path) -> None:
    lines = tmp_path / "lines.txt"
    lines.write_text("吾輩は猫である。名前はまだ無い。\n" * 20000, encoding="utf-8")
    process = subprocess.Popen([sys.executable, "-m", "kataru", "tokenize", str(ckpt), "--file", str(lines)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    assert process.stdout is not None and process.stderr is not None
    process.stdout.read(10)  # as `| head -c 10` does, then the reader goes away
    process.stdout.close()
    err = process.stderr.read().decode()
    assert process.wait(timeout=120) == 2
    assert err.startswith("kataru: error: ") and "broken pipe" in err and "Traceback" not in err, err


def test_a_legacy_format_pytorch_model_bin_loads(ckpt: Path) -> None:
    """torch's pre-zip serialization (many older uploads) loads with weights_only, not memory mapped."""
    import kataru

    expected = kataru.load(ckpt, dtype="float32").logits([[5, 6, 7, 8]])
    state = load_file(str(ckpt / "model.safetensors"))
    (ckpt / "model.safetensors").unlink()
    torch.save(state, ckpt / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    import zipfile

    assert not zipfile.is_zipfile(ckpt / "pytorch_model.bin")
    assert torch.equal(kataru.load(ckpt, dtype="float32").logits([[5, 6, 7, 8]]), expected)


def test_data_inputs_and_failed_runs(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    assert_one_line_error(*run_cli(capsys, "data", "clean", tmp_path, "--out", tmp_path / "out"), "is a directory")
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"text": "短い"}) + "\n", encoding="utf-8")
    assert_one_line_error(*run_cli(capsys, "data", "clean", short, "--out", tmp_path / "out"),
                          "no training documents left")
    assert not list((tmp_path / "out").iterdir())  # no train.jsonl, no leftover *.tmp


def test_run_script_checks_the_folder_before_anything_runs(tmp_path: Path) -> None:
    result = subprocess.run([str(ROOT / "scripts" / "run.sh"), str(tmp_path / "llm-jp-typo"), "質問"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert "model folder" in result.stderr and "does not exist" in result.stderr
