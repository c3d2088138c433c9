"""What the Envoy v3 translator does with every field of every message it accepts.

The table is data, ``field_coverage.yaml`` beside this module (one line per field); this module
loads it into typed decisions.

Each field is ``Honoured`` (with the test that shows it), ``Refused`` (``sidecar validate``
names it with its path: a config that sets it is an error), or ``Opaque`` (kept and handed on
as given, not read: the node identity, which goes to the control plane). Nothing is accepted
and ignored.

``tests/unit/translate/test_field_coverage.py`` walks the real Envoy API definitions (the
``envoy-data-plane`` package) from the bootstrap through every honoured field, and fails when a
message it reaches has a field this table does not decide, when a field decided ``Refused`` is
accepted, or when a named test does not exist: a new field in the API fails the test until
someone decides what the sidecar does with it.

A message used in more than one place is decided where the walk first meets it: the core
``HttpProtocolOptions`` on the HTTP connection manager (``max_response_headers_kb`` is refused
there, as in Envoy; on a cluster's ``typed_extension_protocol_options`` it is honoured,
``tests/integration/test_edge_safety.py::test_upstream_response_header_limits_both_formats``).

Not walkable from the API package: ``envoy.extensions.load_balancing_policies.peak_ewma.v3alpha.
PeakEwma`` (v3alpha types are not in envoy-data-plane); its fields are checked by hand in
``control_plane_client/translate/cluster.py`` (``decay_time``, ``default_rtt``, ``choice_count``,
``failure_penalty``; anything else refused by name).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml


@dataclass(frozen=True, slots=True)
class Honoured:
    test: str                  # "tests/<path>.py::<test function>" that shows the field at work
    note: str = ""


@dataclass(frozen=True, slots=True)
class Refused:
    note: str = ""
    sample: object = None      # a value the translator must refuse (default: one of its type)


@dataclass(frozen=True, slots=True)
class Opaque:
    test: str
    note: str = ""


Decision = Honoured | Refused | Opaque

TABLE = Path(__file__).with_name("field_coverage.yaml")


def _decision(where: str, entry: object) -> Decision:
    if entry == "refused":
        return Refused()
    if isinstance(entry, dict):
        if "honoured" in entry:
            return Honoured(str(entry["honoured"]), str(entry.get("note", "")))
        if "opaque" in entry:
            return Opaque(str(entry["opaque"]), str(entry.get("note", "")))
        if "refused" in entry:
            return Refused(str(entry["refused"]), entry.get("sample"))
    raise ValueError(f"{TABLE.name}: {where}: not a decision: {entry!r}")


def load(path: Path = TABLE) -> dict[str, dict[str, Decision]]:
    """message (envoy-data-plane module path + class) -> field -> decision."""
    raw = yaml.safe_load(path.read_text()) or {}
    return {message: {field: _decision(f"{message}.{field}", entry)
                      for field, entry in (fields or {}).items()}
            for message, fields in raw.items()}


COVERAGE: dict[str, dict[str, Decision]] = load()
