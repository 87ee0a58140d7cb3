"""Read a Hugging Face checkpoint folder into kataru's Transformer, one weight layout per family.

Each layout is a plan: every kataru tensor is a row-wise concatenation of row ranges of published
tensors (fused q/k/v and gate/up, NeoX's per-head interleaved qkv, Alpha's packed MLP are all just row
ranges). The plan also tells which tensors the files must hold, so a missing or stray tensor is named.

Rows are copied straight into the preallocated kataru tensor in small chunks, converting dtype on the
way. safetensors files are read with positional reads rather than memory mapping: mapped pages of the
source would count against memory until the file is closed, and loading bf16 weights from an fp32 file
would then peak at three times the model. .bin files go through `torch.load(weights_only=True,
mmap=True)`, which never runs pickled code.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path

import torch
from torch import Tensor

from kataru.config import ModelConfig
from kataru.errors import KataruError
from kataru.files import read_json
from kataru.model import Transformer

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
CHUNK_BYTES = 16 << 20

# Non-parameter buffers that older uploads keep in their state dict; everything else must be used.
IGNORED_BUFFERS = re.compile(r"\.rotary_emb\.(inv_freq|scale)$|\.attention\.(bias|masked_bias)$")

Segment = tuple[str, int, int]  # (published tensor, first row, end row)


def weight_plan(config: ModelConfig) -> dict[str, list[Segment]]:
    """kataru tensor name -> the row ranges of published tensors it is made of, in order.

    Every published tensor is used whole, once (its ranges tile it), so the plan read backwards is the
    export map (`train/export.py`) and the loader can check each file tensor's rows against config.json.
    """
    plan: dict[str, list[Segment]] = {}
    family, d, vocab = config.family, config.dim, config.vocab_size
    q, kv, ff = config.q_size, config.kv_size, config.intermediate_size

    def add(name: str, *parts: tuple[str, int]) -> None:
        """name is the published tensors stacked, each (name, rows) taken whole."""
        plan[name] = [(source, 0, rows) for source, rows in parts]

    def norm(kataru: str, hf: str, affine: bool = True) -> None:
        if affine:
            add(f"{kataru}.weight", (f"{hf}.weight", d))
            if config.norm_bias:
                add(f"{kataru}.bias", (f"{hf}.bias", d))

    def neox_qkv(name: str, source: str) -> None:
        """NeoX fuses qkv per head ([q0 k0 v0 q1 k1 v1 …]); kataru keeps [q; k; v]."""
        hd = config.head_dim
        plan[name] = [(source, (3 * h + i) * hd, (3 * h + i + 1) * hd) for i in range(3) for h in range(config.n_head)]

    if family in ("llama", "mistral", "stablelm"):
        add("tok_embeddings.weight", ("model.embed_tokens.weight", vocab))
        for i in range(config.n_layer):
            p, k = f"model.layers.{i}", f"layers.{i}"
            norm(f"{k}.attention_norm", f"{p}.input_layernorm")
            norm(f"{k}.ffn_norm", f"{p}.post_attention_layernorm")
            qkv = [(f"{p}.self_attn.{x}_proj", rows) for x, rows in (("q", q), ("k", kv), ("v", kv))]
            add(f"{k}.attention.wqkv.weight", *((f"{name}.weight", rows) for name, rows in qkv))
            if config.qkv_bias:
                add(f"{k}.attention.wqkv.bias", *((f"{name}.bias", rows) for name, rows in qkv))
            add(f"{k}.attention.wo.weight", (f"{p}.self_attn.o_proj.weight", d))
            if config.o_bias:
                add(f"{k}.attention.wo.bias", (f"{p}.self_attn.o_proj.bias", d))
            add(f"{k}.feed_forward.w1.weight", (f"{p}.mlp.gate_proj.weight", ff), (f"{p}.mlp.up_proj.weight", ff))
            add(f"{k}.feed_forward.w2.weight", (f"{p}.mlp.down_proj.weight", d))
            if config.mlp_bias:
                add(f"{k}.feed_forward.w1.bias", (f"{p}.mlp.gate_proj.bias", ff), (f"{p}.mlp.up_proj.bias", ff))
                add(f"{k}.feed_forward.w2.bias", (f"{p}.mlp.down_proj.bias", d))
        norm("norm", "model.norm")
        head = "lm_head.weight"
    else:  # gpt_neox and japanese_stablelm_alpha share NeoX naming
        alpha = family == "japanese_stablelm_alpha"
        root = "transformer" if alpha else "gpt_neox"
        add("tok_embeddings.weight", (f"{root}.embed_in.weight", vocab))
        for i in range(config.n_layer):
            p, k = f"{root}.layers.{i}", f"layers.{i}"
            norm(f"{k}.attention_norm", f"{p}.input_layernorm", affine=config.attn_norm_affine)
            norm(f"{k}.ffn_norm", f"{p}.post_attention_layernorm")
            neox_qkv(f"{k}.attention.wqkv.weight", f"{p}.attention.query_key_value.weight")
            add(f"{k}.attention.wo.weight", (f"{p}.attention.dense.weight", d))
            if config.qkv_bias:
                neox_qkv(f"{k}.attention.wqkv.bias", f"{p}.attention.query_key_value.bias")
            if config.o_bias:
                add(f"{k}.attention.wo.bias", (f"{p}.attention.dense.bias", d))
            if alpha:  # packed as [up; gate], kataru keeps [gate; up]
                packed = f"{p}.mlp.packed_input_proj.weight"
                plan[f"{k}.feed_forward.w1.weight"] = [(packed, ff, 2 * ff), (packed, 0, ff)]
                add(f"{k}.feed_forward.w2.weight", (f"{p}.mlp.out_proj.weight", d))
            else:
                for kataru_name, hf, rows in (("w1", "dense_h_to_4h", ff), ("w2", "dense_4h_to_h", d)):
                    add(f"{k}.feed_forward.{kataru_name}.weight", (f"{p}.mlp.{hf}.weight", rows))
                    add(f"{k}.feed_forward.{kataru_name}.bias", (f"{p}.mlp.{hf}.bias", rows))
        norm("norm", f"{root}.final_layer_norm")
        head = "embed_out.weight"
    if not config.tie_embeddings:
        add("output.weight", (head, vocab))
    return plan


def source_rows(plan: dict[str, list[Segment]]) -> dict[str, int]:
    """The rows each published tensor must have: the end of its last range (the ranges tile it)."""
    rows: dict[str, int] = {}
    for segments in plan.values():
        for source, _, end in segments:
            rows[source] = max(rows.get(source, 0), end)
    return rows


def optional_tensors(config: ModelConfig) -> set[str]:
    """Tensors a file may hold that kataru does not need (a saved copy of a tied head)."""
    return {"lm_head.weight", "embed_out.weight"} if config.tie_embeddings else set()


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__


class SafetensorsFile:
    """Header and row-range reads of one .safetensors file, without memory mapping it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        size = path.stat().st_size
        self.file = open(path, "rb")  # closed by the ExitStack of WeightFiles
        try:
            header_len = int.from_bytes(self.file.read(8), "little")
            if size < 8 or header_len > size - 8:
                raise ValueError("header length beyond the end of the file")
            header = json.loads(self.file.read(header_len))
            header.pop("__metadata__", None)
            self.base = 8 + header_len
            self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int]] = {}
            for name, entry in header.items():
                dtype = SAFETENSORS_DTYPES[entry["dtype"]]
                shape = tuple(entry["shape"])
                begin, end = entry["data_offsets"]
                numel = 1
                for n in shape:
                    numel *= n
                if end - begin != numel * dtype.itemsize:
                    raise ValueError(f"tensor {name} has {end - begin} bytes for shape {list(shape)}")
                if self.base + end > size:
                    raise ValueError(f"tensor {name} ends past the end of the file")
                self.entries[name] = (dtype, shape, self.base + begin)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
            self.file.close()
            raise KataruError(f"weight file {path.name} is truncated or corrupt ({_first_line(err)}); "
                              "copy it again") from None

    def close(self) -> None:
        self.file.close()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name][0]

    def rows(self, name: str, start: int, end: int, scratch: Tensor) -> Tensor:
        """Rows [start, end) read into the front of scratch (one reused buffer: no allocator churn)."""
        dtype, shape, offset = self.entries[name]
        row_bytes = dtype.itemsize
        for n in shape[1:]:
            row_bytes *= n
        buffer = scratch[: (end - start) * row_bytes]
        view = memoryview(buffer.numpy())
        read = os.preadv(self.file.fileno(), [view], offset + start * row_bytes)
        if read != len(view):
            raise KataruError(f"weight file {self.path.name} is truncated; copy it again")
        return buffer.view(dtype).view(end - start, *shape[1:])


class StateDict:
    """Tensors already in memory (a transformers model's state_dict), read like a file."""

    def __init__(self, state: dict[str, Tensor]) -> None:
        self.state = state
        self.entries = state

    def close(self) -> None:
        self.state = {}

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.state[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.state[name].dtype

    def rows(self, name: str, start: int, end: int, scratch: Tensor) -> Tensor:
        return self.state[name][start:end]


class BinFile(StateDict):
    """A pytorch_model*.bin state dict, loaded with weights_only=True (memory mapped when torch's zip format)."""

    def __init__(self, path: Path) -> None:
        # torch's zip format (torch >= 1.6) is memory mapped; the legacy format, which many older uploads use,
        # cannot be, and is read whole (still weights_only: no pickled code runs)
        mmap = zipfile.is_zipfile(path)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError … for a bad file
            message = _first_line(err)
            if "weights_only" in message or "Unpickl" in type(err).__name__:
                raise KataruError(f"{path.name} holds more than tensors and kataru never executes pickled code; "
                                  "convert the checkpoint to safetensors") from None
            raise KataruError(f"weight file {path.name} is truncated or corrupt ({message}); copy it again") from None
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise KataruError(f"{path.name} does not hold a state dict of tensors; convert it to safetensors")
        super().__init__(state)


class WeightFiles:
    """Every tensor of a checkpoint folder, by name."""

    def __init__(self, folder: Path, stack: ExitStack, state: dict[str, Tensor] | None = None) -> None:
        self.folder = folder
        self.scratch = torch.empty(0, dtype=torch.uint8)
        self.location: dict[str, SafetensorsFile | StateDict] = {}
        handles = [StateDict(state)] if state is not None else [
            SafetensorsFile(path) if path.suffix == ".safetensors" else BinFile(path) for path in self._files()]
        for handle in handles:
            stack.callback(handle.close)
            for name in handle.entries:
                self.location.setdefault(name, handle)

    def _files(self) -> list[Path]:
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = self.folder / index_name
            if index.is_file():
                weight_map = read_json(index, "restore it from the checkpoint").get("weight_map")
                if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                    raise KataruError(f"{index} is not a valid index file (no weight_map of file names); restore it "
                                      "from the checkpoint")
                shards = sorted(set(weight_map.values()))
                missing = [s for s in shards if not (self.folder / s).is_file()]
                if missing:
                    raise KataruError(f"shard {missing[0]} listed in {index_name} is missing from {self.folder}; "
                                      "download or copy every shard of the checkpoint")
                return [self.folder / s for s in shards]
        found = sorted(self.folder.glob("*.safetensors")) or sorted(self.folder.glob("pytorch_model*.bin"))
        if not found:
            raise KataruError(f"no weights in {self.folder}: expected model.safetensors, sharded *.safetensors "
                              "with an index, or pytorch_model.bin")
        return found

    def check_names(self, config: ModelConfig, needed: set[str]) -> None:
        def listed(names: list[str]) -> str:
            return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

        missing = sorted(needed - self.location.keys())
        if missing:
            raise KataruError(f"checkpoint {self.folder} lacks tensor(s) {listed(missing)} that a {config.family} "
                              f"model with {config.n_layer} layers needs; the weights do not match config.json "
                              "or a shard is missing")
        unused = self.location.keys() - needed - optional_tensors(config)
        extra = sorted(n for n in unused if not IGNORED_BUFFERS.search(n))
        if extra:
            raise KataruError(f"checkpoint {self.folder} has unexpected tensor(s) {listed(extra)}; the weights do "
                              "not match config.json (wrong architecture or layer count)")

    def fill(self, target: Tensor, name: str, segments: list[Segment], rows: dict[str, int]) -> None:
        """Copy the segments' rows into target in chunks, converting dtype on the way; `rows` says how many rows
        each published tensor has (all of them are used)."""
        sources = list(dict.fromkeys(s for s, _, _ in segments))  # NeoX qkv names one tensor 3 x heads times
        row = 0
        for source, start, end in segments:
            handle = self.location[source]
            shape, dtype = handle.shape(source), handle.dtype(source)
            if not dtype.is_floating_point:
                raise KataruError(f"tensor {source} has dtype {dtype}, not floating point; the checkpoint is "
                                  "quantized or corrupt and kataru reads float32/bfloat16/float16 weights")
            if tuple(shape[1:]) != tuple(target.shape[1:]) or shape[0] != rows[source] \
                    or row + end - start > target.shape[0]:
                shapes = ", ".join(f"{s} {tuple(self.location[s].shape(s))}" for s in sources)
                raise KataruError(f"shape mismatch: {shapes} cannot make {name} {tuple(target.shape)} that "
                                  "config.json implies; the weights do not match config.json")
            row_bytes = max(1, dtype.itemsize * (target[0].numel() if target.dim() > 1 else 1))
            step = max(1, CHUNK_BYTES // row_bytes)
            if self.scratch.numel() < step * row_bytes:
                self.scratch = torch.empty(step * row_bytes, dtype=torch.uint8)
            for first in range(start, end, step):
                last = min(end, first + step)
                target[row:row + last - first].copy_(handle.rows(source, first, last, self.scratch))
                row += last - first
        if row != target.shape[0]:
            raise KataruError(f"shape mismatch: {', '.join(sources)} give {row} rows for {name}, "
                              f"config.json implies {target.shape[0]}; the weights do not match config.json")


def load_weights(folder: Path, config: ModelConfig, dtype: torch.dtype, device: str = "cpu",
                 progress: bool | None = None, state_dict: dict[str, Tensor] | None = None) -> Transformer:
    """Build the model on the meta device, then fill it tensor by tensor from the files.

    With state_dict (tensors under the published names, e.g. a transformers model's), read from it instead.
    """
    plan = weight_plan(config)
    model = Transformer.empty(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state: dict[str, Tensor] = {}
    with ExitStack() as stack:
        files = WeightFiles(folder, stack, state_dict)
        rows = source_rows(plan)
        files.check_names(config, set(rows))
        for name, segments in _progress(plan.items(), len(plan), progress):
            target = torch.empty(shapes[name], dtype=dtype, device=device)
            files.fill(target, name, segments, rows)
            state[name] = target
    if config.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.rotary = model.rotary.to(device)
    return model.eval().requires_grad_(False)


def _progress(items: Iterable, total: int, progress: bool | None) -> Iterator:
    if progress is False:
        return iter(items)
    from tqdm import tqdm

    # disable=None hides the bar when stderr is not a terminal (tests, pipes, CI).
    return iter(tqdm(items, total=total, desc="loading weights", unit="tensor", leave=False,
                     disable=None if progress is None else False))
