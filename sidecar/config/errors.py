"""Config errors carry the path to the bad field, e.g.
``clusters[2].endpoints[0].port: must be 1..65535``."""

from __future__ import annotations


class ConfigError(Exception):
    """One bad field. ``path`` is dotted with [index] for list items."""

    def __init__(self, path: str, message: str):
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


class ConfigErrors(Exception):
    """Every error found in one config; raised after collecting all of them."""

    def __init__(self, errors: list[ConfigError]):
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))


class ErrorCollector:
    """Collects ConfigErrors so that `sidecar validate` lists all of them, not just the first."""

    def __init__(self) -> None:
        self.errors: list[ConfigError] = []

    def add(self, path: str, message: str) -> None:
        self.errors.append(ConfigError(path, message))

    def capture(self, exc: ConfigError | ConfigErrors) -> None:
        if isinstance(exc, ConfigErrors):
            self.errors.extend(exc.errors)
        else:
            self.errors.append(exc)

    def raise_if_any(self) -> None:
        if self.errors:
            raise ConfigErrors(self.errors)
