"""Errors of the Kafka codec."""

from __future__ import annotations


class KafkaCodecError(Exception):
    """Base of the Kafka codec's errors."""


class KafkaFramingError(KafkaCodecError):
    """The byte stream is not Kafka framing (e.g. a negative length): it cannot be resynced."""


class KafkaDecodeError(KafkaCodecError):
    """A frame's header or body does not decode under its (api key, version) definition."""


class UnsupportedApiVersion(KafkaDecodeError):
    """No published definition of this (api key, version) is known to the codec."""
