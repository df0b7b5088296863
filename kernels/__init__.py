"""Triton kernels for microdit's GPU backend (see attention.py, common.py)."""
