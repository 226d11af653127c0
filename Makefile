# mx-lsoftmax: build, install and test.
#   make install   create .venv with the pinned dependencies and the package
#   make           build the CPU library mx_lsoftmax/lib/liblsoftmax.so against the installed MXNet
#   make cuda      build the CPU+GPU library with nvcc
#   make emulated  the CUDA kernels compiled for the CPU (tests only: build/, never installed)
#   make test      all of the above that is out of date (the GPU library once built), then pytest
#   make demo      train the 2-D LeNet on MNIST with margin 4 and draw its features
#   make bench     benchmark every backend against FullyConnected (and C = 10^6: ~10 GB of memory)
#   make results   the MNIST / Fashion-MNIST comparisons of docs/results.md (hours; reuses finished runs)
#   make imbalanced the long-tailed comparisons of docs/imbalanced.md (reuses finished runs)

PYTHON_SYSTEM ?= python3
VENV          ?= .venv
PYTHON        := $(VENV)/bin/python
CXX           ?= g++
NVCC          ?= nvcc
CUDA_ARCH     ?= -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
                 -gencode arch=compute_90,code=compute_90
BUILD_DIR     := build
LIBRARY       := mx_lsoftmax/lib/liblsoftmax.so
CUDA_LIBRARY  := mx_lsoftmax/lib/liblsoftmax_cuda.so
EMULATED_CUDA_LIBRARY := $(BUILD_DIR)/liblsoftmax_cuda_emulated.so
SOURCES       := src/operator/margin_softmax.cc
HEADERS       := src/operator/margin_softmax-inl.h src/operator/margin_softmax-gpu.h

# Found from the installed package, never hard-coded.
MXNET_INCLUDE  = $(shell $(PYTHON) -c "import mxnet.libinfo as l; print(l.find_include_path())" 2>/dev/null)
MXNET_LIB_API  = $(abspath $(MXNET_INCLUDE)/../src/lib_api.cc)
CXXFLAGS      ?= -O3 -march=x86-64-v2 -std=c++17 -fPIC -pthread -Wall -Wno-unused-function

# The project's MNIST copy when this checkout sits beside ../shared (as in CI).
MNIST_DIR         ?= $(abspath $(wildcard ../shared/data/mnist))
FASHION_MNIST_DIR ?= $(abspath $(wildcard ../shared/data/fashion-mnist))
export MNIST_DIR FASHION_MNIST_DIR

# Training runs (demo, results) as repeatable as MXNet allows: a fixed number of CPU
# threads (oneDNN's reductions depend on it) and MXNet's deterministic kernels.
# Runs still differ in the last digits between processor models (docs in README).
RUN_THREADS   ?= 2
CORES         ?= $(shell nproc)
RUN_ENV        = OMP_NUM_THREADS=$(RUN_THREADS) MXNET_ENFORCE_DETERMINISM=1

.PHONY: all cuda emulated install test demo bench results imbalanced clean

# A CUDA build, once made, is what mx_lsoftmax loads (mx_lsoftmax/library.py), so `make` keeps it
# in step with the sources too: a stale one would run old code behind a fresh CPU library.
all: $(LIBRARY) $(wildcard $(CUDA_LIBRARY))

$(VENV)/.installed: pyproject.toml requirements.txt
	$(PYTHON_SYSTEM) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -r requirements.txt
	$(PYTHON) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

install: $(VENV)/.installed all

$(LIBRARY): $(SOURCES) $(HEADERS) $(VENV)/.installed
	@mkdir -p $(dir $@)
	$(CXX) $(CXXFLAGS) -shared -I$(MXNET_INCLUDE) -Isrc/operator $(SOURCES) $(MXNET_LIB_API) -o $@

# margin_softmax.cu holds only kernels and plain-pointer launchers; lib_api.h (which
# under nvcc would need cuRAND's headers, absent from this CUDA toolkit) is
# compiled by the host compiler only, so no cuRAND package is needed.
$(CUDA_LIBRARY): $(SOURCES) src/operator/margin_softmax.cu $(HEADERS) $(VENV)/.installed
	@mkdir -p $(dir $@) $(BUILD_DIR)
	$(NVCC) -O3 -std=c++17 $(CUDA_ARCH) -Xcompiler -fPIC -Isrc/operator \
	    -c src/operator/margin_softmax.cu -o $(BUILD_DIR)/margin_softmax_cu.o
	$(CXX) $(CXXFLAGS) -DMARGIN_SOFTMAX_WITH_CUDA -I$(MXNET_INCLUDE) -Isrc/operator \
	    -c $(SOURCES) -o $(BUILD_DIR)/margin_softmax_cc.o
	$(CXX) $(CXXFLAGS) -I$(MXNET_INCLUDE) -c $(MXNET_LIB_API) -o $(BUILD_DIR)/lib_api.o
	$(NVCC) -shared $(CUDA_ARCH) -cudart static $(BUILD_DIR)/margin_softmax_cu.o \
	    $(BUILD_DIR)/margin_softmax_cc.o $(BUILD_DIR)/lib_api.o -o $@

cuda: $(CUDA_LIBRARY)

# The same kernels with the host compiler against an emulated CUDA runtime, so that the tests
# run them on machines without a GPU (tools/cuda_emulation/cuda_runtime.h says what it emulates);
# margin_softmax.cc comes in through lib_api_entries.cc, which adds a way to call the op's
# lib_api functions, CPU or GPU, on host memory.
$(EMULATED_CUDA_LIBRARY): $(SOURCES) src/operator/margin_softmax.cu $(HEADERS) tools/emulate_cuda.py \
                          tools/cuda_emulation/cuda_runtime.h tools/cuda_emulation/lib_api_entries.cc \
                          $(VENV)/.installed
	@mkdir -p $(BUILD_DIR)/emulated
	$(PYTHON) tools/emulate_cuda.py src/operator/margin_softmax.cu $(BUILD_DIR)/emulated/margin_softmax_cu.cc
	$(CXX) $(CXXFLAGS) -Wno-sign-compare -Itools/cuda_emulation -Isrc/operator \
	    -c $(BUILD_DIR)/emulated/margin_softmax_cu.cc -o $(BUILD_DIR)/emulated/margin_softmax_cu.o
	$(CXX) $(CXXFLAGS) -I$(MXNET_INCLUDE) -Isrc/operator \
	    -c tools/cuda_emulation/lib_api_entries.cc -o $(BUILD_DIR)/emulated/margin_softmax_cc.o
	$(CXX) $(CXXFLAGS) -I$(MXNET_INCLUDE) -c $(MXNET_LIB_API) -o $(BUILD_DIR)/emulated/lib_api.o
	$(CXX) -shared -pthread $(BUILD_DIR)/emulated/margin_softmax_cu.o \
	    $(BUILD_DIR)/emulated/margin_softmax_cc.o $(BUILD_DIR)/emulated/lib_api.o -o $@

emulated: $(EMULATED_CUDA_LIBRARY)

test: install $(EMULATED_CUDA_LIBRARY)
	$(PYTHON) -m pytest -q tests

demo: install
	$(RUN_ENV) $(PYTHON) examples/train_mnist.py --embed-dim 2 --margin 4 --beta 100 --scale 0.99 \
	    --epochs 5 --plot build/demo_features.png --json build/demo.json

# The second run gives FullyConnected every core: MXNet's default takes half (docs/performance.md).
bench: install
	$(PYTHON) examples/benchmark.py --parts layer kinds lenet gpu scale --write docs/benchmarks.md
	OMP_NUM_THREADS=$(CORES) $(PYTHON) examples/benchmark.py --parts kinds --write docs/benchmarks_all_cores.md

results: install
	$(RUN_ENV) $(PYTHON) examples/mnist_results.py --epochs 20 --seeds 0 1 --figure-epochs 5 \
	    --family-epochs 10 --reuse

imbalanced: install
	$(RUN_ENV) $(PYTHON) examples/imbalanced_results.py --epochs 15 --drw-epoch 12 --seeds 0 1 --reuse

clean:
	rm -rf $(BUILD_DIR) mx_lsoftmax/lib *.egg-info .pytest_cache
