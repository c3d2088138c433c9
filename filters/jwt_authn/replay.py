"""The ``jti`` replay check of one provider: the sidecar's cache (``FilterEnv.replay_cache``,
shared by every worker: a jti used once is refused whichever worker sees it again), or a Redis
store's (``FilterEnv.replay_store``, shared by every replica). Entries live until the token's
``exp`` (+ skew); a full cache refuses rather than forgets a one-time token still valid."""

from __future__ import annotations

from filters.jwt_authn.status import REPLAY_FULL, REPLAY_UNAVAILABLE, REPLAYED, Status
from sidecar.core.limits import RemoteReplayCache, ReplayCache, ReplayVerdict

_STATUS: dict[ReplayVerdict, Status | None] = {
    ReplayVerdict.FRESH: None, ReplayVerdict.REPLAYED: REPLAYED,
    ReplayVerdict.FULL: REPLAY_FULL, ReplayVerdict.UNAVAILABLE: REPLAY_UNAVAILABLE}


class ReplayCheck:
    """``namespace``: the provider's issuer (or name), so two providers never collide and a
    reload that keeps the issuer keeps its history."""

    __slots__ = ("namespace", "local", "remote")

    def __init__(self, namespace: str, local: ReplayCache, remote: RemoteReplayCache | None):
        self.namespace = namespace
        self.local = local
        self.remote = remote

    def check(self, jti: str, until: float, now: float) -> Status | None:
        """The sidecar's cache (no store configured)."""
        return _STATUS[self.local.check_and_add(self.namespace, jti, until, now)]

    async def check_remote(self, remote: RemoteReplayCache, jti: str, until: float,
                           now: float) -> Status | None:
        return _STATUS[await remote.check_and_add(self.namespace, jti, until, now)]
