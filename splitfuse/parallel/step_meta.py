"""Each step's BatchMeta from rank 0 to every rank: a fixed header, then one packed int64 tensor."""

from __future__ import annotations

import torch
import torch.distributed as dist

from splitfuse.core.batch import BatchMeta

# the sizes the payload is cut by, and the host-side fields of BatchMeta
HEADER = ("num_tokens", "num_seqs", "num_sampled", "max_blocks", "max_query_len", "max_context_len",
          "block_size", "is_decode_only", "has_seq_lens")


def pack(meta: BatchMeta) -> tuple[torch.Tensor, torch.Tensor]:
    """(header [len(HEADER)], payload) int64 CPU tensors holding every field of a host-side meta."""
    tensors = [meta.input_ids, meta.positions, meta.query_start, meta.context_lens, meta.block_tables.flatten(),
               meta.slot_mapping, meta.token_seq, meta.sample_index]
    if meta.seq_lens is not None:
        tensors.append(meta.seq_lens)
    header = torch.tensor([meta.num_tokens, meta.num_seqs, meta.sample_index.numel(),
                           meta.block_tables.shape[1], meta.max_query_len, meta.max_context_len, meta.block_size,
                           int(meta.is_decode_only), int(meta.seq_lens is not None)], dtype=torch.int64)
    return header, torch.cat([t.to(torch.int64) for t in tensors])


def unpack(header: torch.Tensor, payload: torch.Tensor) -> BatchMeta:
    """The BatchMeta `pack` was given (on the CPU)."""
    h = dict(zip(HEADER, header.tolist()))
    S, max_blocks = h["num_seqs"], h["max_blocks"]
    parts = payload.split(_payload_sizes(h))
    int32 = [p.to(torch.int32) for p in (parts[2], parts[3], parts[4])]
    query_start, context_lens, block_tables = int32
    return BatchMeta(
        input_ids=parts[0], positions=parts[1], query_start=query_start, context_lens=context_lens,
        block_tables=block_tables.view(S, max_blocks), slot_mapping=parts[5], token_seq=parts[6],
        sample_index=parts[7], num_tokens=h["num_tokens"], num_seqs=S, max_query_len=h["max_query_len"],
        max_context_len=h["max_context_len"], block_size=h["block_size"], is_decode_only=bool(h["is_decode_only"]),
        query_start_host=query_start.tolist(), context_lens_host=context_lens.tolist(),
        seq_lens=parts[8].to(torch.int32) if h["has_seq_lens"] else None,
    )


def broadcast_step(meta: BatchMeta) -> None:
    """Rank 0: send one step's metadata (built on the host) to every rank."""
    header, payload = pack(meta)
    dist.broadcast(header, src=0)
    dist.broadcast(payload, src=0)


def receive_step() -> BatchMeta:
    """Other ranks: the next step's metadata from rank 0."""
    header = torch.empty(len(HEADER), dtype=torch.int64)
    dist.broadcast(header, src=0)
    payload = torch.empty(sum(_payload_sizes(dict(zip(HEADER, header.tolist())))), dtype=torch.int64)
    dist.broadcast(payload, src=0)
    return unpack(header, payload)


def _payload_sizes(h: dict[str, int]) -> list[int]:
    """Lengths of the packed tensors, in `pack`'s order, from a header."""
    T, S = h["num_tokens"], h["num_seqs"]
    return [T, T, S + 1, S, S * h["max_blocks"], T, T, h["num_sampled"]] + ([S] if h["has_seq_lens"] else [])
