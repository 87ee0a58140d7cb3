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
    assert_one_line_error(*run_cli(capsys, "bench", "tiny", "--device", "banana"), "unknown device")
    if not torch.cuda.is_available():
        assert_one_line_error(*run_cli(capsys, "generate", ckpt, "x", "--device", "cuda"), "sees no CUDA GPU",
                              "use device cpu")
        assert_one_line_error(*run_cli(capsys, "bench", "tiny", "--device", "cuda:0"), "sees no CUDA GPU")
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
