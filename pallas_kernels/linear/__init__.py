"""Dense (unquantized) linear layers on GPU: `gemv.py`, a few rows of x times a bf16/f16 weight."""
