"""Registers the built-in model architectures through the same hook plugins use."""

from splitfuse.plugins.hookspecs import hookimpl


@hookimpl
def splitfuse_register_models(registry) -> None:
    from splitfuse.models.llama import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

    registry.add("LlamaForCausalLM", LlamaForCausalLM)
    registry.add("MistralForCausalLM", MistralForCausalLM)
    registry.add("Qwen2ForCausalLM", Qwen2ForCausalLM)

    from splitfuse.models.moe import MixtralForCausalLM, Qwen2MoeForCausalLM
    from splitfuse.models.phi3 import Phi3ForCausalLM
    from splitfuse.models.qwen3 import Qwen3ForCausalLM

    registry.add("MixtralForCausalLM", MixtralForCausalLM)
    registry.add("Qwen2MoeForCausalLM", Qwen2MoeForCausalLM)
    registry.add("Qwen3ForCausalLM", Qwen3ForCausalLM)
    registry.add("Phi3ForCausalLM", Phi3ForCausalLM)

    from splitfuse.models.falcon import FalconForCausalLM
    from splitfuse.models.gemma2 import Gemma2ForCausalLM
    from splitfuse.models.opt import OPTForCausalLM
    from splitfuse.models.phi import PhiForCausalLM

    registry.add("PhiForCausalLM", PhiForCausalLM)
    registry.add("FalconForCausalLM", FalconForCausalLM)
    registry.add("OPTForCausalLM", OPTForCausalLM)
    registry.add("Gemma2ForCausalLM", Gemma2ForCausalLM)
