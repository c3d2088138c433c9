"""Envoy-differential harness for the HTTP/1.1 codec (issue 14, item 3).

A corpus of raw HTTP/1.1 requests (``requests_corpus``, ``mutations``) and raw upstream
responses (``responses_corpus``) is run through real Envoy 1.40 and through the sidecar
(``python -m sidecar run -c FILE``), both started from the same Envoy v3 bootstrap
(``proxies``), in front of a raw-socket recording upstream (``upstream``). For every case the
runner (``runner``) records what the client got back (responses, bytes, when the connection
closed) and what reached the upstream (bytes per connection, whether the proxy closed it);
``normalise`` masks what legitimately differs and compares; ``expected`` lists the known
divergences with their reasons.

    python -m tests.conformance.http1_differential            # table of every case
    python -m tests.conformance.http1_differential -k te.     # only cases whose name matches
    python -m pytest -q tests/conformance/http1_differential  # the assertions
"""
