"""The Triton kernel library shared by the cuda and xpu backends, one module per op.

Each op module imports triton; import them only where triton is available (this package itself
imports nothing heavy).
"""
