"""Plugin system: `from splitfuse.plugins import hookimpl` to write a backend or model plugin."""

from splitfuse.plugins.hookspecs import API_VERSION, hookimpl, hookspec
from splitfuse.plugins.manager import PluginManager, get_plugin_manager, reset_plugin_manager
from splitfuse.plugins.registry import BackendRegistry, ModelRegistry, PluginFailure

__all__ = [
    "API_VERSION", "BackendRegistry", "ModelRegistry", "PluginFailure", "PluginManager",
    "get_plugin_manager", "hookimpl", "hookspec", "reset_plugin_manager",
]
