"""pysidecar: an Envoy-style L7 sidecar proxy."""

__version__ = "0.1.0"
