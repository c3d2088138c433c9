"""The Kafka wire protocol: framing, headers, correlation, and message bodies.

Message layouts come from Kafka's published JSON definitions through the ``kio`` package
(see ``schema``); this package adds framing over arbitrary TCP chunks, header parsing,
correlation tracking and the few message edits a proxy needs (``messages``).
"""
