"""Triton kernels for the grouped ops. Launchers here take plain tensors; autograd lives in
kernels/autograd.py and the backend API in kernels/triton_backend.py."""
