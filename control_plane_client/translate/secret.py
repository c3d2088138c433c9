"""Envoy v3 ``Secret`` (``envoy.extensions.transport_sockets.tls.v3.Secret``) -> the secret model.

What SDS delivers (and what ``static_resources.secrets`` holds): a ``tls_certificate``
(certificate chain + private key) or a ``validation_context`` (trusted CA). Each piece is a
DataSource: ``inline_bytes`` (base64 in JSON), ``inline_string`` or ``filename`` (read now).
The PEM is checked here, so a bad secret is a NACK naming the field, never a broken context:
the chain must hold certificates, the key must be the chain's first certificate's, the CA must
hold CA certificates. Everything else a Secret may carry (session ticket keys, generic secrets,
private key providers, OCSP staples, SAN matchers inside the secret) is refused by name.
"""

from __future__ import annotations

import base64
import binascii

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from sidecar.config import wire as w
from sidecar.config.errors import ConfigError
from sidecar.config.tls import Secret, TlsCertificateSecret, ValidationSecret

T_SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"

MAX_PEM = 1 << 20


def data_source(d: object, path: str) -> bytes:
    src = w.check_keys(d, ("filename", "inline_bytes", "inline_string", "environment_variable",
                           "watched_directory"), path)
    kind = w.one_of(src, ("filename", "inline_bytes", "inline_string", "environment_variable"),
                    path)
    kp = w.join(path, str(kind))
    if "watched_directory" in src:
        raise ConfigError(w.join(path, "watched_directory"), "is not supported")
    if kind == "inline_bytes":
        try:
            data = base64.b64decode(w.string(src, "inline_bytes", path), validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(kp, "is not base64") from None
    elif kind == "inline_string":
        data = w.string(src, "inline_string", path).encode()
    elif kind == "filename":
        name = w.string(src, "filename", path, nonempty=True)
        try:
            with open(name, "rb") as f:
                data = f.read(MAX_PEM + 1)
        except OSError as e:
            raise ConfigError(kp, f"cannot read {name}: {e.strerror or e}") from None
    else:
        raise ConfigError(kp, "is not supported (secrets are never taken from the environment "
                          "of the proxy by reference)")
    if len(data) > MAX_PEM:
        raise ConfigError(kp, "is larger than 1 MiB")
    return data


def _certificates(pem: bytes, path: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as e:
        raise ConfigError(path, f"is not PEM certificates: {e}") from None
    return certs


def secret(d: dict, path: str) -> Secret:
    """One Secret (by name) -> TlsCertificateSecret or ValidationSecret, checked."""
    w.check_keys(d, ("@type", "name", "tls_certificate", "validation_context",
                     "session_ticket_keys", "generic_secret"), path)
    name = w.string(d, "name", path, nonempty=True)
    kind = w.one_of(d, ("tls_certificate", "validation_context", "session_ticket_keys",
                        "generic_secret"), path)
    kp = w.join(path, str(kind))
    if kind == "tls_certificate":
        tc = w.check_keys(d[kind], ("certificate_chain", "private_key", "password",
                                    "private_key_provider", "ocsp_staple",
                                    "signed_certificate_timestamp", "watched_directory",
                                    "pkcs12"), kp)
        for field in ("password", "private_key_provider", "ocsp_staple",
                    "signed_certificate_timestamp", "watched_directory", "pkcs12"):
            if field in tc:
                raise ConfigError(w.join(kp, field), "is not supported")
        chain = data_source(w.mapping(tc, "certificate_chain", kp), w.join(kp, "certificate_chain"))
        key_pem = data_source(w.mapping(tc, "private_key", kp), w.join(kp, "private_key"))
        certs = _certificates(chain, w.join(kp, "certificate_chain"))
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as e:
            raise ConfigError(w.join(kp, "private_key"), f"is not an unencrypted PEM private "
                              f"key: {e}") from None
        pub = certs[0].public_key().public_bytes(serialization.Encoding.DER,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)
        if key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo) != pub:
            raise ConfigError(w.join(kp, "private_key"), "does not belong to the chain's first "
                              "certificate")
        return TlsCertificateSecret(name, chain, key_pem)
    if kind == "validation_context":
        vc = w.check_keys(d[kind], ("trusted_ca", "match_typed_subject_alt_names", "crl",
                                    "allow_expired_certificate", "trust_chain_verification",
                                    "custom_validator_config", "only_verify_leaf_cert_crl",
                                    "max_verify_depth", "verify_certificate_spki",
                                    "verify_certificate_hash", "watched_directory"), kp)
        for field in vc:
            if field != "trusted_ca":
                raise ConfigError(w.join(kp, field), "is not supported in an SDS secret (SAN "
                                  "matchers go in the TLS context's default_validation_context)")
        ca = data_source(w.mapping(vc, "trusted_ca", kp), w.join(kp, "trusted_ca"))
        for c in _certificates(ca, w.join(kp, "trusted_ca")):
            try:
                is_ca = c.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
            except x509.ExtensionNotFound:
                is_ca = False
            if not is_ca:
                raise ConfigError(w.join(kp, "trusted_ca"), f"holds a certificate that is not a "
                                  f"CA ({c.subject.rfc4514_string()})")
        return ValidationSecret(name, ca)
    raise ConfigError(kp, "is not supported (tls_certificate and validation_context are)")


def not_after(s: Secret) -> float:
    """When the secret stops being useful, as a unix time: its leaf certificate's expiry (a
    tls_certificate) or its first CA's to expire (a validation_context)."""
    if isinstance(s, TlsCertificateSecret):
        certs = x509.load_pem_x509_certificates(s.certificate_chain)[:1]   # the leaf
    else:
        certs = x509.load_pem_x509_certificates(s.trusted_ca)              # the first CA to expire
    return min(c.not_valid_after_utc.timestamp() for c in certs)
