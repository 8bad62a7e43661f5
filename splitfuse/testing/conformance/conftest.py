"""Fixtures of the conformance kit: the backend under test, the reference, the dtypes and quantized
weight formats it declares."""

from __future__ import annotations

from pathlib import Path

import pytest

from splitfuse.quant.weights import FORMATS
from splitfuse.testing.conformance.target import Target, target_from_config
from splitfuse.testing.conformance.tolerances import DTYPES

_HERE = Path(__file__).parent


def _backend_class(backend_name: str):
    """The registered backend class, or None when unknown (the backend fixture then fails with the
    registry's message)."""
    from splitfuse.plugins import get_plugin_manager

    return get_plugin_manager().backends().get(backend_name)


def _declared_dtypes(backend_name: str) -> tuple:
    """The dtypes the backend class declares (all of them when it is unknown)."""
    cls = _backend_class(backend_name)
    return DTYPES if cls is None else tuple(d for d in DTYPES if d in cls.dtypes)


def _declared_quantized_formats(backend_name: str) -> tuple:
    """The QuantizedWeight formats the backend class claims `linear` runs (all when it is unknown)."""
    cls = _backend_class(backend_name)
    return FORMATS if cls is None else tuple(getattr(cls, "quantized_formats", ()))


def pytest_generate_tests(metafunc) -> None:
    if "dtype" in metafunc.fixturenames and Path(str(metafunc.definition.path)).parent == _HERE:
        dtypes = _declared_dtypes(target_from_config(metafunc.config).backend)
        metafunc.parametrize("dtype", dtypes, ids=[str(d).replace("torch.", "") for d in dtypes])


def pytest_collection_modifyitems(config, items) -> None:
    target = target_from_config(config)
    formats = _declared_quantized_formats(target.backend)
    keep, drop = [], []
    for item in items:
        ours = Path(str(item.path)).parent == _HERE
        ops_left_out = not target.check_ops and item.path.name == "test_backend_ops.py"
        full_only = target.quick and item.get_closest_marker("splitfuse_full") is not None
        # a quantized-linear check runs only for the formats the backend claims
        fmt = getattr(getattr(item, "callspec", None), "params", {}).get("fmt")
        unclaimed = fmt is not None and fmt not in formats
        (drop if ours and (ops_left_out or full_only or unclaimed) else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="session")
def target(request) -> Target:
    return target_from_config(request.config)


@pytest.fixture(scope="session")
def backend(target):
    """The backend under test; an unknown or unavailable one fails with the registry's listing."""
    from splitfuse.backends import create_backend

    return create_backend(target.backend)


@pytest.fixture(scope="session")
def reference():
    """The reference ops: Backend's defaults, the plain-torch ops the cpu backend runs."""
    from splitfuse.backends import Backend

    return Backend()
