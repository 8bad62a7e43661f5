"""GPT-2 for splitfuse: `plugin.py` registers the model class of `model.py`."""
