"""Route table compilation and matching (unit level: the matcher is pure)."""

from multidict import MultiDict

from sidecar.route.table import RouteTable
from sidecar.runtime.loader import snapshot_from_doc as snapshot


def table(vhosts):
    cfg = {"listeners": [{"name": "l", "port": 0, "virtual_hosts": vhosts}],
           "clusters": [{"name": n, "endpoints": ["127.0.0.1:1"]} for n in ("a", "b", "c", "d", "e")]}
    return RouteTable(snapshot(cfg).listeners[0].route_config)


def pick(t, host, path, method="GET", headers=None, query=""):
    vh = t.virtual_host(host)
    if vh is None:
        return None
    h = MultiDict(headers or {})
    r = vh.match(method, path, query, h)
    return r.config.action.cluster if r else None


def test_virtual_host_selection_order():
    t = table([
        {"name": "exact", "domains": ["api.example.com"], "routes": [{"cluster": "a"}]},
        {"name": "suffix", "domains": ["*.example.com"], "routes": [{"cluster": "b"}]},
        {"name": "longer-suffix", "domains": ["*.svc.example.com"], "routes": [{"cluster": "c"}]},
        {"name": "prefix", "domains": ["internal.*"], "routes": [{"cluster": "d"}]},
        {"name": "default", "domains": ["*"], "routes": [{"cluster": "e"}]},
    ])
    assert pick(t, "api.example.com", "/") == "a"
    assert pick(t, "API.example.com:8080", "/") == "a"      # case-insensitive, port stripped
    assert pick(t, "x.example.com", "/") == "b"
    assert pick(t, "x.svc.example.com", "/") == "c"
    assert pick(t, "internal.corp", "/") == "d"
    assert pick(t, "other", "/") == "e"
    assert pick(t, "[::1]:80", "/") == "e"


def test_route_match_kinds_first_match_wins():
    t = table([{"name": "v", "domains": ["*"], "routes": [
        {"match": {"path": "/exact"}, "cluster": "a"},
        {"match": {"prefix": "/api", "headers": {"x-version": "v2"}}, "cluster": "b"},
        {"match": {"prefix": "/api", "methods": ["POST"]}, "cluster": "c"},
        {"match": {"regex": "/items/[0-9]+"}, "cluster": "d"},
        {"match": {"prefix": "/CI", "case_sensitive": False}, "cluster": "c"},
        {"match": {"prefix": "/q", "query": {"debug": "1"}}, "cluster": "a"},
        {"match": {"prefix": "/h", "headers": [{"name": "x-present", "present": True}]}, "cluster": "b"},
        {"match": {"prefix": "/h", "headers": [{"name": "x-env", "prefix": "prod", "invert": True}]}, "cluster": "c"},
        {"match": {"prefix": "/ck", "cookies": {"version": "v2"}}, "cluster": "d"},
        {"match": {"prefix": "/"}, "cluster": "e"},
    ]}])
    assert pick(t, "h", "/exact") == "a"
    assert pick(t, "h", "/exact/more") == "e"
    assert pick(t, "h", "/api/x", headers={"x-version": "v2"}) == "b"
    assert pick(t, "h", "/api/x", method="POST") == "c"
    assert pick(t, "h", "/api/x") == "e"
    assert pick(t, "h", "/items/12") == "d"
    assert pick(t, "h", "/items/12x") == "e"
    assert pick(t, "h", "/ci/thing") == "c"
    assert pick(t, "h", "/cI/thing") == "c"
    assert pick(t, "h", "/CX/thing") == "e"
    assert pick(t, "h", "/q", query="debug=1") == "a"
    assert pick(t, "h", "/q", query="debug=0") == "e"
    assert pick(t, "h", "/h", headers={"x-present": ""}) == "b"
    assert pick(t, "h", "/h", headers={"x-env": "staging"}) == "c"
    assert pick(t, "h", "/h", headers={"x-env": "production"}) == "e"
    assert pick(t, "h", "/ck", headers={"cookie": "a=b; version=v2"}) == "d"
    assert pick(t, "h", "/ck", headers={"cookie": "version=v1"}) == "e"


def test_case_insensitive_prefix():
    t = table([{"name": "v", "domains": ["*"], "routes": [
        {"match": {"prefix": "/Admin", "case_sensitive": False}, "cluster": "a"},
        {"match": {"prefix": "/"}, "cluster": "b"}]}])
    assert pick(t, "h", "/ADMIN/x") == "a"
    assert pick(t, "h", "/admin") == "a"
    assert pick(t, "h", "/adm") == "b"


def test_config_order_is_kept_across_index_kinds():
    # a regex route before a prefix route must still win when both match
    t = table([{"name": "v", "domains": ["*"], "routes": [
        {"match": {"regex": "/a/.*"}, "cluster": "a"},
        {"match": {"prefix": "/a/"}, "cluster": "b"},
        {"match": {"path": "/a/x"}, "cluster": "c"}]}])
    assert pick(t, "h", "/a/x") == "a"


def test_ten_thousand_routes_pick_the_right_one():
    routes = [{"match": {"prefix": f"/svc{i}/"}, "cluster": "a" if i % 2 else "b"} for i in range(10_000)]
    routes.append({"match": {"prefix": "/"}, "cluster": "c"})
    t = table([{"name": "v", "domains": ["*"], "routes": routes}])
    assert pick(t, "h", "/svc9999/x") == "a"
    assert pick(t, "h", "/svc1234/x") == "b"
    assert pick(t, "h", "/nothing") == "c"
