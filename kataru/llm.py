"""`kataru.load(folder)`: a checkpoint folder becomes an LLM that prompts, samples and streams as its card says.

Every call goes through the LLM's one engine, so an LLM is safe to use from many threads and from
interleaved generators: their requests batch together, and each gets what it would get alone. The
engine's KV cache grows with what the calls need and shrinks back when they are done; its rows keep
whole prompt chunks, so the next turn of a chat prefills only what is new.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kataru import cards, dispatch
from kataru.checkpoint import load_weights
from kataru.config import ModelConfig, read_config_file
from kataru.engine import Engine, Request
from kataru.engine.speculate import DEFAULT_NGRAM, DEFAULT_TOKENS, Draft, Options, acceptance, check_draft, parse_method
from kataru.errors import KataruError
from kataru.files import read_json
from kataru.prompts import Message, PromptStyle, detect_style, get_style
from kataru.quantize import load_quantized, read_quantization, save_quantized
from kataru.quantize import quantize as quantize_model
from kataru.runtime import dtype_name, resolve_device, resolve_dtype
from kataru.sampling import SamplingParams
from kataru.tokenizer import Tokenizer

Prompt = str | list[Message]
# kataru's own small Japanese model, trained by recipes/train-kataru-tiny-ja.sh and shipped in the package.
DEFAULT_MODEL = Path(__file__).resolve().parent / "models" / "kataru-tiny-ja"


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str
    speculation: dict[str, Any] | None = None  # proposals verified and kept, when the request speculated

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class LLM:
    def __init__(self, folder: str | Path, dtype: str = "auto", device: str = "cpu", prompt_style: str | None = None,
                 progress: bool | None = None, quantize: str | None = None, compile: bool = False,
                 max_batch: int = 8, max_cache_tokens: int | None = None,
                 idle_cache_tokens: int | None = None, batch_invariant: bool = False, speculate: str | None = None,
                 speculate_tokens: int = DEFAULT_TOKENS, speculate_ngram: tuple[int, int] = DEFAULT_NGRAM,
                 idle_after: float | None = None) -> None:
        """max_batch: requests decoded together; max_cache_tokens: the KV cache's budget in tokens (default
        max_batch x the context); idle_cache_tokens: what the cache keeps when no call runs (default one
        context's worth, the conversation of a chat) once no call has run for idle_after seconds (None: at once);
        batch_invariant: one matmul path for every decode batch
        size, so that a request decodes to the same bits alone or batched (`kataru.dispatch`); speculate:
        "ngram" or "draft:FOLDER", speculative decoding for every call that does not say otherwise (greedy:
        the same tokens; sampling: the same distribution), with at most `speculate_tokens` proposals per step
        and prompt lookup over n-grams of speculate_ngram = (min, max) tokens."""
        folder = Path(folder)
        if not folder.is_dir():
            if folder == DEFAULT_MODEL:
                raise KataruError(f"the embedded model is missing from this installation ({folder}); "
                                  "reinstall kataru or pass a model folder")
            what = "is a file, not a folder" if folder.exists() else "does not exist"
            raise KataruError(f"model folder {folder} {what}; give the path of a local checkpoint folder")
        self.folder = folder
        device = resolve_device(device)
        hf_config = read_config_file(folder)
        self.config = ModelConfig.from_hf(hf_config)
        self.tokenizer = Tokenizer(folder)
        self.device, self.progress = device, progress
        self.model = load_model(folder, self.config, dtype, device, quantize, progress)
        self.dtype = self.model.tok_embeddings.weight.dtype
        self.quantization: str | None = getattr(self.model, "quantization", None)
        generation_config = read_json(folder / "generation_config.json", "fix or delete it", default={})
        self.prompt_style = prompt_style_of(folder, self.tokenizer, prompt_style)
        sampling, self.sampling_source = cards.defaults(folder, self.config.family, hf_config, generation_config)
        self.defaults = SamplingParams().updated(**sampling)
        method, draft_folder = parse_method(speculate)
        options = Options(None, speculate_tokens, *speculate_ngram).validate()  # bad numbers refused before a load
        if draft_folder is not None:
            options.draft = self._load_draft(draft_folder)
        options.method = None if method == "off" else method
        self.engine = Engine(self.model, self._eos_ids(generation_config), max_batch=max_batch,
                             max_cache_tokens=max_cache_tokens, compile=compile, tokenizer=self.tokenizer,
                             postprocess=self.prompt_style.postprocess, grow=True, batch_invariant=batch_invariant,
                             idle_cache_tokens=self.config.max_seq_len if idle_cache_tokens is None
                             else idle_cache_tokens, speculation=options.validate(), idle_after=idle_after)
        if options.method is not None:
            self.engine.speculator.prepare()  # the step costs measured now, not at the first request

    def _load_draft(self, folder: str | Path) -> Draft:
        """A draft checkpoint for speculation, in this model's dtype and quantization, refused in one line when its
        tokenizer is not this model's."""
        folder = Path(folder)
        if not folder.is_dir():
            raise KataruError(f"draft folder {folder} does not exist; give the path of a local checkpoint folder "
                              "with the model's tokenizer")
        config = ModelConfig.from_hf(read_config_file(folder))
        check_draft(self.tokenizer, Tokenizer(folder), self.config.vocab_size, config.vocab_size)
        model = load_model(folder, config, dtype_name(self.dtype), self.device, self.quantization
                           if getattr(self, "quantization", None) else None, self.progress)
        return Draft(model, str(folder))

    def _draft_for(self, folder: str) -> None:
        """The engine drafts with `folder` from now on (loaded at the first call that asks for it)."""
        draft = self.engine.speculator.draft
        if draft is None:
            self.engine.attach_draft(self._load_draft(folder))
        elif Path(draft.name).resolve() != Path(folder).resolve():
            raise KataruError(f"this model already drafts with {draft.name}; load another LLM to draft with {folder}")

    @property
    def eos_ids(self) -> set[int]:
        return self.engine.eos_ids

    @eos_ids.setter
    def eos_ids(self, ids: set[int]) -> None:
        self.engine.eos_ids = set(ids)

    def _eos_ids(self, generation_config: dict[str, Any]) -> set[int]:
        ids = set(self.config.eos_token_ids)
        eos = generation_config.get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else [])
        if self.tokenizer.eos_id is not None:
            ids.add(self.tokenizer.eos_id)
        return ids

    def info(self) -> dict[str, Any]:
        c = self.config
        stats = self.engine.stats()
        bytes_per_token = 2 * c.n_layer * c.kv_size * self.model.tok_embeddings.weight.element_size()
        return {
            "path": str(self.folder.resolve()),
            "family": c.family,
            "parameters": c.num_parameters(),
            "dtype": dtype_name(self.dtype),
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
            "sampling_source": self.sampling_source,
            "kv_cache": {"bytes_per_token": bytes_per_token, "bytes": stats["cache_bytes"],
                         "rows": stats["cache_rows"], "slots": stats["cache_slots"],
                         "budget_tokens": stats["budget_tokens"]},
            "cpu": dispatch.cpu(),
            "dispatch": {"mode": dispatch.mode(), "plan": dispatch.table(dispatch.plans_for(self.model))},
            "speculation": self.speculation_info(),
        }

    def speculation_info(self) -> dict[str, Any]:
        """The engine's speculation: method, proposals per step at most, n-gram lengths, draft, and the totals."""
        spec = self.engine.speculator
        o, totals = spec.options, spec.totals
        return {"method": o.method, "tokens": o.tokens, "ngram": [o.min_ngram, o.max_ngram],
                "draft": None if o.draft is None else o.draft.name, "drafts": totals["drafts"],
                **acceptance(totals["draft_tokens"], totals["accepted_tokens"])}

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
        if "speculate" in overrides:  # "ngram", "draft:FOLDER", "draft" (the loaded one), "off" or False, None
            value = overrides["speculate"]
            method, folder = ("draft", None) if value == "draft" else parse_method(value)
            if folder is not None:
                self._draft_for(folder)
            overrides["speculate"] = method
        return self.defaults.updated(**overrides)

    def complete(self, prompts: list[Prompt], inputs: str | None = None, system: str | None = None,
                 raw: bool = False, **sampling: Any) -> list[Completion]:
        """Generate for a batch of prompts; each result is what that prompt gives alone."""
        params = self.sampling(**sampling)
        encoded = [self.encode_prompt(p, inputs, system, raw) for p in prompts]
        requests = self._submit(encoded, params)
        try:
            for request in requests:
                self.engine.wait(request)
        finally:
            for request in requests:
                self.engine.cancel(request)  # a no-op for finished ones; frees the rest on an interrupt
        return [self._completion(r) for r in requests]

    def generate(self, prompt: Prompt | list[Prompt], inputs: str | None = None, system: str | None = None,
                 raw: bool = False, **sampling: Any) -> str | list[str]:
        """Text for one prompt (str or messages), or a list of texts for a list of prompts."""
        batch = isinstance(prompt, list) and (not prompt or not isinstance(prompt[0], dict))
        prompts: list[Prompt] = list(prompt) if batch else [prompt]  # type: ignore[arg-type]
        if not prompts:
            return []
        texts = [c.text for c in self.complete(prompts, inputs, system, raw, **sampling)]
        return texts if batch else texts[0]

    def stream(self, prompt: Prompt, inputs: str | None = None, system: str | None = None, raw: bool = False,
               **sampling: Any) -> Iterator[str]:
        """Text pieces as tokens come, each made of whole characters; they join to `generate`'s text."""
        (request,) = self._submit([self.encode_prompt(prompt, inputs, system, raw)], self.sampling(**sampling))
        sent = 0
        for _ in self.engine.follow(request):
            text = request.text  # read once: other callers' steps extend it while this generator waits
            if len(text) > sent:
                piece, sent = text[sent:], len(text)
                yield piece
        self._completion(request)  # raises the request's error, if it failed

    def _submit(self, prompts: list[list[int]], params: SamplingParams) -> list[Request]:
        requests: list[Request] = []
        try:
            for ids in prompts:
                requests.append(self.engine.submit(ids, params))
        except BaseException:
            for request in requests:
                self.engine.cancel(request)
            raise
        return requests

    @staticmethod
    def _completion(request: Request) -> Completion:
        if request.finish_reason == "error":
            raise KataruError(request.error or "the engine failed")
        assert request.finish_reason is not None
        spec = request.spec
        return Completion(request.text, list(request.tokens), request.prompt, request.finish_reason,
                          None if spec is None else {"method": spec.method, "steps": spec.steps,
                                                     **acceptance(spec.proposed, spec.accepted)})

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
        bad = [i for ids in token_ids for i in ids if isinstance(i, bool) or not isinstance(i, int)
               or not 0 <= i < vocab]
        if bad:
            raise KataruError(f"token id {bad[0]!r} is outside the vocabulary (0..{vocab - 1})")
        device = self.model.tok_embeddings.weight.device
        tokens = torch.zeros(len(token_ids), width, dtype=torch.long, device=device)
        for row, ids in enumerate(token_ids):
            tokens[row, :len(ids)] = torch.tensor(ids)
        return self.model(tokens).float()


def load_model(folder: Path, config: ModelConfig, dtype: str, device: str, quantize: str | None,
               progress: bool | None) -> Any:
    """A checkpoint folder's model on `device`, quantized as asked (or as a quantized folder was saved), with the
    dispatch plans of its layers made on the CPU (measured once per CPU)."""
    saved = read_quantization(folder)
    if saved:
        model = load_quantized(folder, config, saved, device, dtype, quantize)
    else:
        model = load_weights(folder, config, resolve_dtype(dtype, config), device, progress)
        if quantize:
            quantize_model(model, quantize)
    if torch.device(device).type == "cpu":  # which matmul path runs each kind of layer here (measured once per CPU)
        dispatch.prepare(model, progress=bool(progress))
    return model


def prompt_style_of(folder: Path, tokenizer: Tokenizer, name: str | None = None) -> PromptStyle:
    """The prompt style a checkpoint folder is used with: `name` when given, a seed card's, else what the
    tokenizer and the architecture say (a chat template, rinna's `<NL>`, alpaca-ja for StableLM and Mistral)."""
    if name:
        return get_style(name)
    hf_config = read_config_file(folder)
    family = ModelConfig.from_hf(hf_config).family
    card = cards.find_card(folder, family, hf_config)
    return get_style(card[0].prompt_style) if card else detect_style(family, tokenizer)


def load(folder: str | Path | None = None, dtype: str = "auto", device: str = "cpu", prompt_style: str | None = None,
         progress: bool | None = None, quantize: str | None = None, compile: bool = False,
         max_batch: int = 8, max_cache_tokens: int | None = None, idle_cache_tokens: int | None = None,
         batch_invariant: bool = False, speculate: str | None = None, speculate_tokens: int = DEFAULT_TOKENS,
         speculate_ngram: tuple[int, int] = DEFAULT_NGRAM, idle_after: float | None = None) -> LLM:
    """Load a local Hugging Face checkpoint folder (nothing is downloaded); quantize: int8 or int4.

    compile: run the one-token decode step through torch.compile (eager fallback when unavailable).
    speculate: "ngram" (prompt lookup) or "draft:FOLDER" (a smaller checkpoint with the same tokenizer):
    speculative decoding with the model's own tokens (greedy) or distribution (sampling); any call may pass
    speculate= too ("off" turns it off for that call).

    With no folder, the embedded kataru-tiny-ja model that ships inside the package.
    """
    return LLM(DEFAULT_MODEL if folder is None else folder, dtype=dtype, device=device, prompt_style=prompt_style,
               progress=progress, quantize=quantize, compile=compile, max_batch=max_batch,
               max_cache_tokens=max_cache_tokens, idle_cache_tokens=idle_cache_tokens, batch_invariant=batch_invariant,
               speculate=speculate, speculate_tokens=speculate_tokens, speculate_ngram=speculate_ngram,
               idle_after=idle_after)
