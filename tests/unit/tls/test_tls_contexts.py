"""TLS contexts without sockets: handshakes run between two ``ssl.SSLObject``s over memory BIOs,
with certificates made by the dev CA (``sidecar.cli.certs.DevCA``).

Covers server and client contexts (mTLS, required client certificates, ALPN, the pinned SPIFFE
URI SANs), the peer identity helper, the file-stamp reload (a rotated pair is picked up, a
half-rotated pair keeps the previous context until it is consistent), load errors naming the
file, and contexts built from SDS secrets (failing handshakes until the secrets arrive, then
rotating)."""

from __future__ import annotations

import os
import ssl
import time
from pathlib import Path

import pytest

from sidecar.cli.certs import DevCA, Workload
from sidecar.config.tls import DownstreamTls, TlsCertificateSecret, UpstreamTls, ValidationSecret
from sidecar.tls.context import (
    ReloadingContext,
    TlsLoadError,
    client_context,
    peer_uri_san,
    server_context,
    uri_sans,
)
from sidecar.tls.secrets import SecretStore, SecretVersion

TD = "mesh.test"


@pytest.fixture(scope="module")
def ca() -> DevCA:
    return DevCA.create(TD)


def write(ca: DevCA, d: Path, name: str, wl: Workload) -> tuple[str, str, str]:
    ca_path, _ = ca.write(str(d))
    cert, key = wl.write(str(d), name)
    return cert, key, ca_path


def handshake(server: ssl.SSLContext, client: ssl.SSLContext,
              sni: str = "server.local") -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """Drive both ends of a handshake through memory BIOs; raises what either end raised."""
    s_in, s_out, c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    s = server.wrap_bio(s_in, s_out, server_side=True)
    c = client.wrap_bio(c_in, c_out, server_side=False, server_hostname=sni)
    done = {"s": False, "c": False}
    for _ in range(20):
        for name, obj in (("c", c), ("s", s)):
            if not done[name]:
                try:
                    obj.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        if c_out.pending:
            s_in.write(c_out.read())
        if s_out.pending:
            c_in.write(s_out.read())
        if all(done.values()) and not c_out.pending and not s_out.pending:
            return s, c
    raise AssertionError("handshake did not finish")


@pytest.fixture(scope="module")
def pki(ca: DevCA, tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("pki")
    server_cert, server_key, ca_path = write(ca, d, "server", ca.issue("shop", "orders", dns=["server.local"]))
    client_cert, client_key, _ = write(ca, d, "client", ca.issue("shop", "web"))
    other = DevCA.create("other.test")
    stranger_cert, stranger_key = other.issue("x", "stranger").write(str(d), "stranger")
    return {"ca": ca_path, "server_cert": server_cert, "server_key": server_key,
            "client_cert": client_cert, "client_key": client_key,
            "stranger_cert": stranger_cert, "stranger_key": stranger_key}


def mtls_server(pki, require: bool = True, alpn: tuple[str, ...] = ()) -> ReloadingContext:
    return server_context(DownstreamTls(pki["server_cert"], pki["server_key"], ca_file=pki["ca"],
                                        require_client_cert=require, alpn=alpn))


def client(pki, cert: str = "client", **kw) -> ReloadingContext:
    return client_context(UpstreamTls(ca_file=pki["ca"], cert_file=pki[f"{cert}_cert"],
                                      key_file=pki[f"{cert}_key"], **kw))


# ---- handshakes ---------------------------------------------------------------------------------

def test_mtls_handshake_gives_each_side_the_others_spiffe_identity(pki):
    s, c = handshake(mtls_server(pki), client(pki))
    assert peer_uri_san(s) == f"spiffe://{TD}/ns/shop/sa/web"
    assert uri_sans(c.getpeercert()) == [f"spiffe://{TD}/ns/shop/sa/orders"]
    assert s.version() in ("TLSv1.2", "TLSv1.3") and s.selected_alpn_protocol() == "http/1.1"


def test_a_client_without_a_certificate_is_refused_when_one_is_required(pki):
    no_cert = client_context(UpstreamTls(ca_file=pki["ca"]))
    with pytest.raises(ssl.SSLError):
        handshake(mtls_server(pki, require=True), no_cert)
    s, _ = handshake(mtls_server(pki, require=False), no_cert)   # optional: let in, no identity
    assert peer_uri_san(s) is None


def test_a_client_certificate_from_another_ca_is_refused(pki):
    with pytest.raises(ssl.SSLError):
        handshake(mtls_server(pki, require=False), client(pki, "stranger"))


def test_a_server_from_another_ca_is_refused_by_a_verifying_client(pki):
    stranger_server = server_context(DownstreamTls(pki["stranger_cert"], pki["stranger_key"]))
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(stranger_server, client(pki))
    _, c = handshake(stranger_server, client_context(UpstreamTls(verify=False)))
    assert c.getpeercert(binary_form=True)          # not verified, but connected


def test_pinned_san_uris_accept_the_expected_identity_only(pki):
    good = client(pki, match_san_uris=(f"spiffe://{TD}/ns/shop/sa/orders",))
    handshake(mtls_server(pki), good)
    bad = client(pki, match_san_uris=(f"spiffe://{TD}/ns/shop/sa/payments",))
    with pytest.raises(ssl.SSLCertVerificationError) as e:
        handshake(mtls_server(pki), bad)
    assert e.value.reason == "SAN_MISMATCH"
    assert f"spiffe://{TD}/ns/shop/sa/orders" in str(e.value)


def test_check_hostname_verifies_the_sni_against_the_dns_sans(pki):
    checking = client(pki, check_hostname=True)
    handshake(mtls_server(pki), checking, sni="server.local")
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(mtls_server(pki), checking, sni="elsewhere.local")


def test_alpn_the_servers_preference_wins(pki):
    s, c = handshake(mtls_server(pki, alpn=("h2", "http/1.1")), client(pki, alpn=()))
    assert s.selected_alpn_protocol() == "http/1.1"     # the client offered http/1.1 only
    h2_client = client_context(UpstreamTls(ca_file=pki["ca"], cert_file=pki["client_cert"],
                                           key_file=pki["client_key"]), alpn=("http/1.1", "h2"))
    s, _ = handshake(mtls_server(pki, alpn=("h2", "http/1.1")), h2_client)
    assert s.selected_alpn_protocol() == "h2"


def test_tls13_floor_is_applied(pki):
    ctx = server_context(DownstreamTls(pki["server_cert"], pki["server_key"], min_version="TLSv1_3"))
    assert ctx.current.minimum_version == ssl.TLSVersion.TLSv1_3
    assert server_context(DownstreamTls(pki["server_cert"], pki["server_key"])).current.minimum_version \
        == ssl.TLSVersion.TLSv1_2


# ---- peer identity helper -----------------------------------------------------------------------

class _Peer:
    def __init__(self, cert):
        self.cert = cert

    def getpeercert(self):
        if isinstance(self.cert, Exception):
            raise self.cert
        return self.cert


def test_peer_uri_san_prefers_a_spiffe_id_then_any_uri():
    both = {"subjectAltName": (("DNS", "a"), ("URI", "https://id.example/x"), ("URI", "spiffe://td/ns/a/sa/b"))}
    assert peer_uri_san(_Peer(both)) == "spiffe://td/ns/a/sa/b"
    assert peer_uri_san(_Peer({"subjectAltName": (("URI", "urn:x"),)})) == "urn:x"
    assert peer_uri_san(_Peer({"subjectAltName": (("DNS", "only.dns"),)})) is None
    assert peer_uri_san(_Peer(None)) is None
    assert peer_uri_san(_Peer(ValueError("handshake not done"))) is None


# ---- reload from files ----------------------------------------------------------------------------

def replace_file(path: str, data: bytes) -> None:
    """As a rotation tool writes: a new file moved into place (a new inode, whatever the clock)."""
    tmp = path + ".new"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def served_identity(server: ReloadingContext, pki) -> str:
    _, c = handshake(server, client_context(UpstreamTls(ca_file=pki["ca"])))
    return uri_sans(c.getpeercert())[0]


def test_a_rotated_pair_is_served_from_the_next_check(ca, pki, tmp_path):
    cert, key = ca.issue("shop", "v1", dns=["server.local"]).write(str(tmp_path), "srv")
    server = server_context(DownstreamTls(cert, key))
    first = server.current
    assert server.reloader.force_check() is first          # nothing changed: same context
    assert served_identity(server, pki).endswith("/sa/v1")
    ca.issue("shop", "v2", dns=["server.local"]).write(str(tmp_path), "srv")
    assert server.reloader.force_check() is not first
    assert server.reloader.reloads == 1
    assert served_identity(server, pki).endswith("/sa/v2")


def test_a_half_rotated_pair_keeps_the_previous_certificate_until_consistent(ca, pki, tmp_path, caplog):
    cert, key = ca.issue("shop", "v1", dns=["server.local"]).write(str(tmp_path), "srv")
    server = server_context(DownstreamTls(cert, key))
    old = server.current
    new = ca.issue("shop", "v2", dns=["server.local"])
    replace_file(cert, new.cert_pem)       # the certificate first: it does not match the key yet
    assert server.reloader.force_check() is old
    assert server.reloader.reloads == 0 and server.reloader.failed_stamp is not None
    assert served_identity(server, pki).endswith("/sa/v1")
    assert server.reloader.force_check() is old
    refused = [r for r in caplog.records if "cannot be loaded" in r.getMessage()]
    assert len(refused) == 1                              # the same bad files are not retried
    replace_file(key, new.key_pem)
    assert server.reloader.force_check() is not old
    assert server.reloader.reloads == 1 and server.reloader.failed_stamp is None
    assert served_identity(server, pki).endswith("/sa/v2")


def test_a_deleted_file_keeps_the_previous_context(ca, pki, tmp_path):
    cert, key = ca.issue("shop", "v1", dns=["server.local"]).write(str(tmp_path), "srv")
    server = server_context(DownstreamTls(cert, key))
    old = server.current
    os.remove(key)
    assert server.reloader.force_check() is old
    assert served_identity(server, pki).endswith("/sa/v1")


def test_the_stamp_follows_a_symlink_swap(ca, pki, tmp_path):
    """Kubernetes secret volumes swap a ``..data`` symlink: the stamp must follow the link."""
    for v in ("a", "b"):
        ca.issue("shop", f"sa-{v}", dns=["server.local"]).write(str(tmp_path / v), "tls")
    link = tmp_path / "current"
    link.symlink_to(tmp_path / "a")
    server = server_context(DownstreamTls(str(link / "tls.pem"), str(link / "tls-key.pem")))
    assert served_identity(server, pki).endswith("/sa/sa-a")
    tmp = tmp_path / "next"
    tmp.symlink_to(tmp_path / "b")
    os.replace(tmp, link)
    server.reloader.force_check()
    assert served_identity(server, pki).endswith("/sa/sa-b")


def test_missing_or_bad_files_at_start_are_load_errors_naming_the_file(pki, tmp_path):
    with pytest.raises(TlsLoadError) as e:
        server_context(DownstreamTls(str(tmp_path / "nope.pem"), pki["server_key"]))
    assert "nope.pem" in str(e.value)
    with pytest.raises(TlsLoadError) as e:
        server_context(DownstreamTls(pki["server_cert"], pki["client_key"]))      # not its key
    assert pki["server_cert"] in str(e.value)
    with pytest.raises(TlsLoadError) as e:
        client_context(UpstreamTls(ca_file=str(tmp_path / "missing-ca.pem")))
    assert "missing-ca.pem" in str(e.value)
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(TlsLoadError) as e:
        client_context(UpstreamTls(ca_file=str(junk)))
    assert "junk.pem" in str(e.value)
    assert isinstance(e.value, OSError)        # refused like a bind failure on reload


# ---- SDS secrets ------------------------------------------------------------------------------------

def cert_secret(name: str, wl: Workload) -> SecretVersion:
    return SecretVersion(TlsCertificateSecret(name, wl.cert_pem, wl.key_pem), "v", 0.0, time.time())


def test_a_secret_context_fails_handshakes_until_its_secrets_arrive_then_rotates(ca, pki):
    store = SecretStore()
    server = server_context(DownstreamTls("", "", cert_secret="server-cert", ca_secret="mesh-ca"), store)
    verifying = client(pki)
    with pytest.raises(ssl.SSLError):
        handshake(server, verifying)                       # no certificate yet
    store.put("server-cert", cert_secret("server-cert", ca.issue("shop", "sds1", dns=["server.local"])))
    with pytest.raises(ssl.SSLError):
        handshake(server, verifying)                       # the CA secret is still missing
    store.put("mesh-ca", SecretVersion(ValidationSecret("mesh-ca", ca.cert_pem), "v", 0.0, time.time()))
    s, c = handshake(server, verifying)
    assert uri_sans(c.getpeercert()) == [f"spiffe://{TD}/ns/shop/sa/sds1"]
    assert peer_uri_san(s) == f"spiffe://{TD}/ns/shop/sa/web"    # client verified against the secret CA
    assert server.reloader.reloads == 0                    # the first build is not a rotation
    assert not store.put("mesh-ca", SecretVersion(ValidationSecret("mesh-ca", ca.cert_pem), "v2", 0.0, 0.0))
    store.put("server-cert", cert_secret("server-cert", ca.issue("shop", "sds2", dns=["server.local"])))
    _, c = handshake(server, verifying)
    assert uri_sans(c.getpeercert()) == [f"spiffe://{TD}/ns/shop/sa/sds2"]
    assert server.reloader.reloads == 1
