"""State shared across the worker processes of one sidecar (shared memory) and across
replicas (Redis, Envoy's rate limit service). See docs/resilience.md ("Limits across workers and replicas").

Modules: ``api`` (types and interfaces), ``local`` (one process), ``segment`` / ``counters`` /
``buckets`` / ``replay`` / ``host`` (shared memory across workers), ``redis_store`` (across
replicas), ``rls`` (Envoy's RateLimitService client), ``config`` (their config).
"""
