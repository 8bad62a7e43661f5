"""Backend contract version 2 from a plugin author's side: a minimal backend written from
docs/writing-a-backend.md passes the conformance kit and gives the cpu backend's tokens; a backend
written for version 1 loads through the adapter with a deprecation warning and keeps its
version-1 behaviour; other versions are refused by name."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import splitfuse
from splitfuse.backends import Backend, BackendError, create_backend, list_backends
from splitfuse.backends.cpu import CpuBackend
from splitfuse.cli import main
from splitfuse.plugins import get_plugin_manager, hookimpl, reset_plugin_manager

ROOT = Path(__file__).resolve().parents[1]
BACKEND_DOC = ROOT / "docs" / "writing-a-backend.md"
CONFORMANCE = ["-m", "pytest", "--pyargs", "splitfuse.testing.conformance", "-q", "-p", "no:cacheprovider"]
PROMPTS = [[5, 17, 300, 41, 9, 77, 120, 3, 64, 250, 11], [9], [400, 401, 402, 7]]
# prompts split over several steps and sharing them with decodes; 4-token KV blocks
CHUNKED = dict(token_budget=5, kv_block_size=4)


pytestmark = pytest.mark.usefixtures("splitfuse_fresh_plugins")  # from splitfuse's pytest plugin


def install_plugin_module(site: Path, dist: str, module: str, body: str) -> Path:
    """A pip-installed plugin as importlib.metadata sees it: the module plus a dist-info folder."""
    site.mkdir(parents=True, exist_ok=True)
    (site / f"{module}.py").write_text(body)
    info = site / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[splitfuse]\n{dist} = {module}\n")
    return site


def run_conformance(backend: str, site: Path, cwd: Path, *options: str) -> subprocess.CompletedProcess:
    """The conformance kit's command line on a backend installed in `site` (the quick subset unless
    options select cases)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    args = [*CONFORMANCE, "--splitfuse-backend", backend, *(options or ["--splitfuse-quick"])]
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def assert_conformance_passed(result: subprocess.CompletedProcess) -> None:
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    assert re.search(r"\d+ passed", result.stdout) and "failed" not in result.stdout, out[-4000:]


def use_site(site: Path, module: str, monkeypatch):
    """Put an installed plugin folder on the path for this test; the plugin manager finds it afresh."""
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, module, raising=False)
    reset_plugin_manager()


def greedy_tokens(model_dir: str, backend: str) -> list[list[int]]:
    pipe = splitfuse.pipeline(model_dir, backend=backend, **CHUNKED)
    try:
        return [r.token_ids for r in pipe(PROMPTS, max_new_tokens=6, temperature=0.0, ignore_eos=True)]
    finally:
        pipe.close()


def overridden(cls: type) -> set[str]:
    """The Backend members a class (or a base class below Backend) replaces."""
    below = cls.__mro__[:cls.__mro__.index(Backend)]
    return {n for n in vars(Backend) if not n.startswith("_") and any(n in vars(k) for k in below)}


# ---- a minimal version-2 backend, literally from the docs ------------------------------------------
def doc_code_block(doc: Path, path: str) -> str:
    blocks = dict(re.findall(r"```[a-z]*\n# file: (\S+)\n(.*?)```", doc.read_text(), flags=re.S))
    assert path in blocks, f"{doc.name} has no code block starting with '# file: {path}'"
    return blocks[path]


@pytest.fixture(scope="module")
def doc_backend_site(tmp_path_factory) -> Path:
    return install_plugin_module(tmp_path_factory.mktemp("doc-backend"), "splitfuse_loop", "splitfuse_loop",
                                 doc_code_block(BACKEND_DOC, "splitfuse_loop.py"))


def test_minimal_backend_from_the_docs_implements_only_the_building_blocks(doc_backend_site, monkeypatch):
    use_site(doc_backend_site, "splitfuse_loop", monkeypatch)
    cls = get_plugin_manager().backends().get("loop")
    assert cls is importlib.import_module("splitfuse_loop").LoopBackend  # version 2: registered as it is
    assert overridden(cls) == {"name", "priority", "dtypes", "write_kv", "paged_attention"}
    assert "adapted" not in get_plugin_manager().backends().source("loop")
    assert get_plugin_manager().failures == []


def test_minimal_backend_from_the_docs_passes_the_conformance_kit(doc_backend_site, tmp_path):
    assert_conformance_passed(run_conformance("loop", doc_backend_site, tmp_path))


def test_minimal_backend_from_the_docs_matches_the_cpu_backend(doc_backend_site, tiny_model_dir, monkeypatch):
    use_site(doc_backend_site, "splitfuse_loop", monkeypatch)
    path = tiny_model_dir("llama")
    assert greedy_tokens(path, "loop") == greedy_tokens(path, "cpu")


WRONG_BUILDING_BLOCKS = '''
import torch

from splitfuse.backends import torch_ops
from splitfuse.backends.cpu import CpuBackend
from splitfuse.plugins import hookimpl


class WrongBlocks(CpuBackend):
    name = "wrong-blocks"
    dtypes = (torch.float32,)

    def write_kv(self, kv_layer, k, v, slot_mapping):  # keys and values swapped
        torch_ops.write_kv(kv_layer, v, k, slot_mapping)

    def paged_attention(self, q, kv_layer, meta, scale, sliding_window=None, logit_softcap=None):  # no window
        return torch_ops.paged_attention(q, kv_layer, meta, scale, None, logit_softcap)


@hookimpl
def splitfuse_register_backends(registry):
    registry.add(WrongBlocks)
'''


def test_conformance_kit_fails_wrong_building_blocks(tmp_path):
    site = install_plugin_module(tmp_path / "site", "wrong_blocks", "wrong_blocks", WRONG_BUILDING_BLOCKS)
    # all shapes and variants (the sliding window is not in the quick subset)
    result = run_conformance("wrong-blocks", site, tmp_path, "-rf", "-k",
                             "write_kv or paged_attention or test_attention")
    assert result.returncode == 1, result.stdout[-4000:]
    failed = re.findall(r"FAILED \S+::(\w+)\[(\S+)\]", result.stdout)
    # rotary_write_kv's default and attention are built on the wrong blocks, so they fail too
    assert {test for test, _ in failed} == {"test_write_kv", "test_paged_attention", "test_rotary_write_kv",
                                            "test_attention"}
    # the window is the only thing paged_attention gets wrong
    assert all("window5" in case for test, case in failed if test == "test_paged_attention")
    assert re.search(r"\d+ passed", result.stdout)


# ---- a version-1 plugin, through the adapter ---------------------------------------------------
V1_PLUGIN = '''
import torch

from splitfuse.backends import torch_ops
from splitfuse.backends.cpu import CpuBackend
from splitfuse.plugins import hookimpl

SPLITFUSE_API_VERSION = 1


class CountingBackend(CpuBackend):
    """Written for contract version 1: it runs attention by overriding attention()."""

    name = "counting-v1"
    dtypes = (torch.float32,)
    attention_calls = 0

    def attention(self, q, k, v, kv_layer, meta, scale, sliding_window=None, logit_softcap=None):
        CountingBackend.attention_calls += 1
        torch_ops.write_kv(kv_layer, k, v, meta.slot_mapping)
        return torch_ops.paged_attention(q, kv_layer, meta, scale, sliding_window, logit_softcap)


@hookimpl
def splitfuse_register_backends(registry):
    registry.add(CountingBackend)
'''


@pytest.fixture(scope="module")
def v1_site(tmp_path_factory) -> Path:
    return install_plugin_module(tmp_path_factory.mktemp("v1-backend"), "counting_v1", "counting_v1", V1_PLUGIN)


def test_v1_plugin_loads_with_a_deprecation_warning(v1_site, monkeypatch, caplog, capsys):
    use_site(v1_site, "counting_v1", monkeypatch)
    with pytest.deprecated_call(match=r"backend 'counting-v1' \(counting_v1 0.1\) is written for backend "
                                      r"contract version 1 \(deprecated\)"):
        registry = get_plugin_manager().backends()
    assert "counting-v1" in registry and registry.source("counting-v1") == "counting_v1 0.1 (contract v1, adapted)"
    [logged] = [r.getMessage() for r in caplog.records if "counting-v1" in r.getMessage()]
    assert "implement write_kv() and paged_attention()" in logged and "declare version 2" in logged
    assert {i.name: i for i in list_backends()}["counting-v1"].available
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("counting-v1 "))
    assert "counting_v1 0.1 (contract v1, adapted)" in line and line.endswith("available")
    assert "plugins with problems" not in out


def test_v1_attention_override_serves_a_rotary_model(v1_site, tiny_model_dir, monkeypatch):
    use_site(v1_site, "counting_v1", monkeypatch)
    path = tiny_model_dir("llama")  # Llama calls rotary_attention, never attention itself
    counting = importlib.import_module("counting_v1").CountingBackend
    with pytest.deprecated_call():
        tokens = greedy_tokens(path, "counting-v1")
    assert counting.attention_calls > 0
    assert tokens == greedy_tokens(path, "cpu")


def test_v1_plugin_passes_the_conformance_kit(v1_site, tmp_path):
    result = run_conformance("counting-v1", v1_site, tmp_path)
    assert_conformance_passed(result)
    assert "backend 'counting-v1' (counting_v1 0.1) is written for backend contract version 1" in result.stdout


# ---- how the adapter reads version-1 classes ----------------------------------------------------
def register_backends(*classes, module_version=None) -> None:
    class Plugin:
        @hookimpl
        def splitfuse_register_backends(self, registry):
            for cls in classes:
                registry.add(cls)

    plugin = Plugin()
    if module_version is not None:
        plugin.SPLITFUSE_API_VERSION = module_version
    get_plugin_manager().register(plugin, name="test-plugin")


def test_version_1_is_read_from_the_class_its_bases_or_the_plugin_module():
    class OwnBody(CpuBackend):
        name = "own-body"
        contract_version = 1

    class V1Base(CpuBackend):
        api_version = 1

    class FromBase(V1Base):
        name = "from-base"

    class FromModule(CpuBackend):
        name = "from-module"

    with pytest.deprecated_call():
        register_backends(OwnBody, FromBase, FromModule, module_version="1.4")
        registry = get_plugin_manager().backends()
    for name, cls in [("own-body", OwnBody), ("from-base", FromBase), ("from-module", FromModule)]:
        assert registry.source(name).endswith("(contract v1, adapted)"), name
        assert issubclass(registry.get(name), cls) and registry.get(name).adapted_from is cls


def test_a_class_declaring_version_2_in_a_version_1_module_is_not_adapted():
    class Ported(CpuBackend):
        name = "ported"
        contract_version = 2

    register_backends(Ported, module_version=1)
    assert get_plugin_manager().backends().get("ported") is Ported


def test_v1_rotary_attention_reaches_the_attention_override_also_through_super():
    """In version 1, Backend.rotary_attention was rotary() then self.attention(); a version-1
    backend's own fallback `super().rotary_attention(...)` still gets exactly that."""
    calls = []

    class Fallback(CpuBackend):
        name = "fallback-v1"
        contract_version = 1

        def attention(self, q, k, v, kv_layer, meta, scale, sliding_window=None, logit_softcap=None):
            calls.append("attention")
            return super().attention(q, k, v, kv_layer, meta, scale, sliding_window, logit_softcap)

        def rotary_attention(self, *args, **kwargs):
            calls.append("rotary_attention")
            return super().rotary_attention(*args, **kwargs)

    from splitfuse.testing.ragged import filled_cache, ragged_step

    with pytest.deprecated_call():
        register_backends(Fallback)
        backend = create_backend("fallback-v1")
    step = ragged_step([(9, 1), (6, 6)], 4)
    kv, _, _ = filled_cache(step, 2, 8)
    T = step.meta.num_tokens
    q, k, v = torch.randn(T, 4, 8), torch.randn(T, 2, 8), torch.randn(T, 2, 8)
    cos_sin = torch.randn(16, 8)
    expected_kv = kv.clone()
    expected = Backend().rotary_attention(q, k, v, step.meta.positions, cos_sin, expected_kv, step.meta, 0.3)
    got = backend.rotary_attention(q, k, v, step.meta.positions, cos_sin, kv, step.meta, 0.3)
    assert calls == ["rotary_attention", "attention"]
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(kv, expected_kv, equal_nan=True)


def test_v1_backend_without_attention_override_keeps_the_composites():
    class RmsOnly(CpuBackend):
        name = "rms-only"
        contract_version = 1

        def rms_norm(self, x, weight, eps, residual=None, weight_offset=0.0):
            return super().rms_norm(x, weight, eps, residual, weight_offset)

    with pytest.deprecated_call():
        register_backends(RmsOnly)
        adapted = get_plugin_manager().backends().get("rms-only")
    # rotary() then attention() equals rotary_write_kv() then paged_attention() when attention is not overridden
    assert adapted.rotary_attention is Backend.rotary_attention and adapted.rms_norm is RmsOnly.rms_norm


def test_the_same_v1_class_added_twice_is_no_name_clash():
    class Twice(CpuBackend):
        name = "twice"
        contract_version = 1

    with pytest.deprecated_call():
        register_backends(Twice, Twice)
        registry = get_plugin_manager().backends()
    assert registry.get("twice").adapted_from is Twice and get_plugin_manager().failures == []


def test_model_plugin_declaring_api_1_loads_unchanged_with_a_deprecation_warning():
    class OldModel:
        pass

    class ModelPlugin:
        SPLITFUSE_API_VERSION = 1

        @hookimpl
        def splitfuse_register_models(self, registry):
            registry.add("OldForCausalLM", OldModel)

    get_plugin_manager().register(ModelPlugin(), name="old-models")
    with pytest.deprecated_call(match=r"model 'OldForCausalLM' .*API version 1, which is deprecated.*declare "
                                      r"version 2"):
        models = get_plugin_manager().models()
    assert models.get("OldForCausalLM") is OldModel and get_plugin_manager().failures == []


# ---- other versions: refused by name ------------------------------------------------------------
REFUSED = [
    (0, "is written for splitfuse plugin API version 0, but this splitfuse implements version 2"),
    (3, "is written for splitfuse plugin API version 3, but this splitfuse implements version 2"),
    ("x", "declares API version 'x'; expected an integer major version such as 2"),
]


@pytest.mark.parametrize("version,message", REFUSED, ids=["0", "3", "x"])
def test_backend_class_of_another_version_is_refused_by_name(version, message):
    class Other(CpuBackend):
        name = "other"
        contract_version = version

    register_backends(Other)
    assert "other" not in {i.name for i in list_backends()}
    [failure] = get_plugin_manager().failures
    assert failure.name == "test-plugin" and failure.error.startswith(f"backend 'other' {message}")
    with pytest.raises(BackendError, match="unknown backend 'other'"):
        create_backend("other")


@pytest.mark.parametrize("version,message", REFUSED, ids=["0", "3", "x"])
def test_plugin_module_of_another_version_is_not_loaded(version, message, tmp_path, monkeypatch, capsys):
    site = install_plugin_module(tmp_path, "other_api", "other_api_mod", textwrap.dedent(f'''
        from splitfuse.backends.cpu import CpuBackend
        from splitfuse.plugins import hookimpl

        SPLITFUSE_API_VERSION = {version!r}

        class OtherApi(CpuBackend):
            name = "other-api"

        @hookimpl
        def splitfuse_register_backends(registry):
            registry.add(OtherApi)
    '''))
    use_site(site, "other_api_mod", monkeypatch)
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "other-api " not in out
    assert f"other_api (other_api 0.1): not loaded: plugin 'other_api' {message}" in out
