"""``sidecar certs``: a development CA and workload certificates with SPIFFE identities.

For local use and tests only (a real mesh gets its certificates from its CA / SPIRE / cert-manager).
The CA certificate carries the trust domain as its URI SAN (``spiffe://<trust-domain>``); each
workload certificate carries ``spiffe://<trust-domain>/ns/<ns>/sa/<sa>`` as its URI SAN, plus any
DNS names and IP addresses asked for, and is valid both as a server and as a client certificate
(sidecars use the same certificate in both directions of mTLS). Keys are ECDSA P-256.

    sidecar certs ca    --out certs --trust-domain example.org
    sidecar certs issue --out certs --ns shop --sa orders --dns orders.shop --ip 127.0.0.1
    sidecar certs dev   --out certs --trust-domain example.org shop/orders shop/web
    sidecar certs show  certs/orders.pem
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT = "ca.pem"
CA_KEY = "ca-key.pem"
_LABEL = re.compile(r"^[a-z0-9]([a-z0-9._-]*[a-z0-9])?$")


def spiffe_id(trust_domain: str, ns: str, sa: str) -> str:
    return f"spiffe://{trust_domain}/ns/{ns}/sa/{sa}"


def _check_label(kind: str, v: str) -> str:
    if not _LABEL.match(v):
        raise ValueError(f"{kind} {v!r} must be lower-case letters, digits, '.', '_' or '-'")
    return v


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass
class Workload:
    spiffe_id: str
    cert_pem: bytes
    key_pem: bytes

    def write(self, out_dir: str, name: str) -> tuple[str, str]:
        """Write ``<name>.pem`` and ``<name>-key.pem`` (0600); returns their paths."""
        os.makedirs(out_dir, exist_ok=True)
        cert_path = os.path.join(out_dir, f"{name}.pem")
        key_path = os.path.join(out_dir, f"{name}-key.pem")
        _write(key_path, self.key_pem, 0o600)
        _write(cert_path, self.cert_pem, 0o644)
        return cert_path, key_path


def _write(path: str, data: bytes, mode: int) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)      # readers (cert reload) never see a half-written file


class DevCA:
    """A self-signed CA that signs workload certificates."""

    def __init__(self, key, cert: x509.Certificate, trust_domain: str):
        self.key = key
        self.cert = cert
        self.trust_domain = trust_domain

    @classmethod
    def create(cls, trust_domain: str = "cluster.local", days: int = 365,
               common_name: str = "sidecar dev CA") -> "DevCA":
        _check_label("trust domain", trust_domain)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sidecar dev"),
                          x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = _now()
        cert = (x509.CertificateBuilder()
                .subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + dt.timedelta(days=days))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False,
                                             encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]), critical=False)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256()))
        return cls(key, cert, trust_domain)

    @classmethod
    def load(cls, directory: str) -> "DevCA":
        with open(os.path.join(directory, CA_CERT), "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        with open(os.path.join(directory, CA_KEY), "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
        td = "cluster.local"
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
                if uri.startswith("spiffe://"):
                    td = uri[len("spiffe://"):].strip("/")
        except x509.ExtensionNotFound:
            pass
        return cls(key, cert, td)

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def write(self, directory: str) -> tuple[str, str]:
        os.makedirs(directory, exist_ok=True)
        cert_path = os.path.join(directory, CA_CERT)
        key_path = os.path.join(directory, CA_KEY)
        _write(key_path, _key_pem(self.key), 0o600)
        _write(cert_path, self.cert_pem, 0o644)
        return cert_path, key_path

    def issue(self, ns: str = "default", sa: str = "default", *, dns: Iterable[str] = (),
              ips: Iterable[str] = (), days: int = 30, uri: str | None = None,
              not_before: dt.datetime | None = None) -> Workload:
        """A workload certificate for ``spiffe://<td>/ns/<ns>/sa/<sa>`` (or ``uri``)."""
        if uri is None:
            uri = spiffe_id(self.trust_domain, _check_label("namespace", ns),
                            _check_label("service account", sa))
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri)]
        sans += [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        now = _now() if not_before is None else not_before
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sidecar dev"),
                                         x509.NameAttribute(NameOID.COMMON_NAME, f"{sa}.{ns}")]))
                .issuer_name(self.cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + dt.timedelta(days=days))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False,
                                             key_agreement=True, content_commitment=False,
                                             data_encipherment=False, key_cert_sign=False,
                                             crl_sign=False, encipher_only=False,
                                             decipher_only=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                               critical=False)
                .sign(self.key, hashes.SHA256()))
        return Workload(uri, cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def describe(path: str) -> str:
    """Subject, SANs and validity of the certificates in a PEM file (``sidecar certs show``)."""
    with open(path, "rb") as f:
        certs = x509.load_pem_x509_certificates(f.read())
    lines = []
    for c in certs:
        lines.append(f"subject:   {c.subject.rfc4514_string()}")
        lines.append(f"issuer:    {c.issuer.rfc4514_string()}")
        try:
            san = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            for g in san:
                kinds: dict[type, str] = {x509.UniformResourceIdentifier: "URI", x509.DNSName: "DNS",
                                          x509.IPAddress: "IP"}
                kind = kinds.get(type(g), type(g).__name__)
                lines.append(f"san:       {kind}:{g.value}")
        except x509.ExtensionNotFound:
            pass
        lines.append(f"valid:     {c.not_valid_before_utc:%Y-%m-%d %H:%M} .. "
                     f"{c.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
        try:
            bc = c.extensions.get_extension_for_class(x509.BasicConstraints).value
            lines.append(f"ca:        {'yes' if bc.ca else 'no'}")
        except x509.ExtensionNotFound:
            pass
    return "\n".join(lines)


# ---- command line -------------------------------------------------------------------------------

def add_parser(sub) -> None:
    p = sub.add_parser("certs", help="make a dev CA and workload certificates (SPIFFE URI SANs)",
                       description=__doc__, formatter_class=_RawFormatter)
    csub = p.add_subparsers(dest="certs_cmd")
    ca = csub.add_parser("ca", help="create a dev CA (ca.pem, ca-key.pem)")
    ca.add_argument("--out", default="certs", help="directory (default: ./certs)")
    ca.add_argument("--trust-domain", default="cluster.local")
    ca.add_argument("--days", type=int, default=365)
    ca.add_argument("--force", action="store_true", help="replace an existing CA")
    ca.set_defaults(func=_cmd_ca)
    iss = csub.add_parser("issue", help="issue a workload certificate signed by the dev CA")
    iss.add_argument("--out", default="certs", help="where the CA is and the cert goes")
    iss.add_argument("--ca-dir", default=None, help="the CA's directory (default: --out)")
    iss.add_argument("--ns", default="default", help="namespace in the SPIFFE ID")
    iss.add_argument("--sa", required=True, help="service account in the SPIFFE ID")
    iss.add_argument("--name", default=None, help="file name stem (default: the service account)")
    iss.add_argument("--dns", action="append", default=[], help="a DNS SAN (repeatable)")
    iss.add_argument("--ip", action="append", default=[], help="an IP SAN (repeatable)")
    iss.add_argument("--days", type=int, default=30)
    iss.set_defaults(func=_cmd_issue)
    dev = csub.add_parser("dev", help="a CA (kept if present) and one certificate per NS/SA")
    dev.add_argument("workloads", nargs="*", metavar="NS/SA",
                     help="workloads, e.g. shop/orders (default: default/default)")
    dev.add_argument("--out", default="certs")
    dev.add_argument("--trust-domain", default="cluster.local")
    dev.add_argument("--dns", action="append", default=["localhost"])
    dev.add_argument("--ip", action="append", default=["127.0.0.1"])
    dev.add_argument("--days", type=int, default=30)
    dev.set_defaults(func=_cmd_dev)
    show = csub.add_parser("show", help="print a certificate's subject, SANs and validity")
    show.add_argument("file")
    show.set_defaults(func=_cmd_show)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


class _RawFormatter(argparse.RawDescriptionHelpFormatter):
    pass


def _cmd_ca(args) -> int:
    if os.path.exists(os.path.join(args.out, CA_CERT)) and not args.force:
        print(f"{os.path.join(args.out, CA_CERT)} exists (use --force to replace it)", file=sys.stderr)
        return 1
    try:
        ca = DevCA.create(args.trust_domain, days=args.days)
    except ValueError as e:
        print(f"sidecar certs: {e}", file=sys.stderr)
        return 2
    cert, key = ca.write(args.out)
    print(f"CA for trust domain {ca.trust_domain}: {cert} (key {key})")
    return 0


def _load_ca(directory: str) -> DevCA | None:
    try:
        return DevCA.load(directory)
    except FileNotFoundError:
        print(f"no CA in {directory} (create one with: sidecar certs ca --out {directory})",
              file=sys.stderr)
        return None


def _cmd_issue(args) -> int:
    ca = _load_ca(args.ca_dir or args.out)
    if ca is None:
        return 1
    try:
        wl = ca.issue(args.ns, args.sa, dns=args.dns, ips=args.ip, days=args.days)
    except ValueError as e:
        print(f"sidecar certs: {e}", file=sys.stderr)
        return 2
    cert, key = wl.write(args.out, args.name or args.sa)
    print(f"{wl.spiffe_id}: {cert} (key {key})")
    return 0


def _cmd_dev(args) -> int:
    try:
        if os.path.exists(os.path.join(args.out, CA_CERT)):
            ca = DevCA.load(args.out)
            print(f"using the CA in {args.out} (trust domain {ca.trust_domain})")
        else:
            ca = DevCA.create(args.trust_domain)
            ca.write(args.out)
            print(f"CA for trust domain {ca.trust_domain}: {os.path.join(args.out, CA_CERT)}")
        for w in args.workloads or ["default/default"]:
            ns, sep, sa = w.partition("/")
            if not sep:
                ns, sa = "default", w
            wl = ca.issue(ns, sa, dns=args.dns, ips=args.ip, days=args.days)
            cert, _ = wl.write(args.out, sa)
            print(f"{wl.spiffe_id}: {cert}")
    except ValueError as e:
        print(f"sidecar certs: {e}", file=sys.stderr)
        return 2
    return 0


def _cmd_show(args) -> int:
    try:
        print(describe(args.file))
    except (OSError, ValueError) as e:
        print(f"sidecar certs: cannot read {args.file}: {e}", file=sys.stderr)
        return 1
    return 0
