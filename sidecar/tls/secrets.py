"""Secrets by name (SDS): the certificates and CAs TLS contexts refer to as ``cert_secret`` /
``ca_secret``, as the control plane last delivered them.

One ``SecretStore`` per process. The control-plane client (``control_plane_client.sds``)
puts checked secrets in; TLS contexts (``sidecar.tls.context``) read them when they build
and compare a per-name generation number on each new connection, so a rotated certificate is
used from the next handshake on while open connections keep the one they were set up with.

PEM never goes to disk: ``ssl`` loads certificate chains only from paths, so the chain and
key are written to anonymous memory files (``memfd_create``) that are closed right after the
load (elsewhere: a private 0700 directory, the files removed at once).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import ssl
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from sidecar.config.tls import Secret, TlsCertificateSecret, ValidationSecret


@dataclass(frozen=True, slots=True)
class SecretVersion:
    secret: Secret
    version: str            # the xDS version_info that delivered it
    not_after: float        # unix time the (leaf or first CA) certificate expires
    received_at: float


class MissingSecret(ssl.SSLError):
    """A context needs a secret that has not arrived (its handshakes fail until it does)."""


class SecretStore:
    def __init__(self) -> None:
        self._current: dict[str, SecretVersion] = {}
        self._generation: dict[str, int] = {}
        self.on_update: list[Callable[[str, SecretVersion], None]] = []

    def get(self, name: str) -> SecretVersion | None:
        return self._current.get(name)

    def generation(self, name: str) -> int:
        return self._generation.get(name, 0)

    def names(self) -> list[str]:
        return sorted(self._current)

    def put(self, name: str, sv: SecretVersion) -> bool:
        """Store a new version; False (and nothing happens) if the content is the same."""
        old = self._current.get(name)
        if old is not None and old.secret == sv.secret:
            return False
        self._current[name] = sv
        self._generation[name] = self._generation.get(name, 0) + 1
        for cb in self.on_update:
            cb(name, sv)
        return True

    def tls_certificate(self, name: str) -> TlsCertificateSecret:
        sv = self._current.get(name)
        if sv is None or not isinstance(sv.secret, TlsCertificateSecret):
            raise MissingSecret(f"secret {name!r} (a tls_certificate) has not arrived")
        return sv.secret

    def validation_context(self, name: str) -> ValidationSecret:
        sv = self._current.get(name)
        if sv is None or not isinstance(sv.secret, ValidationSecret):
            raise MissingSecret(f"secret {name!r} (a validation_context) has not arrived")
        return sv.secret


@contextlib.contextmanager
def _memory_file(data: bytes) -> Iterator[str]:
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is not None:
        fd = memfd_create("sidecar-secret", getattr(os, "MFD_CLOEXEC", 0))
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    d = tempfile.mkdtemp(prefix="sidecar-secret-")        # 0700
    try:
        path = os.path.join(d, "pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        yield path
    finally:
        shutil.rmtree(d, ignore_errors=True)


def load_chain(ctx: ssl.SSLContext, s: TlsCertificateSecret) -> None:
    with _memory_file(s.certificate_chain) as chain, _memory_file(s.private_key) as key:
        ctx.load_cert_chain(chain, key)


def load_ca(ctx: ssl.SSLContext, s: ValidationSecret) -> None:
    ctx.load_verify_locations(cadata=s.trusted_ca.decode("ascii", "replace"))


def days_left(sv: SecretVersion, now: float | None = None) -> float:
    return (sv.not_after - (time.time() if now is None else now)) / 86400.0
