"""The CUDA emulation that runs the kernels without a GPU (tools/cuda_emulation, `make emulated`)
does what its header says: barriers, a shuffled order between them, refused launch
configurations, and guard zones that catch writes outside an array. A small kernel file is
rewritten and compiled here, as the Makefile does for margin_softmax.cu."""
import ctypes
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from mx_lsoftmax.support.cuda_harness import HostDevice

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

KERNELS = r"""
#include <cuda_runtime.h>

constexpr int kThreads = 128;

// Sum of values[0..count) by one block; `synchronised` = 0 leaves out the barrier that makes
// each step of the tree read what the step before wrote.
__global__ void block_sum(const double* values, int count, double* total, int synchronised) {
  __shared__ double partial[kThreads];
  double sum = 0.0;
  for (int i = threadIdx.x; i < count; i += blockDim.x) sum += values[i];
  partial[threadIdx.x] = sum;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if ((int)threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    if (synchronised) __syncthreads();
  }
  if (threadIdx.x == 0) *total = partial[0];
}

// out[i] = i for i < count, one thread per element: a count beyond the array writes past its end.
__global__ void fill_index(double* out, long count) {
  const long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
  if (i < count) out[i] = (double)i;
}

extern "C" int sum(const double* values, int count, double* total, int synchronised) {
  block_sum<<<1, kThreads, 0, 0>>>(values, count, total, synchronised);
  return cudaGetLastError();
}

extern "C" int fill(double* out, long count, int blocks, int threads) {
  fill_index<<<blocks, threads>>>(out, count);
  return cudaGetLastError();
}
"""


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        pytest.fail(f"no host compiler {compiler!r}: the emulated CUDA build needs one (set CXX)")
    folder = tmp_path_factory.mktemp("emulation")
    (folder / "kernels.cu").write_text(KERNELS)
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "emulate_cuda.py"), str(folder / "kernels.cu"),
                    str(folder / "kernels.cc")], check=True)
    subprocess.run([compiler, "-std=c++17", "-O1", "-fPIC", "-shared", "-Wall", "-Wno-sign-compare",
                    "-I", os.path.join(ROOT, "tools", "cuda_emulation"), str(folder / "kernels.cc"),
                    "-o", str(folder / "kernels.so")], check=True)
    library = ctypes.CDLL(str(folder / "kernels.so"))
    library.sum.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    library.fill.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_int]
    return library


def test_the_rewrite_keeps_everything_but_the_launches():
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    try:
        import emulate_cuda
    finally:
        sys.path.pop(0)
    text, launches = emulate_cuda.rewrite(KERNELS)
    assert launches == 2 and "<<<" not in text
    assert "cuda_emulation::launch(1, kThreads, [&] { block_sum(values, count, total, synchronised); });" in text
    assert "cuda_emulation::launch(blocks, threads, [&] { fill_index(out, count); });" in text
    assert text.replace(" ", "").count("__global__") == KERNELS.replace(" ", "").count("__global__")


def test_barriers_order_a_block_reduction(emulated):
    values = HostDevice.asarray(np.arange(1000, dtype=np.float64))
    total = HostDevice.zeros((1,))
    assert emulated.sum(HostDevice.pointer(values), 1000, HostDevice.pointer(total), 1) == 0
    assert total[0] == 499500.0


def test_a_missing_barrier_gives_a_wrong_sum(emulated):
    """Between barriers the threads run in a shuffled order: a tree step that reads a partial
    sum its neighbour has not written yet loses it, as it may on a GPU."""
    values = HostDevice.asarray(np.arange(1000, dtype=np.float64))
    total = HostDevice.zeros((1,))
    assert emulated.sum(HostDevice.pointer(values), 1000, HostDevice.pointer(total), 0) == 0
    assert total[0] != 499500.0


@pytest.mark.parametrize("blocks, threads", [(0, 32), (1, 0), (1, 1025)])
def test_launch_configurations_a_gpu_refuses_run_nothing_and_report(emulated, blocks, threads):
    out = HostDevice.full((8,), -1.0)
    assert emulated.fill(HostDevice.pointer(out), 8, blocks, threads) == 9  # cudaErrorInvalidConfiguration
    assert np.all(out == -1.0)
    assert emulated.fill(HostDevice.pointer(out), 8, 1, 32) == 0  # the error was read once
    np.testing.assert_array_equal(out, np.arange(8.0))


def test_guard_zones_catch_a_write_past_the_end(emulated):
    out = HostDevice.zeros((4, 2))
    HostDevice.check_guards()
    assert emulated.fill(HostDevice.pointer(out), 9, 1, 32) == 0  # one element too many
    with pytest.raises(RuntimeError, match=r"outside an array of shape \(4, 2\) float64 \(after it\)"):
        HostDevice.check_guards()
    HostDevice.check_guards()  # reported once, the zone restored
