"""Extra commands: ``sidecar dev`` and ``sidecar certs``."""

from __future__ import annotations


def add_commands(sub) -> None:
    from sidecar import certs
    certs.add_parser(sub)
