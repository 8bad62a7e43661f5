"""The plugin ecosystem from the outside: a package written only from docs/plugins.md, the
conformance kit's command line (and that it fails a wrong backend), and docs that keep up with
the hooks and ops."""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import splitfuse
from splitfuse.backends import CONTRACT_VERSION, Backend
from splitfuse.cli import main
from splitfuse.plugins import (
    BackendRegistry, ModelRegistry, PluginManager, get_plugin_manager, hookspecs, reset_plugin_manager,
)
from splitfuse.testing import pytest_plugin

ROOT = Path(__file__).resolve().parents[1]
PLUGINS_DOC = ROOT / "docs" / "plugins.md"
CONFORMANCE = ["-m", "pytest", "--pyargs", "splitfuse.testing.conformance", "-q", "-p", "no:cacheprovider"]


pytestmark = pytest.mark.usefixtures("splitfuse_fresh_plugins")  # from splitfuse's pytest plugin


def run_python(args: list[str], cwd: Path, extra_path: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(extra_path), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


# ---- a third-party package written from the docs --------------------------------------------------
def files_in_doc(doc: Path) -> dict[str, str]:
    """The fenced code blocks whose first line is `# file: PATH`, by path."""
    blocks = re.findall(r"```[a-z]*\n# file: (\S+)\n(.*?)```", doc.read_text(), flags=re.S)
    return {path: body for path, body in blocks}


@pytest.fixture(scope="module")
def docs_plugin(tmp_path_factory):
    """The docs' example package, pip-installed into a folder of its own (the environment is untouched)."""
    root = tmp_path_factory.mktemp("docs-plugin")
    files = files_in_doc(PLUGINS_DOC)
    assert set(files) == {"pyproject.toml", "splitfuse_toy.py"}, sorted(files)
    for name, body in files.items():
        (root / "src" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "src" / name).write_text(body)
    site = root / "site"
    result = run_python(["-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(site),
                         str(root / "src")], cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return site


@pytest.fixture(scope="module")
def toy_llama(tmp_path_factory):
    """A tiny Llama checkpoint whose config names the docs' architecture."""
    from splitfuse.testing import make_tiny_model

    path = make_tiny_model(tmp_path_factory.mktemp("toy-llama"))
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["ToyLlamaForCausalLM"]
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_package_from_the_docs_is_listed_and_runs(docs_plugin, toy_llama, monkeypatch, capsys):
    from splitfuse.backends import BackendError, create_backend

    with pytest.raises(BackendError, match="unknown backend 'toy'"):
        create_backend("toy")  # not on the path yet
    reset_plugin_manager()
    monkeypatch.syspath_prepend(str(docs_plugin))
    monkeypatch.delitem(sys.modules, "splitfuse_toy", raising=False)
    try:
        assert main(["backends"]) == 0
        assert main(["models"]) == 0
        prompts = [[5, 17, 300], [9]]
        toy = splitfuse.pipeline(toy_llama, backend="toy")
        assert toy.engine.backend.name == "toy"
        got = toy(prompts, max_new_tokens=5, temperature=0.0, ignore_eos=True)
        expected = splitfuse.pipeline(toy_llama, backend="cpu")(prompts, max_new_tokens=5, temperature=0.0,
                                                                ignore_eos=True)
    finally:
        sys.modules.pop("splitfuse_toy", None)
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]
    lines = capsys.readouterr().out.splitlines()
    toy_line = next(line for line in lines if line.startswith("toy "))
    assert "splitfuse-toy 0.1.0" in toy_line and toy_line.endswith("available")
    assert any(line.split() == ["ToyLlamaForCausalLM", "splitfuse-toy", "0.1.0"] for line in lines)
    assert not any("plugins with problems" in line for line in lines)


def test_package_from_the_docs_is_selected_on_the_command_line(docs_plugin, toy_llama, tmp_path):
    result = run_python(["-m", "splitfuse", "generate", str(toy_llama), "Hello", "--backend", "toy",
                         "--max-new-tokens", "4", "--temperature", "0", "--ignore-eos"],
                        cwd=tmp_path, extra_path=docs_plugin)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[4 tokens, finish_reason=length]" in result.stderr


# ---- the conformance kit ----------------------------------------------------------------------------
def first_party_packages() -> list[str]:
    return sorted(p.name for p in (ROOT / "plugins").iterdir() if (p / "pyproject.toml").is_file())


def first_party_backends() -> list[str]:
    """Backends registered by the installed packages under plugins/ (model packages run the suite
    for their architecture in their own tests: only they know the config their tiny model needs)."""
    registry = PluginManager().backends()
    return [n for n in registry.names() if registry.source(n).split(" ")[0] in first_party_packages()]


@pytest.mark.parametrize("backend", first_party_backends())
def test_first_party_backend_plugins_pass_the_conformance_suite(backend, tmp_path):
    # the quick subset keeps CI short; the full suite is the package's own command
    result = run_python(CONFORMANCE + ["--splitfuse-backend", backend, "--splitfuse-quick"], cwd=tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert re.search(r"\d+ passed", result.stdout) and "failed" not in result.stdout


WRONG_BACKEND = '''
    import torch
    from splitfuse.backends.cpu import CpuBackend
    from splitfuse.plugins import hookimpl

    class WrongBackend(CpuBackend):
        name = "wrong"
        dtypes = (torch.float32,)

        def silu_and_mul(self, x):  # gate and up swapped
            up, gate = x.chunk(2, dim=-1)
            return torch.nn.functional.silu(gate) * up

        def rms_norm(self, x, weight, eps, residual=None, weight_offset=0.0):  # normalises x, not x + residual
            normed = super().rms_norm(x, weight, eps, None, weight_offset)
            return normed if residual is None else (normed, x + residual)

    @hookimpl
    def splitfuse_register_backends(registry):
        registry.add(WrongBackend)
'''


def test_conformance_kit_fails_a_wrong_backend(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "wrong_backend.py").write_text(textwrap.dedent(WRONG_BACKEND))
    info = site / "wrong_backend-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: wrong-backend\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[splitfuse]\nwrong = wrong_backend\n")
    result = run_python(CONFORMANCE + ["--splitfuse-backend", "wrong", "--splitfuse-quick", "-k",
                                       "activation or rms_norm", "-rf"], cwd=tmp_path, extra_path=site)
    out = result.stdout
    assert result.returncode == 1, out[-4000:]
    failed = set(re.findall(r"FAILED \S+::(\S+)", out))
    assert failed == {"test_activation[float32-5x18-silu_and_mul]", "test_rms_norm[float32-9x41-residual-llama]"}, out
    assert re.search(r"\d+ passed", out)  # the ops it does right still pass


def test_every_backend_op_has_a_conformance_check():
    """A new op in the Backend contract needs a case in the conformance suite."""
    checks = (ROOT / "splitfuse" / "testing" / "conformance" / "test_backend_ops.py").read_text()
    not_ops = {"synchronize", "warm_up", "forward", "describe"}  # exercised by the pipeline run
    members = [n for n, _ in inspect.getmembers(Backend, callable) if not n.startswith("_") and n not in not_ops]
    missing = [n for n in members if f"backend.{n}(" not in checks and f'"{n}"' not in checks]
    assert missing == []


# ---- docs keep up with the code ------------------------------------------------------------------
def test_every_hook_and_registry_method_is_documented():
    doc = PLUGINS_DOC.read_text()
    hooks = [f for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(f, "splitfuse_spec")]
    assert hooks
    for hook in hooks:
        params = ", ".join(inspect.signature(hook).parameters)
        assert f"### `{hook.__name__}({params})`" in doc, f"hook {hook.__name__} is not documented in docs/plugins.md"
    for registry in (BackendRegistry, ModelRegistry):
        for name, _ in inspect.getmembers(registry, inspect.isfunction):
            if not name.startswith("_") and name != "registering":  # registering: the manager's, not plugins'
                assert f"`{name}(" in doc, f"{registry.__name__}.{name} is not documented in docs/plugins.md"
    for term in ("SPLITFUSE_PLUGINS", "SPLITFUSE_DISABLE_PLUGINS", "SPLITFUSE_API_VERSION", "api_version",
                 "writing-a-backend.md", "porting-a-model.md", *pytest_plugin.OPTIONS):
        assert term in doc, f"{term} is not documented in docs/plugins.md"


def test_backend_contract_doc_covers_every_member_and_the_v1_adapter():
    doc = (ROOT / "docs" / "backend-contract.md").read_text()
    assert doc.startswith(f"# Backend contract, version {CONTRACT_VERSION}\n")
    missing = [n for n in vars(Backend) if not n.startswith("_") and f"`{n}" not in doc]
    assert missing == [], f"Backend members not documented in docs/backend-contract.md: {missing}"
    for term in ("splitfuse.backends.v1_adapter", "DeprecationWarning", "(contract v1, adapted)", "adapted_from"):
        assert term in doc, f"{term} is not documented in docs/backend-contract.md"
    plugins_doc = PLUGINS_DOC.read_text()
    assert f"`splitfuse.plugins.API_VERSION` (now `{hookspecs.API_VERSION}`)" in plugins_doc
    assert "Version 1 is deprecated and still loads" in plugins_doc


def test_installed_first_party_plugins_load():
    """Every package under plugins/ is installed (CI installs them) and loads without a problem."""
    manager = get_plugin_manager()
    manager.backends(), manager.models()
    assert [f"{f.name}: {f.error}" for f in manager.failures] == []
    sources = {manager.backends().source(n) for n in manager.backends().names()}
    sources |= {manager.models().source(n) for n in manager.models().names()}
    for package in first_party_packages():
        installed = any(s.startswith(package + " ") for s in sources)
        assert installed, f"{package} is not installed (pip install --no-build-isolation plugins/{package})"
