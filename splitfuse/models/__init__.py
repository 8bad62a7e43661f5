"""Model architectures (one file per family) and the Hugging Face directory loader."""

from splitfuse.models.base import CausalLM
from splitfuse.models.loader import LoadedModel, ModelLoadError, load_model, supported_architectures
from splitfuse.models.weight_tables import Weight, fused, weight_and_bias

__all__ = ["CausalLM", "LoadedModel", "ModelLoadError", "Weight", "fused", "load_model", "supported_architectures",
           "weight_and_bias"]
