"""splitfuse: LLM serving with Dynamic SplitFuse on every accelerator."""

from splitfuse.config import EngineConfig, SamplingParams
from splitfuse.pipeline import Pipeline, Response, pipeline

__version__ = "0.1.0"


def serve(model=None, host: str = "127.0.0.1", port: int = 0, **kwargs):
    """Serve `model` over HTTP from a background thread; returns a ServerHandle (.url, .terminate())."""
    # Imported here so `import splitfuse` stays fast and does not load fastapi or uvicorn.
    from splitfuse.serving.server import serve as _serve

    return _serve(model, host, port, **kwargs)


__all__ = ["EngineConfig", "Pipeline", "Response", "SamplingParams", "__version__", "pipeline", "serve"]
