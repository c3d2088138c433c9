"""Honour or refuse, checked against the real Envoy API definitions (issue 14, item 1).

The walk (``walk.py``) goes from the bootstrap, and from every ``Any`` target the translator
accepts, through every field ``control_plane_client.translate.coverage`` says is honoured. For
every message reached, every field of its API definition (``envoy-data-plane``) must have a
decision; a refused field set in a valid config must make the translator fail with an error
at exactly that field's path; an honoured field must name a test that exists. A field added to
the API fails this file until someone decides what the sidecar does with it.
"""

from __future__ import annotations

import ast
import copy
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml

from control_plane_client.translate.coverage import COVERAGE, Honoured, Opaque, Refused
from tests.paths import REPO
from tests.unit.translate.probe import errors, fields_of, sample, set_field, shown
from tests.unit.translate.walk import Instance, base_doc, walk

# honoured message fields whose message is walked from its own root (it needs siblings set)
ROOTED_ELSEWHERE = {
    ("envoy.config.cluster.v3.Cluster", "eds_cluster_config"),
    # an ORIGINAL_DST cluster's own settings and a TCP health check are walked from roots that
    # make the cluster ORIGINAL_DST / replace the HTTP check (they cannot sit beside them)
    ("envoy.config.cluster.v3.Cluster", "original_dst_lb_config"),
    ("envoy.config.core.v3.HealthCheck", "tcp_health_check"),
    # a ConfigSource is walked where every kind of source is valid (an RDS config_source)
    ("envoy.config.bootstrap.v3.BootstrapDynamicResources", "cds_config"),
    ("envoy.config.bootstrap.v3.BootstrapDynamicResources", "lds_config"),
    # an SdsSecretConfig is walked as validation_context_sds_secret_config (the certificate's
    # one cannot sit beside the probe's tls_certificates)
    ("envoy.extensions.transport_sockets.tls.v3.CommonTlsContext", "tls_certificate_sds_secret_configs"),
}


@cache
def instances() -> dict[str, Instance]:
    def descend(message: str, field: str, inst: Instance, doc: dict) -> bool:
        d = COVERAGE.get(message, {}).get(field)
        return isinstance(d, Honoured) and (message, field) not in ROOTED_ELSEWHERE
    return {i.message: i for i in walk(descend)}


def _doc_with(inst: Instance, field: str, value: object) -> tuple[dict, str]:
    doc = base_doc(inst.setup)
    return doc, set_field(doc, inst.at, inst.message, field, copy.deepcopy(value))


def test_every_field_of_every_message_reached_is_decided():
    problems = []
    for name in instances():
        api = set(fields_of(name))
        table = set(COVERAGE.get(name, {}))
        if api - table:
            problems.append(f"{name}: no decision for {sorted(api - table)}")
        if table - api:
            problems.append(f"{name}: decisions for fields the API does not have {sorted(table - api)}")
    assert not problems, "\n".join(problems)


def test_every_message_in_the_table_is_reached():
    assert not set(COVERAGE) - set(instances()), sorted(set(COVERAGE) - set(instances()))


def test_each_message_is_probed_in_a_valid_config():
    bad = {name: errors(base_doc(i.setup))[:1] for name, i in instances().items()
           if errors(base_doc(i.setup))}
    assert not bad, bad


REFUSED = [(m, f) for m, fs in COVERAGE.items() for f, d in fs.items() if isinstance(d, Refused)]


@pytest.mark.parametrize("message", sorted({m for m, _ in REFUSED}))
def test_refused_fields_are_refused_by_name_with_their_path(message):
    inst = instances()[message]
    accepted = []
    for field, d in COVERAGE[message].items():
        if not isinstance(d, Refused):
            continue
        value = d.sample if d.sample is not None else sample(message, field)
        doc, path = _doc_with(inst, field, value)
        want = shown(path)
        errs = errors(doc)
        if not any(e.path in (want, want + "[0]") for e in errs):
            accepted.append(f"{want}: {[str(e) for e in errs][:2] or 'accepted'}")
    assert not accepted, "refused in the table, not refused by name:\n" + "\n".join(accepted)


@pytest.mark.parametrize("message", sorted(COVERAGE))
def test_honoured_fields_are_not_refused_as_unknown(message):
    inst = instances()[message]
    refused = []
    for field, d in COVERAGE[message].items():
        if isinstance(d, Refused):
            continue
        doc, path = _doc_with(inst, field, sample(message, field))
        want = shown(path)
        for e in errors(doc):
            if e.path == want and e.message == "unknown or unsupported field":
                refused.append(want)
    assert not refused, refused


@cache
def _test_functions(path: str) -> frozenset[str]:
    tree = ast.parse((REPO / path).read_text())
    return frozenset(n.name for n in ast.walk(tree)
                     if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))


def test_honoured_fields_name_tests_that_exist():
    missing = []
    for message, fs in COVERAGE.items():
        for field, d in fs.items():
            if isinstance(d, (Honoured, Opaque)):
                path, _, func = d.test.partition("::")
                if not (REPO / path).is_file() or func not in _test_functions(path):
                    missing.append(f"{message}.{field}: {d.test}")
    assert not missing, "\n".join(missing)


def test_sidecar_validate_refuses_them_by_name(tmp_path: Path):
    """The CLI a user runs says the same: exit 1, every refused field named with its path."""
    picks = [("envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
              "delayed_close_timeout"),
             ("envoy.config.cluster.v3.Cluster", "upstream_connection_options"),
             ("envoy.config.bootstrap.v3.Admin", "profile_path")]
    doc = base_doc(())
    paths = []
    for message, field in picks:
        assert isinstance(COVERAGE[message][field], Refused)
        inst = instances()[message]
        assert not inst.setup
        paths.append(shown(set_field(doc, inst.at, message, field, sample(message, field))))
    cfg = tmp_path / "envoy.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    out = subprocess.run([sys.executable, "-m", "sidecar", "validate", "-c", str(cfg)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stdout + out.stderr
    for p in paths:
        assert f"{p}: unknown or unsupported field" in out.stdout + out.stderr, p
