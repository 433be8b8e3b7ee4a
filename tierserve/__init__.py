"""tierserve: an LLM inference and serving engine with a paged KV cache and continuous batching."""

from tierserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from tierserve.errors import InvalidRequestError
from tierserve.outputs import CompletionOutput, Logprob, RequestOutput
from tierserve.request import SamplingParams

__all__ = [
    "LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob",
    "EngineConfig", "ModelConfig", "CacheConfig", "SchedulerConfig", "InvalidRequestError",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # LLM pulls in torch; import it lazily so `import tierserve` stays light.
    if name == "LLM":
        from tierserve.engine.llm import LLM

        return LLM
    raise AttributeError(name)
