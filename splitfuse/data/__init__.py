"""Files shipped inside the package: the embedded demo model used when no model is named."""

from __future__ import annotations

import logging
import pathlib

log = logging.getLogger("splitfuse")

# A small Llama trained on Python's standard library source (scripts/train_demo_model.py; its
# training.json records how, and the held-out loss).
DEMO_MODEL_DIR = pathlib.Path(__file__).with_name("demo_model")


def default_model_dir() -> pathlib.Path:
    """The model used when none is named: the shipped demo model, or, in a source tree without
    it, the tiny random-weight Llama (built once and cached)."""
    if (DEMO_MODEL_DIR / "config.json").is_file():
        return DEMO_MODEL_DIR
    from splitfuse.testing.tiny_model import default_model_dir as tiny_model_dir

    log.warning("the demo model is missing from %s; using a tiny random-weight model (its output is noise)",
                DEMO_MODEL_DIR)
    return tiny_model_dir()
