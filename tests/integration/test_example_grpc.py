"""examples/grpc runs as documented: one command starts the gRPC service, the sidecar (its own
process) and a grpcio client, with the native config and with the Envoy v3 twin; Envoy 1.40
accepts the twin as it is."""

from __future__ import annotations

import asyncio
import shutil
import subprocess

import pytest

from examples.grpc.run import main
from tests.paths import REPO


@pytest.mark.parametrize("envoy", [False, True], ids=["native", "envoy-twin"])
async def test_grpc_example_runs(envoy):
    argv = ["--free-ports"] + (["--envoy"] if envoy else [])
    assert await asyncio.to_thread(main, argv) == 0


@pytest.mark.skipif(shutil.which("envoy") is None, reason="the envoy binary is not installed")
def test_envoy_accepts_the_twin():
    cp = subprocess.run(["envoy", "--mode", "validate", "-c", str(REPO / "examples/grpc/envoy.yaml")],
                        capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0, cp.stdout + cp.stderr
