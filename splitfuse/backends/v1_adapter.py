"""Runs backends written for contract version 1 on version 2, keeping their version-1 behaviour.

In version 1 `rotary_attention` was `rotary()` then `self.attention()`, and a backend accelerated
attention by overriding `attention` (and `rotary_attention`). In version 2 both composites are
built from `write_kv`, `paged_attention` and `rotary_write_kv`, so `rotary_attention` would bypass
an overridden `attention`. The adapter registers a subclass that puts the version-1 composite back
wherever a version-1 class relies on it.
"""

from __future__ import annotations

from splitfuse.backends.base import CONTRACT_VERSION, Backend

# `api_version` is the name every plugin class may use; `contract_version` the one Backend carries
VERSION_ATTRIBUTES = ("api_version", "contract_version")
ADAPTED_NOTE = "contract v1, adapted"


def declared_version(cls: type) -> object | None:
    """The version a backend class declares in its own body or a base class below Backend; None if none."""
    for klass in cls.__mro__:
        if klass is Backend or klass is object:
            break
        for attr in VERSION_ATTRIBUTES:
            if attr in vars(klass):
                return vars(klass)[attr]
    return None


def overrides_attention(cls: type) -> bool:
    return issubclass(cls, Backend) and cls.attention is not Backend.attention


class _V1Composites(Backend):
    """Version 1's rotary_attention. Placed after the version-1 class in the adapted class's MRO,
    so that the class's own `super().rotary_attention(...)` reaches it too."""

    def rotary_attention(self, q, k, v, positions, cos_sin, kv_layer, meta, scale, sliding_window=None,
                         logit_softcap=None, rotary_dim=None, interleaved=False):
        q, k = self.rotary(q, k, positions, cos_sin, rotary_dim, interleaved)
        return self.attention(q, k, v, kv_layer, meta, scale, sliding_window, logit_softcap)


def adapt(cls: type) -> type:
    """A version-2 subclass of the version-1 backend class `cls` with its version-1 behaviour."""
    # Without an attention() override, version 1's rotary() then attention() computes exactly what
    # version 2's rotary_write_kv() then paged_attention() does, and the latter keeps any fused
    # building block a version-2 base class has.
    bases = (cls, _V1Composites) if overrides_attention(cls) else (cls,)
    namespace = {
        "__module__": cls.__module__, "__qualname__": cls.__qualname__, "__doc__": cls.__doc__,
        "contract_version": CONTRACT_VERSION, "adapted_from": cls,
    }
    return type(cls.__name__, bases, namespace)


def deprecation_message(name: str, cls: type, source: str) -> str:
    where = f" ({source})" if source else ""
    kept = ", its attention() override serving rotary_attention() as before" if overrides_attention(cls) else ""
    v = CONTRACT_VERSION
    return (f"backend {name!r}{where} is written for backend contract version 1 (deprecated) and runs through "
            f"the version-1 adapter{kept}. To port it: implement write_kv() and paged_attention() (and "
            f"rotary_write_kv() to fuse the rotary with the cache write) instead of overriding attention() or "
            f"rotary_attention(), and declare version {v} (SPLITFUSE_API_VERSION = {v} on the plugin module, or "
            f"contract_version = {v} on the class); see docs/backend-contract.md")
