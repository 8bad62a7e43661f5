"""Accelerator backends: the contract (`Backend`) and selection by name or priority."""

from splitfuse.backends.base import CONTRACT_VERSION, Backend
from splitfuse.backends.selection import BackendError, BackendInfo, backend_class, create_backend, list_backends

__all__ = [
    "CONTRACT_VERSION", "Backend", "BackendError", "BackendInfo", "backend_class", "create_backend", "list_backends",
]
