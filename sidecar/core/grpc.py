"""gRPC shapes of messages the proxy makes itself (Envoy's local replies to gRPC clients),
shared by the route layers and the codecs (a stream timeout a codec answers), and the typed
ends of the unary calls the proxy makes to gRPC services (``EnvoyGrpcService``, ``GrpcReply``,
the framing helpers; the client itself is ``sidecar.cluster.grpc``)."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote

from multidict import MultiDict

from sidecar.core.message import Request, Response

# Envoy's Grpc::Utility::httpToGrpcStatus
_HTTP_TO_GRPC = {400: 13, 401: 16, 403: 7, 404: 12, 429: 14, 502: 14, 503: 14, 504: 14}


def is_grpc(req: Request) -> bool:
    ct = req.headers.get("content-type")
    return ct is not None and ct.startswith("application/grpc")


def grpc_message(text: str) -> str:
    """gRPC's percent-encoding of ``grpc-message`` (printable ASCII except ``%`` kept)."""
    if all(" " <= c <= "~" and c != "%" for c in text):
        return text
    return "".join(c if " " <= c <= "~" and c != "%" else
                   "".join(f"%{b:02X}" for b in c.encode("utf-8")) for c in text)


def grpc_local_reply(resp: Response) -> Response:
    """A local reply to a gRPC request, as Envoy sends it: HTTP 200, trailers-only (one
    HEADERS frame over HTTP/2, ``content-length: 0`` over HTTP/1.1), the gRPC status from the
    HTTP status (Envoy's ``httpToGrpcStatus``) and the reply body as ``grpc-message``; other
    headers of the reply (``www-authenticate``, ``x-envoy-overloaded``) are kept."""
    if "grpc-status" in resp.headers:
        return resp
    body = resp.body if isinstance(resp.body, bytes) else b""
    h = MultiDict(resp.headers)
    h.popall("content-length", None)
    h["content-type"] = "application/grpc"
    h["grpc-status"] = str(_HTTP_TO_GRPC.get(resp.status, 2))
    if body:
        h["grpc-message"] = grpc_message(body.decode("utf-8", "replace"))
    out = Response(200, h, b"")
    out.local = True
    return out


def grpc_reply(status: int, message: str) -> Response:
    """A local reply with an explicit gRPC status (e.g. DEADLINE_EXCEEDED)."""
    h: MultiDict[str] = MultiDict()
    h["content-type"] = "application/grpc"
    h["grpc-status"] = str(status)
    if message:
        h["grpc-message"] = grpc_message(message)
    out = Response(200, h, b"")
    out.local = True
    return out


# ---- unary gRPC calls the proxy makes (ext_authz, rate limit service) ----------------------

GRPC_OK = 0
GRPC_UNKNOWN = 2
GRPC_DEADLINE_EXCEEDED = 4
GRPC_RESOURCE_EXHAUSTED = 8
GRPC_INTERNAL = 13
GRPC_UNAVAILABLE = 14
# gRPC's own default limit on a received message (Envoy has none by default)
DEFAULT_MAX_RECEIVE_BYTES = 4 * 1024 * 1024


def http_to_grpc_status(status: int) -> int:
    """Envoy's ``Grpc::Utility::httpToGrpcStatus``."""
    return _HTTP_TO_GRPC.get(status, GRPC_UNKNOWN)


@dataclass(frozen=True, slots=True)
class EnvoyGrpcService:
    """Envoy's ``GrpcService`` with ``envoy_grpc``: a gRPC service reached through a cluster
    (its balancer, breakers, health, TLS and counters), which must speak HTTP/2."""

    cluster: str
    authority: str = ""                  # "" : the cluster's name (Envoy)
    initial_metadata: tuple[tuple[str, str], ...] = ()
    skip_envoy_headers: bool = False     # no x-envoy-internal / x-forwarded-for
    max_receive_bytes: int = DEFAULT_MAX_RECEIVE_BYTES


@dataclass(frozen=True, slots=True)
class GrpcReply:
    """How a unary call ended: ``status`` is its gRPC status (0: OK, ``payload`` then holds
    the response message, serialized); a call that could not be made or answered has the
    status Envoy's gRPC client gives it (UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL...)."""

    status: int
    message: str = ""
    payload: bytes = b""

    @property
    def ok(self) -> bool:
        return self.status == GRPC_OK


def grpc_frame(message: bytes) -> bytes:
    """One uncompressed gRPC message: flag byte 0, 4-byte big-endian length, the message."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def grpc_unframe(body: bytes) -> bytes | None:
    """The single uncompressed message of a unary response body (None when the body is not
    exactly one such message)."""
    if len(body) < 5 or body[0] != 0:
        return None
    n = int.from_bytes(body[1:5], "big")
    if len(body) != 5 + n:
        return None
    return body[5:]


def grpc_timeout(seconds: float) -> str:
    """``grpc-timeout`` as Envoy writes it (``Grpc::Common::toGrpcTimeout``): milliseconds,
    moving to a larger unit when the value needs more than 8 digits."""
    value = max(0, int(seconds * 1000))
    for unit, factor in (("m", 1000), ("S", 60), ("M", 60), ("H", 1)):
        if value < 100_000_000:
            return f"{value}{unit}"
        value //= factor
    return f"{min(value, 99_999_999)}H"


def grpc_message_decode(text: str) -> str:
    """The inverse of ``grpc_message``'s percent-encoding."""
    return unquote(text) if "%" in text else text
