"""Test and demo helpers: tiny locally built models and tokenizer, HF parity checks, a scheduler driver."""

from splitfuse.testing.tiny_model import (
    ARCHITECTURES,
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    VOCAB_SIZE,
    build_tokenizer,
    cache_dir,
    default_model_dir,
    make_tiny_model,
)

__all__ = [
    "ARCHITECTURES",
    "BOS_ID",
    "EOS_ID",
    "PAD_ID",
    "UNK_ID",
    "VOCAB_SIZE",
    "build_tokenizer",
    "cache_dir",
    "default_model_dir",
    "make_tiny_model",
]
