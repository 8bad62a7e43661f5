"""What --ray needs: the ray package (a clear message without it) and the resources each replica reserves."""

from __future__ import annotations

import sys

import pytest

from splitfuse import cli
from splitfuse.serving.ray_replicas import replica_bundle


@pytest.fixture
def no_ray(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError


def test_serve_with_ray_but_without_it_says_what_to_install(no_ray, capsys):
    assert cli.main(["serve", "--replicas", "2", "--ray"]) == 2
    assert "pip install splitfuse[ray]" in capsys.readouterr().err


def test_the_python_api_says_it_too(no_ray, tiny_model_dir):
    from splitfuse.serving.server import build_app

    with pytest.raises(ImportError, match=r"pip install splitfuse\[ray\]"):
        build_app(tiny_model_dir("llama"), "cpu", replicas=2, ray_address="local")


def test_each_replica_reserves_its_gpus_or_a_share_of_the_cores():
    assert replica_bundle("cuda", 2, 64, 4) == {"CPU": 1, "GPU": 2}  # one GPU per tensor-parallel rank
    assert replica_bundle("cpu", 1, 16, 4) == {"CPU": 4}
    assert replica_bundle("cpu", 1, 2, 8) == {"CPU": 1}  # never less than one core


def test_serve_help_shows_the_scale_out_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    text = capsys.readouterr().out
    assert all(option in text for option in ("--replicas", "--ray", "ADDRESS", "--max-waiting"))
