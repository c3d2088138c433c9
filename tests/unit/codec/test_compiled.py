"""Which form of the hot modules the tests run: scripts/test_compiled sets
SIDECAR_EXPECT_COMPILED=1 and then every module of scripts/compiled_modules must be the mypyc
extension, else the interpreted .py (a stale extension must never shadow an edit)."""

import importlib
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def _modules() -> list[str]:
    text = (ROOT / "scripts" / "compiled_modules").read_text()
    return [line.strip()[:-3].replace("/", ".") for line in text.splitlines()
            if line.strip() and not line.startswith("#")]


def test_hot_modules_are_in_the_expected_form():
    compiled = os.environ.get("SIDECAR_EXPECT_COMPILED") == "1"
    for name in _modules():
        f = importlib.import_module(name).__file__ or ""
        assert f.endswith(".so") == compiled, (name, f)
