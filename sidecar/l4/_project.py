"""The Kafka broker filter's only imports from the rest of the project, kept in one place.

The redesign moves ConfigError to ``sidecar.config.errors``: change this line then.
"""

from sidecar.errors import ConfigError

__all__ = ("ConfigError",)
