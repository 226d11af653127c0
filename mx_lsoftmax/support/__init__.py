"""Support code that serves the examples and the tests, not the layer itself.

``data``: the MNIST / Fashion-MNIST IDX loader of the examples.
``environment``: the machine and MXNet settings recorded beside every measurement.
``cuda_harness``: the compiled op's CUDA kernels driven from CuPy (tests, benchmark),
since the MXNet 1.9.1 wheel has no GPU build.
"""
