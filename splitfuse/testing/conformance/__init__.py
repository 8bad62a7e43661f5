"""Conformance kit: checks any backend against the cpu reference ops and any model architecture
against Hugging Face transformers. A plugin package runs it in its own CI with

    pytest --pyargs splitfuse.testing.conformance --splitfuse-backend NAME
    pytest --pyargs splitfuse.testing.conformance --splitfuse-arch GPT2LMHeadModel

(options come from splitfuse's pytest plugin; see docs/plugins.md).
"""
