"""Who this sidecar serves: the pod's workload identity, as Istio's metrics label it.

Read once from the environment the injector gives the proxy container (the downward API for
the pod's name, namespace and service account; the workload, app, version and canonical
service worked out from the pod's labels and owner at injection time, see
``sidecar.k8s.inject``). Missing values are ``unknown``, as in Istio.

Also the peer side: a SPIFFE ID (``spiffe://<trust domain>/ns/<namespace>/sa/<account>``)
gives a peer's namespace, and Istio's metadata exchange (``x-envoy-peer-metadata``: a
base64 ``google.protobuf.Struct``) its workload, app and version.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

UNKNOWN = "unknown"

ENV_POD_NAME = "POD_NAME"
ENV_NAMESPACE = "POD_NAMESPACE"
ENV_SERVICE_ACCOUNT = "SERVICE_ACCOUNT"
ENV_WORKLOAD = "SIDECAR_WORKLOAD_NAME"
ENV_APP = "SIDECAR_APP"
ENV_VERSION = "SIDECAR_VERSION"
ENV_CANONICAL_SERVICE = "SIDECAR_CANONICAL_SERVICE"
ENV_CANONICAL_REVISION = "SIDECAR_CANONICAL_REVISION"
ENV_CLUSTER_ID = "SIDECAR_CLUSTER_ID"
ENV_TRUST_DOMAIN = "SIDECAR_TRUST_DOMAIN"
ENV_DNS_DOMAIN = "SIDECAR_DNS_DOMAIN"

CANONICAL_NAME_LABEL = "service.istio.io/canonical-name"
CANONICAL_REVISION_LABEL = "service.istio.io/canonical-revision"

# Istio's metadata exchange headers
PEER_METADATA = "x-envoy-peer-metadata"
PEER_METADATA_ID = "x-envoy-peer-metadata-id"
MAX_PEER_METADATA = 4096             # bytes of base64; Istio's are a few hundred

_SPIFFE = re.compile(r"^spiffe://([^/]+)/ns/([^/]+)/sa/([^/]+)$")
# label values we accept from a peer: what Kubernetes allows in names and label values
_VALUE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,251}[A-Za-z0-9])?$")
# <name>-<replicaset hash>-<pod suffix> (a Deployment's pod), <name>-<pod suffix>
_POD_OF_DEPLOYMENT = re.compile(r"^(.+)-[a-z0-9]{6,10}-[a-z0-9]{5}$")


@dataclass(frozen=True, slots=True)
class WorkloadLabels:
    """One side's eight Istio labels (``<side>_workload`` ... ``<side>_canonical_revision``)."""
    workload: str = UNKNOWN
    namespace: str = UNKNOWN
    principal: str = UNKNOWN
    app: str = UNKNOWN
    version: str = UNKNOWN
    cluster: str = UNKNOWN
    canonical_service: str = UNKNOWN
    canonical_revision: str = UNKNOWN

    def values(self) -> tuple[str, ...]:
        return (self.workload, self.namespace, self.principal, self.app, self.version,
                self.cluster, self.canonical_service, self.canonical_revision)


@dataclass(frozen=True, slots=True)
class Workload:
    """This pod."""
    pod_name: str = UNKNOWN
    namespace: str = UNKNOWN
    service_account: str = UNKNOWN
    workload: str = UNKNOWN
    app: str = UNKNOWN
    version: str = UNKNOWN
    canonical_service: str = UNKNOWN
    canonical_revision: str = "latest"
    cluster_id: str = "Kubernetes"
    trust_domain: str = "cluster.local"
    dns_domain: str = "cluster.local"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Workload:
        def get(key: str, default: str = UNKNOWN) -> str:
            v = env.get(key, "").strip()
            return v if v else default
        pod = get(ENV_POD_NAME)
        m = _POD_OF_DEPLOYMENT.match(pod)
        workload = get(ENV_WORKLOAD, m.group(1) if m else pod)
        app = get(ENV_APP)
        version = get(ENV_VERSION)
        return cls(pod_name=pod, namespace=get(ENV_NAMESPACE),
                   service_account=get(ENV_SERVICE_ACCOUNT), workload=workload, app=app,
                   version=version,
                   canonical_service=get(ENV_CANONICAL_SERVICE, app if app != UNKNOWN else workload),
                   canonical_revision=get(ENV_CANONICAL_REVISION,
                                          version if version != UNKNOWN else "latest"),
                   cluster_id=get(ENV_CLUSTER_ID, "Kubernetes"),
                   trust_domain=get(ENV_TRUST_DOMAIN, "cluster.local"),
                   dns_domain=get(ENV_DNS_DOMAIN, "cluster.local"))

    @property
    def spiffe_id(self) -> str:
        if UNKNOWN in (self.namespace, self.service_account):
            return UNKNOWN
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    def labels(self, principal: str) -> WorkloadLabels:
        return WorkloadLabels(self.workload, self.namespace, principal, self.app, self.version,
                              self.cluster_id, self.canonical_service, self.canonical_revision)

    def default_service(self) -> str:
        """The Kubernetes Service host this workload most likely serves (inbound
        destination_service unless configured)."""
        if UNKNOWN in (self.canonical_service, self.namespace):
            return UNKNOWN
        return f"{self.canonical_service}.{self.namespace}.svc.{self.dns_domain}"

    # ---- metadata exchange (ours, as Istio encodes it) ----------------------------------------
    def metadata_headers(self) -> tuple[tuple[str, str], tuple[str, str]]:
        s = _struct()
        s.update({"NAME": self.pod_name, "NAMESPACE": self.namespace,
                  "WORKLOAD_NAME": self.workload, "SERVICE_ACCOUNT": self.service_account,
                  "CLUSTER_ID": self.cluster_id,
                  "LABELS": {"app": self.app, "version": self.version,
                             CANONICAL_NAME_LABEL: self.canonical_service,
                             CANONICAL_REVISION_LABEL: self.canonical_revision}})
        value = base64.b64encode(s.SerializeToString()).decode("ascii")
        ident = f"sidecar~{self.pod_name}.{self.namespace}~{self.namespace}.svc.{self.dns_domain}"
        return (PEER_METADATA, value), (PEER_METADATA_ID, ident)


def _struct() -> Any:
    # Lazy: protobuf (~2 MB of RSS) is loaded only by Istio metadata exchange.
    from google.protobuf import struct_pb2
    return struct_pb2.Struct()


def _decode_error() -> type[Exception]:
    from google.protobuf.message import DecodeError  # lazy, as in _struct
    return DecodeError


def spiffe_parts(identity: str | None) -> tuple[str, str, str] | None:
    """(trust domain, namespace, service account) of a SPIFFE ID, or None."""
    if not identity:
        return None
    m = _SPIFFE.match(identity)
    return (m.group(1), m.group(2), m.group(3)) if m else None


def peer_from_identity(identity: str | None, cluster: str = UNKNOWN) -> WorkloadLabels:
    """What a verified SPIFFE ID alone says of the peer."""
    parts = spiffe_parts(identity)
    if parts is None:
        return WorkloadLabels(principal=identity or UNKNOWN) if identity else WorkloadLabels()
    return WorkloadLabels(namespace=parts[1], principal=identity or UNKNOWN)


def _clean(v: object) -> str:
    return v if isinstance(v, str) and _VALUE.match(v) else UNKNOWN


def peer_from_metadata(header: str, identity: str) -> WorkloadLabels | None:
    """A peer's ``x-envoy-peer-metadata``, used only when it agrees with the peer's verified
    SPIFFE ID (same namespace and service account): a header alone proves nothing. None when
    it cannot be decoded or does not agree. Values that are not Kubernetes-shaped names become
    ``unknown`` (labels must stay bounded and printable)."""
    parts = spiffe_parts(identity)
    if parts is None or len(header) > MAX_PEER_METADATA:
        return None
    try:
        raw = base64.b64decode(header, validate=True)
        s = _struct()
        s.ParseFromString(raw)
    except (binascii.Error, ValueError, _decode_error()):
        return None
    fields = s.fields
    ns = fields["NAMESPACE"].string_value if "NAMESPACE" in fields else ""
    sa = fields["SERVICE_ACCOUNT"].string_value if "SERVICE_ACCOUNT" in fields else ""
    if (ns, sa) != (parts[1], parts[2]):
        return None
    labels: dict[str, str] = {}
    if "LABELS" in fields and fields["LABELS"].HasField("struct_value"):
        for k, v in fields["LABELS"].struct_value.fields.items():
            if v.HasField("string_value"):
                labels[k] = v.string_value

    def field(name: str) -> str:
        return _clean(fields[name].string_value) if name in fields else UNKNOWN

    workload = field("WORKLOAD_NAME")
    app = _clean(labels.get("app"))
    version = _clean(labels.get("version"))
    canonical = _clean(labels.get(CANONICAL_NAME_LABEL))
    revision = _clean(labels.get(CANONICAL_REVISION_LABEL))
    return WorkloadLabels(workload=workload, namespace=ns, principal=identity, app=app,
                          version=version, cluster=field("CLUSTER_ID"),
                          canonical_service=canonical if canonical != UNKNOWN else
                          (app if app != UNKNOWN else workload),
                          canonical_revision=revision if revision != UNKNOWN else
                          (version if version != UNKNOWN else "latest"))
