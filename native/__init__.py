"""The C engine (bytes, TLS, HTTP/2 framing) and its thin Python API. Python owns policy; C owns bytes."""

from native.engine import Engine, EngineError, Event, crypto_version

__all__ = ["Engine", "EngineError", "Event", "crypto_version"]
