"""The ``sidecar`` command line in-process, without sockets: the parser of each command
(defaults, required flags, choices, exit code 2 on bad usage), ``validate`` on good and bad
files (exit codes, every error named by its path, build-time errors too), ``run`` refusing an
invalid file before binding anything, and the ``certs`` / ``token`` commands end to end on
files in tmp_path."""

from __future__ import annotations

import json
import stat

import jwt
import pytest
import yaml
from cryptography import x509

from sidecar import __version__
from sidecar.cli.main import build_parser, main

GOOD = {
    "listeners": [{"name": "web", "port": 10000,
                   "routes": [{"match": {"prefix": "/"}, "cluster": "api"}]}],
    "clusters": [{"name": "api", "endpoints": ["127.0.0.1:8081"]},
                 {"name": "spare", "endpoints": ["127.0.0.1:8082"]}],
}

BOOM_FILTER = '''
from sidecar import sdk


class Boom(sdk.UserFilter):
    def __init__(self, config, setup):
        super().__init__(config, setup)
        raise RuntimeError("cannot start")
'''


def write_yaml(path, doc) -> str:
    path.write_text(yaml.safe_dump(doc))
    return str(path)


# ---- the parsers ------------------------------------------------------------------------------

def test_run_defaults_and_flags():
    p = build_parser()
    a = p.parse_args(["run"])
    assert (a.config, a.concurrency, a.no_metrics, a.no_uvloop, a.loop_lag_threshold) == \
        (None, None, False, False, 250.0)
    a = p.parse_args(["run", "-c", "x.yaml", "--concurrency", "4", "--no-metrics", "--no-uvloop",
                      "--loop-lag-threshold", "0", "--log-level", "debug"])
    assert (a.config, a.concurrency, a.no_metrics, a.no_uvloop, a.loop_lag_threshold, a.log_level) == \
        ("x.yaml", 4, True, True, 0.0, "debug")


@pytest.mark.parametrize("argv", [
    ["validate"],                                         # -c is required
    ["run", "--concurrency", "many"],
    ["iptables", "--inbound-port", "15006", "--outbound-port", "15001"],    # --proxy-uid
    ["iptables", "--proxy-uid", "1", "--inbound-port", "99999", "--outbound-port", "1"],
    ["token", "mint"],                                    # --key or --secret
    ["token", "mint", "--key", "k.pem", "--secret", "s"],  # not both
    ["token", "keygen", "--out", "d", "--kind", "dsa"],
    ["certs", "issue"],                                   # --sa is required
    ["dev", "--port", "http"],
    ["no-such-command"],
])
def test_bad_usage_exits_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_iptables_flags_parse_to_typed_values():
    a = build_parser().parse_args([
        "iptables", "--proxy-uid", "1337", "--inbound-port", "15006", "--outbound-port", "15001",
        "--exclude-inbound-ports", "15020,8081", "--exclude-outbound-cidrs", "169.254.169.254/32",
        "--dry-run"])
    assert (a.proxy_uid, a.proxy_gid, a.inbound_port, a.outbound_port, a.dry_run) == \
        (1337, None, 15006, 15001, True)
    assert tuple(a.exclude_inbound_ports) == (15020, 8081)
    assert [str(c) for c in a.exclude_outbound_cidrs] == ["169.254.169.254/32"]


def test_dev_certs_and_token_parsers():
    p = build_parser()
    d = p.parse_args(["dev"])
    assert (d.config, d.init, d.port, d.admin_port, d.color) == ("sidecar.dev.yaml", False, None, None, "auto")
    d = p.parse_args(["dev", "my.yaml", "--init", "--port", "0", "--admin-port", "9902", "--color", "never"])
    assert (d.config, d.init, d.port, d.admin_port, d.color) == ("my.yaml", True, 0, 9902, "never")
    c = p.parse_args(["certs", "issue", "--sa", "orders", "--ns", "shop", "--dns", "a", "--dns", "b",
                      "--ip", "127.0.0.1"])
    assert (c.certs_cmd, c.sa, c.ns, c.dns, c.ip, c.days, c.out) == \
        ("issue", "orders", "shop", ["a", "b"], ["127.0.0.1"], 30, "certs")
    dev = p.parse_args(["certs", "dev", "shop/orders", "shop/web"])
    assert dev.workloads == ["shop/orders", "shop/web"] and dev.dns == ["localhost"] and dev.ip == ["127.0.0.1"]
    t = p.parse_args(["token", "mint", "--secret", "s" * 32, "--claim", "a=1", "--claim", "b=x,y"])
    assert (t.token_cmd, t.ttl, t.claim) == ("mint", "1h", ["a=1", "b=x,y"])


def test_core_commands_do_not_load_the_extra_ones():
    p = build_parser(extra=False)
    with pytest.raises(SystemExit):
        p.parse_args(["certs", "ca"])
    assert p.parse_args(["version"]).cmd == "version"


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "usage: sidecar" in capsys.readouterr().out


def test_version(capsys):
    assert main(["version"]) == 0
    assert capsys.readouterr().out.startswith(f"sidecar {__version__} (python ")


# ---- validate -----------------------------------------------------------------------------------

def test_validate_a_good_file(tmp_path, capsys):
    path = write_yaml(tmp_path / "good.yaml", GOOD)
    assert main(["validate", "-c", path]) == 0
    assert capsys.readouterr().out.strip() == \
        f"{path}: OK (native format; 1 listener(s), 2 cluster(s))"


def test_validate_lists_every_error_with_its_path(tmp_path, capsys):
    doc = yaml.safe_load(yaml.safe_dump(GOOD))
    doc["clusters"][0]["endpoints"] = ["127.0.0.1:70000"]
    doc["clusters"][1]["endpoints"] = ["no-port"]
    doc["listeners"][0]["colour"] = "blue"
    path = write_yaml(tmp_path / "bad.yaml", doc)
    assert main(["validate", "-c", path]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert lines[0] == f"{path}: 3 error(s)"
    assert sorted(line.strip().split(":")[0] for line in lines[1:]) == \
        ["clusters[0].endpoints[0]", "clusters[1].endpoints[0]", "listeners[0].colour"]
    assert "  listeners[0].colour: unknown or unsupported field" in lines


def test_validate_reports_errors_found_only_when_building_the_routes(tmp_path, capsys):
    (tmp_path / "boom.py").write_text(BOOM_FILTER)
    doc = yaml.safe_load(yaml.safe_dump(GOOD))
    doc["listeners"][0]["filters"] = [{"python": {"module": "boom.py", "class": "Boom"}}]
    path = write_yaml(tmp_path / "boom.yaml", doc)
    assert main(["validate", "-c", path]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{path}: 1 error(s)")
    assert "listeners[0].filters[0].python" in err and "cannot start" in err


def test_validate_an_envoy_file_and_unreadable_ones(tmp_path, capsys):
    envoy = {"static_resources": {"listeners": [], "clusters": [{
        "name": "api", "connect_timeout": "1s", "type": "STATIC",
        "load_assignment": {"cluster_name": "api", "endpoints": [{"lb_endpoints": [{"endpoint": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": 8081}}}}]}]}}]}}
    path = tmp_path / "envoy.json"
    path.write_text(json.dumps(envoy))
    assert main(["validate", "-c", str(path)]) == 0
    assert "OK (envoy format; 0 listener(s), 1 cluster(s))" in capsys.readouterr().out
    assert main(["validate", "-c", str(tmp_path / "missing.yaml")]) == 1
    assert "cannot read" in capsys.readouterr().err
    broken = tmp_path / "broken.yaml"
    broken.write_text("listeners: [\n")
    assert main(["validate", "-c", str(broken)]) == 1
    assert "not valid YAML/JSON" in capsys.readouterr().err


def test_run_refuses_an_invalid_file_before_binding(tmp_path, capsys):
    doc = yaml.safe_load(yaml.safe_dump(GOOD))
    doc["clusters"][0]["endpoints"] = ["nowhere"]
    path = write_yaml(tmp_path / "bad.yaml", doc)
    assert main(["run", "-c", path, "--concurrency", "1"]) == 1
    err = capsys.readouterr().err
    assert f"invalid config {path}" in err and "clusters[0].endpoints[0]" in err


# ---- certs --------------------------------------------------------------------------------------

def uri_sans_of(path) -> list[str]:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def test_certs_ca_issue_show(tmp_path, capsys):
    out = tmp_path / "pki"
    assert main(["certs", "ca", "--out", str(out), "--trust-domain", "shop.test"]) == 0
    assert uri_sans_of(out / "ca.pem") == ["spiffe://shop.test"]
    assert stat.S_IMODE((out / "ca-key.pem").stat().st_mode) == 0o600
    assert main(["certs", "ca", "--out", str(out)]) == 1                 # never overwritten...
    assert "--force" in capsys.readouterr().err
    assert main(["certs", "issue", "--out", str(out), "--ns", "shop", "--sa", "orders",
                 "--dns", "orders.shop"]) == 0
    assert uri_sans_of(out / "orders.pem") == ["spiffe://shop.test/ns/shop/sa/orders"]
    assert stat.S_IMODE((out / "orders-key.pem").stat().st_mode) == 0o600
    capsys.readouterr()
    assert main(["certs", "show", str(out / "orders.pem")]) == 0
    shown = capsys.readouterr().out
    assert "san:       URI:spiffe://shop.test/ns/shop/sa/orders" in shown
    assert "san:       DNS:orders.shop" in shown and "ca:        no" in shown


def test_certs_errors_have_exit_codes(tmp_path, capsys):
    assert main(["certs", "issue", "--out", str(tmp_path / "empty"), "--sa", "x"]) == 1
    assert "no CA in" in capsys.readouterr().err
    assert main(["certs", "ca", "--out", str(tmp_path), "--trust-domain", "Bad Domain"]) == 2
    assert main(["certs", "ca", "--out", str(tmp_path)]) == 0
    assert main(["certs", "issue", "--out", str(tmp_path), "--sa", "Not_Lower!"]) == 2
    assert "service account" in capsys.readouterr().err
    assert main(["certs", "show", str(tmp_path / "absent.pem")]) == 1


def test_certs_dev_keeps_an_existing_ca(tmp_path, capsys):
    assert main(["certs", "dev", "--out", str(tmp_path), "--trust-domain", "a.test", "shop/web"]) == 0
    ca_before = (tmp_path / "ca.pem").read_bytes()
    assert main(["certs", "dev", "--out", str(tmp_path), "--trust-domain", "b.test", "api"]) == 0
    assert (tmp_path / "ca.pem").read_bytes() == ca_before
    assert uri_sans_of(tmp_path / "api.pem") == ["spiffe://a.test/ns/default/sa/api"]


# ---- token --------------------------------------------------------------------------------------

def test_token_keygen_then_mint_verifies_with_the_jwks(tmp_path, capsys):
    assert main(["token", "keygen", "--out", str(tmp_path), "--kind", "ec", "--kid", "k1"]) == 0
    capsys.readouterr()
    jwks = json.loads((tmp_path / "jwks.json").read_text())
    assert [(k["kid"], k["alg"], k["kty"]) for k in jwks["keys"]] == [("k1", "ES256", "EC")]
    assert stat.S_IMODE((tmp_path / "demo-key.pem").stat().st_mode) == 0o600
    assert main(["token", "mint", "--key", str(tmp_path / "demo-key.pem"), "--kid", "k1",
                 "--iss", "https://issuer.test", "--aud", "api", "--sub", "alice", "--ttl", "15m",
                 "--claim", "groups=admin,dev", "--claim", "level=3", "--claim", "beta=true"]) == 0
    token = capsys.readouterr().out.strip()
    key = jwt.PyJWK(jwks["keys"][0])
    claims = jwt.decode(token, key.key, algorithms=["ES256"], audience="api", issuer="https://issuer.test")
    assert jwt.get_unverified_header(token)["kid"] == "k1"
    assert (claims["sub"], claims["groups"], claims["level"], claims["beta"]) == \
        ("alice", ["admin", "dev"], 3, True)
    assert claims["exp"] - claims["iat"] == 900


def test_token_mint_with_a_secret_and_a_bad_claim(capsys):
    secret = "s" * 32
    assert main(["token", "mint", "--secret", secret, "--sub", "bob"]) == 0
    token = capsys.readouterr().out.strip()
    assert jwt.decode(token, secret, algorithms=["HS256"])["sub"] == "bob"
    assert main(["token", "mint", "--secret", secret, "--claim", "novalue"]) == 2
    assert "expected NAME=VALUE" in capsys.readouterr().err
