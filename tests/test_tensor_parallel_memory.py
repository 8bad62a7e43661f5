"""Each tensor-parallel rank reads only its slices of the checkpoint: its peak host memory while
loading is about its share of the weights, well below what loading the whole model takes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from splitfuse.testing.tiny_model import make_tiny_model

# Loads the model at argv[1] as rank argv[2] of argv[3] (after a warm-up load of the model at
# argv[4], so imports and caches are not counted) and prints the peak growth of the process's
# anonymous memory, sampled every half millisecond, and the bytes of the weights it holds. Anonymous
# memory is what a rank allocates for itself: copied slices, fused matrices, temporaries. The
# checkpoint's file pages, which safetensors maps (and which back the slices it need not copy), are
# page cache that every rank on the host shares, so they are not counted.
MEASURE = textwrap.dedent("""
    import sys, threading, time
    from splitfuse.backends.cpu import CpuBackend
    from splitfuse.models.loader import load_model
    from splitfuse.parallel import Shard

    def anonymous() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))

    path, rank, size, warm_up = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    load_model(warm_up, CpuBackend(), shard=Shard(rank, size))
    base = anonymous()
    peak, done = [base], threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], anonymous())
            time.sleep(0.0005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    model = load_model(path, CpuBackend(), shard=Shard(rank, size)).model
    done.set()
    watcher.join()
    print(max(peak[0], anonymous()) - base, sum(w.numel() * w.element_size() for w in model.weights.values()))
""")


def _peak_while_loading(path: str, rank: int, size: int, warm_up: str) -> tuple[int, int]:
    """(peak anonymous memory growth, bytes of the weights it holds) of one rank loading `path`."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", MEASURE, path, str(rank), str(size), warm_up], capture_output=True,
                         text=True, timeout=300, env=env, check=True)
    peak, held = out.stdout.split()[-2:]
    return int(peak), int(held)


def test_each_ranks_peak_host_memory_while_loading_is_its_share(tmp_path, tiny_model_dir, record_property):
    # 4 layers of hidden 512 and intermediate 2048: about 64 MiB of float32 weights
    path = str(make_tiny_model(tmp_path / "m", "llama", num_layers=4, hidden_size=512, num_heads=8, num_kv_heads=4,
                               intermediate_size=2048))
    whole = os.path.getsize(os.path.join(path, "model.safetensors"))
    ranks = [_peak_while_loading(path, rank, 2, tiny_model_dir("llama")) for rank in (0, 1)]
    report = f"checkpoint {whole / 2**20:.1f} MiB; peak private memory growth while loading: " + "; ".join(
        f"rank {r} of 2 {peak / 2**20:.1f} MiB (its weights {held / 2**20:.1f} MiB)" for r, (peak, held) in enumerate(ranks))
    print(report)
    record_property("tensor_parallel_load_memory", report)
    for peak, held in ranks:
        assert held < 0.55 * whole  # half of every split matrix, the norms whole
        assert peak < 0.65 * whole, report  # no whole tensor is read on the way
