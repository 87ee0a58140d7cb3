"""One serving process's state: its settings, and the model (loaded in the background), its engine and metrics."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kataru.errors import KataruError
from kataru.llm import LLM
from kataru.serve.metrics import Metrics
from kataru.serve.protocol import APIError

log = logging.getLogger("kataru.serve")


@dataclass
class Settings:
    served_model_name: str
    api_keys: list[str] = field(default_factory=list)
    max_queue: int = 256  # requests waiting for a row at most; more get 429
    max_body_bytes: int = 4 << 20
    log_prompts: bool = False
    metrics_public: bool = False


class Server:
    """One serving process: the model (loaded in the background), its engine, the metrics."""

    def __init__(self, load: Callable[[], LLM], settings: Settings) -> None:
        self.load, self.settings = load, settings
        self.llm: LLM | None = None
        self.failure: str | None = None
        self.created = int(time.time())
        self.metrics = Metrics(lambda: self.llm.engine.stats() if self.llm else None)

    def start_loading(self) -> None:
        def target() -> None:
            try:
                self.llm = self.load()
            except KataruError as err:
                self.failure = str(err)
                log.error("kataru: error: %s", err)
            except Exception as err:
                self.failure = f"{type(err).__name__}: {err}"
                log.exception("loading the model failed")

        threading.Thread(target=target, name="kataru-load", daemon=True).start()

    def ready(self) -> LLM:
        if self.llm is None:
            raise APIError(503, self.failure or "the model is still loading; retry when /health answers 200",
                           type="unavailable_error")
        return self.llm

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.settings.served_model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves "
                                f"`{self.settings.served_model_name}`", type="not_found_error", param="model",
                           code="model_not_found")
