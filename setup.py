"""Build of saliq._C: the C++ CPU kernels always, the CUDA kernels when a CUDA toolkit is present.

The .cu files include no torch headers (extern "C" launchers), so they are compiled with nvcc for sm_80 and
sm_90a into a static library that links against any torch build, CPU wheel included.
"""
import os
import sys

from setuptools import setup

# build backends run this file with another working directory: find the build config beside it
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from build_ext_config import cmdclass, ext_modules

setup(
    packages=["saliq", "saliq.kernels"],
    package_dir={"saliq": "saliq", "saliq.kernels": "kernels"},
    package_data={"saliq.kernels": ["configs/*.json"]},  # launch configurations measured per GPU model
    ext_modules=ext_modules(),
    cmdclass=cmdclass(),
)
