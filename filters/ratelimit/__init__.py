"""``envoy.filters.http.ratelimit``: global rate limiting through Envoy's rate limit service.
Only its config exists so far (``config``); the filter comes with the redesign, on top of
``sidecar.shared.rls``. Not in the registry yet, so no config can name it."""
