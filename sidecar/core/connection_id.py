"""The identity of one downstream connection, kept apart from ``core.context`` because it
must stay an interpreted class: state kept per connection holds it in a
``WeakKeyDictionary``, and a mypyc-compiled class cannot be weakly referenced."""

from __future__ import annotations


class ConnectionId:
    """The identity of one downstream connection: made by the codec when the connection
    opens, shared by its requests, gone with it (weak-referenceable, so state kept per
    connection, e.g. a per-connection rate limit bucket, goes when the connection does). It
    refers to nothing, so a request holding it keeps no connection alive."""

    __slots__ = ("__weakref__",)
