"""Kernel functions, one module per op family, each pass one function that picks its device.

Every function here is a pure function of arrays. Its GPU body (Numba CUDA kernels, CuPy
ElementwiseKernels, cuBLAS) and its NumPy CPU twin sit side by side, forward beside backward;
``backend.on_gpu(x)`` picks between them. These functions know nothing of layers.
"""
