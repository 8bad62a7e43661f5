"""Registers the built-in model architectures through the same hook plugins use."""

from splitfuse.plugins.hookspecs import hookimpl


@hookimpl
def splitfuse_register_models(registry) -> None:
    from splitfuse.models.llama import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

    registry.add("LlamaForCausalLM", LlamaForCausalLM)
    registry.add("MistralForCausalLM", MistralForCausalLM)
    registry.add("Qwen2ForCausalLM", Qwen2ForCausalLM)
