"""Read a config file (native YAML or Envoy v3 bootstrap, YAML or JSON) into a Snapshot."""

from __future__ import annotations

import json
import os

import yaml

from control_plane_client.translate.bootstrap import bootstrap
from filters import CATALOG
from filters.python import config_dir
from sidecar.config.errors import ConfigError, ConfigErrors
from sidecar.config.native.document import snapshot
from sidecar.config.snapshot import Snapshot

# libyaml's loader when PyYAML was built with it: several times faster on large configs
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# keys that only an Envoy bootstrap has at its top level
_ENVOY_KEYS = {"static_resources", "dynamic_resources", "layered_runtime",
               "overload_manager", "stats_flush_interval"}


def parse_text(text: str, name: str = "<config>") -> dict:
    try:
        if name.endswith(".json"):
            doc = json.loads(text)
        else:
            doc = yaml.load(text, Loader=_YAML_LOADER)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise ConfigErrors([ConfigError("", f"{name}: not valid YAML/JSON: {e}")]) from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ConfigErrors([ConfigError("", f"{name}: the top level must be a mapping")])
    return doc


def is_envoy(doc: dict) -> bool:
    return bool(_ENVOY_KEYS & set(doc)) or (
        isinstance(doc.get("admin"), dict) and "address" in doc["admin"]
        and isinstance(doc["admin"]["address"], dict))


def snapshot_from_doc(doc: dict) -> Snapshot:
    try:
        if is_envoy(doc):
            return bootstrap(doc)
        return snapshot(doc, CATALOG)
    except ConfigError as e:
        raise ConfigErrors([e]) from None


def filter_source_files(snap: Snapshot) -> dict[str, str]:
    """The files the snapshot's filters were made from (user filter modules) -> the name of
    the filter instance: the proxy reloads when one changes, and the loop watchdog names the
    filter whose code blocked the loop."""
    out: dict[str, str] = {}
    for lc in snap.listeners:
        for hf in lc.http_filters:
            spec = CATALOG.lookup(hf.spec_name)
            if spec is not None and spec.source_files is not None:
                for f in spec.source_files(hf.config):
                    out[f] = f"{out[f]},{hf.name}" if f in out and hf.name not in out[f] \
                        else hf.name
    return out


def load_file(path: str) -> Snapshot:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigErrors([ConfigError("", f"cannot read {path}: {e.strerror}")]) from None
    # user filter modules named by a relative path live beside the config file
    with config_dir(os.path.dirname(os.path.abspath(path))):
        snap = snapshot_from_doc(parse_text(text, path))
    st = os.stat(path)
    return Snapshot(**{**{k: getattr(snap, k) for k in snap.__dataclass_fields__},
                       "version": snap.version if snap.version != "0" else f"file-{int(st.st_mtime)}"})
