"""Path normalisation before filters and routing (Envoy's ``normalize_path``, ``merge_slashes``
and ``path_with_escaped_slashes_action``), so that RBAC, routing and the upstream all see the
same path: ``//admin/x``, ``/./admin/x``, ``/public/../admin`` and ``/%61dmin`` are ``/admin...``
for every one of them.

The order is Envoy's (``ConnectionManagerUtility::maybeNormalizePath``): escaped slashes first,
then RFC 3986 normalisation, then slash merging. Normalisation follows what Envoy does with
Chromium's URL canonicaliser (checked against Envoy 1.40 in
``tests/conformance/http1_differential/test_path_normalization.py``): ``\\`` is a ``/``;
percent-encoded unreserved characters are decoded, other escapes are kept; bytes
that may not appear in a path are percent-encoded; ``.`` and ``..`` segments (also written
``%2e``) are removed (RFC 3986 5.2.4). Only the path is touched, never the query.
"""

from __future__ import annotations

from dataclasses import dataclass

KEEP_UNCHANGED = "KEEP_UNCHANGED"
REJECT_REQUEST = "REJECT_REQUEST"
UNESCAPE_AND_REDIRECT = "UNESCAPE_AND_REDIRECT"

_HEX = "0123456789ABCDEFabcdef"
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# bytes a canonical path carries percent-encoded (controls, SP, '"', '#', '<', '>', '?', '^',
# '`', '{', '|', '}', DEL and everything above 0x7F: Chromium's path table, as Envoy does)
_ESCAPE = frozenset([chr(c) for c in range(0x21)] + list(' "#<>?^`{|}') + [chr(0x7F)]
                    + [chr(c) for c in range(0x80, 0x100)])


@dataclass(frozen=True, slots=True)
class PathPolicy:
    """A listener's path normalisation settings (all off by default, as in Envoy)."""

    normalize: bool = False
    merge_slashes: bool = False
    escaped_slashes: str = KEEP_UNCHANGED

    @property
    def active(self) -> bool:
        return self.normalize or self.merge_slashes or self.escaped_slashes != KEEP_UNCHANGED


REJECT = "reject"
REDIRECT = "redirect"


def apply(policy: PathPolicy, path: str) -> tuple[str, str | None]:
    """``(new path, None)``, or ``(new path, REJECT | REDIRECT)`` when the request must be
    refused (400) or redirected to the new path (307)."""
    action = None
    if path[:1] != "/":
        return path, None        # asterisk-form (OPTIONS *): nothing to normalise
    if policy.escaped_slashes != KEEP_UNCHANGED and "%" in path:
        unescaped = unescape_slashes(path)
        if unescaped != path:
            if policy.escaped_slashes == REJECT_REQUEST:
                return path, REJECT
            if policy.escaped_slashes == UNESCAPE_AND_REDIRECT:
                action = REDIRECT
            path = unescaped
    if policy.normalize:
        try:
            path = canonical_path(path)
        except InvalidPath:
            return path, REJECT
    if policy.merge_slashes and "//" in path:
        path = merge_slashes(path)
    return path, action


def unescape_slashes(path: str) -> str:
    """``%2F`` / ``%5C`` (any case) -> ``/`` / ``\\``."""
    if "%2" not in path and "%5" not in path:
        return path
    out = []
    i, n = 0, len(path)
    while i < n:
        c = path[i]
        if c == "%" and i + 2 < n:
            code = path[i + 1:i + 3].upper()
            if code == "2F":
                out.append("/")
                i += 3
                continue
            if code == "5C":
                out.append("\\")
                i += 3
                continue
        out.append(c)
        i += 1
    return "".join(out)


def merge_slashes(path: str) -> str:
    out = []
    prev = ""
    for c in path:
        if c == "/" and prev == "/":
            continue
        out.append(c)
        prev = c
    return "".join(out)


class InvalidPath(ValueError):
    """The path cannot be normalised (an escaped NUL): the request is refused, as by Envoy."""


def canonical_path(path: str) -> str:
    """RFC 3986 normalisation of an origin-form path, as Envoy's ``normalize_path``; raises
    ``InvalidPath`` for a path Envoy refuses."""
    # 1. characters: backslashes are slashes, escapes of unreserved characters are decoded,
    #    other escapes get upper-case hex, bytes not allowed in a path are escaped. A "."
    #    written as %2E is decoded here, so step 2 sees it as a dot.
    out: list[str] = []
    i, n = 0, len(path)
    while i < n:
        c = path[i]
        if c == "%":
            h = path[i + 1:i + 3]
            if len(h) == 2 and h[0] in _HEX and h[1] in _HEX:
                ch = chr(int(h, 16))
                if ch == "\x00":
                    raise InvalidPath(path)
                out.append(ch if ch in _UNRESERVED else "%" + h)
                i += 3
                continue
            out.append("%")
        elif c == "\\":
            out.append("/")
        elif c in _ESCAPE:
            out.append("".join(f"%{b:02X}" for b in c.encode("latin-1")))
        else:
            out.append(c)
        i += 1
    # 2. dot segments (RFC 3986 5.2.4)
    segments = "".join(out).split("/")
    stack: list[str] = []
    last = len(segments) - 1
    for k, seg in enumerate(segments[1:], 1):
        if seg == ".":
            if k == last:
                stack.append("")
        elif seg == "..":
            if stack:
                stack.pop()
            if k == last:
                stack.append("")
        else:
            stack.append(seg)
    return "/" + "/".join(stack)
