"""padengine: Personalized Alignment at Decoding-time (PAD) served by a paged-KV, continuously batched engine."""
from padengine.engine.llm_engine import Engine
from padengine.engine.sequence import RequestMetrics, RequestOutput
from padengine.errors import EngineClosed, InvalidInput
from padengine.sampling_params import SamplingParams

__all__ = ["Engine", "SamplingParams", "RequestOutput", "RequestMetrics", "InvalidInput", "EngineClosed"]
