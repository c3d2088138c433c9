"""Where things are, for tests anywhere under tests/."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
