"""Triton kernels of capstriton (installed as ``capstriton.kernels``): kernels and launch helpers only."""
