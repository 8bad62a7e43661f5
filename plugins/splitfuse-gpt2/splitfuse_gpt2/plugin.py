"""The entry point splitfuse loads (`[project.entry-points.splitfuse]` in pyproject.toml)."""

from splitfuse.plugins import hookimpl

SPLITFUSE_API_VERSION = 2  # the plugin API this was written for; another major version is refused


@hookimpl
def splitfuse_register_models(registry) -> None:
    # Imported here, not at module level: listing plugins stays cheap.
    from splitfuse_gpt2.model import GPT2LMHeadModel

    registry.add("GPT2LMHeadModel", GPT2LMHeadModel)
