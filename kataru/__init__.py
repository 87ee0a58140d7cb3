"""kataru (語る): run, serve, evaluate and train Japanese instruction LLMs from local checkpoint folders."""

from kataru.errors import KataruError
from kataru.llm import LLM, Completion, load
from kataru.sampling import SamplingParams

__all__ = ["LLM", "Completion", "KataruError", "SamplingParams", "load"]
__version__ = "0.1.0"
