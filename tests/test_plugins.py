"""Backends and models come from pluggy hooks; selection, listing and broken plugins."""

from __future__ import annotations

import textwrap

import pytest

from splitfuse.backends import Backend, BackendError, create_backend, list_backends
from splitfuse.backends.cpu import CpuBackend
from splitfuse.cli import main
from splitfuse.plugins import get_plugin_manager, hookimpl, reset_plugin_manager


pytestmark = pytest.mark.usefixtures("splitfuse_fresh_plugins")  # from splitfuse's pytest plugin


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
    lines = capsys.readouterr().out.splitlines()
    good = next(line for line in lines if line.startswith("good "))
    assert "good_backend 0.1" in good and good.endswith("available")  # where it came from
    assert "built-in" in next(line for line in lines if line.startswith("cpu "))
    problems = lines[lines.index("plugins with problems (everything else works without them):"):]
    broken = next(line for line in problems if "broken_backend" in line)
    assert "(broken_backend 0.1): failed to import broken_backend_mod" in broken and "not_a_real_module" in broken
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
        contract_version = 3

    class FuturePlugin:
        @hookimpl
        def splitfuse_register_backends(self, registry):
            registry.add(FutureBackend)

    get_plugin_manager().register(FuturePlugin(), name="future-plugin")
    infos = {i.name: i for i in list_backends()}
    assert "future" not in infos
    assert "backend 'future' is written for splitfuse plugin API version 3" in infos["future-plugin"].reason
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


# ---- broken plugins: each is reported by name and the rest keeps working ----------------------
def test_duplicate_backend_and_model_names_keep_the_builtin(capsys):
    from splitfuse.models.llama import LlamaForCausalLM

    class Impostor(CpuBackend):
        name = "cpu"
        priority = 5000

    class OwnBackend(CpuBackend):
        name = "own"

    class ImpostorLlama:
        pass

    class DuplicatingPlugin:
        @hookimpl
        def splitfuse_register_backends(self, registry):
            registry.add(Impostor)
            registry.add(OwnBackend)  # still registered: only the clashing name is refused

        @hookimpl
        def splitfuse_register_models(self, registry):
            registry.add("LlamaForCausalLM", ImpostorLlama)

    get_plugin_manager().register(DuplicatingPlugin(), name="dup-plugin")
    manager = get_plugin_manager()
    assert manager.backends().get("cpu") is CpuBackend and manager.backends().get("own") is OwnBackend
    assert manager.models().get("LlamaForCausalLM") is LlamaForCausalLM
    assert type(create_backend("auto")) is not Impostor
    errors = [f.error for f in manager.failures if f.name == "dup-plugin"]
    assert any("backend 'cpu' is already registered by built-in" in e for e in errors)
    assert any("model 'LlamaForCausalLM' is already registered by built-in" in e for e in errors)
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "dup-plugin (registered in code): model 'LlamaForCausalLM' is already registered by built-in" in out


def test_plugin_module_for_another_api_version_is_not_loaded(tmp_path, monkeypatch, capsys):
    write_entry_point_plugin(tmp_path, "api_three", "api_three_mod", """
        from splitfuse.backends.cpu import CpuBackend
        from splitfuse.plugins import hookimpl

        SPLITFUSE_API_VERSION = 3

        class ApiThree(CpuBackend):
            name = "api-three"

        @hookimpl
        def splitfuse_register_backends(registry):
            registry.add(ApiThree)
    """)
    write_entry_point_plugin(tmp_path, "api_two", "api_two_mod", """
        from splitfuse.backends.cpu import CpuBackend
        from splitfuse.plugins import hookimpl

        SPLITFUSE_API_VERSION = "2.3"  # the same major version: loaded

        class ApiTwo(CpuBackend):
            name = "api-two"

        @hookimpl
        def splitfuse_register_backends(registry):
            registry.add(ApiTwo)
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "api-two " in out and "api-three " not in out
    assert ("api_three (api_three 0.1): not loaded: plugin 'api_three' is written for splitfuse plugin API version 3, "
            "but this splitfuse implements version 2") in out
    with pytest.raises(BackendError, match="unknown backend 'api-three'"):
        create_backend("api-three")
    assert create_backend("cpu").name == "cpu"


def test_model_class_for_another_api_version_is_refused():
    class FutureModel:
        api_version = 3

    class CurrentModel:
        api_version = 2

    class ModelsPlugin:
        @hookimpl
        def splitfuse_register_models(self, registry):
            registry.add("FutureForCausalLM", FutureModel)
            registry.add("CurrentForCausalLM", CurrentModel)

    get_plugin_manager().register(ModelsPlugin(), name="models-plugin")
    models = get_plugin_manager().models()
    assert "FutureForCausalLM" not in models and models.get("CurrentForCausalLM") is CurrentModel
    [failure] = [f for f in get_plugin_manager().failures if f.name == "models-plugin"]
    assert "model 'FutureForCausalLM' is written for splitfuse plugin API version 3" in failure.error


def test_misspelt_hook_is_reported_and_not_registered():
    class Misspelt:
        @hookimpl
        def splitfuse_register_backend(self, registry):  # missing "s"
            registry.add(FastBackend)

    get_plugin_manager().register(Misspelt(), name="misspelt")
    [failure] = get_plugin_manager().failures
    assert failure.name == "misspelt" and "splitfuse_register_backend" in failure.error
    assert "fast" not in {i.name for i in list_backends()}
