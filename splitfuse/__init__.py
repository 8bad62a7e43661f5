"""splitfuse: LLM serving with Dynamic SplitFuse on every accelerator."""

from splitfuse.config import EngineConfig, SamplingParams
from splitfuse.pipeline import Pipeline, Response, pipeline

__version__ = "0.1.0"

__all__ = ["EngineConfig", "Pipeline", "Response", "SamplingParams", "__version__", "pipeline"]
