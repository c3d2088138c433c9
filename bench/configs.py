"""Config generators for the benchmark: nginx upstream, nginx as a proxy, and one Envoy v3
bootstrap that both Envoy 1.40 and the sidecar run unchanged.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

UPSTREAM_BODY = "hello from the upstream\n"


# --------------------------------------------------------------------------- nginx


def _nginx_common(workdir: Path) -> str:
    return f"""daemon off;
master_process off;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log stderr crit;
events {{ worker_connections 8192; multi_accept on; }}
"""


def _nginx_http_common(workdir: Path) -> str:
    return f"""    access_log off;
    client_body_temp_path {workdir}/client_body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    keepalive_timeout 300s;
    keepalive_requests 100000000;
    server_tokens off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
"""


def nginx_upstream_conf(workdir: Path, port: int, files_dir: Path) -> str:
    """The upstream: a small fixed body on every path; /body/<name> serves generated files."""
    return _nginx_common(workdir) + f"""http {{
{_nginx_http_common(workdir)}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            default_type text/plain;
            return 200 "{UPSTREAM_BODY.strip()}\\n";
        }}
        location /body/ {{
            default_type application/octet-stream;
            alias {files_dir}/;
        }}
    }}
}}
"""


def nginx_proxy_conf(workdir: Path, port: int, upstream_port: int) -> str:
    """Debian nginx as a keep-alive reverse proxy (one worker), for comparison."""
    return _nginx_common(workdir) + f"""http {{
{_nginx_http_common(workdir)}
    upstream app {{
        server 127.0.0.1:{upstream_port};
        keepalive 128;
        keepalive_requests 100000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_max_temp_file_size 0;
        }}
    }}
}}
"""


# --------------------------------------------------------------------------- Envoy bootstrap

_HCM = ("type.googleapis.com/envoy.extensions.filters.network."
        "http_connection_manager.v3.HttpConnectionManager")
_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
_JWT = "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication"
_FAULT = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"


@dataclass(frozen=True)
class ProxyConfig:
    """A generated Envoy-format config and what a load generator needs to use it."""
    text: str
    path: str = "/"                      # request path that hits the measured route
    headers: tuple[tuple[str, str], ...] = ()
    description: str = ""


def _route_action(cluster: str, retry: bool) -> dict:
    action: dict = {"cluster": cluster}
    if retry:
        action["retry_policy"] = {
            "retry_on": "5xx,connect-failure,reset",
            "num_retries": 2,
            "per_try_timeout": "2s",
        }
    return action


def envoy_bootstrap(*, listen_port: int, admin_port: int, upstream_port: int,
                    routes: int = 1, http_filters: list[dict] | None = None,
                    retry: bool = False) -> dict:
    """One listener, one virtual host, `routes` prefix routes, one STATIC cluster.

    With routes > 1 the routes are `/r0/` ... `/r{N-1}/` followed by a catch-all `/`, so a
    request for `/r{N-1}/x` has to get past every other route before it matches.
    """
    if routes <= 1:
        route_list = [{"match": {"prefix": "/"}, "route": _route_action("upstream", retry)}]
    else:
        route_list = [
            {"name": f"r{i}", "match": {"prefix": f"/r{i}/"},
             "route": _route_action("upstream", retry)}
            for i in range(routes)
        ]
        route_list.append({"name": "fallback", "match": {"prefix": "/"},
                           "route": _route_action("upstream", retry)})
    filters = list(http_filters or [])
    filters.append({"name": "envoy.filters.http.router",
                    "typed_config": {"@type": _ROUTER}})
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1",
                                                 "port_value": admin_port}}},
        "static_resources": {
            "listeners": [{
                "name": "bench",
                "address": {"socket_address": {"address": "127.0.0.1",
                                               "port_value": listen_port}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": _HCM,
                        "stat_prefix": "bench",
                        "route_config": {
                            "name": "bench",
                            "virtual_hosts": [{"name": "all", "domains": ["*"],
                                               "routes": route_list}],
                        },
                        "http_filters": filters,
                    },
                }]}],
            }],
            "clusters": [{
                "name": "upstream",
                "type": "STATIC",
                "connect_timeout": "1s",
                "lb_policy": "ROUND_ROBIN",
                "load_assignment": {
                    "cluster_name": "upstream",
                    "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                        "socket_address": {"address": "127.0.0.1",
                                           "port_value": upstream_port}}}}]}],
                },
            }],
        },
    }


def dump(doc: dict) -> str:
    return yaml.safe_dump(doc, sort_keys=False, width=1000)


def basic_config(listen_port: int, admin_port: int, upstream_port: int) -> ProxyConfig:
    return ProxyConfig(dump(envoy_bootstrap(listen_port=listen_port, admin_port=admin_port,
                                            upstream_port=upstream_port)),
                       description="1 route, router only")


def routes_config(listen_port: int, admin_port: int, upstream_port: int,
                  n: int) -> ProxyConfig:
    doc = envoy_bootstrap(listen_port=listen_port, admin_port=admin_port,
                          upstream_port=upstream_port, routes=n)
    return ProxyConfig(dump(doc), path=f"/r{n - 1}/x" if n > 1 else "/",
                       description=f"{n} prefix routes, request matches the last")


# --------------------------------------------------------------------------- filters scenario
#
# The hook for issue 9's "every feature on" figure: JWT (valid token, key cached) + fault at
# 0% + a retry policy on the route. It is written in the Envoy v3 shapes, which Envoy 1.40
# runs as is; the sidecar runs the same file once filters/jwt_authn.py and filters/fault.py
# accept these fields. `sidecar validate` is run on it first, so a refusal is reported with
# the sidecar's own error paths instead of a failed measurement.

JWT_ISSUER = "https://bench.local"
JWT_AUDIENCE = "bench"
JWT_KID = "bench-key"


def _b64url_uint(n: int) -> str:
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def make_jwt_material() -> tuple[str, str]:
    """(JWKS JSON with one RSA key, an RS256 token valid for a day signed by it)."""
    import jwt  # PyJWT
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pub = key.public_key().public_numbers()
    jwks = {"keys": [{"kty": "RSA", "alg": "RS256", "use": "sig", "kid": JWT_KID,
                      "n": _b64url_uint(pub.n), "e": _b64url_uint(pub.e)}]}
    now = int(time.time())
    token = jwt.encode({"iss": JWT_ISSUER, "aud": JWT_AUDIENCE, "sub": "bench-client",
                        "iat": now, "exp": now + 86400}, key, algorithm="RS256",
                       headers={"kid": JWT_KID})
    return json.dumps(jwks), token


def filter_chain(jwks_json: str) -> list[dict]:
    """JWT authn (inline JWKS) + fault abort at 0%, in Envoy v3 form."""
    return [
        {"name": "envoy.filters.http.jwt_authn",
         "typed_config": {
             "@type": _JWT,
             "providers": {"bench": {
                 "issuer": JWT_ISSUER,
                 "audiences": [JWT_AUDIENCE],
                 "local_jwks": {"inline_string": jwks_json},
                 "forward": True,
             }},
             "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "bench"}}],
         }},
        {"name": "envoy.filters.http.fault",
         "typed_config": {
             "@type": _FAULT,
             "abort": {"http_status": 503,
                       "percentage": {"numerator": 0, "denominator": "HUNDRED"}},
         }},
    ]


def add_tracing(doc: dict, collector_port: int, percent: float = 1.0) -> dict:
    """OpenTelemetry tracing (OTLP/HTTP) sampled at `percent`, exported to a collector on
    127.0.0.1 (the bench points it at the nginx upstream, which answers 200 to the POST)."""
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["tracing"] = {
        "random_sampling": {"value": percent},
        "provider": {"name": "envoy.tracers.opentelemetry", "typed_config": {
            "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
            "service_name": "bench",
            "http_service": {"http_uri": {"uri": f"http://127.0.0.1:{collector_port}/v1/traces",
                                          "cluster": "otel", "timeout": "0.25s"}}}},
    }
    doc["static_resources"]["clusters"].append({
        "name": "otel", "type": "STATIC", "connect_timeout": "0.25s",
        "load_assignment": {"cluster_name": "otel", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                         "port_value": collector_port}}}}]}]}})
    return doc


def filters_config(listen_port: int, admin_port: int, upstream_port: int) -> ProxyConfig:
    jwks, token = make_jwt_material()
    doc = envoy_bootstrap(listen_port=listen_port, admin_port=admin_port,
                          upstream_port=upstream_port, http_filters=filter_chain(jwks),
                          retry=True)
    add_tracing(doc, upstream_port, 1.0)
    return ProxyConfig(dump(doc), headers=(("authorization", f"Bearer {token}"),),
                       description="jwt_authn (valid token) + fault 0% + retry policy + "
                                   "tracing 1% (OTLP/HTTP)")


def write_body_files(files_dir: Path, sizes: dict[str, int]) -> None:
    files_dir.mkdir(parents=True, exist_ok=True)
    chunk = bytes(range(256)) * 4096  # 1 MiB of non-trivial bytes
    for name, size in sizes.items():
        path = files_dir / name
        if path.exists() and path.stat().st_size == size:
            continue
        with open(path, "wb") as f:
            left = size
            while left > 0:
                piece = chunk[: min(left, len(chunk))]
                f.write(piece)
                left -= len(piece)


# --------------------------------------------------------------------------- feature costs
#
# Issue 18: what each feature costs on top of the bare router, the same Envoy v3 file for both
# proxies. Each variant adds one thing to ``basic_config``.

_FILE_LOG = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"


def _hcm(doc: dict) -> dict:
    return doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def _base_doc(listen_port: int, admin_port: int, upstream_port: int, **kw) -> dict:
    return envoy_bootstrap(listen_port=listen_port, admin_port=admin_port,
                           upstream_port=upstream_port, **kw)


def tracing_config(listen_port: int, admin_port: int, upstream_port: int) -> ProxyConfig:
    doc = add_tracing(_base_doc(listen_port, admin_port, upstream_port), upstream_port, 1.0)
    return ProxyConfig(dump(doc), description="router + OpenTelemetry tracing sampled at 1%")


def access_log_config(listen_port: int, admin_port: int, upstream_port: int,
                      log_path: str = "/dev/null") -> ProxyConfig:
    """A file access log in Envoy's default format (written to /dev/null: the formatting and
    the write are what is measured, not the disk)."""
    doc = _base_doc(listen_port, admin_port, upstream_port)
    _hcm(doc)["access_log"] = [{"name": "envoy.access_loggers.file",
                                "typed_config": {"@type": _FILE_LOG, "path": log_path}}]
    return ProxyConfig(dump(doc), description="router + file access log (default format)")


def jwt_config(listen_port: int, admin_port: int, upstream_port: int) -> ProxyConfig:
    jwks, token = make_jwt_material()
    doc = _base_doc(listen_port, admin_port, upstream_port,
                    http_filters=filter_chain(jwks)[:1])
    return ProxyConfig(dump(doc), headers=(("authorization", f"Bearer {token}"),),
                       description="jwt_authn, valid RS256 token, inline JWKS")


def fault_config(listen_port: int, admin_port: int, upstream_port: int) -> ProxyConfig:
    doc = _base_doc(listen_port, admin_port, upstream_port, http_filters=filter_chain("{}")[1:])
    return ProxyConfig(dump(doc), description="fault filter, abort at 0%")


def retry_config(listen_port: int, admin_port: int, upstream_port: int) -> ProxyConfig:
    doc = _base_doc(listen_port, admin_port, upstream_port, retry=True)
    return ProxyConfig(dump(doc), description="route retry policy (5xx, 2 retries)")


# (scenario name, config builder): run by ``bench.run --features``
FEATURES = (
    ("tracing 1%", tracing_config),
    ("access log", access_log_config),
    ("jwt_authn", jwt_config),
    ("fault 0%", fault_config),
    ("retry policy", retry_config),
)
