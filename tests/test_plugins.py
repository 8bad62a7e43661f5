"""Backends and models come from pluggy hooks; selection, listing and broken plugins."""

from __future__ import annotations

import textwrap

import pytest

from splitfuse.backends import Backend, BackendError, create_backend, list_backends
from splitfuse.backends.cpu import CpuBackend
from splitfuse.cli import main
from splitfuse.plugins import get_plugin_manager, hookimpl, reset_plugin_manager


@pytest.fixture(autouse=True)
def fresh_plugins(monkeypatch):
    monkeypatch.delenv("SPLITFUSE_BACKEND", raising=False)
    reset_plugin_manager()
    yield
    reset_plugin_manager()


class FastBackend(CpuBackend):
    name = "fast"
    priority = 500  # above every built-in, also cuda where a GPU is present


class MissingHardwareBackend(Backend):
    name = "npu"
    priority = 1000

    @classmethod
    def unavailable_reason(cls) -> str:
        return "no NPU device found"


class FakeBackendsPlugin:
    @hookimpl
    def splitfuse_register_backends(self, registry):
        registry.add(FastBackend)
        registry.add(MissingHardwareBackend)


def test_builtin_cpu_backend_registers_through_the_hook():
    infos = {i.name: i for i in list_backends()}
    assert infos["cpu"].available
    assert isinstance(create_backend("cpu"), CpuBackend)
    assert isinstance(create_backend("auto"), Backend)


def test_auto_picks_the_highest_priority_available_backend():
    get_plugin_manager().register(FakeBackendsPlugin(), name="fake")
    assert create_backend("auto").name == "fast"  # npu ranks higher but is unavailable


def test_environment_variable_selects_the_backend(monkeypatch):
    get_plugin_manager().register(FakeBackendsPlugin(), name="fake")
    monkeypatch.setenv("SPLITFUSE_BACKEND", "cpu")
    assert create_backend(None).name == "cpu"


def test_unavailable_backend_error_says_why_and_lists_all():
    get_plugin_manager().register(FakeBackendsPlugin(), name="fake")
    with pytest.raises(BackendError) as err:
        create_backend("npu")
    message = str(err.value)
    assert "backend 'npu' is unavailable: no NPU device found" in message
    assert "fast: available" in message and "cpu: available" in message


def test_models_register_through_the_hook(capsys):
    class TinyArch:
        pass

    class ModelPlugin:
        @hookimpl
        def splitfuse_register_models(self, registry):
            registry.add("TinyArchForCausalLM", TinyArch)

    get_plugin_manager().register(ModelPlugin(), name="tiny-arch")
    assert get_plugin_manager().models().get("TinyArchForCausalLM") is TinyArch
    assert main(["models"]) == 0
    listed = capsys.readouterr().out.split()
    assert {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "TinyArchForCausalLM"} <= set(listed)


def test_hook_that_raises_is_reported_and_others_still_work():
    class Broken:
        @hookimpl
        def splitfuse_register_backends(self, registry):
            raise RuntimeError("driver exploded")

    get_plugin_manager().register(Broken(), name="broken-plugin")
    infos = {i.name: i for i in list_backends()}
    assert infos["cpu"].available
    assert "driver exploded" in infos["broken-plugin"].reason


def write_entry_point_plugin(root, dist: str, module: str, body: str) -> None:
    """A pip-installed plugin as importlib.metadata sees it: a module plus a dist-info folder."""
    (root / f"{module}.py").write_text(textwrap.dedent(body))
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[splitfuse]\n{dist} = {module}\n")


def test_installed_plugins_load_from_entry_points(tmp_path, monkeypatch, capsys):
    write_entry_point_plugin(tmp_path, "good_backend", "good_backend_mod", """
        from splitfuse.backends.cpu import CpuBackend
        from splitfuse.plugins import hookimpl

        class GoodBackend(CpuBackend):
            name = "good"
            priority = 1000  # above every built-in, also cuda where a GPU is present

        @hookimpl
        def splitfuse_register_backends(registry):
            registry.add(GoodBackend)
    """)
    write_entry_point_plugin(tmp_path, "broken_backend", "broken_backend_mod", "import not_a_real_module\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "good" in out and "cpu" in out
    assert "broken_backend" in out and "plugin failed to load" in out and "not_a_real_module" in out
    assert create_backend("auto").name == "good"


def test_plugins_can_be_disabled_or_allow_listed(tmp_path, monkeypatch):
    write_entry_point_plugin(tmp_path, "good_backend2", "good_backend2_mod", """
        from splitfuse.backends.cpu import CpuBackend
        from splitfuse.plugins import hookimpl

        class Good2(CpuBackend):
            name = "good2"

        @hookimpl
        def splitfuse_register_backends(registry):
            registry.add(Good2)
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("SPLITFUSE_DISABLE_PLUGINS", "good_backend2")
    assert "good2" not in {i.name for i in list_backends()}
    reset_plugin_manager()
    monkeypatch.delenv("SPLITFUSE_DISABLE_PLUGINS")
    monkeypatch.setenv("SPLITFUSE_PLUGINS", "good_backend2")
    assert "good2" in {i.name for i in list_backends()}


def test_backend_for_another_contract_version_is_refused_by_name():
    class FutureBackend(CpuBackend):
        name = "future"
        contract_version = 2

    class FuturePlugin:
        @hookimpl
        def splitfuse_register_backends(self, registry):
            registry.add(FutureBackend)

    get_plugin_manager().register(FuturePlugin(), name="future-plugin")
    infos = {i.name: i for i in list_backends()}
    assert "future" not in infos
    assert "contract version 2" in infos["future-plugin"].reason
    assert infos["cpu"].available


def test_backend_instances_on_a_chosen_device():
    class TwoDevices(CpuBackend):
        name = "two"
        priority = 2000

        @classmethod
        def device_count(cls) -> int:
            return 2

        def __init__(self, device_index: int = 0) -> None:
            super().__init__(device_index)
            self.index = device_index

    class TwoDevicesPlugin:
        @hookimpl
        def splitfuse_register_backends(self, registry):
            registry.add(TwoDevices)

    get_plugin_manager().register(TwoDevicesPlugin(), name="two-devices")
    assert create_backend("two", device_index=1).index == 1
    assert create_backend("auto").index == 0
    with pytest.raises(BackendError, match="2 device"):
        create_backend("two", device_index=2)
    with pytest.raises(BackendError, match="1 device"):
        create_backend("cpu", device_index=1)
