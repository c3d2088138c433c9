"""The one set of matchers: string and header matchers, and their two parsers (Envoy, native).

Routes, RBAC, JWT rules, rate-limit descriptors and the fault filter all use these, so a
matcher means the same thing everywhere. Envoy semantics: ``ignore_case`` applies to exact /
prefix / suffix / contains and has no effect on ``safe_regex`` (write ``(?i)`` in the regex);
a header present several times is matched against its values joined with ``,``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from sidecar.config import wire as w
from sidecar.config.errors import ConfigError


@dataclass(frozen=True, slots=True)
class StringMatcher:
    """Envoy's StringMatcher: exact / prefix / suffix / contains / safe_regex."""

    exact: str | None = None
    prefix: str | None = None
    suffix: str | None = None
    contains: str | None = None
    regex: re.Pattern[str] | None = None
    ignore_case: bool = False          # the literal above is stored lower-cased

    def matches(self, value: str) -> bool:
        if self.regex is not None:
            return self.regex.fullmatch(value) is not None
        if self.ignore_case:
            value = value.lower()
        if self.exact is not None:
            return value == self.exact
        if self.prefix is not None:
            return value.startswith(self.prefix)
        if self.suffix is not None:
            return value.endswith(self.suffix)
        if self.contains is not None:
            return self.contains in value
        return True


@dataclass(frozen=True, slots=True)
class HeaderMatcher:
    """Envoy's HeaderMatcher. ``name`` is lower-case; pseudo-headers (``:method``, ``:path``,
    ``:authority``, ``:scheme``) are resolved by the caller's value getter."""

    name: str
    value: StringMatcher | None = None      # None (with present None): the header is present
    present: bool | None = None
    invert: bool = False
    range_start: int | None = None           # range_match [start, end)
    range_end: int | None = None
    missing_as_empty: bool = False           # treat_missing_header_as_empty

    def matches_value(self, v: str | None) -> bool:
        """Match one (joined) header value, None when the header is absent."""
        if self.present is not None:
            ok = (v is not None) == self.present
        else:
            if v is None and self.missing_as_empty:
                v = ""
            if v is None:
                ok = False
            elif self.range_start is not None and self.range_end is not None:
                try:
                    ok = self.range_start <= int(v) < self.range_end
                except ValueError:
                    ok = False
            else:
                ok = self.value is None or self.value.matches(v)
        return ok != self.invert

    def matches(self, headers: Mapping[str, str]) -> bool:
        return self.matches_value(joined_header(headers, self.name))


def joined_header(headers: Mapping[str, str], name: str) -> str | None:
    """A header's value, several occurrences joined with ``,`` (Envoy's view); None if absent."""
    getall = getattr(headers, "getall", None)
    if getall is None:
        return headers.get(name)
    values = getall(name, None)
    if values is None:
        return None
    return values[0] if len(values) == 1 else ",".join(values)


@dataclass(frozen=True, slots=True)
class QueryMatcher:
    name: str
    value: StringMatcher | None = None
    present: bool = True


def _literal(kind: str, value: str, ignore_case: bool) -> StringMatcher:
    """A literal matcher of ``kind`` (exact, prefix, suffix, contains)."""
    if kind == "exact":
        return StringMatcher(exact=value, ignore_case=ignore_case)
    if kind == "prefix":
        return StringMatcher(prefix=value, ignore_case=ignore_case)
    if kind == "suffix":
        return StringMatcher(suffix=value, ignore_case=ignore_case)
    return StringMatcher(contains=value, ignore_case=ignore_case)


# ---- Envoy (envoy.type.matcher.v3 / envoy.config.route.v3) -------------------------------------

_STRING_KINDS = ("exact", "prefix", "suffix", "contains", "safe_regex")


def _regex(d: object, path: str) -> re.Pattern[str]:
    r = w.check_keys(d, ("regex", "google_re2"), path)
    w.google_re2(r, path)
    return w.compile_regex(w.string(r, "regex", path), w.join(path, "regex"))


def string_matcher_from_envoy(d: object, path: str) -> StringMatcher:
    """``envoy.type.matcher.v3.StringMatcher``."""
    m = w.check_keys(d, (*_STRING_KINDS, "ignore_case"), path)
    kind = w.one_of(m, _STRING_KINDS, path)
    if kind == "safe_regex":
        w.boolean(m, "ignore_case", path, False)      # no effect on safe_regex, as in Envoy
        return StringMatcher(regex=_regex(m["safe_regex"], w.join(path, "safe_regex")))
    assert kind is not None
    ic = w.boolean(m, "ignore_case", path, False)
    s = w.string(m, kind, path)
    return _literal(kind, s.lower() if ic else s, ic)


_HEADER_KINDS = ("exact_match", "safe_regex_match", "range_match", "present_match",
                 "prefix_match", "suffix_match", "contains_match", "string_match")


def header_matcher_from_envoy(d: object, path: str) -> HeaderMatcher:
    """``envoy.config.route.v3.HeaderMatcher``."""
    m = w.check_keys(d, ("name", *_HEADER_KINDS, "invert_match", "treat_missing_header_as_empty"),
                     path)
    name = w.string(m, "name", path, nonempty=True).lower()
    invert = w.boolean(m, "invert_match", path, False)
    empty = w.boolean(m, "treat_missing_header_as_empty", path, False)
    kind = w.one_of(m, _HEADER_KINDS, path, required=False)
    if kind is None:
        return HeaderMatcher(name=name, invert=invert, missing_as_empty=empty)
    kp = w.join(path, kind)
    if kind == "present_match":
        return HeaderMatcher(name=name, present=w.boolean(m, kind, path), invert=invert)
    if kind == "range_match":
        r = w.check_keys(m[kind], ("start", "end"), kp)
        start, end = w.integer(r, "start", kp), w.integer(r, "end", kp)
        if end <= start:
            raise ConfigError(w.join(kp, "end"), "must be greater than start ([start, end))")
        return HeaderMatcher(name=name, range_start=start, range_end=end, invert=invert,
                             missing_as_empty=empty)
    if kind == "string_match":
        sm = string_matcher_from_envoy(m[kind], kp)
    elif kind == "safe_regex_match":
        sm = StringMatcher(regex=_regex(m[kind], kp))
    else:
        sm = _literal(kind[: -len("_match")], w.string(m, kind, path), False)
    return HeaderMatcher(name=name, value=sm, invert=invert, missing_as_empty=empty)


# ---- native ----------------------------------------------------------------------------------

_NATIVE_KINDS = ("exact", "prefix", "suffix", "contains", "regex")


def string_matcher_from_native(v: object, path: str) -> StringMatcher:
    """A string is an exact match; a mapping picks exact/prefix/suffix/contains/regex, with
    ``ignore_case`` for the literal kinds."""
    if isinstance(v, str):
        return StringMatcher(exact=v)
    m = w.check_keys(v, (*_NATIVE_KINDS, "ignore_case"), path)
    kind = w.one_of(m, _NATIVE_KINDS, path)
    if kind == "regex":
        if w.boolean(m, "ignore_case", path, False):
            raise ConfigError(w.join(path, "ignore_case"),
                              "does not apply to regex (write (?i) in the regex)")
        return StringMatcher(regex=w.compile_regex(m["regex"], w.join(path, "regex")))
    assert kind is not None
    ic = w.boolean(m, "ignore_case", path, False)
    s = w.string(m, kind, path)
    return _literal(kind, s.lower() if ic else s, ic)


def header_matcher_from_native(d: object, path: str) -> HeaderMatcher:
    """``{name, exact|prefix|suffix|contains|regex|present, ignore_case, invert}``."""
    m = w.check_keys(d, ("name", *_NATIVE_KINDS, "present", "ignore_case", "invert"), path)
    name = w.string(m, "name", path, nonempty=True).lower()
    invert = w.boolean(m, "invert", path, False)
    if "present" in m:
        return HeaderMatcher(name=name, present=w.boolean(m, "present", path), invert=invert)
    rest = {k: x for k, x in m.items() if k not in ("name", "invert")}
    if not rest:
        return HeaderMatcher(name=name, invert=invert)
    return HeaderMatcher(name=name, value=string_matcher_from_native(rest, path), invert=invert)


def header_matchers_from_native(v: object, path: str) -> tuple[HeaderMatcher, ...]:
    """``{name: value}`` (exact, or a string-matcher mapping) or a list of header matchers."""
    if isinstance(v, dict):
        return tuple(HeaderMatcher(name=str(name).lower(),
                                   value=string_matcher_from_native(val, w.join(path, str(name))))
                     for name, val in v.items())
    if not isinstance(v, list):
        raise ConfigError(path, "must be a mapping of name: value or a list of matchers")
    return tuple(header_matcher_from_native(h, w.join(path, i)) for i, h in enumerate(v))
