"""The dashboard's L4 part: TCP proxy traffic per ``stat_prefix`` and Kafka per API and per
topic, sampled with the rest (``sidecar.admin.dashboard.Sampler``) and turned into rates over
the same window."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MAX_TOPICS = 50

Totals = dict[tuple[str, ...], float]


@dataclass(slots=True)
class L4Sample:
    tcp_cx: Totals = field(default_factory=dict)          # (stat_prefix,)
    tcp_rx: Totals = field(default_factory=dict)
    tcp_tx: Totals = field(default_factory=dict)
    kafka_requests: Totals = field(default_factory=dict)  # (stat_prefix, api)
    kafka_errors: Totals = field(default_factory=dict)    # (stat_prefix, error)
    topic_records: Totals = field(default_factory=dict)   # (stat_prefix, api, topic)
    topic_bytes: Totals = field(default_factory=dict)
    acl_denied: Totals = field(default_factory=dict)      # (stat_prefix, api, topic)


def _totals(metrics: Any, name: str, keys: tuple[str, ...]) -> Totals:
    """Counter values summed by the label values of ``keys``."""
    fam = metrics.family(name)
    out: Totals = {}
    if fam is None:
        return out
    for m in fam.collect():
        for s in m.samples:
            if s.name.endswith("_total"):
                k = tuple(s.labels.get(x, "") for x in keys)
                out[k] = out.get(k, 0.0) + s.value
    return out


def sample(metrics: Any) -> L4Sample:
    s = L4Sample()
    if not metrics.enabled:
        return s
    p = ("stat_prefix",)
    s.tcp_cx = _totals(metrics, "sidecar_tcp_downstream_cx_total", p)
    s.tcp_rx = _totals(metrics, "sidecar_tcp_downstream_cx_rx_bytes_total", p)
    s.tcp_tx = _totals(metrics, "sidecar_tcp_downstream_cx_tx_bytes_total", p)
    s.kafka_requests = _totals(metrics, "sidecar_kafka_requests_total", ("stat_prefix", "api"))
    s.kafka_errors = _totals(metrics, "sidecar_kafka_response_errors_total",
                             ("stat_prefix", "error"))
    t = ("stat_prefix", "api", "topic")
    s.topic_records = _totals(metrics, "sidecar_kafka_topic_records_total", t)
    s.topic_bytes = _totals(metrics, "sidecar_kafka_topic_bytes_total", t)
    s.acl_denied = _totals(metrics, "sidecar_kafka_acl_denied_total", t)
    return s


def view(new: L4Sample, old: L4Sample | None, rate: Callable[[float, float], float],
         sessions: dict[str, int]) -> dict[str, object]:
    """``tcp``: one entry per tcp_proxy stat_prefix; ``kafka``: one per kafka_broker
    stat_prefix, with its APIs and topics. ``sessions``: open connections by stat_prefix."""
    o = old if old is not None else L4Sample()
    tcp = []
    for (prefix,), cx in sorted(new.tcp_cx.items()):
        k = (prefix,)
        tcp.append({
            "stat_prefix": prefix, "cx_active": sessions.get(prefix, 0),
            "cx_total": int(cx), "cx_per_s": rate(cx, o.tcp_cx.get(k, 0.0)),
            "rx_bytes": int(new.tcp_rx.get(k, 0.0)), "tx_bytes": int(new.tcp_tx.get(k, 0.0)),
            "rx_bytes_per_s": rate(new.tcp_rx.get(k, 0.0), o.tcp_rx.get(k, 0.0)),
            "tx_bytes_per_s": rate(new.tcp_tx.get(k, 0.0), o.tcp_tx.get(k, 0.0)),
        })
    kafka: dict[str, dict[str, Any]] = {}

    def entry(prefix: str) -> dict[str, Any]:
        e = kafka.get(prefix)
        if e is None:
            e = kafka[prefix] = {"stat_prefix": prefix, "requests": 0, "requests_per_s": 0.0,
                                 "apis": [], "topics": {}, "errors": {}}
        return e

    for (prefix, api), n in sorted(new.kafka_requests.items()):
        e = entry(prefix)
        r = rate(n, o.kafka_requests.get((prefix, api), 0.0))
        e["requests"] += int(n)
        e["requests_per_s"] = round(e["requests_per_s"] + r, 3)
        e["apis"].append({"api": api, "requests": int(n), "per_s": r})
    for (prefix, error), n in new.kafka_errors.items():
        if error not in ("NONE", ""):
            entry(prefix)["errors"][error] = int(n)
    for table, what in ((new.topic_records, "records"), (new.topic_bytes, "bytes"),
                        (new.acl_denied, "denied")):
        before = {"records": o.topic_records, "bytes": o.topic_bytes, "denied": o.acl_denied}[what]
        for (prefix, api, topic), n in table.items():
            t = entry(prefix)["topics"].setdefault(topic, {"topic": topic})
            t[f"{api}_{what}"] = int(n)
            if what != "denied":
                t[f"{api}_{what}_per_s"] = rate(n, before.get((prefix, api, topic), 0.0))
    out = []
    for e in kafka.values():
        e["apis"].sort(key=lambda a: (-a["per_s"], -a["requests"], a["api"]))
        topics = sorted(e["topics"].values(),
                        key=lambda t: (-(t.get("produce_records", 0) + t.get("fetch_records", 0)),
                                       t["topic"]))
        e["topics_total"] = len(topics)
        e["topics"] = topics[:MAX_TOPICS]
        out.append(e)
    return {"tcp": tcp, "kafka": out}
