"""The benchmark script (examples/benchmark.py): its tables and sections, on tiny shapes.

Timings are never asserted (they depend on the machine); the structure, the
ratios' arithmetic and the JSON are.
"""
import json
import sys
import types

import mxnet as mx
import numpy as np
import pytest

import mx_lsoftmax
from mx_lsoftmax.support import cuda_harness, environment

from conftest import load_example


def test_layer_and_gpu_sections_on_a_tiny_shape(tmp_path):
    benchmark = load_example("benchmark")
    markdown, raw_path = tmp_path / "bench.md", tmp_path / "bench.json"
    raw = benchmark.main(["--parts", "layer", "gpu", "--shapes", "16x8x5", "--dtypes", "float64",
                          "--rounds", "2", "--backends", "python", "compiled",
                          "--write", str(markdown), "--json", str(raw_path)])
    assert json.loads(raw_path.read_text())["results"] == raw["results"]
    modes = {result["mode"]: result for result in raw["results"]}
    assert set(modes) == {"bound", "imperative", "hybridized"}
    for result in modes.values():
        assert result["shape"] == [16, 8, 5]
        for backend in ("python", "compiled"):
            assert result["ratio"][backend] == pytest.approx(result["ms"][backend] / result["ms"]["softmax"])
    text = markdown.read_text()
    # Ratios move with the processor: the document names it.
    assert f"- Machine: {environment.processor()} (" in text
    for mode in ("bound", "imperative", "hybridized"):
        assert f"| 16x8x5 | float64 | {mode} |" in text
    assert "## GPU: the CUDA kernels against cuBLAS" in text
    try:
        cuda_harness.KernelHarness()
    except cuda_harness.HarnessUnavailable as reason:
        assert f"Not measured on this machine: {reason}." in text
        assert raw["gpu"] == []
    else:
        assert "Device: " in text and raw["gpu"][0]["shape"] == [16, 8, 5]


def test_lenet_table_ratios():
    rows = [{"batch": 128, "softmax": 2000.0, "python": 1800.0, "compiled": 1960.0,
             "softmax_test_accuracy": 0.97, "python_test_accuracy": 0.9612, "compiled_test_accuracy": 0.958}]
    table = load_example("benchmark").lenet_table(rows).splitlines()
    assert table[0] == ("| batch | softmax samples/s | python samples/s (ratio) | compiled samples/s (ratio) "
                        "| test accuracy after 2 epochs (softmax, python, compiled) |")
    assert table[2] == "| 128 | 2000 | 1800 (0.90x) | 1960 (0.98x) | 0.970, 0.961, 0.958 |"


def test_harness_says_cupy_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError
    with pytest.raises(cuda_harness.HarnessUnavailable, match="CuPy is not installed") as raised:
        cuda_harness.KernelHarness()
    assert not raised.value.gpu_present


def _fake_cupy(device_count):
    runtime = types.SimpleNamespace(getDeviceCount=lambda: device_count, CUDARuntimeError=RuntimeError)
    return types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime))


def test_harness_says_no_gpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(0))
    with pytest.raises(cuda_harness.HarnessUnavailable, match="no CUDA GPU") as raised:
        cuda_harness.KernelHarness()
    assert not raised.value.gpu_present


def test_harness_names_the_missing_library(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(1))
    missing = str(tmp_path / "liblsoftmax_cuda.so")
    with pytest.raises(cuda_harness.HarnessUnavailable, match="make cuda") as raised:
        cuda_harness.KernelHarness(missing)
    assert raised.value.gpu_present and missing in str(raised.value)


def profile_text(tmp_path, *arguments):
    """The --profile file of examples/benchmark.py at 16x8x5 float32 with these further arguments."""
    path = tmp_path / "profile.txt"
    load_example("benchmark").main(["--profile", str(path), "--shapes", "16x8x5", "--dtypes", "float32",
                                    *arguments])
    return path.read_text()


def test_profile_names_the_library_op(tmp_path):
    text = profile_text(tmp_path, "--modes", "bound", "--backends", "compiled")
    assert "== 16x8x5 float32 bound softmax, 5 calls" in text
    assert "== 16x8x5 float32 bound compiled, 5 calls" in text
    compiled_part = text.split("bound compiled, 5 calls")[1]
    assert "margin_softmax_target" in compiled_part and "FullyConnected" in compiled_part


def test_profile_of_a_kind_names_its_python_op(tmp_path):
    text = profile_text(tmp_path, "--profile-kind", "arcface", "--backends", "python")
    assert "== 16x8x5 float32 bound arcface softmax, 5 calls" in text
    python_part = text.split("bound arcface python, 5 calls")[1]
    assert "MarginSoftmax" in python_part and "_backward_FullyConnected" in python_part


@pytest.mark.parametrize("kind", ["cosface", "arcface", "combined"])
def test_stock_operator_baseline_equals_the_layer(kind):
    """The benchmark's insightface-style graph is an independent implementation: its forward
    equals the layer's (float64), so the speed comparison compares like with like."""
    import mxnet as mx
    import numpy as np
    from mxnet import autograd

    import mx_lsoftmax
    from conftest import kind_inputs, nd
    benchmark = load_example("benchmark")
    settings = mx_lsoftmax.MarginSettings(kind)
    data, weight, label = kind_inputs(kind, settings.values, 12, 6, 5, seed=4)
    graph = benchmark.insightface_symbol(kind, mx.sym.var("data"), mx.sym.var("weight"), mx.sym.var("label"),
                                         5, settings, "float64")
    stock = graph.bind(mx.cpu(), {"data": nd(data), "weight": nd(weight), "label": nd(label, "float64")})
    with autograd.record():
        layer = mx_lsoftmax.margin_logits(nd(data), nd(weight), nd(label), 5, kind, backend="python")
    np.testing.assert_allclose(stock.forward(is_train=True)[0].asnumpy(), layer.asnumpy(), rtol=1e-6, atol=1e-6)


def test_kinds_section_on_a_tiny_shape(tmp_path):
    benchmark = load_example("benchmark")
    raw = benchmark.main(["--parts", "kinds", "--kind-shapes", "16x8x5", "--kinds", "lsoftmax", "arcface",
                          "--rounds", "3", "--backends", "python", "--write", str(tmp_path / "k.md")])
    kinds = {result["kind"]: result for result in raw["kinds"]}
    assert set(kinds) == {"lsoftmax", "arcface"}
    assert "stock" in kinds["arcface"]["ratio"] and "stock" not in kinds["lsoftmax"]["ratio"]
    assert kinds["arcface"]["ratio"]["stock"] == pytest.approx(
        kinds["arcface"]["ms"]["stock"] / kinds["arcface"]["ms"]["softmax"])
    text = (tmp_path / "k.md").read_text()
    assert "| 16x8x5 | arcface |" in text and "| 16x8x5 | lsoftmax |" in text


def test_kinds_section_times_an_added_weight_gradient_too(tmp_path):
    benchmark = load_example("benchmark")
    raw = benchmark.main(["--parts", "kinds", "--kind-shapes", "16x8x5", "--kinds", "arcface", "--rounds", "2",
                          "--backends", "python", "--weight-grad-req", "both", "--write", str(tmp_path / "k.md")])
    arcface = raw["kinds"][0]
    assert set(arcface["ratio"]) == {"python", "python +add", "stock"}
    assert "| python +add ms (ratio) |" in (tmp_path / "k.md").read_text()
    # The runner of a "+add" name binds the weight's gradient to be added to.
    arrays = benchmark.random_arrays((16, 8, 5), "float32")
    graph = mx_lsoftmax.margin_logits(mx.sym.var("data"), mx.sym.var("weight"), mx.sym.var("label"), 5, "arcface",
                                      backend="python")
    run = benchmark.bind_graph(graph, 16, 8, 5, "float32", arrays, "add")
    run()
    first = run.executor.grad_dict["weight"].asnumpy().copy()
    run()
    np.testing.assert_allclose(run.executor.grad_dict["weight"].asnumpy(), 2 * first, rtol=1e-5, atol=1e-6)
