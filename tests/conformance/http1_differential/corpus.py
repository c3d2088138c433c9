"""All cases, in a fixed order: requests, mutations, responses."""

from __future__ import annotations

from .cases import Case
from .mutations import CASES as MUTATION_CASES
from .requests_corpus import CASES as REQUEST_CASES
from .responses_corpus import CASES as RESPONSE_CASES

ALL: list[Case] = [*REQUEST_CASES, *MUTATION_CASES, *RESPONSE_CASES]
BY_NAME: dict[str, Case] = {c.name: c for c in ALL}
assert len(BY_NAME) == len(ALL), "case names must be unique"
