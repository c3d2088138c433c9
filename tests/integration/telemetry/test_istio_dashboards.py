"""A real Prometheus (the Debian package) scrapes the metrics ports of two real sidecars
(productpage -> reviews over mTLS, HTTP and TCP), and the PromQL of panels of Istio's Grafana
dashboards, evaluated through Prometheus' HTTP API, returns the expected series and values.

The panel queries are quoted from Istio's ``manifests/addons/dashboards/
istio-service-dashboard.json`` (Grafana's ``$__rate_interval`` becomes ``1m``; the template
variables get the values a user picks: ``$service`` the reviews service, ``$qrep`` the
reporter, ``$srcwl`` / ``$srcns`` "All", i.e. ``.*``).

Every panel uses ``irate``: the rate between a series' last two samples. The test sends a
burst of requests and TCP connections between two consecutive scrapes of each target (and
retries the burst if a scrape fell inside it), then evaluates the panels at the first scrape
after the burst, so the expected values are exact: the burst's counts (and TCP bytes, counted
when each connection closes) over the two samples' time apart.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time

import aiohttp
import pytest
import yaml

from sidecar.testing import free_port, stop_process
from tests.integration.telemetry.mesh import NS, RATINGS_HOST, REVIEWS_HOST, Mesh

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="prometheus (Debian package) not installed")

RATE = "1m"       # Grafana's $__rate_interval

# (dashboard, panel) -> expr, exactly as in istio-service-dashboard.json
PANELS = {
    "Client Request Volume":
        'round(sum(irate(istio_requests_total{reporter=~"$qrep",destination_service="$service"}'
        '[$__rate_interval])), 0.001)',
    "Client Success Rate (non-5xx responses)":
        'sum(irate(istio_requests_total{reporter=~"$qrep",destination_service="$service",'
        'response_code!~"5.*"}[$__rate_interval])) / (sum(irate(istio_requests_total{'
        'reporter=~"$qrep",destination_service="$service"}[$__rate_interval])) or on () vector(1))',
    "Client Request Duration":
        '(histogram_quantile(0.50, sum(irate(istio_request_duration_milliseconds_bucket{'
        'reporter=~"$qrep",destination_service="$service"}[$__rate_interval])) by (le)) / 1000) '
        'or histogram_quantile(0.50, sum(irate(istio_request_duration_seconds_bucket{'
        'reporter=~"$qrep",destination_service="$service"}[$__rate_interval])) by (le))',
    "Server Request Volume":
        'round(sum(irate(istio_requests_total{reporter="destination",destination_service='
        '"$service"}[$__rate_interval])), 0.001)',
    "Incoming Requests By Source And Response Code":
        'round(sum(irate(istio_requests_total{connection_security_policy="mutual_tls",'
        'destination_service="$service",reporter=~"$qrep",source_workload=~"$srcwl",'
        'source_workload_namespace=~"$srcns"}[$__rate_interval])) by (source_workload, '
        'source_workload_namespace, response_code), 0.001)',
    "Incoming Success Rate (non-5xx responses) By Source":
        'sum(irate(istio_requests_total{reporter=~"$qrep", connection_security_policy="mutual_tls", '
        'destination_service="$service",response_code!~"5.*", source_workload=~"$srcwl", '
        'source_workload_namespace=~"$srcns"}[$__rate_interval])) by (source_workload, '
        'source_workload_namespace) / sum(irate(istio_requests_total{reporter=~"$qrep", '
        'connection_security_policy="mutual_tls", destination_service="$service", '
        'source_workload=~"$srcwl", source_workload_namespace=~"$srcns"}[$__rate_interval])) by '
        '(source_workload, source_workload_namespace)',
    "Incoming Request Size By Source":
        'histogram_quantile(0.50, sum(irate(istio_request_bytes_bucket{reporter=~"$qrep", '
        'connection_security_policy="mutual_tls", destination_service="$service", '
        'source_workload=~"$srcwl", source_workload_namespace=~"$srcns"}[$__rate_interval])) by '
        '(source_workload, source_workload_namespace, le))',
    "TCP Received Bytes":
        'sum(irate(istio_tcp_received_bytes_total{reporter=~"$qrep", destination_service='
        '"$service"}[$__rate_interval]))',
}

# gRPC calls (ratings, behind its sidecar): Kiali's split of gRPC answers (its error filter:
# a gRPC status 1-16 under a non-error HTTP code), per reporter and by grpc_response_status
KIALI_GRPC = 'request_protocol="grpc",destination_service="$service",reporter="$qrep"'
KIALI_GRPC_ERRORS = ('grpc_response_status=~"^[1-9]$|^1[0-6]$",'
                     r'response_code!~"^0$|^[4-5]\\d\\d$"')
GRPC_CALLS = {b"1": 4, b"9": 3}           # OK, NOT_FOUND (5)

# the burst: path -> (requests, response code)
BURST = {"/reviews/1": (6, "200"), "/missing": (2, "404"), "/fail": (1, "503")}
BODY = b"x" * 10
# the burst's TCP connections: bytes each client sends (the app answers twice as many)
TCP_BURST = (1000, 2500, 500)
TCP_METRIC = "istio_tcp_received_bytes_total"


def panel(name: str, qrep: str) -> str:
    expr = PANELS[name]
    for var, value in (("$__rate_interval", RATE), ("$qrep", qrep), ("$service", REVIEWS_HOST),
                       ("$srcwl", ".*"), ("$srcns", ".*")):
        expr = expr.replace(var, value)
    return expr


class Prometheus:
    def __init__(self, tmp: str, targets: list[int]):
        self.port = free_port()
        self.dir = os.path.join(tmp, "prometheus")
        os.makedirs(self.dir, exist_ok=True)
        cfg = {"global": {"scrape_interval": "1s", "scrape_timeout": "900ms",
                          "evaluation_interval": "1s"},
               "scrape_configs": [{"job_name": "sidecars", "metrics_path": "/stats/prometheus",
                                   "static_configs": [{"targets": [f"127.0.0.1:{p}" for p in targets]}]}]}
        self.config = os.path.join(self.dir, "prometheus.yml")
        with open(self.config, "w") as f:
            yaml.safe_dump(cfg, f)
        self.log = open(os.path.join(self.dir, "log"), "w")
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={self.config}", f"--storage.tsdb.path={self.dir}/data",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"

    async def ready(self, session: aiohttp.ClientSession, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            assert self.proc.poll() is None, open(self.log.name).read()
            try:
                async with session.get(f"{self.url}/-/ready") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
        raise TimeoutError("prometheus not ready")

    async def query(self, session: aiohttp.ClientSession, expr: str, at: float | None = None) -> list:
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        async with session.get(f"{self.url}/api/v1/query", params=params) as r:
            body = await r.json()
        assert body["status"] == "success", (expr, body)
        return body["data"]["result"]

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()


@pytest.fixture
async def world(tmp_path):
    mesh = await Mesh(str(tmp_path)).start()
    prom = Prometheus(str(tmp_path), [mesh.client_metrics, mesh.server_metrics,
                                      mesh.grpc_metrics])
    try:
        yield mesh, prom
    finally:
        prom.stop()
        await mesh.stop()


async def totals(prom: Prometheus, s: aiohttp.ClientSession, at: float | None = None,
                 metric: str = "istio_requests_total") -> dict:
    """Per reporter: [(scrape time, total)] of the last 30 s, from the raw samples."""
    out: dict[str, dict[float, float]] = {}
    for r in await prom.query(s, f'{metric}{{destination_service="{REVIEWS_HOST}"}}[30s]', at):
        rows = out.setdefault(r["metric"]["reporter"], {})
        for t, v in r["values"]:
            rows[float(t)] = rows.get(float(t), 0.0) + float(v)
    return {rep: sorted(rows.items()) for rep, rows in out.items()}


async def send_burst(mesh: Mesh, s: aiohttp.ClientSession) -> None:
    for path, (n, _) in BURST.items():
        for _ in range(n):
            async with s.post(f"http://127.0.0.1:{mesh.outbound_port}{path}", data=BODY,
                              headers={"host": "reviews"}) as r:
                await r.read()
    for n in TCP_BURST:
        assert await mesh.tcp_exchange(b"t" * n) == b"t" * 2 * n


async def test_istio_dashboard_panels_over_a_real_prometheus(world):
    mesh, prom = world
    n = sum(c for c, _ in BURST.values())
    tcp = sum(TCP_BURST)
    async with aiohttp.ClientSession() as s:
        await prom.ready(s)
        await send_burst(mesh, s)          # the series exist before the measured burst
        deadline = time.monotonic() + 60
        while True:
            assert time.monotonic() < deadline, "no clean burst between two scrapes"
            before = await totals(prom, s)
            before_tcp = await totals(prom, s, metric=TCP_METRIC)
            if {"source", "destination"} <= set(before) and \
                    {"source", "destination"} <= set(before_tcp) and \
                    all(rows[-1][1] % n == 0 for rows in before.values()) and \
                    all(rows[-1][1] % tcp == 0 for rows in before_tcp.values()):
                base = {rep: rows[-1][1] for rep, rows in before.items()}
                base_tcp = {rep: rows[-1][1] for rep, rows in before_tcp.items()}
                await send_burst(mesh, s)
                # wait for both targets' first scrape after the burst
                for _ in range(100):
                    after = await totals(prom, s)
                    after_tcp = await totals(prom, s, metric=TCP_METRIC)
                    if all(after[rep][-1][1] > base[rep] for rep in base) and \
                            all(after_tcp[rep][-1][1] > base_tcp[rep] for rep in base_tcp):
                        break
                    await asyncio.sleep(0.1)
                # clean: each target's last two samples are "before" and "all of the burst"
                # (for the TCP bytes too: every connection of the burst closed before it)
                clean = [len(rows) >= 2 and rows[-2][1] == b[rep] and rows[-1][1] == b[rep] + k
                         for got, b, k in ((after, base, n), (after_tcp, base_tcp, tcp))
                         for rep, rows in got.items()]
                if all(clean):
                    break
            await asyncio.sleep(1.1)       # a scrape fell inside the burst: try again
        at = max(rows[-1][0] for rows in after.values())
        gap = {rep: rows[-1][0] - rows[-2][0] for rep, rows in after.items()}
        # one scrape of a target holds both series: the same two sample times
        assert gap == {rep: rows[-1][0] - rows[-2][0] for rep, rows in after_tcp.items()}

        async def ask(name: str, qrep: str) -> list:
            return await prom.query(s, panel(name, qrep), at)

        def one(result: list) -> float:
            assert len(result) == 1, result
            return float(result[0]["value"][1])

        def per_second(count: int, rep: str) -> float:
            return round(count / gap[rep], 3)

        # both reporters: requests per second over the burst, the success ratio (8 of 9 non-5xx)
        for rep in ("destination", "source"):
            assert one(await ask("Client Request Volume", rep)) == pytest.approx(per_second(n, rep), abs=0.0011)
            assert one(await ask("Client Success Rate (non-5xx responses)", rep)) == pytest.approx(8 / 9)
            p50 = one(await ask("Client Request Duration", rep))
            assert 0 < p50 < 1.0            # seconds: loopback requests take milliseconds
        assert one(await ask("Server Request Volume", "destination")) == \
            pytest.approx(per_second(n, "destination"), abs=0.0011)

        # by source: productpage's workload and namespace, from metadata exchange over mTLS
        rows = await ask("Incoming Requests By Source And Response Code", "destination")
        got = {(r["metric"]["source_workload"], r["metric"]["source_workload_namespace"],
                r["metric"]["response_code"]): float(r["value"][1]) for r in rows}
        assert got == pytest.approx({("productpage-v1", NS, code): per_second(c, "destination")
                                     for c, code in BURST.values()}, abs=0.0011)
        rows = await ask("Incoming Success Rate (non-5xx responses) By Source", "destination")
        assert [(r["metric"], float(r["value"][1])) for r in rows] == \
            [({"source_workload": "productpage-v1", "source_workload_namespace": NS}, pytest.approx(8 / 9))]
        # every body is 10 bytes: the (1, 10] bucket, interpolated at its middle
        rows = await ask("Incoming Request Size By Source", "destination")
        assert [(r["metric"], float(r["value"][1])) for r in rows] == \
            [({"source_workload": "productpage-v1", "source_workload_namespace": NS}, 5.5)]

        # TCP: the bytes the burst's connections sent, per second, seen by both reporters
        for rep in ("destination", "source"):
            assert one(await ask("TCP Received Bytes", rep)) == \
                pytest.approx(tcp / gap[rep], rel=1e-6)


async def test_grpc_calls_on_the_dashboards(world):
    """gRPC between two injected pods (productpage's grpcio client -> ratings' grpcio
    service, HTTP/2 over mTLS between the sidecars): Prometheus shows the calls per reporter
    as ``request_protocol="grpc"`` with their ``grpc_response_status``, and Kiali's gRPC error
    filter counts the NOT_FOUND answers (HTTP 200 each)."""
    mesh, prom = world
    for rating, n in GRPC_CALLS.items():
        for _ in range(n):
            await mesh.grpc_call(rating)
    total = sum(GRPC_CALLS.values())
    async with aiohttp.ClientSession() as s:
        await prom.ready(s)

        async def ask(expr: str, qrep: str) -> list:
            return await prom.query(s, expr.replace("$service", RATINGS_HOST)
                                    .replace("$qrep", qrep))

        for rep in ("source", "destination"):
            by_status: dict = {}
            for _ in range(100):            # until the calls are scraped
                rows = await ask(f"sum(istio_requests_total{{{KIALI_GRPC}}}) "
                                 "by (grpc_response_status, response_code, source_workload)", rep)
                by_status = {(r["metric"]["grpc_response_status"], r["metric"]["response_code"],
                              r["metric"]["source_workload"]): float(r["value"][1]) for r in rows}
                if sum(by_status.values()) == total:
                    break
                await asyncio.sleep(0.2)
            assert by_status == {("0", "200", "productpage-v1"): 4.0,
                                 ("5", "200", "productpage-v1"): 3.0}, rep
            errors = await ask(f"sum(istio_requests_total{{{KIALI_GRPC},{KIALI_GRPC_ERRORS}}})",
                               rep)
            assert [float(r["value"][1]) for r in errors] == [3.0], rep
