"""The cpu backend's compiled ops (splitfuse/native/csrc/cpu_attention.cpp), built at install time.

Each op checks that its tensors are what the kernel reads (CPU, one of its dtypes, the layout it
indexes) and passes raw pointers; for anything else it returns None and the backend runs the
plain-torch reference op instead. The kernels validate block tables, positions and slots
themselves, so a bad step raises instead of reading outside the cache.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from splitfuse import native

if TYPE_CHECKING:
    from splitfuse.core.batch import BatchMeta

MODULE = "cpu_attention"
_DTYPE_CODES = native.DTYPE_CODES


def load() -> "NativeOps | None":
    """The compiled ops, or None when the module is not there to use (see unavailable_reason)."""
    module = native.load(MODULE)
    return None if module is None else NativeOps(module)


def unavailable_reason() -> str:
    return native.unavailable_reason(MODULE)


def _empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """A new contiguous CPU tensor; sizes passed as separate ints parse faster than a torch.Size."""
    return torch.empty(*shape, dtype=dtype)


def _is_dense(t: torch.Tensor, dtype: torch.dtype) -> bool:
    """A contiguous CPU tensor of `dtype`."""
    # is_cpu, not device.type: these checks run several times per layer and device builds an object
    return t.dtype == dtype and t.is_cpu and t.is_contiguous()


def _is_rows(t: torch.Tensor, dtype: torch.dtype) -> bool:
    """A CPU tensor of `dtype` whose last dimension is contiguous (rows may be strided)."""
    return t.dtype == dtype and t.is_cpu and t.stride(-1) == 1


# the attention kernel's path codes: by each unit's shape, row by row, register tiles, decodes over
# every kv head (other units as "auto", which runs decodes that way too)
ATTENTION_PATHS = {"auto": 0, "rows": 1, "tiles": 2, "decode": 3}


class NativeOps:
    """The kernels of one loaded module; every op returns None where it does not apply."""

    def __init__(self, module) -> None:
        self._kernels = module

    def paged_attention(self, q: torch.Tensor, kv_layer: torch.Tensor, meta: "BatchMeta", scale: float,
                        sliding_window: int | None, logit_softcap: float | None,
                        path: str = "auto") -> torch.Tensor | None:
        """Causal paged attention of q [T, H, D] (see Backend.paged_attention), or None. `path` picks
        the kernel of every unit: "auto" by its shape, "rows" or "tiles" (side-by-side comparisons),
        "decode": decodes as units of every kv head whatever the group size, other units as "auto"."""
        if path not in ATTENTION_PATHS:
            raise ValueError(f"path {path!r}: expected one of {sorted(ATTENTION_PATHS)}")
        code = _DTYPE_CODES.get(q.dtype)
        if (code is None or q.dim() != 3 or kv_layer.dim() != 5 or q.numel() == 0
                or not _is_rows(q, q.dtype) or not _is_dense(kv_layer, q.dtype) or kv_layer.shape[-1] != q.shape[-1]
                or not all(_is_dense(t, torch.int32) for t in (meta.query_start, meta.context_lens))
                or not _is_rows(meta.block_tables, torch.int32) or meta.block_tables.dim() != 2):
            return None
        T, H, D = q.shape
        _, num_blocks, block_size, num_kv_heads, _ = kv_layer.shape
        out = torch.empty(T, H, D, dtype=q.dtype)
        tables = meta.block_tables
        self._kernels.paged_attention(
            code, q.data_ptr(), q.stride(0), q.stride(1), out.data_ptr(), kv_layer.data_ptr(), num_blocks,
            block_size, num_kv_heads, D, H, T, meta.query_start.data_ptr(), meta.context_lens.data_ptr(),
            meta.context_lens.numel(), tables.data_ptr(), tables.stride(0), float(scale), int(sliding_window or 0),
            float(logit_softcap or 0.0), ATTENTION_PATHS[path])
        return out

    def rotary(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
               rotary_dim: int | None, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rotated q, rotated k) as new contiguous tensors (see Backend.rotary), or None."""
        if not self._rotary_fits(q, k, positions, cos_sin):
            return None
        q_out, k_out = _empty(q.shape, q.dtype), _empty(k.shape, k.dtype)
        self._rotate(q, k, positions, cos_sin, rotary_dim, interleaved, q_out, k_out, None, None, None)
        return q_out, k_out

    def rotary_write_kv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                        cos_sin: torch.Tensor, kv_layer: torch.Tensor, slot_mapping: torch.Tensor,
                        rotary_dim: int | None, interleaved: bool) -> torch.Tensor | None:
        """Rotated q; rotated k and v stored at slot_mapping in one pass (see Backend.rotary_write_kv), or None."""
        if not (self._rotary_fits(q, k, positions, cos_sin) and _is_rows(v, q.dtype) and v.shape == k.shape
                and kv_layer.dim() == 5 and _is_dense(kv_layer, q.dtype) and kv_layer.shape[-2:] == k.shape[-2:]
                and _is_dense(slot_mapping, torch.int64) and slot_mapping.numel() == q.shape[0]):
            return None
        q_out = _empty(q.shape, q.dtype)
        self._rotate(q, k, positions, cos_sin, rotary_dim, interleaved, q_out, None, v, kv_layer, slot_mapping)
        return q_out

    @staticmethod
    def _rotary_fits(q, k, positions, cos_sin) -> bool:
        return (q.dtype in _DTYPE_CODES and q.dim() == 3 and k.dim() == 3 and q.shape[0] > 0
                and q.shape[0] == k.shape[0] == positions.numel() and q.shape[2] == k.shape[2]
                and _is_rows(q, q.dtype) and _is_rows(k, q.dtype) and _is_dense(cos_sin, q.dtype)
                and cos_sin.dim() == 2 and _is_dense(positions, torch.int64))

    def _rotate(self, q, k, positions, cos_sin, rotary_dim, interleaved, q_out, k_out, v, kv_layer, slots) -> None:
        T, H, D = q.shape
        q_stride_t, q_stride_h, _ = q.stride()
        k_stride_t, k_stride_h, _ = k.stride()
        table_rows, table_width = cos_sin.shape
        if kv_layer is None:
            v_ptr = kv_ptr = slots_ptr = None
            v_stride_t = v_stride_h = num_slots = 0
        else:
            v_ptr, kv_ptr, slots_ptr = v.data_ptr(), kv_layer.data_ptr(), slots.data_ptr()
            v_stride_t, v_stride_h, _ = v.stride()
            _, num_blocks, block_size, _, _ = kv_layer.shape
            num_slots = num_blocks * block_size
        self._kernels.rotary(
            _DTYPE_CODES[q.dtype], q.data_ptr(), q_stride_t, q_stride_h, k.data_ptr(), k_stride_t, k_stride_h,
            q_out.data_ptr(), None if k_out is None else k_out.data_ptr(), T, H, k.shape[1], D,
            positions.data_ptr(), cos_sin.data_ptr(), table_rows, table_width, rotary_dim or table_width,
            bool(interleaved), v_ptr, v_stride_t, v_stride_h, kv_ptr, num_slots, slots_ptr)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None,
                 weight_offset: float):
        """RMSNorm of x, or (normed, x + residual) (see Backend.rms_norm); None where it does not apply."""
        dtype = x.dtype
        code = _DTYPE_CODES.get(dtype)
        if (code is None or not _is_dense(x, dtype) or not _is_dense(weight, dtype) or weight.dim() != 1
                or (residual is not None and (not _is_dense(residual, dtype) or residual.shape != x.shape))):
            return None
        shape = x.shape
        N = shape[-1] if shape else 0
        rows = x.numel() // N if N else 0
        if rows == 0 or weight.shape[0] != N:
            return None
        out = _empty(shape, dtype)
        total = None if residual is None else _empty(shape, dtype)
        self._kernels.rms_norm(code, x.data_ptr(), None if residual is None else residual.data_ptr(),
                               weight.data_ptr(), out.data_ptr(), None if total is None else total.data_ptr(),
                               rows, N, float(eps), float(weight_offset))
        return out if residual is None else (out, total)


ACTIVATIONS_MODULE = "cpu_activations"
_ACTIVATION_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2}  # cpu_activations.cpp's Act


def load_activations() -> "NativeActivations | None":
    """The compiled gated activations (splitfuse/native/csrc/cpu_activations.cpp), or None."""
    module = native.load(ACTIVATIONS_MODULE)
    return None if module is None else NativeActivations(module)


class NativeActivations:
    """act(gate) * up for x = [gate | up] in one pass; None where the kernel does not apply."""

    def __init__(self, module) -> None:
        self._kernels = module

    def gated_and_mul(self, x: torch.Tensor, activation: str) -> torch.Tensor | None:
        """activation: "silu", "gelu" (erf) or "gelu_tanh"; x [..., 2I] contiguous."""
        code = _DTYPE_CODES.get(x.dtype)
        if code is None or x.dim() == 0 or x.shape[-1] % 2 or x.shape[-1] == 0 or not _is_dense(x, x.dtype):
            return None
        *lead, width = x.shape
        inner = width // 2
        out = _empty((*lead, inner), x.dtype)
        self._kernels.gated_and_mul(code, _ACTIVATION_CODES[activation], x.data_ptr(), out.data_ptr(),
                                    x.numel() // width, inner)
        return out
