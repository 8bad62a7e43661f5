"""What the Triton ops share on the host: where kernels run, tile and launch sizes, row views,
and argument checks whose messages name the op, the argument and what was expected."""

from __future__ import annotations

import torch
import triton

from splitfuse.backends.device_backend import env_flag

# The interpreter pays per program, not per element: on the CPU one program takes up to this many
# elements of a row-wise op, so a test launches few programs.
INTERPRETER_TILE = 16384


def interpreting() -> bool:
    """TRITON_INTERPRET is set: kernels run in Triton's interpreter, on CPU tensors."""
    return env_flag("TRITON_INTERPRET")


def num_warps(device: torch.device, on_gpu: int) -> int:
    """Warps per program: `on_gpu` on a device; 1 in the interpreter, where more only cost time."""
    return 1 if device.type == "cpu" else on_gpu


def rows_per_program(num_rows: int, row_tile: int, device: torch.device, *, gpu_elements: int,
                     gpu_max_rows: int) -> int:
    """How many rows of `row_tile` elements one program handles: on a GPU about `gpu_elements`
    (at most `gpu_max_rows`) so each program moves enough memory; in the interpreter as many as
    INTERPRETER_TILE holds."""
    if device.type == "cpu":
        return max(1, min(triton.next_power_of_2(num_rows), INTERPRETER_TILE // row_tile))
    return max(1, min(gpu_max_rows, gpu_elements // row_tile))


def as_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """[M, n] view of t [..., n] with unit column stride (a copy only when no such view exists)."""
    rows = t.reshape(-1, n)
    return rows if n <= 1 or rows.stride(1) == 1 else rows.contiguous()


def unit_last(t: torch.Tensor) -> torch.Tensor:
    """t itself when its last dim is contiguous, else a contiguous copy."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


# ---- argument checks ----------------------------------------------------------------------------
def check_floating(op: str, **tensors: torch.Tensor | None) -> None:
    """TypeError naming the first tensor that is not floating point (None entries are skipped)."""
    for name, t in tensors.items():
        if t is not None and not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be floating point, got {t.dtype}")


def check_device(op: str, device: torch.device, **tensors: torch.Tensor | None) -> None:
    """ValueError naming the first tensor that is not on `device` (None entries are skipped)."""
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{op}: {name} is on {t.device}, expected {device} (all tensors on one device)")


def check_same_shape(op: str, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """ValueError unless t has ref's shape (v next to k)."""
    if t.shape != ref.shape:
        raise ValueError(f"{op}: {name} {tuple(t.shape)} and {ref_name} {tuple(ref.shape)} differ in shape")


def check_like(op: str, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """ValueError unless t has ref's shape and dtype (a residual next to x)."""
    check_same_shape(op, name, t, ref_name, ref)
    if t.dtype != ref.dtype:
        raise ValueError(f"{op}: {name} dtype {t.dtype} differs from {ref_name} dtype {ref.dtype}")


def check_index(op: str, name: str, t: torch.Tensor, length: int) -> None:
    """ValueError unless t is an int32/int64 vector of `length` entries (positions, slot_mapping)."""
    if t.shape != (length,) or t.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{op}: {name} must be int32/int64 [T={length}], got {t.dtype} {tuple(t.shape)}")
