"""`kataru.load(folder)`: a checkpoint folder becomes an LLM that prompts, samples and streams as its card says."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kataru.checkpoint import load_weights, resolve_device, resolve_dtype
from kataru.config import ModelConfig, read_config_file
from kataru.engine import Engine, compiled_decode, eager_decode
from kataru.errors import KataruError
from kataru.generation import SamplingParams, Step, decode_steps, find_stop, held_back
from kataru.prompts import Message, PromptStyle, detect_style, get_style
from kataru.quantize import load_quantized, read_quantization, save_quantized
from kataru.quantize import quantize as quantize_model
from kataru.tokenizer import StreamDecoder, Tokenizer

# The generate(...) arguments of each family's model card; generation_config.json fills the rest.
CARD_SAMPLING: dict[str, dict[str, Any]] = {
    "llama": {"do_sample": True, "top_p": 0.95, "temperature": 0.7, "repetition_penalty": 1.05, "max_new_tokens": 100},
    "gpt_neox": {"do_sample": True, "temperature": 0.7, "max_new_tokens": 128},
    "stablelm": {"do_sample": True, "temperature": 1.0, "top_p": 0.95, "max_new_tokens": 256},
    "mistral": {"do_sample": True, "temperature": 1.0, "top_p": 0.95, "max_new_tokens": 256},
    "japanese_stablelm_alpha": {"do_sample": True, "temperature": 1.0, "top_p": 0.95, "max_new_tokens": 128},
}
GENERATION_CONFIG_FIELDS = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens")

Prompt = str | list[Message]
# kataru's own small Japanese model, trained by scripts/train-kataru-tiny-ja.sh and shipped in the package.
DEFAULT_MODEL = Path(__file__).resolve().parent / "models" / "kataru-tiny-ja"


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class LLM:
    def __init__(self, folder: str | Path, dtype: str = "auto", device: str = "cpu", prompt_style: str | None = None,
                 progress: bool | None = None, quantize: str | None = None, compile: bool = False) -> None:
        folder = Path(folder)
        if not folder.is_dir():
            if folder == DEFAULT_MODEL:
                raise KataruError(f"the embedded model is missing from this installation ({folder}); "
                                  "reinstall kataru or pass a model folder")
            raise KataruError(f"model folder {folder} does not exist; give the path of a local checkpoint folder")
        self.folder = folder
        device = resolve_device(device)
        self.config = ModelConfig.from_hf(read_config_file(folder))
        self.dtype = resolve_dtype(dtype, self.config)
        self.tokenizer = Tokenizer(folder)
        saved_quantization = read_quantization(folder)
        if saved_quantization:
            self.model = load_quantized(folder, self.config, saved_quantization, device)
            self.dtype = self.model.tok_embeddings.weight.dtype
        else:
            self.model = load_weights(folder, self.config, self.dtype, device, progress)
            if quantize:
                quantize_model(self.model, quantize)
        self.quantization: str | None = getattr(self.model, "quantization", None)
        self.decode = compiled_decode(self.model) if compile else eager_decode(self.model)
        self.prompt_style: PromptStyle = (get_style(prompt_style) if prompt_style
                                          else detect_style(self.config.family, self.tokenizer))
        generation_config = self._generation_config()
        self.eos_ids = self._eos_ids(generation_config)
        card = {k: generation_config[k] for k in GENERATION_CONFIG_FIELDS if k in generation_config}
        card.update(CARD_SAMPLING[self.config.family])
        self.defaults = SamplingParams().updated(**card)

    def _generation_config(self) -> dict[str, Any]:
        path = self.folder / "generation_config.json"
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise KataruError(f"{path} is not valid JSON ({err}); fix or delete it") from None

    def _eos_ids(self, generation_config: dict[str, Any]) -> set[int]:
        ids = set(self.config.eos_token_ids)
        eos = generation_config.get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_id is not None:
            ids.add(self.tokenizer.eos_id)
        return ids

    def info(self) -> dict[str, Any]:
        c = self.config
        return {
            "path": str(self.folder.resolve()),
            "family": c.family,
            "parameters": c.num_parameters(),
            "dtype": str(self.dtype).removeprefix("torch."),
            "quantization": self.quantization,
            "checkpoint_dtype": c.torch_dtype,
            "context": c.max_seq_len,
            "layers": c.n_layer,
            "hidden": c.dim,
            "heads": c.n_head,
            "kv_heads": c.n_kv_head,
            "vocab": c.vocab_size,
            "prompt_style": self.prompt_style.name,
            "eos_token_ids": sorted(self.eos_ids),
            "sampling": asdict(self.defaults),
        }

    # --- prompts ---------------------------------------------------------------------------------
    def prompt_text(self, prompt: Prompt, inputs: str | None = None, system: str | None = None,
                    raw: bool = False) -> str:
        if raw:
            if not isinstance(prompt, str):
                raise KataruError("raw prompts are plain text, not messages")
            return prompt
        style = self.prompt_style
        return style.render(style.messages(prompt, inputs, system), self.tokenizer)

    def encode_prompt(self, prompt: Prompt, inputs: str | None = None, system: str | None = None,
                      raw: bool = False) -> list[int]:
        text = self.prompt_text(prompt, inputs, system, raw)
        add_special = True if raw else self.prompt_style.add_special_tokens  # raw: as the tokenizer says
        return self.tokenizer.encode(text, add_special_tokens=add_special)

    # --- generation ------------------------------------------------------------------------------
    def sampling(self, **overrides: Any) -> SamplingParams:
        if overrides.get("temperature") == 0:
            overrides["do_sample"] = False
        return self.defaults.updated(**overrides)

    def complete(self, prompts: list[Prompt], inputs: str | None = None, system: str | None = None,
                 raw: bool = False, use_cache: bool = True, **sampling: Any) -> list[Completion]:
        """Generate for a batch of prompts; each result is what that prompt gives alone."""
        params = self.sampling(**sampling)
        encoded = [self.encode_prompt(p, inputs, system, raw) for p in prompts]
        done: dict[int, Completion] = {}
        for row, _piece, completion in self._events(encoded, params, use_cache):
            if completion is not None:
                done[row] = completion
        return [done[i] for i in range(len(prompts))]

    def generate(self, prompt: Prompt | list[Prompt], inputs: str | None = None, system: str | None = None,
                 raw: bool = False, **sampling: Any) -> str | list[str]:
        """Text for one prompt (str or messages), or a list of texts for a list of prompts."""
        batch = isinstance(prompt, list) and bool(prompt) and not isinstance(prompt[0], dict)
        prompts: list[Prompt] = list(prompt) if batch else [prompt]  # type: ignore[arg-type]
        texts = [c.text for c in self.complete(prompts, inputs, system, raw, **sampling)]
        return texts if batch else texts[0]

    def stream(self, prompt: Prompt, inputs: str | None = None, system: str | None = None, raw: bool = False,
               **sampling: Any) -> Iterator[str]:
        """Text pieces as tokens come, each made of whole characters."""
        params = self.sampling(**sampling)
        encoded = [self.encode_prompt(prompt, inputs, system, raw)]
        for _row, piece, _completion in self._events(encoded, params, True):
            if piece:
                yield piece

    def _engine(self, batch: int, row_len: int) -> Engine:
        """The engine of the last call, grown if needed: its rows keep their prefixes, so the next chat turn
        prefills only the new tokens. Rows grow in steps of 256 slots to avoid a copy per turn."""
        row_len = min(-(-row_len // 256) * 256, self.config.max_seq_len)
        engine = getattr(self, "_last_engine", None)
        if engine is not None and engine.model.cache_owner in (engine, None) and not engine.has_work():
            if engine.max_batch < batch or engine.row_len < row_len:
                engine.grow(batch, row_len)
            engine.eos_ids, engine.decode_fn = self.eos_ids, self.decode  # both may have been changed since
            return engine
        self._last_engine = Engine(self.model, self.eos_ids, max_batch=batch, decode=self.decode, row_len=row_len)
        return self._last_engine

    def _events(self, prompts: list[list[int]], params: SamplingParams,
                use_cache: bool) -> Iterator[tuple[int, str, Completion | None]]:
        """(row, new text, completion when the row ends) for every step of every row."""
        style, stops = self.prompt_style, params.stop
        decoders = [StreamDecoder(self.tokenizer) for _ in prompts]
        texts = [""] * len(prompts)
        emitted = [0] * len(prompts)
        generated: list[list[int]] = [[] for _ in prompts]
        finished: set[int] = set()
        if use_cache:
            engine = self._engine(len(prompts), max(min(len(p) + params.max_new_tokens, self.config.max_seq_len)
                                                    for p in prompts))
            requests = [engine.submit(p, params) for p in prompts]
            row_of = {r.id: i for i, r in enumerate(requests)}
            steps: Iterator[Step] = (replace(s, row=row_of[s.row]) for s in _engine_steps(engine))
        else:  # the no-cache path recomputes everything each step: the reference the tests compare with
            steps = decode_steps(self.model, prompts, [params] * len(prompts), self.eos_ids, False, finished)
        for step in steps:
            row = step.row
            generated[row].append(step.token_id)
            reason = step.finish_reason
            ends_with_eos = reason == "stop"
            if not ends_with_eos:
                texts[row] += style.postprocess(decoders[row].push(step.token_id))
            cut = find_stop(texts[row], stops) if stops else None
            if cut is not None:
                reason = "stop"
                finished.add(row)
                if use_cache:
                    engine.cancel(requests[row])
            if reason is None:
                visible = len(texts[row]) - held_back(texts[row], stops)
                if visible > emitted[row]:
                    yield row, texts[row][emitted[row]:visible], None
                    emitted[row] = visible
                continue
            # The streamed text is the text: pieces joined always equal the completion.
            final = texts[row] if cut is not None else texts[row] + style.postprocess(decoders[row].flush())
            cut = find_stop(final, stops) if stops else None
            if cut is not None:
                final, reason = final[:cut], "stop"
            completion = Completion(final, generated[row], prompts[row], reason)
            yield row, final[emitted[row]:], completion
            emitted[row] = len(final)

    def save_quantized(self, out: str | Path) -> Path:
        """Write a quantized copy of this checkpoint folder that kataru loads back as it is."""
        if not self.quantization:
            raise KataruError("this model is not quantized; load it with quantize='int8' or 'int4' first")
        return save_quantized(self.model, self.folder, Path(out))

    # --- scoring ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def logits(self, token_ids: list[list[int]]) -> Tensor:
        """float32 logits [batch, seq, vocab]; shorter rows are right-padded (their tail is padding)."""
        if not token_ids or not all(token_ids):
            raise KataruError("logits() needs a non-empty list of non-empty token id lists")
        width = max(len(ids) for ids in token_ids)
        if width > self.config.max_seq_len:
            raise KataruError(f"a sequence of {width} tokens is longer than the model's context of "
                              f"{self.config.max_seq_len}; shorten it")
        vocab = self.config.vocab_size
        bad = [i for ids in token_ids for i in ids if not 0 <= i < vocab]
        if bad:
            raise KataruError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
        device = self.model.tok_embeddings.weight.device
        tokens = torch.zeros(len(token_ids), width, dtype=torch.long, device=device)
        for row, ids in enumerate(token_ids):
            tokens[row, :len(ids)] = torch.tensor(ids)
        return self.model(tokens).float()


def _engine_steps(engine: Engine) -> Iterator[Step]:
    while engine.has_work():
        yield from engine.step()


def load(folder: str | Path | None = None, dtype: str = "auto", device: str = "cpu", prompt_style: str | None = None,
         progress: bool | None = None, quantize: str | None = None, compile: bool = False) -> LLM:
    """Load a local Hugging Face checkpoint folder (nothing is downloaded); quantize: int8 or int4.

    compile: run the one-token decode step through torch.compile (eager fallback when unavailable).

    With no folder, the embedded kataru-tiny-ja model that ships inside the package.
    """
    return LLM(DEFAULT_MODEL if folder is None else folder, dtype=dtype, device=device, prompt_style=prompt_style,
               progress=progress, quantize=quantize, compile=compile)

