"""The flaky-upstream demo: ``python -m examples.flaky`` (see run.py)."""
