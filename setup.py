"""Optional ahead-of-time compilation of the hot modules with mypyc (``scripts/compiled_modules``).

    SIDECAR_MYPYC=1 pip install .     # compiled extensions for those modules
    pip install .                     # plain Python (the default)

Everything else about the package is in pyproject.toml."""

import os
from pathlib import Path

from setuptools import setup

ext_modules = []
if os.environ.get("SIDECAR_MYPYC") == "1":
    from mypyc.build import mypycify  # only needed for the compiled build

    listed = Path(__file__).with_name("scripts").joinpath("compiled_modules").read_text()
    modules = [line.strip() for line in listed.splitlines()
               if line.strip() and not line.startswith("#")]
    ext_modules = mypycify(modules, opt_level="3")

setup(ext_modules=ext_modules)
