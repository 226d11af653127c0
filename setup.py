"""Builds the compiled op into the package on `pip install .` (metadata is in pyproject.toml).

The library must be compiled against the MXNet it will load into: its headers and
src/lib_api.cc ship inside the mxnet wheel, found here without importing mxnet.
Without a C++ compiler the install still succeeds with the Python backend only.
"""
import importlib.util
import os
import subprocess
import sys

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

ROOT = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(ROOT, "src", "operator", "margin_softmax.cc")


def mxnet_include():
    spec = importlib.util.find_spec("mxnet")
    if spec is None or not spec.submodule_search_locations:
        return None
    include = os.path.join(list(spec.submodule_search_locations)[0], "include")
    return include if os.path.isdir(include) else None


class BuildPyWithLibrary(build_py):
    def run(self):
        super().run()
        include = mxnet_include()
        target = os.path.join(self.build_lib, "mx_lsoftmax", "lib", "liblsoftmax.so")
        if include is None:
            sys.stderr.write("mx-lsoftmax: mxnet not found at build time; the compiled op is not built\n")
            return
        os.makedirs(os.path.dirname(target), exist_ok=True)
        command = [os.environ.get("CXX", "g++"), "-O3", "-std=c++17", "-fPIC", "-pthread", "-shared",
                   f"-I{include}", f"-I{os.path.dirname(SOURCE)}", SOURCE,
                   os.path.join(include, "..", "src", "lib_api.cc"), "-o", target]
        try:
            subprocess.check_call(command)
        except (OSError, subprocess.CalledProcessError) as error:
            sys.stderr.write(f"mx-lsoftmax: building the compiled op failed ({error}); "
                             "the Python backend still works\n")


class BinaryDistribution(Distribution):
    """The wheel carries a compiled library: tag it for the platform, not py3-none-any."""

    def has_ext_modules(self):
        return True


setup(cmdclass={"build_py": BuildPyWithLibrary}, distclass=BinaryDistribution)
