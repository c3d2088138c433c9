"""gRPC shapes of messages the proxy makes itself (Envoy's local replies to gRPC clients),
shared by the route layers and the codecs (a stream timeout a codec answers)."""

from __future__ import annotations

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
