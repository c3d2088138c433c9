"""Offline injection of Kubernetes manifests (``sidecar inject -f``), for GitOps pipelines.

Multi-document YAML in, the same documents out, in order: the pod templates of Pod,
Deployment, StatefulSet, DaemonSet, ReplicaSet, ReplicationController, Job and CronJob (and of
the items of a ``List``) go through the same ``inject()`` the webhook uses; every other kind
passes through unchanged. YAML comments are not kept (PyYAML does not read them).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import yaml

from sidecar.k8s.inject import INJECTED, REFUSED, Outcome, inject
from sidecar.k8s.settings import InjectorConfig

# kind -> the path from the document to its pod template (Pod: the document itself)
TEMPLATE_PATHS: dict[str, tuple[str, ...]] = {
    "Pod": (),
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "ReplicationController": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}


@dataclass(frozen=True, slots=True)
class DocResult:
    where: str                 # "document 2 (Deployment shop/web)"
    outcome: Outcome | None  # None: a kind without a pod template, passed through


class ManifestError(Exception):
    """Input that is not Kubernetes YAML at all (not a refusal)."""


def _describe(index: int, doc: dict) -> str:
    meta = doc.get("metadata") or {}
    name = meta.get("name") or meta.get("generateName") or "?"
    ns = meta.get("namespace")
    return f"document {index + 1} ({doc.get('kind')} {ns + '/' if ns else ''}{name})"


def inject_document(doc: dict, config: InjectorConfig, where: str) -> tuple[dict, list[DocResult]]:
    """One document -> (the document, injected where it has pod templates; results)."""
    kind = doc.get("kind")
    if kind == "List" and isinstance(doc.get("items"), list):
        items, results = [], []
        for i, item in enumerate(doc["items"]):
            if isinstance(item, dict):
                new, res = inject_document(item, config, f"{where} item {i + 1}")
                items.append(new)
                results += res
            else:
                items.append(item)
        return {**doc, "items": items}, results
    path = TEMPLATE_PATHS.get(kind) if isinstance(kind, str) else None
    if path is None:
        return doc, [DocResult(where, None)]
    parents = [doc]
    node = doc
    for key in path:
        child = node.get(key)
        if not isinstance(child, dict):
            raise ManifestError(f"{where}: {kind} has no {'.'.join(path)}")
        node = child
        parents.append(node)
    name = (doc.get("metadata") or {}).get("name")
    outcome = inject(node, config, workload=name if kind != "Pod" and isinstance(name, str)
                     else None)
    if outcome.status != INJECTED:
        return doc, [DocResult(where, outcome)]
    # rebuild the path down to the template with copies; the input stays as it was
    new = outcome.pod
    for key, parent in zip(reversed(path), reversed(parents[:-1]), strict=False):
        new = {**parent, key: new}
    return new, [DocResult(where, outcome)]


def inject_yaml(text: str, config: InjectorConfig) -> tuple[list, list[DocResult]]:
    """Multi-document YAML -> (documents, one result per pod template or other document).
    Empty documents are dropped."""
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        raise ManifestError(f"not YAML: {e}") from None
    out, results = [], []
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict):
            raise ManifestError(f"document {i + 1}: not a Kubernetes object (a mapping)")
        new, res = inject_document(doc, config, _describe(i, doc))
        out.append(new)
        results += res
    return out, results


def dump_yaml(docs: Iterable) -> str:
    return yaml.safe_dump_all(list(docs), sort_keys=False, default_flow_style=False, width=100)


def refused(results: Iterable[DocResult]) -> list[DocResult]:
    return [r for r in results if r.outcome is not None and r.outcome.status == REFUSED]
