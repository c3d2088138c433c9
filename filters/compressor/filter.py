"""The compressor filter: which responses are compressed, and streaming compression."""

from __future__ import annotations

from filters.compressor.config import CompressorConfig, CompressorPerRoute
from sidecar import sdk

_BODYLESS = frozenset((204, 304))


class _Chain:
    """The compressor filters one request went through (outermost first) and the encoding
    chosen for its response, decided once for all of them (Envoy's filter-state registry)."""

    __slots__ = ("filters", "decision")

    def __init__(self) -> None:
        self.filters: list[CompressorFilter] = []
        self.decision: str | None = None


class CompressorState:
    __slots__ = ("chains", "responses", "bytes")

    def __init__(self, env: sdk.FilterEnv):
        self.chains: dict[int, _Chain] = {}      # id(request context) -> its chain, in flight
        self.responses = sdk.counter(env.metrics, "sidecar_compressor_responses_total",
                                     "Responses seen by compressor filters, by outcome",
                                     ("encoding", "result"))
        self.bytes = sdk.counter(env.metrics, "sidecar_compressor_bytes_total",
                                 "Body bytes through compressor filters, before and after",
                                 ("encoding", "stage"))


def _parse_accept(value: str) -> list[tuple[str, float]]:
    out = []
    for token in value.split(","):
        name, _, params = token.partition(";")
        name = name.strip().lower()
        if not name:
            continue
        q = 1.0
        if params:
            k, eq, v = params.partition("=")
            if eq and k.strip().lower() == "q":
                try:
                    q = float(v.strip())
                except ValueError:
                    continue              # an unparseable q-value: the token is skipped
        out.append((name, q))
    return out


def _media_type(headers: sdk.Headers) -> str:
    ct = headers.get("content-type")
    return ct.split(";")[0].strip().lower() if ct else ""


def choose_encoding(accept: str, filters: list[CompressorFilter], media_type: str) -> str:
    """The encoding for a response: Envoy's ``chooseEncoding`` ("identity" for none)."""
    allowed: dict[str, CompressorFilter] = {}
    for f in filters:
        if media_type and media_type not in f.content_types:
            continue
        allowed.setdefault(f.encoding, f)
    pairs = _parse_accept(accept)
    for name, q in pairs:
        if q == 0.0:
            allowed.pop(name, None)
    if not pairs or not allowed:
        return "identity"
    choice, best = "identity", 0.0
    for name, q in pairs:
        if name not in allowed and name not in ("identity", "*"):
            continue
        if q > best or (q == best and name in allowed and allowed[name].choose_first
                        and not (choice in allowed and allowed[choice].choose_first)):
            choice, best = name, q
    if best == 0.0 or choice == "identity":
        return "identity"
    if choice == "*":
        return next(iter(allowed))
    return choice


class CompressorFilter(sdk.Filter):
    __slots__ = ("config", "library", "encoding", "content_types", "choose_first",
                 "remove_accept", "state", "compressed", "skipped", "bytes_in", "bytes_out")

    def __init__(self, config: CompressorConfig, per_route: CompressorPerRoute | None,
                 state: CompressorState):
        self.config = config
        self.library = per_route.library if per_route and per_route.library else config.library
        self.encoding = self.library.encoding
        self.content_types = config.content_types
        self.choose_first = config.choose_first
        self.remove_accept = config.remove_accept_encoding if per_route is None \
            or per_route.remove_accept_encoding is None else per_route.remove_accept_encoding
        self.state = state
        self.compressed = state.responses.labels(self.encoding, "compressed")
        self.skipped = state.responses.labels(self.encoding, "not_compressed")
        self.bytes_in = state.bytes.labels(self.encoding, "uncompressed")
        self.bytes_out = state.bytes.labels(self.encoding, "compressed")

    async def __call__(self, req: sdk.Request, next: sdk.Handler) -> sdk.Response:
        accept = req.headers.get("accept-encoding")
        if self.remove_accept:
            req.headers.popall("accept-encoding", None)
        chains = self.state.chains
        key = id(req.ctx)
        chain = chains.get(key)
        owner = chain is None
        if chain is None:
            chain = chains[key] = _Chain()
        chain.filters.append(self)
        try:
            resp = await next(req)
        finally:
            if owner:
                del chains[key]
        if self._should_compress(req, resp, accept, chain):
            self._compress(resp)
            self.compressed.inc()
        else:
            self.skipped.inc()
        return resp

    def _should_compress(self, req: sdk.Request, resp: sdk.Response, accept: str | None,
                         chain: _Chain) -> bool:
        """Envoy's order: a response that could be compressed gets ``Vary: Accept-Encoding``
        whatever the client accepts; then the client's choice decides."""
        h = resp.headers
        status = resp.status
        if (req.method == "HEAD" or status < 200 or status in _BODYLESS
                or status in self.config.uncompressible_codes or "content-encoding" in h):
            return False
        body = resp.body
        length = h.get("content-length")
        if length is not None:
            if not length.isdigit() or int(length) < self.config.min_length or int(length) == 0:
                return False
        elif isinstance(body, bytes) and len(body) < max(self.config.min_length, 1):
            return False
        media = _media_type(h)
        if media and media not in self.content_types:
            return False
        cc = h.get("cache-control")
        if cc and any(t.strip().lower() == "no-transform" for t in cc.split(",")):
            return False
        if self.config.disable_on_etag and "etag" in h:
            return False
        te = h.get("transfer-encoding")
        if te and any(t.strip().lower() in (self.encoding, "gzip", "deflate")
                      for t in te.split(",")):
            return False
        _add_vary(h)
        if accept is None:
            return False
        if chain.decision is None:
            chain.decision = choose_encoding(accept, chain.filters, media)
        return chain.decision == self.encoding

    def _compress(self, resp: sdk.Response) -> None:
        h = resp.headers
        etag = h.get("etag")
        if etag is not None and len(etag) > 2 and etag[:2] not in ("W/", "w/"):
            if self.config.weaken_etag:
                h["etag"] = "W/" + etag
            else:
                h.popall("etag")
        h.popall("content-length", None)
        h["content-encoding"] = self.encoding
        stream = self.library.new()
        body = resp.body
        if isinstance(body, bytes):
            out = stream.whole(body)
            self.bytes_in.inc(len(body))
            self.bytes_out.inc(len(out))
            resp.body = out
            return
        bytes_in, bytes_out = self.bytes_in, self.bytes_out

        def transform(chunk: bytes) -> bytes:
            out = stream.compress(chunk)
            bytes_in.inc(len(chunk))
            bytes_out.inc(len(out))
            return out

        def finish() -> bytes:
            out = stream.finish()
            bytes_out.inc(len(out))
            return out

        resp.body = sdk.TransformedBody(body, transform, finish)


def _add_vary(h: sdk.Headers) -> None:
    vary = h.get("vary")
    if vary is None:
        h["vary"] = "Accept-Encoding"            # Envoy's spelling
    elif not any(t.strip().lower() == "accept-encoding" for t in vary.split(",")):
        h["vary"] = vary + ", Accept-Encoding"


def new_state(env: sdk.FilterEnv) -> CompressorState:
    return CompressorState(env)


def build(config: CompressorConfig, per_route: CompressorPerRoute | None,
          state: CompressorState, env: sdk.FilterEnv,
          route: sdk.RouteInfo) -> CompressorFilter | None:
    if not config.enabled:
        return None
    return CompressorFilter(config, per_route, state)
