"""Each route layer alone, against a fake ``next`` and a manual clock: no sockets, no sleeps."""

from __future__ import annotations

import pytest
from multidict import MultiDict

from sidecar.cluster.cluster import Cluster, ClusterState
from sidecar.config.cluster import CircuitBreakers, RetryBudget, Thresholds
from sidecar.config.cluster import Cluster as ClusterConfig
from sidecar.config.route import MirrorPolicy, RetryPolicy, RouteAction, WeightedCluster
from sidecar.core.context import RequestContext
from sidecar.core.errors import (
    ConnectFailure,
    NoHealthyUpstream,
    RouteTimeout,
    UpstreamReset,
    UpstreamTimeout,
)
from sidecar.core.message import Request, Response, local_reply
from sidecar.observability.metrics import Metrics
from sidecar.observability.stats import StatsCache
from sidecar.route.action import RouteActionLayer
from sidecar.route.observe import ObserveLayer, RouteObserver, grpc_local_reply
from sidecar.route.retry import RetryLayer
from sidecar.route.shadow import ShadowLayer, ShadowState
from sidecar.route.timeout import TimeoutLayer


class Clock:
    """A manual clock; ``sleep`` moves it forward instead of waiting."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, d: float) -> None:
        self.slept.append(d)
        self.now += d


class Next:
    """A fake ``next``: answers from a script of statuses / exceptions, records requests."""

    def __init__(self, *script: int | Exception, clock: Clock | None = None, takes: float = 0.0):
        self.script = list(script)
        self.seen: list[tuple[str, dict[str, str], float | None, float | None]] = []
        self.clock = clock
        self.takes = takes

    async def __call__(self, req: Request) -> Response:
        self.seen.append((req.path, dict(req.headers), req.ctx.deadline, req.ctx.attempt_deadline))
        if self.clock is not None:
            self.clock.now += self.takes
        step = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(step, Exception):
            raise step
        return Response(step, MultiDict(), b"")


def request(method: str = "GET", path: str = "/a/b", headers: dict[str, str] | None = None,
            body: bytes = b"", rid: str = "rid-1") -> Request:
    ctx = RequestContext("l", ("127.0.0.1", 40000), 0.0)
    ctx.request_id = rid
    h: MultiDict[str] = MultiDict({"host": "svc"})
    h.update(headers or {})
    return Request(method, path, "", h, body, ctx)


def cluster_state(thresholds: Thresholds = Thresholds()) -> ClusterState:
    state = ClusterState("svc", StatsCache(Metrics(enabled=False)).cluster("svc"))
    # the retry layer asks the cluster's current version for its thresholds
    config = ClusterConfig(name="svc", circuit_breakers=CircuitBreakers(default=thresholds))
    state.current = Cluster(config, state, (), None)
    return state


STATS = StatsCache(Metrics(enabled=False)).cluster("svc")


# ---- timeout ---------------------------------------------------------------------------------

async def test_timeout_sets_the_deadline_and_the_expected_timeout_header():
    clock = Clock()
    nxt = Next(200)
    layer = TimeoutLayer(RouteAction(cluster="svc", timeout_s=2.0), nxt,
                         set_expected_header=True, clock=clock)
    resp = await layer(request())
    assert resp.status == 200
    _, headers, deadline, _ = nxt.seen[0]
    assert deadline == 1002.0 and headers["x-envoy-expected-rq-timeout-ms"] == "2000"


async def test_timeout_header_may_shorten_only_where_allowed():
    clock = Clock()
    for allow, expect in ((True, 1000.5), (False, 1002.0)):
        nxt = Next(200)
        layer = TimeoutLayer(RouteAction(cluster="svc", timeout_s=2.0, allow_timeout_header=allow),
                             nxt, set_expected_header=True, clock=clock)
        req = request(headers={"x-envoy-upstream-rq-timeout-ms": "500"})
        await layer(req)
        assert nxt.seen[0][2] == expect
        assert "x-envoy-upstream-rq-timeout-ms" not in req.headers      # consumed either way


async def test_no_timeout_means_no_deadline():
    nxt = Next(200)
    layer = TimeoutLayer(RouteAction(cluster="svc", timeout_s=0.0), nxt,
                         set_expected_header=True, clock=Clock())
    await layer(request())
    assert nxt.seen[0][2] is None and "x-envoy-expected-rq-timeout-ms" not in nxt.seen[0][1]


# ---- retry -----------------------------------------------------------------------------------

def retry(policy: RetryPolicy, nxt: Next, clock: Clock, thresholds: Thresholds = Thresholds(),
          attempt_header: bool = True) -> RetryLayer:
    return RetryLayer(policy, nxt, cluster_state(thresholds), STATS, attempt_header,
                      clock=clock, sleep=clock.sleep, rand=lambda: 0.5)


async def test_retry_on_5xx_backs_off_and_counts_attempts():
    clock = Clock()
    nxt = Next(503, 503, 200)
    layer = retry(RetryPolicy(retry_on=frozenset({"5xx"}), num_retries=3), nxt, clock)
    req = request()
    resp = await layer(req)
    assert resp.status == 200 and req.ctx.attempts == 3
    assert [h["x-envoy-attempt-count"] for _, h, _, _ in nxt.seen] == ["1", "2", "3"]
    # full jitter with rand 0.5: half of 25 ms, then half of 50 ms
    assert clock.slept == [pytest.approx(0.0125), pytest.approx(0.025)]


async def test_retries_stop_at_num_retries_and_answer_the_last_response():
    clock = Clock()
    layer = retry(RetryPolicy(retry_on=frozenset({"5xx"}), num_retries=2), Next(503), clock)
    resp = await layer(request())
    assert resp.status == 503 and len(clock.slept) == 2


async def test_a_connect_failure_is_retried_even_for_post_but_a_reset_is_not():
    clock = Clock()
    policy = RetryPolicy(retry_on=frozenset({"connect-failure", "reset"}), num_retries=1,
                         retry_non_idempotent=False)
    ok = await retry(policy, Next(ConnectFailure("refused"), 200), clock)(request("POST"))
    assert ok.status == 200
    with pytest.raises(UpstreamReset):
        await retry(policy, Next(UpstreamReset("UC", "reset"), 200), clock)(request("POST"))


async def test_per_try_timeout_sets_the_attempt_deadline():
    clock = Clock()
    nxt = Next(UpstreamTimeout(), 200)
    layer = retry(RetryPolicy(retry_on=frozenset({"5xx"}), num_retries=1, per_try_timeout_s=0.25),
                  nxt, clock)
    req = request()
    req.ctx.deadline = clock.now + 10
    resp = await layer(req)
    assert resp.status == 200
    assert nxt.seen[0][3] == pytest.approx(1000.25)
    assert nxt.seen[0][1]["x-envoy-expected-rq-timeout-ms"] == "250"


async def test_backoff_past_the_route_deadline_is_the_route_timeout():
    clock = Clock()
    layer = retry(RetryPolicy(retry_on=frozenset({"5xx"}), num_retries=5, backoff_base_s=1.0,
                              backoff_max_s=10.0), Next(503), clock)
    req = request()
    req.ctx.deadline = clock.now + 0.1
    with pytest.raises(RouteTimeout):
        await layer(req)


async def test_no_healthy_upstream_is_not_retried():
    clock = Clock()
    nxt = Next(NoHealthyUpstream())
    with pytest.raises(NoHealthyUpstream):
        await retry(RetryPolicy(retry_on=frozenset({"5xx"}), num_retries=3), nxt, clock)(request())
    assert len(nxt.seen) == 1


async def test_the_retry_budget_is_the_clusters():
    clock = Clock()
    # a budget of 0 % with no minimum: no retry may start
    t = Thresholds(retry_budget=RetryBudget(budget_percent=0.0, min_retry_concurrency=0))
    nxt = Next(503, 200)
    resp = await retry(RetryPolicy(retry_on=frozenset({"5xx"}), num_retries=3), nxt, clock, t)(request())
    assert resp.status == 503 and len(nxt.seen) == 1


async def test_a_body_over_the_replay_limit_goes_once():
    clock = Clock()
    nxt = Next(503, 200)
    layer = retry(RetryPolicy(retry_on=frozenset({"5xx"}), num_retries=3, max_buffered_body=4),
                  nxt, clock)
    resp = await layer(request("PUT", body=b"0123456789"))
    assert resp.status == 503 and len(nxt.seen) == 1


# ---- route action ----------------------------------------------------------------------------

async def test_route_action_rewrites_and_mutates_before_the_cluster_stack():
    stacks: dict[str, Next] = {}

    def make(name: str) -> Next:
        stacks[name] = Next(200)
        return stacks[name]
    layer = RouteActionLayer(RouteAction(cluster="svc", prefix_rewrite="/v2/"), len("/a/"),
                             merged_mutation(), make)
    req = request(path="/a/b")
    await layer(req)
    path, headers, _, _ = stacks["svc"].seen[0]
    assert path == "/v2/b" and headers["x-envoy-original-path"] == "/a/b"
    assert req.ctx.original_path == "/a/b" and req.ctx.cluster == "svc"


async def test_weighted_choice_is_stable_for_a_request_id():
    seen: dict[str, int] = {}

    def make(name: str) -> Next:
        async def count(req: Request) -> Response:
            seen[name] = seen.get(name, 0) + 1
            return Response(200)
        return count  # type: ignore[return-value]
    action = RouteAction(weighted_clusters=(WeightedCluster("a", 50), WeightedCluster("b", 50)))
    layer = RouteActionLayer(action, 0, merged_mutation(), make)
    for _ in range(20):
        await layer(request(rid="same-id"))
    assert len(seen) == 1 and sum(seen.values()) == 20


async def test_upstream_failures_become_envoy_local_replies():
    cases = ((ConnectFailure("x"), 503, "UF"), (UpstreamTimeout(), 504, "UT"),
             (NoHealthyUpstream(), 503, "UH"))
    for exc, status, flag in cases:
        layer = RouteActionLayer(RouteAction(cluster="svc"), 0, merged_mutation(),
                                 lambda name, exc=exc: Next(exc))
        req = request()
        resp = await layer(req)
        assert (resp.status, req.ctx.flags) == (status, [flag])


def merged_mutation():
    from sidecar.config.route import HeaderMutation
    return HeaderMutation()


# ---- shadow ----------------------------------------------------------------------------------

async def test_shadow_copies_go_through_the_shadow_cluster_and_never_delay_the_primary():
    sent: list[Request] = []

    class MirrorCluster:        # stands in for the mirror's ClusterState (shadow.MirrorCluster)
        name = "mirror"
        current = object()

        async def send(self, req: Request, auto_host: bool = False) -> Response:
            sent.append(req)
            return Response(200)
    shadow = MirrorCluster()
    nxt = Next(200)
    layer = ShadowLayer(((MirrorPolicy("mirror"), shadow),), nxt, ShadowState(Metrics(enabled=False)))
    req = request(headers={"host": "shop:8080"}, body=b"abc")
    resp = await layer(req)
    assert resp.status == 200 and len(nxt.seen) == 1
    for _ in range(3):
        await _yield()
    (copy,) = sent
    assert copy.headers["host"] == "shop-shadow:8080" and copy.body == b"abc"
    assert copy.ctx is not req.ctx


async def _yield():
    import asyncio
    await asyncio.sleep(0)


# ---- observe ---------------------------------------------------------------------------------

class FakeRoute:
    name = "r"
    stat_name = "r"
    vhost_name = "vh"
    cluster_names = ("svc",)

    def pick_cluster(self, req: Request) -> str:
        return "svc"


def observer() -> RouteObserver:
    return RouteObserver(lambda: StatsCache(Metrics(enabled=False)).route("l", "vh", "r"), ())


async def test_observe_binds_the_route_and_its_observer_without_a_frame_of_its_own():
    nxt = Next(200)
    obs = observer()
    layer = ObserveLayer(FakeRoute(), nxt, None, obs)
    req = request()
    pending = layer(req)
    assert not isinstance(pending, ObserveLayer) and req.ctx.observer is obs
    assert (await pending).status == 200 and req.ctx.route is layer.route


def test_local_replies_to_grpc_clients_are_grpc_shaped():
    ctx = RequestContext("l", None, 0.0)
    resp = grpc_local_reply(local_reply(ctx, 403, "RBAC: access denied", "RBAC"))
    assert resp.status == 200 and resp.headers["grpc-status"] == "7"
    assert resp.headers["grpc-message"] == "RBAC: access denied" and resp.body == b""
    assert resp.headers["content-type"] == "application/grpc"


async def test_cluster_header_builds_stacks_only_for_configured_clusters():
    built: list[str] = []

    def make(name: str) -> Next:
        built.append(name)
        return Next(200)
    layer = RouteActionLayer(RouteAction(cluster_header="x-cluster"), 0, merged_mutation(), make,
                             configured=lambda name: name == "svc")
    ok = await layer(request(headers={"x-cluster": "svc"}))
    unknown = request(headers={"x-cluster": "made-up-by-a-client"})
    nc = await layer(unknown)
    assert ok.status == 200 and (nc.status, unknown.ctx.flags) == (503, ["NC"])
    assert built == ["svc"]                     # nothing kept for the client's made-up name
