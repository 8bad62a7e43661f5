"""What quantization leaves in memory: the KV cache of a backend that sizes it from device memory
gets the room the smaller weights leave free, and the load log (generate --verbose) says how many
bytes the weights take and how many KV blocks the cache holds."""

from __future__ import annotations

import re

import splitfuse
from splitfuse.assembly import kv_cache_size
from splitfuse.backends.cuda import CudaBackend
from splitfuse.cli import main
from splitfuse.config import EngineConfig
from splitfuse.quant import weight_bytes

GIB = 1 << 30


class DeviceHolding:
    """A fake torch.cuda whose memory in use is a runtime's fixed share plus the model's weights."""

    def __init__(self, model, total: int = 4 * GIB, runtime: int = GIB // 2) -> None:
        self.model, self.total, self.runtime = model, total, runtime

    def mem_get_info(self, device=None):
        return self.total - self.runtime - weight_bytes(self.model.weights), self.total

    def set_device(self, device):
        pass

    def synchronize(self, device=None):
        pass

    def empty_cache(self):
        pass


def test_quantized_weights_leave_more_kv_blocks_under_the_same_memory_budget(tiny_model_dir, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the cuda backend sizes from "device" memory
    config = EngineConfig(gpu_memory_utilization=0.5, token_budget=64, kv_block_size=16)
    models = {q: splitfuse.pipeline(tiny_model_dir("llama"), backend="cpu", dtype="bfloat16", quantization=q,
                                    kv_cache_gib=0.01).engine.model for q in (None, "int4")}
    blocks = {q: kv_cache_size(m, CudaBackend(device_module=DeviceHolding(m)), config)[1] for q, m in models.items()}
    saved = weight_bytes(models[None].weights) - weight_bytes(models["int4"].weights)
    per_block = models[None].kv_bytes_per_block(16)
    assert saved > 0 and blocks["int4"] > blocks[None]
    assert abs(blocks["int4"] - blocks[None] - saved / per_block) <= 1  # every byte saved went to the cache


def test_generate_verbose_prints_weight_bytes_and_kv_blocks(tiny_model_dir, capsys):
    assert main(["generate", str(tiny_model_dir("llama")), "Hello", "--backend", "cpu", "--max-new-tokens", "2",
                 "--temperature", "0", "--ignore-eos", "--quantization", "int8", "--verbose", "--kv-cache-gib", "0.01"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"weights: \d+ bytes, [\d.]+ MiB \(int8\)", err), err
    assert re.search(r"KV cache: \d+ blocks of \d+ tokens", err), err
    assert main(["generate", str(tiny_model_dir("llama")), "Hello", "--backend", "cpu", "--max-new-tokens", "2",
                 "--kv-cache-gib", "0.01"]) == 0
    assert "KV cache" not in capsys.readouterr().err  # quiet without --verbose
