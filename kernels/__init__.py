"""Triton kernels of saliq (installed as saliq.kernels): one module per op family."""
