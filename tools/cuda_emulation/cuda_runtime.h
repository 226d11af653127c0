/*!
 * \file cuda_runtime.h (emulation)
 * \brief Just enough of the CUDA runtime to compile src/operator/margin_softmax.cu with the host
 *        compiler and run its kernels on the CPU, for the tests on machines without a GPU.
 *
 * tools/emulate_cuda.py rewrites every `kernel<<<grid, block, shared, stream>>>(args)` into
 * `cuda_emulation::launch(grid, block, [&] { kernel(args); })` and compiles the result with
 * this directory first on the include path, so `#include <cuda_runtime.h>` lands here.
 *
 * What is emulated, and how faithfully:
 * - A launch runs its blocks one after another, on the calling thread. The CUDA threads of a
 *   block are coroutines (ucontext), each with its own stack: `__syncthreads()` hands control
 *   back to a scheduler, which resumes every thread once all of them have reached a barrier or
 *   returned (a returned thread counts as arrived, as exited threads do on a GPU). Between two
 *   barriers the threads run in a shuffled order (fixed seed): a kernel relying on an order
 *   among its threads without a barrier fails here as it may on a GPU. A kernel without
 *   barriers (none in its first block) runs its other blocks' threads as plain calls.
 * - `__shared__` variables are function statics: one copy, which the threads of the one block
 *   in flight share, as a block shares its shared memory.
 * - One thread runs at a time, so atomics are plain read-modify-writes. Device memory is host
 *   memory: the "device pointers" the entry points take are NumPy arrays' data; the copies and
 *   sets are memmove and memset, done at once (the stream is in order: later kernels see them).
 * - A launch configuration a GPU refuses (an empty grid or block, more than 1024 threads per
 *   block) runs nothing and sets the error cudaGetLastError() then returns, as CUDA does.
 * - Writes outside an array show through the harness's guard zones (HostDevice in
 *   mx_lsoftmax/support/cuda_harness.py), checked after every entry point.
 * What it cannot show: data races (one thread runs at a time, so a read-modify-write that
 * should be atomic passes), reads outside an array, warp-level behaviour and timing, and
 * anything of nvcc's own code generation (`make cuda` builds that; only a GPU runs it).
 */
#ifndef MARGIN_SOFTMAX_CUDA_EMULATION_H_
#define MARGIN_SOFTMAX_CUDA_EMULATION_H_

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <ucontext.h>

#include <algorithm>
#include <functional>
#include <memory>
#include <numeric>
#include <random>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __shared__ static

struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
  dim3() = default;
  dim3(unsigned int x_, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

typedef struct CUstream_st* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidConfiguration = 9 };
enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4
};

inline dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace cuda_emulation {

inline cudaError_t last_error = cudaSuccess;

// The CUDA threads of the block in flight, each a coroutine with its own stack on the calling
// OS thread: one runs at a time, until it reaches __syncthreads() or returns.
struct Block {
  ucontext_t scheduler;
  std::vector<ucontext_t> contexts;
  std::vector<std::unique_ptr<char[]>> stacks;  // uninitialised: only what a thread uses is touched
  std::vector<char> finished;
  unsigned int current = 0;
  const std::function<void()>* kernel = nullptr;
  bool reached_barrier = false;  // in the first block
  bool direct = false;           // threads called one after another, not as coroutines
};
inline Block* block_in_flight = nullptr;
constexpr size_t kStackBytes = 256 * 1024;

inline void run_thread() {
  Block& block = *block_in_flight;
  (*block.kernel)();
  block.finished[block.current] = 1;  // uc_link returns to the scheduler
}

// Kernel threads run in a shuffled order in every phase between two barriers (a fixed seed,
// so a failure repeats): a kernel that relies on an order among its threads without a
// barrier gives wrong results here, as it may on a GPU. A kernel none of whose threads reach a
// barrier in the first block runs its other blocks' threads as plain calls (coroutines cost two
// system calls per switch); a barrier in a later block then stops the process with a message.
inline void launch(dim3 grid, dim3 block_shape, const std::function<void()>& kernel) {
  const unsigned long long blocks = 1ull * grid.x * grid.y * grid.z;
  const unsigned long long requested = 1ull * block_shape.x * block_shape.y * block_shape.z;
  if (blocks == 0 || requested == 0 || requested > 1024) {
    last_error = cudaErrorInvalidConfiguration;
    return;
  }
  const unsigned int threads = static_cast<unsigned int>(requested);
  gridDim = grid;
  blockDim = block_shape;
  Block block;
  block.kernel = &kernel;
  block.contexts.resize(threads);
  for (unsigned int t = 0; t < threads; ++t) block.stacks.emplace_back(new char[kStackBytes]);
  std::vector<unsigned int> order(threads);
  std::iota(order.begin(), order.end(), 0u);
  std::mt19937 shuffle(12345);
  Block* outer = block_in_flight;
  block_in_flight = &block;
  for (unsigned long long b = 0; b < blocks; ++b) {
    blockIdx = dim3(b % grid.x, b / grid.x % grid.y, b / (1ull * grid.x * grid.y));
    block.direct = b > 0 && !block.reached_barrier;
    if (block.direct) {
      std::shuffle(order.begin(), order.end(), shuffle);
      for (unsigned int t : order) {
        block.current = t;
        threadIdx = dim3(t % block_shape.x, t / block_shape.x % block_shape.y,
                         t / (block_shape.x * block_shape.y));
        kernel();
      }
      continue;
    }
    block.finished.assign(threads, 0);
    for (unsigned int t = 0; t < threads; ++t) {
      ucontext_t& context = block.contexts[t];
      getcontext(&context);
      context.uc_stack.ss_sp = block.stacks[t].get();
      context.uc_stack.ss_size = kStackBytes;
      context.uc_link = &block.scheduler;
      makecontext(&context, run_thread, 0);
    }
    unsigned int running = threads;
    while (running > 0) {  // one phase: every unfinished thread runs to its next barrier
      std::shuffle(order.begin(), order.end(), shuffle);
      for (unsigned int t : order) {
        if (block.finished[t]) continue;
        block.current = t;
        threadIdx = dim3(t % block_shape.x, t / block_shape.x % block_shape.y,
                         t / (block_shape.x * block_shape.y));
        swapcontext(&block.scheduler, &block.contexts[t]);
        if (block.finished[t]) --running;
      }
    }
  }
  block_in_flight = outer;
}

}  // namespace cuda_emulation

// The barrier: back to the scheduler, which resumes this thread once every thread of the
// block has reached a barrier or returned (a returned thread counts as arrived, as on a GPU).
inline void __syncthreads() {
  cuda_emulation::Block& block = *cuda_emulation::block_in_flight;
  if (block.direct) {
    fprintf(stderr, "cuda_emulation: a kernel reached __syncthreads() in block %u but in none of "
                    "block 0's threads; the emulation assumes barriers in every block or none\n",
            blockIdx.x);
    abort();
  }
  block.reached_barrier = true;
  swapcontext(&block.contexts[block.current], &block.scheduler);
}

// One CUDA thread runs at a time: a read-modify-write is atomic as written.
inline int atomicMin(int* address, int value) {
  const int old = *address;
  if (value < old) *address = value;
  return old;
}

inline double atomicAdd(double* address, double value) {
  const double old = *address;
  *address = old + value;
  return old;
}

inline cudaError_t cudaMemcpyAsync(void* destination, const void* source, size_t bytes,
                                   cudaMemcpyKind, cudaStream_t = nullptr) {
  if (bytes > 0) memmove(destination, source, bytes);
  return cudaSuccess;
}

inline cudaError_t cudaMemsetAsync(void* destination, int value, size_t bytes,
                                   cudaStream_t = nullptr) {
  if (bytes > 0) memset(destination, value, bytes);
  return cudaSuccess;
}

inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }

inline cudaError_t cudaGetLastError() {
  const cudaError_t error = cuda_emulation::last_error;
  cuda_emulation::last_error = cudaSuccess;
  return error;
}

#endif  // MARGIN_SOFTMAX_CUDA_EMULATION_H_
