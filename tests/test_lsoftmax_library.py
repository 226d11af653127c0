"""Finding and loading the compiled library: every build works, a missing one says how to build."""
import os
import subprocess
import sys

import pytest

import mx_lsoftmax

from conftest import ROOT

LIBRARY_DIR = os.path.join(os.path.dirname(mx_lsoftmax.__file__), "lib")


def run_python(code, **environment):
    """Run `code` in a fresh interpreter with this checkout importable; return (rc, output)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, **environment)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            timeout=120)
    return result.returncode, result.stdout + result.stderr


def test_missing_library_gives_the_build_command():
    code = ("import mx_lsoftmax, mxnet as mx\n"
            "assert not mx_lsoftmax.library.is_loaded()\n"
            "assert mx_lsoftmax.resolve_backend('auto') == 'python'\n"
            "try:\n"
            "    mx_lsoftmax.lsoftmax(mx.nd.ones((2, 3)), mx.nd.ones((4, 3)), mx.nd.zeros(2), 4,"
            " backend='compiled')\n"
            "except mx_lsoftmax.library.LibraryMissingError as error:\n"
            "    print('MESSAGE', error)\n")
    rc, output = run_python(code, MX_LSOFTMAX_LIBRARY="/nonexistent/liblsoftmax.so")
    assert rc == 0, output
    assert "does not exist" in output and "make" in output


def test_mismatched_library_gives_the_rebuild_command(tmp_path):
    bogus = tmp_path / "liblsoftmax.so"
    bogus.write_bytes(b"not a shared library")
    code = ("import mx_lsoftmax\n"
            "try:\n"
            "    mx_lsoftmax.library.require()\n"
            "except mx_lsoftmax.library.LibraryMissingError as error:\n"
            "    print('MESSAGE', error)\n")
    rc, output = run_python(code, MX_LSOFTMAX_LIBRARY=str(bogus))
    assert rc == 0, output
    assert "failed to load" in output and "make clean && make" in output


PARITY = """
import numpy as np, mxnet as mx, mx_lsoftmax
from mx_lsoftmax import spec
assert mx_lsoftmax.library.library_path() == {path!r}
rng = np.random.default_rng(0)
x, w, y = rng.standard_normal((6, 5)), rng.standard_normal((4, 5)), np.array([0, 3, 3, 1, 2, 0])
with mx.autograd.record():
    out = mx_lsoftmax.lsoftmax(mx.nd.array(x, dtype='float64'), mx.nd.array(w, dtype='float64'),
                               mx.nd.array(y), 4, margin=3, beta=0.5, backend='compiled')
np.testing.assert_allclose(out.asnumpy(), spec.forward(x, w, y, 3, 0.5), rtol=1e-12, atol=1e-12)
print('OK', mx.context.num_gpus())
"""


@pytest.mark.parametrize("name", ["liblsoftmax.so", "liblsoftmax_cuda.so"])
def test_each_build_runs_in_this_mxnet(name):
    """The CPU build, and the GPU-enabled build on a CPU-only MXNet, both load and agree."""
    path = os.path.join(LIBRARY_DIR, name)
    if not os.path.exists(path):
        if os.environ.get("CI") and (name == "liblsoftmax.so" or os.system("command -v nvcc >/dev/null") == 0):
            pytest.fail(f"{path} is not built in CI")
        pytest.skip(f"{name} is not built (`make` / `make cuda`)")
    rc, output = run_python(PARITY.format(path=path), MX_LSOFTMAX_LIBRARY=path)
    assert rc == 0 and "OK" in output, output


def test_wheel_is_tagged_for_the_platform_and_carries_the_library(tmp_path):
    """`pip wheel .` builds the compiled op into a platform wheel with every subpackage, and
    setuptools has nothing to warn about in the metadata."""
    import shutil
    import subprocess
    import zipfile
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "lib",
                                                                "__pycache__", ".pytest_cache"))
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-v",
                             "-w", str(tmp_path / "wheels")], cwd=source, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "deprecat" not in (result.stdout + result.stderr).lower()
    wheel, = (tmp_path / "wheels").glob("mx_lsoftmax-*.whl")
    assert "none-any" not in wheel.name and "linux" in wheel.name
    names = zipfile.ZipFile(wheel).namelist()
    for needed in ("mx_lsoftmax/lib/liblsoftmax.so", "mx_lsoftmax/support/data.py", "mx_lsoftmax/kinds.py"):
        assert needed in names


def test_the_library_in_use_is_built_from_the_current_sources():
    """In a checkout, the library the package loads (a CUDA build first) is newer than every
    source of it: `make` rebuilds both builds, so a stale one cannot shadow a fresh one."""
    path = mx_lsoftmax.library.library_path()
    sources = os.path.join(ROOT, "src", "operator")
    if path is None or os.environ.get("MX_LSOFTMAX_LIBRARY") or not os.path.isdir(sources):
        pytest.skip("no library built in this checkout")
    built = os.path.getmtime(path)
    used = [name for name in sorted(os.listdir(sources))
            if path.endswith("_cuda.so") or not name.endswith(".cu")]  # the CPU build has no CUDA
    stale = [name for name in used if os.path.getmtime(os.path.join(sources, name)) > built]
    assert not stale, f"{path} is older than {stale}: run `make`"
