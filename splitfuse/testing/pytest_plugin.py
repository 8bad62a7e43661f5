"""pytest options of the conformance kit, active wherever splitfuse is installed (a `pytest11`
entry point): `pytest --pyargs splitfuse.testing.conformance --splitfuse-backend NAME`.

Only options, a marker, a report header and one fixture for plugin tests live here, so loading this
in every pytest run costs nothing; the conformance fixtures and checks are in
`splitfuse.testing.conformance`.
"""

from __future__ import annotations

import pytest

OPTIONS = ("--splitfuse-backend", "--splitfuse-arch", "--splitfuse-arch-config", "--splitfuse-quick")
# what selects backends and plugins from the shell; a plugin test must not depend on it
PLUGIN_ENVIRONMENT = ("SPLITFUSE_BACKEND", "SPLITFUSE_PLUGINS", "SPLITFUSE_DISABLE_PLUGINS")


@pytest.fixture
def splitfuse_fresh_plugins(monkeypatch):
    """Plugins loaded afresh for the test and forgotten after it (what it registers goes with them),
    whatever the shell's SPLITFUSE_BACKEND, SPLITFUSE_PLUGINS and SPLITFUSE_DISABLE_PLUGINS say."""
    from splitfuse.plugins import reset_plugin_manager

    for var in PLUGIN_ENVIRONMENT:
        monkeypatch.delenv(var, raising=False)
    reset_plugin_manager()
    yield
    reset_plugin_manager()


def pytest_addoption(parser) -> None:
    group = parser.getgroup("splitfuse", "splitfuse conformance kit (pytest --pyargs splitfuse.testing.conformance)")
    group.addoption(
        "--splitfuse-backend", default=None, metavar="NAME",
        help="backend to check: its ops against the cpu reference ops, then a tiny model end to end "
             "against Hugging Face transformers (default: cpu)")
    group.addoption(
        "--splitfuse-arch", default=None, metavar="NAME",
        help="model architecture to check against Hugging Face transformers: an HF architecture name "
             "(GPT2LMHeadModel) or a splitfuse.testing tiny-model key (llama); given alone, the backend "
             "ops are not checked (default: llama)")
    group.addoption(
        "--splitfuse-arch-config", default=None, metavar="JSON",
        help="config values for the architecture's tiny checkpoint, passed to make_tiny_model, e.g. "
             "'{\"initializer_range\": 0.2}' where the defaults give a model that barely tells tokens apart")
    group.addoption(
        "--splitfuse-quick", action="store_true", default=False,
        help="a small subset of shapes and prompts, for slow backends (the cuda backend under the Triton "
             "interpreter)")


def pytest_report_header(config) -> str | None:
    if not any(config.getoption(o.lstrip("-").replace("-", "_"), default=None) for o in OPTIONS):
        return None
    from splitfuse.testing.conformance.target import target_from_config

    return target_from_config(config).describe()


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "splitfuse_full: a conformance case left out by --splitfuse-quick")
