"""The cuda backend: NVIDIA GPUs running the Triton kernels of splitfuse/backends/triton/, with
decode steps replayed as CUDA graphs and sampling in one kernel launch.

Importing this module imports neither triton nor the kernels and touches no CUDA API: the kernels
are imported on first use, availability is probed only when asked.

Interpreter mode: with TRITON_INTERPRET=1 in the environment (and triton installed) the backend is
available on the CPU, where Triton's interpreter runs the same kernels on CPU tensors. That mode is
for tests of the kernels (it is orders of magnitude slower than the cpu backend), so `auto` never
picks it; ask for it by name (`--backend cuda`).
"""

from __future__ import annotations

import torch

from splitfuse.backends.device_backend import DeviceBackend
from splitfuse.backends.triton import triton_import_error
from splitfuse.core.philox import seed_to_int64


class CudaBackend(DeviceBackend):
    name = "cuda"
    priority = 100
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    device_kind = "cuda"
    memory_name = "GPU"
    cpu_mode_env = "TRITON_INTERPRET"
    cpu_mode_label = "Triton interpreter on cpu"

    # ---- discovery -------------------------------------------------------------------------
    @classmethod
    def unavailable_reason(cls) -> str:
        if cls.cpu_mode():
            return triton_import_error()
        if not torch.cuda.is_available():
            return ("no CUDA device (torch.cuda.is_available() is False); TRITON_INTERPRET=1 runs the "
                    "kernels on the CPU for testing")
        return triton_import_error()

    @classmethod
    def distributed_backend(cls) -> str:
        # Under the Triton interpreter the tensors live on the CPU, where NCCL cannot run.
        return "gloo" if cls.cpu_mode() else "nccl"

    def captures_graphs(self) -> bool:
        return self.device.type == "cuda"

    # ---- sampling --------------------------------------------------------------------------
    def sample(self, logits: torch.Tensor, batch) -> torch.Tensor:
        """Next tokens [S'] int64 on the device, sampled by one Triton launch (plus one sort when
        a row uses top-k/top-p) with no host sync; see splitfuse/backends/triton/sampling.py.

        Each row's noise is Philox keyed by the row's seed at its draw counter, both from the
        batch: the backend keeps no per-request state, and the cpu backend draws the same noise
        (core.philox), so a seed gives the same tokens on either backend, alone or in any batch."""
        if batch.all_greedy and not any(batch.suppressed):
            return logits.argmax(dim=-1)
        from splitfuse.backends.triton.sampling import sample

        floats, ints, num_filter, width = self._sampling_tensors(batch, logits.shape[-1])
        S = len(batch.temperatures)
        floats, ints = self._to_device(floats), self._to_device(ints)
        top_ks, seeds, offsets = ints[:S], ints[S:2 * S], ints[2 * S:3 * S]
        filter_rows = ints[3 * S:3 * S + num_filter]
        suppressed = ints[3 * S + num_filter:].view(S, width) if width else None
        return sample(logits, floats[0], top_ks, floats[1], seeds, offsets, suppressed=suppressed,
                      filter_rows=filter_rows)

    def _sampling_tensors(self, batch, vocab: int):
        """Host-side per-row settings packed into two CPU tensors (two small copies per step):
        floats [2, S'] = temperatures, top_ps; ints = top_ks | seeds | offsets | rows that filter
        | suppressed ids [S', M] (-1 padding). Offsets are the rows' draw counters."""
        S = len(batch.temperatures)
        seeds, offsets, filter_rows = [0] * S, [0] * S, []
        for row, (top_k, top_p) in enumerate(zip(batch.top_ks, batch.top_ps)):
            if batch.is_greedy_row(row):
                continue
            if 0 < top_k < vocab or top_p < 1.0:
                filter_rows.append(row)
            seeds[row] = seed_to_int64(batch.seed_of(row))  # the kernel reads the seed's 64 bits
            offsets[row] = batch.counters[row]
        width = max((len(ids) for ids in batch.suppressed), default=0)
        padded = [id_ for ids in batch.suppressed for id_ in list(ids) + [-1] * (width - len(ids))]
        floats = torch.tensor([batch.temperatures, batch.top_ps], dtype=torch.float32)
        ints = torch.tensor(list(batch.top_ks) + seeds + offsets + filter_rows + padded, dtype=torch.int64)
        return floats, ints, len(filter_rows), width


__all__ = ["CudaBackend"]
