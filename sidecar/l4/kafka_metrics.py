"""Metrics of the Kafka broker filter, on metric families passed in.

``MetricFamilies`` is the small interface the filter needs: prometheus_client-style factories
of labelled counters and histograms (``sidecar.observability.metrics.Metrics`` has this shape;
``RegistryFamilies`` adapts a bare ``prometheus_client.CollectorRegistry``). Label children
are bound once and cached by int keys, so recording on the hot path is a dict lookup and an
``inc``/``observe``.

Names (all labelled ``stat_prefix``; Envoy's ``kafka.<stat_prefix>.*`` counterparts in
docs/l4-kafka.md):
  sidecar_kafka_requests_total{api}                   request.TYPE (api "unknown": request.unknown)
  sidecar_kafka_responses_total{api}                  response.TYPE
  sidecar_kafka_response_duration_seconds{api}        response.TYPE_duration (histogram)
  sidecar_kafka_response_errors_total{api,error_code,error}   error codes found in responses
  sidecar_kafka_undecoded_frames_total{direction,reason}      frames passed through undecoded
  sidecar_kafka_trailing_bytes_frames_total{direction}        frames with bytes after the body
  sidecar_kafka_topic_records_total{api,topic}        Produce requests / Fetch responses
  sidecar_kafka_topic_bytes_total{api,topic}          record batch bytes, likewise
  sidecar_kafka_acl_denied_total{api,topic}           topic entries denied by the topic ACL
  sidecar_kafka_rewritten_responses_total{api,reason} responses re-encoded, and why
  sidecar_kafka_unrewritten_brokers_total{api}        broker entries no rewrite rule covers
  sidecar_kafka_unanswered_requests_total{reason}     requests that got no response
  sidecar_kafka_closed_connections_total{reason}      connections the filter asked to close
"""

from __future__ import annotations

from typing import Protocol

from kio.schema.errors import ErrorCode
from prometheus_client import CollectorRegistry, Counter, Histogram

from sidecar.codec.kafka.schema import api_name

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 30.0, 60.0)
# distinct topic label values per filter; more would let clients grow memory at will
DEFAULT_MAX_TOPIC_LABELS = 1000
OTHER_TOPICS = "__other__"


class CounterChild(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class HistogramChild(Protocol):
    def observe(self, amount: float) -> None: ...


class CounterFamily(Protocol):
    def labels(self, *values: str) -> CounterChild: ...


class HistogramFamily(Protocol):
    def labels(self, *values: str) -> HistogramChild: ...


class MetricFamilies(Protocol):
    def counter(self, name: str, doc: str, labels: tuple[str, ...]) -> CounterFamily: ...

    def histogram(self, name: str, doc: str, labels: tuple[str, ...],
                  buckets: tuple[float, ...]) -> HistogramFamily: ...


class RegistryFamilies:
    """MetricFamilies on a prometheus_client registry; families are made once per name."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._counters: dict[str, Counter] = {}
        self._histograms: dict[str, Histogram] = {}

    def counter(self, name: str, doc: str, labels: tuple[str, ...]) -> Counter:
        if name not in self._counters:
            self._counters[name] = Counter(name, doc, labelnames=labels, registry=self.registry)
        return self._counters[name]

    def histogram(self, name: str, doc: str, labels: tuple[str, ...],
                  buckets: tuple[float, ...]) -> Histogram:
        if name not in self._histograms:
            self._histograms[name] = Histogram(name, doc, labelnames=labels, buckets=buckets,
                                               registry=self.registry)
        return self._histograms[name]


def error_name(code: int) -> str:
    try:
        return ErrorCode(code).name.upper()
    except ValueError:
        return "UNKNOWN"


class KafkaMetrics:
    """The filter's metrics for one ``stat_prefix``."""

    def __init__(self, families: MetricFamilies, stat_prefix: str,
                 max_topic_labels: int = DEFAULT_MAX_TOPIC_LABELS) -> None:
        p = stat_prefix
        self._prefix = p
        self._max_topics = max_topic_labels
        self._requests = families.counter(
            "sidecar_kafka_requests_total", "Kafka requests from clients, by API",
            ("stat_prefix", "api"))
        self._responses = families.counter(
            "sidecar_kafka_responses_total", "Kafka responses to clients, by API",
            ("stat_prefix", "api"))
        self._duration = families.histogram(
            "sidecar_kafka_response_duration_seconds",
            "Time from a request to its response, by API", ("stat_prefix", "api"),
            LATENCY_BUCKETS)
        self._errors = families.counter(
            "sidecar_kafka_response_errors_total",
            "Non-zero error codes in responses (every occurrence, nested ones included)",
            ("stat_prefix", "api", "error_code", "error"))
        self._undecoded = families.counter(
            "sidecar_kafka_undecoded_frames_total",
            "Frames passed through without being decoded, by direction and reason",
            ("stat_prefix", "direction", "reason"))
        self._trailing = families.counter(
            "sidecar_kafka_trailing_bytes_frames_total",
            "Decoded frames with bytes after their body (tolerated, as Kafka clients do)",
            ("stat_prefix", "direction"))
        self._topic_records = families.counter(
            "sidecar_kafka_topic_records_total",
            "Records produced (requests) and fetched (responses), by topic",
            ("stat_prefix", "api", "topic"))
        self._topic_bytes = families.counter(
            "sidecar_kafka_topic_bytes_total",
            "Record batch bytes produced and fetched, by topic", ("stat_prefix", "api", "topic"))
        self._acl_denied = families.counter(
            "sidecar_kafka_acl_denied_total",
            "Topics of Produce/Fetch requests denied by the topic ACL",
            ("stat_prefix", "api", "topic"))
        self._rewritten = families.counter(
            "sidecar_kafka_rewritten_responses_total",
            "Responses re-encoded by the filter, by reason", ("stat_prefix", "api", "reason"))
        self._unrewritten = families.counter(
            "sidecar_kafka_unrewritten_brokers_total",
            "Broker addresses in responses that no rewrite rule covers", ("stat_prefix", "api"))
        self._unanswered = families.counter(
            "sidecar_kafka_unanswered_requests_total",
            "Requests that got no response (connection closed, or skipped by the broker)",
            ("stat_prefix", "reason"))
        self._closed = families.counter(
            "sidecar_kafka_closed_connections_total",
            "Connections the filter asked to close, by reason", ("stat_prefix", "reason"))
        self._request_children: dict[int, CounterChild] = {}
        self._response_children: dict[int, tuple[CounterChild, HistogramChild]] = {}
        self._error_children: dict[tuple[int, int], CounterChild] = {}
        self._topic_children: dict[tuple[str, str], tuple[CounterChild, CounterChild]] = {}
        self._topics_seen: set[str] = set()

    def request(self, api_key: int) -> None:
        child = self._request_children.get(api_key)
        if child is None:
            child = self._requests.labels(self._prefix, api_name(api_key))
            self._request_children[api_key] = child
        child.inc()

    def response(self, api_key: int, seconds: float) -> None:
        children = self._response_children.get(api_key)
        if children is None:
            name = api_name(api_key)
            children = (self._responses.labels(self._prefix, name),
                        self._duration.labels(self._prefix, name))
            self._response_children[api_key] = children
        children[0].inc()
        children[1].observe(seconds)

    def response_error(self, api_key: int, code: int) -> None:
        child = self._error_children.get((api_key, code))
        if child is None:
            child = self._errors.labels(self._prefix, api_name(api_key), str(code),
                                        error_name(code))
            self._error_children[(api_key, code)] = child
        child.inc()

    def topic_traffic(self, api: str, topic: str, records: int, size: int) -> None:
        label = self.topic_label(topic)
        key = (api, label)
        children = self._topic_children.get(key)
        if children is None:
            children = (self._topic_records.labels(self._prefix, api, label),
                        self._topic_bytes.labels(self._prefix, api, label))
            self._topic_children[key] = children
        children[0].inc(records)
        children[1].inc(size)

    def topic_label(self, topic: str) -> str:
        if topic in self._topics_seen:
            return topic
        if len(self._topics_seen) >= self._max_topics:
            return OTHER_TOPICS
        self._topics_seen.add(topic)
        return topic

    def acl_denied(self, api: str, topic: str) -> None:
        self._acl_denied.labels(self._prefix, api, self.topic_label(topic)).inc()

    def undecoded(self, direction: str, reason: str) -> None:
        self._undecoded.labels(self._prefix, direction, reason).inc()

    def trailing_bytes(self, direction: str) -> None:
        self._trailing.labels(self._prefix, direction).inc()

    def rewritten(self, api_key: int, reason: str) -> None:
        self._rewritten.labels(self._prefix, api_name(api_key), reason).inc()

    def unrewritten_brokers(self, api_key: int, count: int) -> None:
        self._unrewritten.labels(self._prefix, api_name(api_key)).inc(count)

    def unanswered(self, reason: str, count: int) -> None:
        self._unanswered.labels(self._prefix, reason).inc(count)

    def closed(self, reason: str) -> None:
        self._closed.labels(self._prefix, reason).inc()
