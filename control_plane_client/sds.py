"""SDS over ADS: the secrets the config's TLS contexts name, kept current in the App's
``SecretStore`` (``sidecar.tls.secrets``).

* Subscription: the names of every ``cert_secret`` / ``ca_secret`` of the listeners and
  clusters in force (static and from the control plane), asked for on the ADS stream by name,
  after each applied snapshot.
* A response: every Secret translated and checked (``translate/secret.py``: PEM, key matches
  certificate, CA certificates); one bad Secret refuses the whole response (a NACK naming it)
  and nothing changes. Accepted secrets replace the held ones by name (a name missing from a
  response keeps its secret, as for any by-name xDS type); a changed one bumps its generation,
  so TLS contexts use it from their next handshake on, while open connections go on with the
  certificate they were set up with.
* Readiness: ``/ready`` is 503 while a named secret has not arrived (its listener's handshakes
  fail until then); once ready, its detail lists each certificate's expiry.
* Metrics: ``sidecar_xds_updates_total{type="sds"}`` and, per secret,
  ``sidecar_tls_certificate_expiry_timestamp_seconds`` and
  ``sidecar_tls_secret_updates_total``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from control_plane_client import resources as R
from control_plane_client.sources.transport import Transport
from control_plane_client.translate.secret import not_after, secret
from sidecar.config.errors import ConfigError, ConfigErrors
from sidecar.config.snapshot import Snapshot
from sidecar.config.tls import Secret, TlsCertificateSecret
from sidecar.core.metrics import MetricFactory
from sidecar.tls.secrets import SecretStore, SecretVersion, days_left

log = logging.getLogger("sidecar.xds.sds")

EXPIRY_WARNING_DAYS = 7.0


def secret_names(snap: Snapshot) -> frozenset[str]:
    names: set[str] = set()
    for lst in snap.listeners:
        if lst.tls is not None:
            names.update(lst.tls.secrets)
    for c in snap.clusters:
        if c.tls is not None:
            names.update(c.tls.secrets)
    return frozenset(names)


class SdsClient:
    """The secrets part of one control-plane client (the ADS transport is the client's)."""

    def __init__(self, store: SecretStore, transport: Transport, metrics: MetricFactory) -> None:
        self.store = store
        self.transport = transport
        self.wanted: frozenset[str] = frozenset()
        self.version = ""
        self.accepted = 0
        self.rejected = 0
        self.last_nack: dict | None = None
        self.m_on = metrics.enabled
        if self.m_on:
            self.m_updates = metrics.counter("sidecar_xds_updates_total",
                                             "xDS responses by resource type and outcome "
                                             "(accepted/rejected)", ("type", "outcome"))
            self.m_expiry = metrics.gauge("sidecar_tls_certificate_expiry_timestamp_seconds",
                                          "When a certificate from SDS expires (unix time): a "
                                          "tls_certificate's leaf, a validation_context's first CA",
                                          ("secret", "kind"))
            self.m_rotations = metrics.counter("sidecar_tls_secret_updates_total",
                                               "Secrets received with new content, by name",
                                               ("secret",))
            for o in ("accepted", "rejected"):
                self.m_updates.labels("sds", o)

    # ---- subscription ------------------------------------------------------------------------
    def follow(self, snap: Snapshot) -> None:
        names = secret_names(snap)
        if names == self.wanted:
            return
        self.wanted = names
        if names:
            self.transport.subscribe(R.SDS, names)
            log.info("SDS: subscribed to %s", ", ".join(sorted(names)))
        elif R.SDS in self.transport.subscriptions:
            self.transport.subscribe(R.SDS, frozenset())

    # ---- responses -----------------------------------------------------------------------------
    def parse(self, resources: Iterable[object]) -> list[Secret]:
        errors: list[ConfigError] = []
        out: list[Secret] = []
        seen: set[str] = set()
        for i, d in enumerate(resources):
            path = f"Secret[{i}]"
            try:
                if not isinstance(d, dict):
                    raise ConfigError(path, "resource must be a mapping")
                if d.get("@type") == R.T_RESOURCE_WRAPPER:
                    d = d.get("resource")
                    path += ".resource"
                    if not isinstance(d, dict):
                        raise ConfigError(path, "is required")
                if d.get("@type") not in (None, R.SDS):
                    raise ConfigError(f"{path}.@type", f"expected {R.SDS}")
                name = d.get("name")
                if isinstance(name, str) and name:
                    path = f"Secret {name!r}"
                s = secret(d, path)
                if s.name in seen:
                    raise ConfigError(path, "is in the response twice")
                seen.add(s.name)
                out.append(s)
            except ConfigError as e:
                errors.append(e)
            except (TypeError, ValueError, AttributeError, KeyError) as e:
                errors.append(ConfigError(path, f"malformed secret: {type(e).__name__}: {e}"))
        if errors:
            raise ConfigErrors(errors)
        return out

    def on_response(self, version: str, resources: list, error: str | None = None) -> str | None:
        """Check and store; None (ACK) or the reason (NACK)."""
        try:
            if error is not None:
                raise ConfigError("Secret", error)
            secrets = self.parse(resources)
        except (ConfigError, ConfigErrors) as e:
            err = R.error_text(e)
            self.rejected += 1
            self.last_nack = {"version": version, "error": err, "at": time.time()}
            if self.m_on:
                self.m_updates.labels("sds", "rejected").inc()
            log.error("SDS: version %s rejected, keeping version %s: %s", version or "-",
                      self.version or "-", err)
            return err
        now = time.time()
        for s in secrets:
            if s.name not in self.wanted:
                continue                  # not asked for (any more): ignored, as Envoy does
            sv = SecretVersion(s, version, not_after(s), now)
            if self.store.put(s.name, sv):
                kind = "tls_certificate" if isinstance(s, TlsCertificateSecret) else "validation_context"
                log.info("SDS: secret %s (%s) version %s, expires %s (in %.1f days)", s.name,
                         kind, version or "-", time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                             time.gmtime(sv.not_after)),
                         days_left(sv, now))
                if self.m_on:
                    self.m_expiry.labels(s.name, kind).set(sv.not_after)
                    self.m_rotations.labels(s.name).inc()
        self.version = version
        self.accepted += 1
        if self.m_on:
            self.m_updates.labels("sds", "accepted").inc()
        return None

    # ---- readiness -----------------------------------------------------------------------------
    def missing(self) -> list[str]:
        return sorted(n for n in self.wanted if self.store.get(n) is None)

    def not_ready_reason(self) -> str | None:
        missing = self.missing()
        if missing:
            return ("control plane: waiting for secrets " + ", ".join(missing) +
                    " (SDS); TLS handshakes that need them fail until they arrive")
        return None

    def expiry_note(self) -> str | None:
        """For /ready's detail: one line per certificate."""
        return "\n".join(self.expiry_notes()) or None

    def expiry_notes(self, now: float | None = None) -> list[str]:
        now = time.time() if now is None else now
        out = []
        for name in sorted(self.wanted):
            sv = self.store.get(name)
            if sv is None:
                continue
            left = days_left(sv, now)
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(sv.not_after))
            state = "EXPIRED" if left <= 0 else "expires soon" if left < EXPIRY_WARNING_DAYS \
                else "expires"
            out.append(f"certificate {name} (SDS version {sv.version or '-'}) {state} {when} "
                       f"(in {left:.1f} days)")
        return out

    def dump(self) -> dict:
        return {"version": self.version or None, "accepted": self.accepted,
                "rejected": self.rejected, "last_nack": self.last_nack,
                "subscribed": sorted(self.wanted),
                "secrets": [{"name": n, "version": sv.version, "not_after": sv.not_after,
                             "received_at": sv.received_at}
                            for n in self.store.names() if (sv := self.store.get(n)) is not None]}
