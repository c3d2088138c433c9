"""The resource state machine (control_plane_client.state), driven directly: no sockets, no
event loop, the time passed in. Each test plays what a control plane sends and checks what the
state decides: ACK or NACK, what serves, what warms, what goes."""

from __future__ import annotations

import math

import pytest

from control_plane_client.resources import CDS, EDS, LDS, RDS
from control_plane_client.state import ResourceState, Update
from control_plane_client.testing import cluster, listener, load_assignment, route
from sidecar.config.cluster import Cluster
from sidecar.config.control_plane import ControlPlaneConfig, SourceSpec
from sidecar.config.errors import ConfigError, ConfigErrors
from sidecar.config.route import RouteAction
from sidecar.config.snapshot import Snapshot

ADS = SourceSpec(kind="ads", cluster="xds")
IFT = 15.0          # initial_fetch_timeout


def new_state(base: Snapshot | None = None, ift: float = IFT) -> ResourceState:
    cfg = ControlPlaneConfig(lds=SourceSpec(kind="ads"), cds=SourceSpec(kind="ads"), ads=ADS,
                             initial_fetch_timeout_s=ift)
    return ResourceState(cfg, base or Snapshot(control_plane=cfg))


def accept(st: ResourceState, type_url: str, version: str, resources: list, now: float,
           source: SourceSpec = ADS) -> Update:
    """Receive, serve (rebuild unless endpoints-only) and commit, as the client does."""
    u = st.receive(type_url, source, version, resources, now)
    if u.changed and u.endpoints is None:
        st.serving(st.build(now).snapshot)
    st.commit(u, now)
    return u


def static_cluster(name: str, port: int) -> dict:
    return {"@type": CDS, "name": name, "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                             "port_value": port}}}}]}]}}


def served_cluster(st: ResourceState, name: str) -> Cluster | None:
    assert st.applied is not None
    return st.applied.cluster(name)


def served_route_target(st: ResourceState, listener_name: str = "ingress") -> str | None:
    """The cluster the served listener's first route sends to (None: not served / no routes)."""
    assert st.applied is not None
    for lc in st.applied.listeners:
        if lc.name == listener_name:
            if lc.route_config is None:
                return None
            action = lc.route_config.virtual_hosts[0].routes[0].action
            assert isinstance(action, RouteAction)
            return action.cluster
    return None


# ---- ACK / NACK ----------------------------------------------------------------------------

def test_a_valid_response_is_staged_then_committed_as_the_acked_version():
    st = new_state()
    u = st.receive(CDS, ADS, "v1", [static_cluster("a", 8001)], now=1.0)
    assert u.changed == ("a",) and u.endpoints is None and u.count == 1
    assert st.cds.version == ""                          # not ACKed until it serves
    st.serving(st.build(1.0).snapshot)
    st.commit(u, 1.0)
    assert st.cds.version == "v1" and st.cds.accepted == 1 and st.cds.last_update == 1.0
    assert served_cluster(st, "a") is not None


def test_an_invalid_resource_rejects_the_whole_response_and_keeps_what_was_held():
    st = new_state()
    accept(st, CDS, "v1", [static_cluster("a", 8001)], now=1.0)
    bad = static_cluster("c", 8003)
    bad["no_such_field"] = 1
    with pytest.raises(ConfigErrors) as e:
        st.receive(CDS, ADS, "v2", [static_cluster("b", 8002), bad], now=2.0)
    assert "Cluster 'c'" in str(e.value) and "no_such_field" in str(e.value)
    assert set(st.cds.resources) == {"a"}               # b was valid, but came with c: not taken
    nack = st.reject(CDS, "ads", "v2", str(e.value), now=2.0)
    assert st.cds.rejected == 1 and st.cds.version == "v1"     # the NACK names the old version
    assert st.last_nack == nack and nack.version == "v2" and "no_such_field" in nack.error
    assert st.cds.describe(frozenset())["last_nack"] == nack.as_dict()


def test_every_bad_resource_is_named_in_one_nack():
    st = new_state()
    a, b = static_cluster("a", 8001), static_cluster("b", 8002)
    a["lb_policy"] = "NO_SUCH_POLICY"
    b["connect_timeout"] = "soon"
    with pytest.raises(ConfigErrors) as e:
        st.receive(CDS, ADS, "v1", [a, b], now=1.0)
    assert [err.path.split(".")[0] for err in e.value.errors] == ["Cluster 'a'", "Cluster 'b'"]


def test_duplicates_wrong_types_and_static_names_are_refused():
    cfg_snapshot = Snapshot(clusters=(Cluster(name="static-one"),))
    st = new_state(base=cfg_snapshot)
    with pytest.raises(ConfigErrors, match="twice"):
        st.receive(CDS, ADS, "v1", [static_cluster("a", 1), static_cluster("a", 2)], now=1.0)
    with pytest.raises(ConfigErrors, match="expected .*Cluster"):
        st.receive(CDS, ADS, "v1", [route("main", "a")], now=1.0)
    with pytest.raises(ConfigErrors, match="static cluster"):
        st.receive(CDS, ADS, "v1", [static_cluster("static-one", 1)], now=1.0)


def test_an_unchanged_resource_keeps_its_version_and_time():
    st = new_state()
    accept(st, CDS, "v1", [static_cluster("a", 8001)], now=1.0)
    u = accept(st, CDS, "v2", [static_cluster("a", 8001)], now=5.0)
    assert u.changed == ()                                # nothing to rebuild
    r = st.cds.resources["a"]
    assert (r.version, r.updated_at) == ("v1", 1.0)
    assert st.cds.version == "v2" and st.cds.last_update == 1.0


def test_revert_puts_the_previous_resources_back():
    st = new_state()
    accept(st, CDS, "v1", [static_cluster("a", 8001)], now=1.0)
    u = st.receive(CDS, ADS, "v2", [static_cluster("b", 8002)], now=2.0)
    assert set(st.cds.resources) == {"b"}
    st.revert(u)                                          # e.g. the new listener could not bind
    assert set(st.cds.resources) == {"a"} and st.cds.version == "v1"


# ---- state of the world, by name -----------------------------------------------------------

def test_state_of_the_world_a_resource_missing_from_a_response_is_removed():
    st = new_state()
    accept(st, CDS, "v1", [static_cluster("a", 8001), static_cluster("b", 8002)], now=1.0)
    u = accept(st, CDS, "v2", [static_cluster("a", 8001)], now=2.0)
    assert u.changed == ("b",)
    assert set(st.cds.resources) == {"a"}
    assert served_cluster(st, "b") is None and served_cluster(st, "a") is not None
    accept(st, CDS, "v3", [], now=3.0)                    # an empty response removes everything
    assert st.cds.resources == {} and served_cluster(st, "a") is None


def test_state_of_the_world_is_per_source():
    st = new_state()
    other = SourceSpec(kind="file", path="/etc/xds")
    accept(st, CDS, "v1", [static_cluster("a", 8001)], now=1.0)
    accept(st, CDS, "f1", [static_cluster("f", 8009)], now=1.0, source=other)
    accept(st, CDS, "v2", [], now=2.0)                    # ADS dropped its clusters only
    assert set(st.cds.resources) == {"f"}
    with pytest.raises(ConfigError, match="'f': also served by another source"):
        st.receive(CDS, ADS, "v3", [static_cluster("f", 8010)], now=3.0)


def test_by_name_only_wanted_names_are_kept_and_a_missing_name_is_not_removed():
    st = new_state()
    accept(st, CDS, "c1", [cluster("a"), cluster("b")], now=1.0)
    assert st.subscriptions()[EDS] == [(ADS, frozenset({"a", "b"}))]
    accept(st, EDS, "e1", [load_assignment("a", [8001]), load_assignment("nobody", [9])], now=1.0)
    assert set(st.eds.resources) == {"a"}                 # nobody asked for "nobody"
    accept(st, EDS, "e2", [load_assignment("b", [8002])], now=2.0)
    assert set(st.eds.resources) == {"a", "b"}            # by name: "a" is still held


def test_a_removed_listener_lets_go_of_its_routes():
    st = new_state()
    accept(st, LDS, "l1", [listener(10001, rds="main")], now=1.0)
    accept(st, RDS, "r1", [route("main", "a")], now=1.0)
    assert st.subscriptions()[RDS] == [(ADS, frozenset({"main"}))]
    accept(st, LDS, "l2", [], now=2.0)
    assert st.subscriptions()[RDS] == []
    st.forget_unwanted()
    assert st.rds.resources == {}


# ---- warming ---------------------------------------------------------------------------------

def test_an_eds_cluster_waits_for_its_assignment():
    st = new_state()
    accept(st, CDS, "c1", [cluster("svc")], now=100.0)
    b = st.build(101.0)
    assert b.snapshot.cluster("svc") is None              # not without endpoints
    assert st.warming.clusters == ["svc"] and b.next_at == 100.0 + IFT
    assert st.counts()[0] == ("cds", 0, 1)                # (type, active, warming)
    accept(st, EDS, "e1", [load_assignment("svc", [8001, 8002])], now=102.0)
    svc = served_cluster(st, "svc")
    assert svc is not None and [e.port for e in svc.endpoints] == [8001, 8002]
    assert not st.warming and st.build(102.0).next_at == math.inf


def test_an_eds_cluster_serves_without_endpoints_after_the_initial_fetch_timeout():
    st = new_state()
    accept(st, CDS, "c1", [cluster("svc")], now=100.0)
    assert st.build(100.0 + IFT - 0.1).snapshot.cluster("svc") is None
    late = st.build(100.0 + IFT).snapshot.cluster("svc")
    assert late is not None and late.endpoints == () and not st.warming


def test_a_per_source_initial_fetch_timeout_wins():
    st = new_state()
    quick = {"ads": {}, "resource_api_version": "V3", "initial_fetch_timeout": "2s"}
    accept(st, CDS, "c1", [cluster("svc", config_source=quick)], now=100.0)
    assert st.build(101.0).next_at == 102.0
    assert st.build(102.0).snapshot.cluster("svc") is not None


def test_a_listener_waits_for_its_routes():
    st = new_state()
    accept(st, LDS, "l1", [listener(10001, rds="main")], now=100.0)
    assert st.build(101.0).snapshot.listeners == ()
    assert st.warming.listeners == ["ingress"]
    assert st.subscriptions()[RDS] == [(ADS, frozenset({"main"}))]
    accept(st, CDS, "c1", [static_cluster("a", 8001)], now=101.0)
    accept(st, RDS, "r1", [route("main", "a")], now=102.0)
    assert served_route_target(st) == "a" and not st.warming


def test_a_changed_listener_keeps_serving_its_old_version_while_the_new_one_warms():
    st = new_state()
    accept(st, CDS, "c1", [static_cluster("a", 8001)], now=100.0)
    accept(st, LDS, "l1", [listener(10001, rds="main")], now=100.0)
    accept(st, RDS, "r1", [route("main", "a")], now=100.0)
    accept(st, LDS, "l2", [listener(10001, rds="other")], now=110.0)
    assert served_route_target(st) == "a"                 # the old listener, old routes
    assert st.warming.listeners == ["ingress"]
    assert st.build(110.0 + IFT).snapshot.listeners[0].route_config is None   # timed out: 404 NR


# ---- make before break ------------------------------------------------------------------------

def test_a_route_to_a_cluster_not_serving_yet_is_held_back_until_it_serves():
    st = new_state()
    accept(st, CDS, "c1", [static_cluster("a", 8001)], now=100.0)
    accept(st, LDS, "l1", [listener(10001, rds="main")], now=100.0)
    accept(st, RDS, "r1", [route("main", "a")], now=100.0)
    assert served_route_target(st) == "a"
    # the new routes go to "b" before the control plane sent "b"
    accept(st, RDS, "r2", [route("main", "b")], now=110.0)
    assert served_route_target(st) == "a"                 # the old routes keep serving
    assert st.warming.routes == {"main": ("b",)}
    assert st.warming.as_dict()["routes"] == ["main (needs b)"]
    # "b" arrives as an EDS cluster: still not serving until its endpoints are there
    accept(st, CDS, "c2", [static_cluster("a", 8001), cluster("b")], now=111.0)
    assert served_route_target(st) == "a"
    accept(st, EDS, "e1", [load_assignment("b", [8002])], now=112.0)
    assert served_route_target(st) == "b" and not st.warming


def test_a_held_back_route_serves_after_the_initial_fetch_timeout():
    st = new_state()
    accept(st, LDS, "l1", [listener(10001, rds="main")], now=100.0)
    accept(st, RDS, "r1", [route("main", "nowhere")], now=100.0)
    b = st.build(101.0)
    assert b.snapshot.listeners == () and b.next_at == 100.0 + IFT
    st.serving(st.build(100.0 + IFT).snapshot)
    assert served_route_target(st) == "nowhere"           # then 503 (no cluster), as Envoy


# ---- endpoints only ---------------------------------------------------------------------------

def test_new_endpoints_for_a_serving_cluster_are_set_in_place():
    st = new_state()
    accept(st, CDS, "c1", [cluster("svc")], now=1.0)
    accept(st, EDS, "e1", [load_assignment("svc", [8001])], now=1.0)
    builds = st.applied
    u = accept(st, EDS, "e2", [load_assignment("svc", [8001, 8002])], now=2.0)
    assert u.endpoints is not None
    [(name, eps)] = u.endpoints
    assert name == "svc" and [e.port for e in eps] == [8001, 8002]
    assert st.applied is builds                           # no new snapshot
    assert [e.port for e in st.active_clusters["svc"].endpoints] == [8001, 8002]
    assert st.assignments(st.build(3.0).snapshot) == [("svc", eps)]


def test_endpoints_that_something_waits_for_rebuild():
    st = new_state()
    accept(st, CDS, "c1", [cluster("a"), cluster("b")], now=1.0)
    accept(st, EDS, "e1", [load_assignment("a", [8001])], now=1.0)
    assert st.warming.clusters == ["b"]
    u = st.receive(EDS, ADS, "e2", [load_assignment("a", [8003])], now=2.0)
    assert u.endpoints is None                            # b warms: rebuild, it may be ready


# ---- listeners sharing an address, the cache --------------------------------------------------

def test_two_listeners_on_one_address_are_refused_at_build():
    st = new_state()
    accept(st, CDS, "c1", [static_cluster("a", 8001)], now=1.0)
    st.receive(LDS, ADS, "l1", [listener(10001, rds="main", name="one"),
                                listener(10001, rds="main", name="two")], now=1.0)
    st.receive(RDS, ADS, "r1", [route("main", "a")], now=1.0)
    with pytest.raises(ConfigError, match="already used by listener 'one'"):
        st.build(1.0)


def test_the_cache_document_loads_back_into_the_same_snapshot():
    st = new_state()
    accept(st, CDS, "c1", [cluster("svc")], now=1.0)
    accept(st, EDS, "e1", [load_assignment("svc", [8001])], now=1.0)
    accept(st, LDS, "l1", [listener(10001, rds="main")], now=1.0)
    accept(st, RDS, "r1", [route("main", "svc")], now=1.0)
    versions, resources = st.cache_document()
    assert versions == {"cds": "c1", "eds": "e1", "lds": "l1", "rds": "r1"}
    again = new_state()
    snap = again.load_cached({"versions": versions, "resources": resources}, now=50.0)
    assert st.applied is not None
    assert snap.listeners == st.applied.listeners and snap.clusters == st.applied.clusters
    assert again.version_text() == "cds=c1 eds=e1 lds=l1 rds=r1"
    assert again.lds.resources["ingress"].version == "l1"


def test_a_malformed_cache_entry_is_refused():
    from control_plane_client.cache import CacheError

    st = new_state()
    with pytest.raises(CacheError, match="lds entry 0 is malformed"):
        st.load_cached({"versions": {}, "resources": {LDS: [{"name": "x"}]}}, now=1.0)
