"""Control-plane client: Envoy v3 translation, xDS (REST and gRPC ADS), file source, LKG cache."""
