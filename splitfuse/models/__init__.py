"""Model architectures (one file per family) and the Hugging Face directory loader."""

from splitfuse.models.base import CausalLM
from splitfuse.models.loader import LoadedModel, ModelLoadError, load_model, supported_architectures

__all__ = ["CausalLM", "LoadedModel", "ModelLoadError", "load_model", "supported_architectures"]
